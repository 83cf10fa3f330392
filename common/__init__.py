"""The leaf package: what node, ledger, gateway and devnet all need, and nothing that needs them.

By rule, nothing here imports from node, ledger, gateway or devnet (tests/test_layering.py checks it),
and importing it stays cheap (no torch, web3 or transformers): the packages above re-use these
definitions instead of writing their own.

- `common.wire`: ids, hex, canonical JSON, SSE frames, the error body, the parser of untrusted JSON.
- `common.http`: the request-body limit, bounded reads of HTTP answers, error and event schemas.
- `common.settings`: the base of every service's settings (environment, then a TOML config file).
- `common.logs`: the one logging set-up; `common.serving`: uvicorn with a graceful stop, for every server.
- `common.identity`: identity files (an EVM account and an Ed25519 node key), read by every command that signs.
- `common.help_text`: every command's help, each paragraph one line for the terminal to wrap.
"""
