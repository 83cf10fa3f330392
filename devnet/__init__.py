"""The top of the import graph: the `loramesh` root command and everything for a network on one machine.

- cli.py: the root command (every package's commands under `loramesh`), its own `devnet` and `demo` commands,
  and the entry point that sets up logging once and turns errors into one line;
- anvil.py (the anvil process, dev keys, free ports), deploy.py (the contracts deployed and accounts funded),
  lifecycle.py (`loramesh devnet up|down|status`: a detached anvil kept in a folder);
- processes.py: child `loramesh ...` processes with logs, readiness waits and clean stops;
- demo/: `loramesh demo` (run.py reads top to bottom); data/: its two datasets, also the README's examples;
- explorer/: the attribution explorer, a read-only client of the chain and the gateway's ledger;
- toolchain/: the npm manifest of anvil and solc-js (installed into .tools/ by scripts/setup.sh).
"""
