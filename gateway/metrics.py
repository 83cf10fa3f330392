"""Prometheus metrics of one gateway app, on its own registry (several apps may share a process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway.settlement import RECORD_STATES

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """Requests by model and status, latency and time-to-first-token, tokens, routing, residency."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "loramesh_gateway_requests", "Requests by model (adapter name) and status.", ["model", "status"], registry=r
        )
        self.latency = Histogram(
            "loramesh_gateway_request_latency_seconds",
            "Request latency, end to end.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "loramesh_gateway_time_to_first_token_seconds",
            "Time to the first token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "loramesh_gateway_tokens",
            "Tokens served, by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=r,
        )
        self.routing = Counter(
            "loramesh_gateway_routing_decisions", "How the first node of a route was chosen.", ["decision"], registry=r
        )
        self.residency = Counter(
            "loramesh_gateway_residency",
            "Adapter resident on the chosen node (hit) or not.",
            ["model", "result"],
            registry=r,
        )
        self.failovers = Counter(
            "loramesh_gateway_node_failovers", "Nodes that failed before the first token.", registry=r
        )
        self.usage_records = Counter(
            "loramesh_gateway_usage_records", "Ends of requests, by how they were recorded.", ["result"], registry=r
        )
        self.heartbeats = Counter(
            "loramesh_gateway_heartbeats", "Heartbeats by result (accepted, refused).", ["result"], registry=r
        )
        self.live_nodes = Gauge("loramesh_gateway_live_nodes", "Nodes live at the last heartbeat.", registry=r)
        self.disputed_nodes = Gauge(
            "loramesh_gateway_disputed_node",
            "1 for each node dropped from routing because its receipt disagreed with the gateway's count.",
            ["node_id"],
            registry=r,
        )
        self.outbox_writable = Gauge(
            "loramesh_gateway_outbox_writable",
            "1 while the usage outbox takes writes; 0: new requests are refused with 503.",
            registry=r,
        )
        self.outbox_unwritten = Gauge(
            "loramesh_gateway_outbox_unwritten", "Request ends waiting for the outbox to take writes again.", registry=r
        )
        self.outbox_writable.set(1)
        self.settlement_records = Gauge(
            "loramesh_gateway_settlement_records",
            "Outbox records by settlement state (pending, in_flight, set_aside, disputed, settled).",
            ["state"],
            registry=r,
        )
        self.deposit_left = Gauge(
            "loramesh_gateway_settler_deposit_left_wei",
            "The in-process settler's deposit on the ledger minus the fees of its batches in flight.",
            registry=r,
        )
        self.deposit_low = Gauge(
            "loramesh_gateway_settler_deposit_low",
            "1 while the settler's deposit left is below its low-deposit mark or records wait for the deposit.",
            registry=r,
        )

    def set_settlement(self, status: dict) -> None:
        """Export a ledger.settler.settler_status() dict (one that says "error" changes nothing)."""
        if "error" in status:
            return
        for state in RECORD_STATES:
            self.settlement_records.labels(state).set(status.get(state) or 0)
        if status.get("deposit_left_wei") is not None:
            self.deposit_left.set(status["deposit_left_wei"])
        self.deposit_low.set(1 if status.get("deposit_low") else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
