"""Usage capture: check the node's signed receipt, then write the request's completion record and its
usage record (the ledger outbox row) in one database transaction.

A request to the bare base model (no adapter) is recorded like any other, with the zero adapter id
(ledger.types.BASE_MODEL_ADAPTER_ID): the ledger prices it at its base price and credits the node.
The node's receipt for it says adapter_id null, and is checked to say so."""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import dataclass

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from gateway.models import CompletionRecord, RequestStatus
from ledger.outbox import OutboxError, add_usage_record
from ledger.types import BASE_MODEL_ADAPTER_ID
from node.receipts import ReceiptError, check_receipt

log = logging.getLogger(__name__)


class UsageError(RuntimeError):
    """A request end that could not be written to the database."""


@dataclass(slots=True)
class RequestEnd:
    """How one request ended, as the gateway saw it; receipt and signature come from the node."""

    request_id: str
    model: str
    adapter_id: str | None
    node_id: str | None
    status: str
    key_id: int | None = None
    finish_reason: str | None = None
    receipt: dict | None = None
    signature: str | None = None
    prompt_tokens: int = 0  # as streamed; the receipt's counts win when it verifies
    completion_tokens: int = 0
    attempts: int = 1
    ttft_ms: float | None = None
    latency_ms: float | None = None
    error: str | None = None


def check_served_receipt(end: RequestEnd, public_key: bytes | None) -> dict:
    """The receipt, once its signature verifies and it describes this request on this node."""
    if end.receipt is None or end.signature is None:
        raise ReceiptError("the node sent no receipt")
    if public_key is None:
        raise ReceiptError(f"no public key known for node {end.node_id}")
    check_receipt(end.receipt, end.signature, public_key)
    r = end.receipt
    for name, want in (("request_id", end.request_id), ("node_id", end.node_id), ("adapter_id", end.adapter_id)):
        if r[name] != want:
            raise ReceiptError(f"receipt {name} is {r[name]}, expected {want}")
    return r


class UsageRecorder:
    """Writes request ends. Call `record` from a worker thread (it blocks on the database)."""

    def __init__(self, engine: Engine, public_key_of) -> None:
        self.engine = engine
        self.public_key_of = public_key_of  # node id -> raw Ed25519 key (from its heartbeats) or None
        # SQLite has one writer at a time, and a writer that finds the lock taken sleeps in growing steps
        # (1, 2, 5, 10 ms...) before it retries: our own writers wait their turn here instead
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else nullcontext()

    def record(self, end: RequestEnd) -> str:
        """Write the completion record, and the usage record when the receipt verifies (base-model
        requests too, under the zero adapter id); returns "recorded" or "unreceipted"."""
        result = "recorded"
        receipt = None
        if end.node_id is not None and (end.receipt is not None or end.completion_tokens > 0):
            try:
                receipt = check_served_receipt(end, self.public_key_of(end.node_id))
            except ReceiptError as e:
                log.error("request %s on node %s: receipt refused: %s", end.request_id[:10], str(end.node_id)[:10], e)
                end.error = f"{end.error + '; ' if end.error else ''}receipt refused: {e}"
                end.status = RequestStatus.UNRECEIPTED if end.status == RequestStatus.OK else end.status
                result = "unreceipted"
        elif end.node_id is None:
            result = "unreceipted" if end.completion_tokens else "recorded"
        if receipt is not None:
            end.prompt_tokens, end.completion_tokens = receipt["prompt_tokens"], receipt["completion_tokens"]
            end.finish_reason = end.finish_reason or receipt["finish_reason"]
        row = CompletionRecord(
            request_id=end.request_id, key_id=end.key_id, model=end.model, adapter_id=end.adapter_id,
            node_id=end.node_id, status=end.status, finish_reason=end.finish_reason,
            prompt_tokens=end.prompt_tokens, completion_tokens=end.completion_tokens, attempts=end.attempts,
            ttft_ms=end.ttft_ms, latency_ms=end.latency_ms, error=end.error)  # fmt: skip
        try:
            with self._write_lock, Session(self.engine) as s:
                s.add(row)
                if receipt is not None:
                    adapter_id = BASE_MODEL_ADAPTER_ID if end.adapter_id is None else end.adapter_id
                    add_usage_record(s, request_id=end.request_id, adapter_id=adapter_id, node_id=end.node_id,
                                     prompt_tokens=receipt["prompt_tokens"],
                                     completion_tokens=receipt["completion_tokens"],
                                     receipt_json=receipt,
                                     node_signature=end.signature, gateway_key_id=end.key_id)  # fmt: skip
                s.commit()
        except (SQLAlchemyError, OutboxError) as e:
            raise UsageError(f"could not record request {end.request_id}: {e}") from e
        return result
