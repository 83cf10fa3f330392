"""The node's Prometheus metrics (GET /metrics): vLLM's names where vLLM has the metric, so dashboards and
alerts written for vLLM read a loramesh node unchanged, and `loramesh_node_*` for what is ours.

Gauges are read at scrape time from one snapshot the engine thread takes between steps (`scheduler_snapshot`),
so they are consistent and never race the scheduler. Latencies are observed on the node's event loop as the
API relays each request's events: time to first token from the request's submission, inter-token latency per
sequence, end-to-end latency at its end."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from node.engine import FinishEvent, TokenEvent

# vLLM's buckets for these histograms (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
MAX_OPEN = 65536  # requests timed at once, at most (the oldest is dropped past it)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeMetrics:
    """One node's metrics registry. `started(rid)` when a request is queued, `saw(rid, event)` for each event
    relayed; `render(snapshot)` writes the exposition with the engine's gauges from `snapshot`."""

    def __init__(self, *, extra: Callable[[], dict[str, float]] | None = None) -> None:
        """`extra`: more counters of this node (e.g. heartbeats sent and failed), read at scrape time."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS, registry=self.registry
        )
        self.itl = Histogram(
            "vllm:inter_token_latency_seconds", "Time between tokens", buckets=ITL_BUCKETS, registry=self.registry
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Request latency", buckets=E2E_BUCKETS, registry=self.registry
        )
        self.success = Counter("vllm:request_success", "Finished requests", ["finished_reason"], registry=self.registry)
        self.extra = extra
        self._snapshot: dict = {}
        self._open: dict[str, tuple[float, dict[int, float]]] = {}  # request id -> (queued at, index -> last token)
        self.registry.register(_Gauges(self))

    def started(self, request_id: str) -> None:
        self._open[request_id] = (time.perf_counter(), {})
        if len(self._open) > MAX_OPEN:  # requests whose end was never read (their response never began)
            del self._open[next(iter(self._open))]

    def token(self, request_id: str, index: int) -> None:
        got = self._open.get(request_id)
        if got is None:
            return
        now = time.perf_counter()
        queued, last = got
        if not last:
            self.ttft.observe(now - queued)
        elif index in last:
            self.itl.observe(now - last[index])
        last[index] = now

    def finished(self, request_id: str, reason: str) -> None:
        got = self._open.pop(request_id, None)
        if got is not None:
            self.e2e.observe(time.perf_counter() - got[0])
        self.success.labels(reason).inc()

    def saw(self, ev) -> None:
        """One event the API relays (or reads for a whole answer)."""
        if isinstance(ev, TokenEvent):
            self.token(ev.request_id, ev.index)
        elif isinstance(ev, FinishEvent):
            self.finished(ev.request_id, ev.finish_reason)

    def forget(self, request_id: str) -> None:
        """A request whose client left before its end was read: no latency to observe."""
        self._open.pop(request_id, None)

    def render(self, snapshot: dict) -> bytes:
        self._snapshot = snapshot
        return generate_latest(self.registry)


class _Gauges:
    """The engine's state at scrape time, from the snapshot `render` was given."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def describe(self):
        return []

    def collect(self):
        s = self.m._snapshot
        if not s:
            return
        g = GaugeMetricFamily
        yield g("vllm:num_requests_running", "Sequences running", value=s["running"])
        yield g("vllm:num_requests_waiting", "Sequences waiting", value=s["waiting"])
        yield g("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", value=s["kv_cache_usage"])
        lora = g(
            "vllm:lora_requests_info",
            "Adapters of running and waiting requests",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        lora.add_metric(
            [",".join(s["running_adapters"]), ",".join(s["waiting_adapters"]), str(s["num_slots"])], time.time()
        )
        yield lora
        yield CounterMetricFamily("vllm:prompt_tokens", "Prompt tokens processed", value=s["prompt_tokens"])
        yield CounterMetricFamily(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            value=s.get("prefix_cache_queries", 0),
        )
        yield CounterMetricFamily(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", value=s.get("prefix_cache_hits", 0)
        )
        yield CounterMetricFamily("vllm:generation_tokens", "Tokens generated", value=s["completion_tokens"])
        # speculative decoding: drafted tokens verified, and how many of them the target accepted
        yield CounterMetricFamily(
            "vllm:spec_decode_num_draft_tokens", "Drafted tokens verified", value=s.get("spec_draft_tokens", 0)
        )
        yield CounterMetricFamily(
            "vllm:spec_decode_num_accepted_tokens", "Drafted tokens accepted", value=s.get("spec_accepted_tokens", 0)
        )
        yield g("loramesh_node_adapters_resident", "Adapters in GPU/CPU slots", value=s["resident"])
        yield g("loramesh_node_adapters_cached", "Adapters in the host cache", value=s["cached"])
        c = s.get("adapter_counters", {})
        loads = CounterMetricFamily(
            "loramesh_node_adapter_loads",
            "Adapter loads by tier: disk (package decoded into the host cache), slot (host cache to a device slot)",
            labels=["tier"],
        )
        loads.add_metric(["disk"], c.get("disk_loads", 0))
        loads.add_metric(["slot"], c.get("slot_loads", 0))
        yield loads
        yield CounterMetricFamily(
            "loramesh_node_adapter_slot_hits",
            "Requests whose adapter was already in a slot",
            value=c.get("slot_hits", 0),
        )
        evictions = CounterMetricFamily("loramesh_node_adapter_evictions", "Adapters evicted by tier", labels=["tier"])
        evictions.add_metric(["slot"], c.get("evictions", 0))
        evictions.add_metric(["host"], c.get("cpu_evictions", 0))
        yield evictions
        for name, value in (self.m.extra() if self.m.extra is not None else {}).items():
            yield CounterMetricFamily(f"loramesh_node_{name}", name.replace("_", " "), value=value)
