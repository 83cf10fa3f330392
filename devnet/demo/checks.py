"""The demo's traffic and its proof: real OpenAI-client requests, then checks that every one of them is
on chain exactly once (the bare base-model comparisons too, under the zero adapter id, at the ledger's
base price) and that the rewards accrued add up to the fees of the settled records."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from sqlmodel import Session, select

from common.wire import ZERO_ID, hex0x


class DemoCheckFailed(RuntimeError):
    """The demo's end-to-end check found something wrong."""


@dataclass(slots=True)
class Answer:
    adapter: str
    kind: str  # completion, chat, system chat (after the shared system prompt), stream, scored, ...
    prompt: str
    expected: str  # what the adapter was trained to answer
    text: str
    finish_reason: str
    request_id: str
    prompt_tokens: int
    completion_tokens: int
    base_text: str = ""  # the bare base model's answer to the same prompt, for comparison
    base_request_id: str = ""  # that comparison request (settled too, under the zero adapter id)
    base_prompt_tokens: int = 0
    base_completion_tokens: int = 0
    # an ensemble request: (adapter id, weight) of each adapter in it; it is on chain as one record per adapter
    components: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Sent:
    """One request the demo sent, as the client saw it; base: to the bare base model (no adapter)."""

    request_id: str
    label: str
    prompt_tokens: int
    completion_tokens: int
    base: bool = False
    adapter_id: str = ""  # the adapter its record must name, when the check knows it (an ensemble's parts)


def sent_requests(answers: list[Answer]) -> list[Sent]:
    """Every request behind the answers: the adapter ones and their base-model comparisons."""
    from ledger.outbox import component_request_id, split_by_weight

    out = []
    for a in answers:
        if a.components:  # one record per adapter: derived ids, tokens shared by weight (ledger/outbox.py)
            weights = [w for _, w in a.components]
            shares = zip(split_by_weight(a.prompt_tokens, weights), split_by_weight(a.completion_tokens, weights))
            for i, ((aid, _), (p, c)) in enumerate(zip(a.components, shares)):
                rid = component_request_id(a.request_id, i)
                out.append(Sent(rid, f"{a.adapter} (part {i})", p, c, adapter_id=aid))
            continue
        out.append(Sent(a.request_id, a.adapter, a.prompt_tokens, a.completion_tokens))
        if a.base_request_id:
            out.append(
                Sent(
                    a.base_request_id,
                    f"base model (vs {a.adapter})",
                    a.base_prompt_tokens,
                    a.base_completion_tokens,
                    base=True,
                )
            )
    return out


def _rid(response_id: str) -> str:
    return "0x" + response_id.split("-", 1)[1]


# room for the longest answer the demo teaches and its EOS: an answer must end by itself ("stop"), not be cut
MAX_TOKENS = 32


def send_requests(gateway_url: str, api_key: str, adapters, base_name: str) -> list[Answer]:
    """Each adapter's questions as completions (and to the bare base) and as chats, all greedy, plus one
    streamed completion."""
    from openai import OpenAI

    client = OpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0, timeout=180)
    out: list[Answer] = []
    for a in adapters:
        for q in a.questions:
            r = client.completions.create(model=a.name, prompt=q.prompt, max_tokens=MAX_TOKENS, temperature=0)
            base = client.completions.create(model=base_name, prompt=q.prompt, max_tokens=MAX_TOKENS, temperature=0)
            out.append(
                Answer(
                    a.name,
                    "completion",
                    q.prompt,
                    q.completion,
                    r.choices[0].text,
                    r.choices[0].finish_reason,
                    _rid(r.id),
                    r.usage.prompt_tokens,
                    r.usage.completion_tokens,
                    base.choices[0].text,
                    _rid(base.id),
                    base.usage.prompt_tokens,
                    base.usage.completion_tokens,
                )
            )
            asks = [("chat", [], q.chat)]
            if q.system:  # the same question after the long system prompt every request of the data shares
                asks.append(("system chat", [{"role": "system", "content": q.system}], q.system_chat))
            for kind, system, expected in asks:
                chat = client.chat.completions.create(
                    model=a.name,
                    messages=[*system, {"role": "user", "content": q.prompt}],
                    max_tokens=MAX_TOKENS,
                    temperature=0,
                )
                out.append(
                    Answer(
                        a.name,
                        kind,
                        q.prompt,
                        expected,
                        chat.choices[0].message.content or "",
                        chat.choices[0].finish_reason,
                        _rid(chat.id),
                        chat.usage.prompt_tokens,
                        chat.usage.completion_tokens,
                    )
                )
        q = a.questions[1]
        text, usage, rid, finish = [], None, "", ""
        for chunk in client.completions.create(
            model=a.name,
            prompt=q.prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        ):
            rid = chunk.id
            if chunk.choices:
                text.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                usage = chunk.usage
        if usage is None:
            raise DemoCheckFailed(f"the streamed request for {a.name} ended without usage")
        out.append(
            Answer(
                a.name,
                "stream",
                q.prompt,
                q.completion,
                "".join(text),
                finish,
                _rid(rid),
                usage.prompt_tokens,
                usage.completion_tokens,
            )
        )
    return out


def send_structured(gateway_url: str, api_key: str, adapter) -> Answer:
    """One chat constrained to the adapter's taught chat answers (vLLM's structured_outputs choice): greedy, it
    answers what it was taught, as unconstrained. Its prompt counted first by vLLM's /tokenize, which must be the
    prompt_tokens the chat is billed."""
    import httpx
    from openai import OpenAI

    q = adapter.questions[0]
    messages = [{"role": "user", "content": q.prompt}]
    counted = httpx.post(
        gateway_url + "/tokenize",
        json={"model": adapter.name, "messages": messages},
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=60,
    )
    counted.raise_for_status()
    client = OpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0, timeout=180)
    choices = sorted({x.chat for x in adapter.questions})
    r = client.chat.completions.create(
        model=adapter.name,
        messages=messages,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"structured_outputs": {"choice": choices}},
    )
    if counted.json()["count"] != r.usage.prompt_tokens:
        raise DemoCheckFailed(
            f"/tokenize counted {counted.json()['count']} tokens for a chat billed {r.usage.prompt_tokens}"
        )
    return Answer(
        adapter.name,
        "structured chat",
        q.prompt,
        q.chat,
        r.choices[0].message.content or "",
        r.choices[0].finish_reason,
        _rid(r.id),
        r.usage.prompt_tokens,
        r.usage.completion_tokens,
    )


def send_response(gateway_url: str, api_key: str, adapter) -> Answer:
    """One question through OpenAI's Responses API (client.responses.create), which the gateway serves as the chat
    it is: greedy, the adapter answers what its chats were taught, and the response completes by itself."""
    from openai import OpenAI

    q = adapter.questions[0]
    client = OpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0, timeout=180)
    raw = client.responses.with_raw_response.create(
        model=adapter.name, input=q.prompt, max_output_tokens=MAX_TOKENS, temperature=0
    )
    r = raw.parse()
    return Answer(
        adapter.name,
        "response",
        q.prompt,
        q.chat,
        r.output_text,
        "stop" if r.status == "completed" else str(r.status),
        raw.headers["x-request-id"],
        r.usage.input_tokens,
        r.usage.output_tokens,
    )


def send_lorax(gateway_url: str, api_key: str, adapter) -> Answer:
    """One question through LoRAX's REST API with LoRAX's own client (lorax.Client.generate, adapter_id naming the
    adapter), which the gateway serves as the completion it is: greedy, the answer is the one its completions were
    taught. The client shows no headers, so its session's response hook reads the request id (X-Request-Id)."""
    import requests
    from lorax import Client

    seen: list[str] = []
    session = requests.Session()
    session.hooks["response"].append(lambda r, *args, **kwargs: seen.append(r.headers.get("x-request-id", "")))
    client = Client(gateway_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=180, session=session)
    q = adapter.questions[0]
    r = client.generate(q.prompt, adapter_id=adapter.name, max_new_tokens=MAX_TOKENS, details=True)
    reason = {"eos_token": "stop", "stop_sequence": "stop"}.get(r.details.finish_reason, r.details.finish_reason)
    return Answer(
        adapter.name,
        "lorax",
        q.prompt,
        q.completion,
        r.generated_text,
        reason,
        seen[-1],
        r.details.prompt_tokens,
        r.details.generated_tokens,
    )


def send_scored(gateway_url: str, api_key: str, adapter) -> Answer:
    """Its first question scored as lm-evaluation-harness scores a continuation (echo, max_tokens 0, logprobs): the
    question followed by its taught answer, and by the answer taught for another question, in one request of two
    prompts. The adapter finds its taught answer the likelier; `text` is the likelier of the two."""
    from openai import OpenAI

    q, other = adapter.questions[0], adapter.questions[1]
    candidates = [q.completion, other.completion]
    client = OpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0, timeout=180)
    r = client.completions.create(
        model=adapter.name,
        prompt=[q.prompt + c for c in candidates],
        echo=True,
        max_tokens=0,
        logprobs=0,
        temperature=0,
    )
    # the prompts share the question: what their log-likelihoods differ by is the answers'
    scores = [sum(x for x in choice.logprobs.token_logprobs if x is not None) for choice in r.choices]
    return Answer(
        adapter.name,
        "scored",
        q.prompt,
        q.completion,
        candidates[scores.index(max(scores))],
        r.choices[0].finish_reason,
        _rid(r.id),
        r.usage.prompt_tokens,
        r.usage.completion_tokens,
    )


def send_ensemble(gateway_url: str, api_key: str, parts: list[tuple[str, str, float]], prompt: str) -> Answer:
    """One completion from an ensemble of adapters (`parts`: name, adapter id, weight), named as users name it:
    the adapters joined with "+", their weights in `adapter_weights`. Its answer is a blend, so only its
    attribution is checked (check_on_chain: one record per adapter, tokens shared by weight)."""
    from openai import OpenAI

    client = OpenAI(base_url=gateway_url + "/v1", api_key=api_key, max_retries=0, timeout=180)
    name = "+".join(n for n, _, _ in parts)
    r = client.completions.create(
        model=name,
        prompt=prompt,
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"adapter_weights": [w for _, _, w in parts]},
    )
    return Answer(
        name,
        "ensemble",
        prompt,
        "",
        r.choices[0].text,
        r.choices[0].finish_reason,
        _rid(r.id),
        r.usage.prompt_tokens,
        r.usage.completion_tokens,
        components=tuple((aid, w) for _, aid, w in parts),
    )


def check_answers(answers: list[Answer]) -> None:
    """Every adapter answer, completion, chat and streamed alike, is exactly what its data taught, and ended
    by itself (EOS: finish_reason "stop")."""
    for a in answers:
        if a.kind == "ensemble":
            continue  # a blend of two adapters: nothing taught it an answer
        if a.kind == "scored":  # the prompt alone, scored: it ends at max_tokens 0, "length"
            if a.text != a.expected:
                raise DemoCheckFailed(f"{a.adapter} scored {a.text!r} above its taught answer {a.expected!r}")
            if a.finish_reason != "length":
                raise DemoCheckFailed(f"the prompt alone (max_tokens 0) ended {a.finish_reason!r}, not 'length'")
            continue
        if a.text != a.expected or a.finish_reason != "stop":
            raise DemoCheckFailed(
                f"{a.adapter} answered the {a.kind} {a.prompt!r} with {a.text!r} ({a.finish_reason}); "
                f"it was trained to answer {a.expected!r}"
            )


def check_prefix_cache(node_urls: list[str], answers: list[Answer]) -> int:
    """Prompt tokens the nodes read from their prefix caches (vllm:prefix_cache_hits, parsed with
    prometheus_client's own parser). Every chat after the shared system prompt but the first of its adapter on
    each node finds at least that prompt's full blocks cached (128 tokens of its ~190, counted low), since a
    prefix's KV belongs to (adapter, tokens) and is kept between requests."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    hits = 0
    for url in node_urls:
        text = httpx.get(url + "/metrics", timeout=10).text
        hits += sum(
            int(s.value)
            for f in text_string_to_metric_families(text)
            if f.name == "vllm:prefix_cache_hits"
            for s in f.samples
            if s.name in ("vllm:prefix_cache_hits", "vllm:prefix_cache_hits_total")
        )
    system_chats = [a for a in answers if a.kind == "system chat"]
    floor = max(1, (len(system_chats) - len({a.adapter for a in system_chats}) * len(node_urls)) * 128)
    if hits < floor:
        raise DemoCheckFailed(
            f"the nodes read {hits} prompt tokens from their prefix caches; {len(system_chats)} chats after one "
            f"shared system prompt should have read at least {floor}"
        )
    return hits


def wait_settled(db_url: str, request_ids: list[str], timeout: float = 180.0) -> None:
    """Until the gateway's ledger outbox says every request is settled on chain."""
    from ledger.db import make_engine
    from ledger.models import RecordStatus, UsageRecord

    engine = make_engine(db_url)
    deadline = time.monotonic() + timeout
    wanted = set(request_ids)
    while True:
        with Session(engine) as s:
            rows = s.exec(select(UsageRecord).where(UsageRecord.request_id.in_(wanted))).all()
        settled = {r.request_id for r in rows if r.status == RecordStatus.SETTLED}
        if settled == wanted:
            return
        if time.monotonic() > deadline:
            missing = sorted(wanted - {r.request_id for r in rows})
            raise DemoCheckFailed(
                f"{len(wanted - settled)} of {len(wanted)} records not settled after {timeout:.0f}s"
                + (f"; {len(missing)} never reached the outbox" if missing else "")
            )
        time.sleep(0.5)


def check_on_chain(client, answers: list[Answer]) -> dict:
    """Every request (base-model comparisons included) settled exactly once with the token counts the
    client saw, base-model ones under the zero adapter id at the base price; accruals equal fees."""
    sent = {s.request_id: s for s in sent_requests(answers)}
    events = client.settled_records()  # every record, from the one RecordsSettled log of each batch
    counts = Counter(e.request_id for e in events)
    for rid, a in sent.items():
        if counts[rid] != 1:
            raise DemoCheckFailed(f"request {rid} ({a.label}) is on chain {counts[rid]} times, expected once")
    base_price = client.base_price()
    fees, base_fees, batches = 0, 0, set()
    for e in events:
        rid = e.request_id
        if rid in sent:
            a = sent[rid]
            if a.adapter_id and e.adapter_id != a.adapter_id:
                raise DemoCheckFailed(f"record {rid} ({a.label}) names adapter {e.adapter_id}, not {a.adapter_id}")
            if (e.prompt_tokens, e.completion_tokens) != (a.prompt_tokens, a.completion_tokens):
                raise DemoCheckFailed(
                    f"request {rid}: chain has {e.prompt_tokens}+{e.completion_tokens} "
                    f"tokens, the client was told {a.prompt_tokens}+{a.completion_tokens}"
                )
            if a.base:
                want = base_price * (a.prompt_tokens + a.completion_tokens) // 1000
                if e.adapter_id != ZERO_ID or e.fee != want:
                    raise DemoCheckFailed(
                        f"base-model request {rid}: chain has adapter {e.adapter_id} and fee "
                        f"{e.fee} wei, expected the zero id and {want} wei"
                    )
                base_fees += e.fee
            fees += e.fee
            batches.add(e.batch_id)
    accrued = sum(
        e["args"]["amount"]
        for e in client.events("ledger", "RewardAccrued")
        if hex0x(bytes(e["args"]["batchId"])) in batches
    )
    batch_fees = sum(e.fee for e in events if e.batch_id in batches)
    if accrued != batch_fees or batch_fees != fees:
        raise DemoCheckFailed(f"rewards do not add up: accrued {accrued} wei, fees of the settled records {fees} wei")
    return {
        "records": len(sent),
        "base_records": sum(s.base for s in sent.values()),
        "batches": len(batches),
        "fees": fees,
        "base_fees": base_fees,
        "accrued": accrued,
    }
