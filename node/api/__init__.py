"""The node's HTTP API for gateways, publishers and operators (FastAPI). Contract (stable; the gateway depends on it):

Who may call what (401 unauthenticated / 403 not allowed, in the error shape below):
    gateway-signed   headers of node.request_auth.sign_request (X-Loramesh-Gateway-Key, -Timestamp, -Signature)
                     over method, path, this node's id and the raw body, from a key the node trusts (the
                     operator's --trust-gateway-key list, else the keys its --gateway URLs announce);
                     a timestamp more than 60 s off, or a signature already used, is refused.
    operator         `Authorization: Bearer <token>`, the token in <data dir>/operator.token.
    public           no credentials.

POST /v1/generate                            gateway-signed
    body (unknown fields -> 400): {"request_id": "0x"+64hex (optional; made if absent),
      "adapter_id": "0x"+64hex | null (base model), "prompt": str | "prompt_token_ids": [int],
      "max_tokens": int >= 1 = 16, "temperature": float in [0, 1e6] = 1.0 (0 = greedy), "top_p": (0, 1] = 1,
      "top_k": int >= 0 = 0 (off), "seed": int in [0, 2^64) | null, "stop": [str] (<= 4), "stream": bool = false,
      "cache_salt": str (1..256) | null: requests share cached prompt KV and compiled grammars only under one
      salt, and the other sampling, scoring and grammar fields of models.GenerateBody}
    Fields added after the first release (common.wire.GENERATE_FEATURES) are listed in /status's "features": a gateway
    sends one only to a node that lists it.
    A request id this node already runs or holds a receipt for: 409 "duplicate_request".
    non-stream 200: {"request_id", "adapter_id", "text", "token_ids", "finish_reason": "stop"|"length"|"abort",
      "usage": {"prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details": {"cached_tokens",
      "cache_write_tokens"}}, "receipt": {...}, "signature": hex}
    (an engine failure: 500 {"error": {...}, "receipt", "signature"} for the tokens produced)
    usage.prompt_tokens_details: of the prompt tokens, those read from the prefix cache, and those this request
      wrote into it (its full blocks not found there; each prompt counted once whatever n); shown, never billed.
      A node of before cache_write_tokens sends cached_tokens alone.
    stream (text/event-stream): `data: {"type":"token","index","text":str,"token_id":int}` per token (text
      holds only complete characters, possibly ""), `data: {"type":"finish","index","finish_reason"}` as each
      sequence ends (with "stop_string", the request's stop string that ended it, where one did: the feature
      "stop_string"), then `data: {"type":"done","finish_reason","usage","receipt","signature"}`; an engine
      failure sends `data: {"type":"error","message"}` before the done event.
      A client that disconnects aborts its request. A streaming request whose adapter is not ready within
      HEADERS_AFTER_S (fetched from peers) is answered 200 at once; an adapter or engine refusal then comes as
      `{"type":"error","message","code"}` and a done event with a signed 0-token receipt (so a slow fetch is
      not mistaken for a hung node by a gateway's first-byte timeout).
POST /v1/requests/{request_id}/abort         operator, or signed by the gateway key that started the request
      (another trusted gateway: 403 "not_request_owner")
      -> {"receipt", "signature"} for what was produced (404 if unknown).
GET  /v1/requests/{request_id}/receipt       public
      -> {"receipt", "signature", "public_key"}: the signed receipt of a
      recent request (the node keeps the last RECENT_RECEIPTS, also of requests whose client went away, so a
      gateway that died mid-request can still close it); 409 "request_running" while it runs, 404
      "receipt_not_found" for one this node does not know (or has forgotten). Public: request ids are
      unguessable and a receipt holds only counts.
POST /v1/adapters/{adapter_id}/load          operator, or gateway-signed (gateways prefetch)
      body optional {"pin": bool}, the operator's only (a gateway's: 403 "pin_refused")
      -> {"adapter_id", "slot", "pinned"}.
POST /v1/adapters                            operator (the daemon's app: create_app(uploads=...))
      body: the package as a flat, uncompressed tar of its plain files (node.upload.tar_package), at most
      node.upload.max_upload_bytes(--max-package-bytes); checked before any weight byte is written, then
      verified whole by the store -> {"adapter_id", "name", "signer", "announced": bool (offered to the p2p
      mesh)}. 400 "package_refused" (this machine's folders taken out of the message); 403
      "adapter_unregistered" when the node is on a chain and the adapter is not registered there or not signed
      by its registered owner; 500 "store_failed".
GET  /health -> {"status": "ok"}             public
GET  /status -> {"node_id", "public_key", "base_model": {"name", "id"}, "features": [str],
      "resident_adapters": [{"adapter_id", "name", "slot", "pinned"}], "cached_adapters": [{"adapter_id",
      "name"}], "free_slots", "num_slots", "queue_depth", "running", "tokens_per_s", "device", "usage":
      {"requests", "prompt_tokens", "completion_tokens"}}                  public
Bodies are read whole only up to a limit (413 "request_too_large"; generate 1 MiB by default, upload the package
limit) and parsed by common.wire.parse_json (size, nesting depth, duplicate keys), never by FastAPI's own JSON
decoding.
Errors: common.wire.error_body, {"error": {"message", "type", "param": null, "code"}}: 400 bad body / malformed
JSON / unknown field / prompt longer than the context (code "context_length_exceeded"); 401/403 as above; 404
adapter the node neither holds nor can fetch ("adapter_not_found"); 409 adapter for another base model
("adapter_base_mismatch"), duplicate request id or replayed signature; 422 adapter whose weights do not fit
("adapter_incompatible"); 503 no free slot ("slots_busy").
Receipts: see node/receipts.py (Ed25519 over canonical JSON; node_id = sha256(public_key)).

Layout (the FastAPI template's): main.py builds the app (lifespan, exception handlers), deps.py says who is
calling (the auth dependencies) and holds what the routes share, routes/ has one module per resource, models.py
the request bodies, book.py the requests this node took and the receipts it keeps.
"""

from node.api.main import create_app

__all__ = ["create_app"]
