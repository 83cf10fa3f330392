"""The demo's flow, top to bottom: build, start, send, check, show; then stay up or stop everything."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

from rich.console import Console
from rich.table import Table

from common.identity import load_identity
from devnet.anvil import free_port
from devnet.demo import checks, network, stages
from devnet.processes import ManagedProcess, ProcessGroup
from ledger.chain import ChainClient
from ledger.types import ETHER
from node.adapters.basemodel import base_model_name

PARTICIPANTS = ["alice", "bob", "carol", "operator1", "operator2", "gateway"]


def run_demo(workdir: Path, *, fresh: bool = False, once: bool = False) -> None:
    """Run the whole network here, send real requests, check every one is settled on chain exactly once
    and that the rewards add up, print who earned what; stay up until Ctrl-C unless `once`."""
    console = Console(soft_wrap=True)
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    # every run starts a fresh chain, so the node stores and the ledger of the last run go with it
    for name in ("store-node1", "store-node2"):
        shutil.rmtree(workdir / name, ignore_errors=True)
    for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
        (workdir / name).unlink(missing_ok=True)
    console.rule("[bold]loramesh demo")
    base = stages.make_base(workdir, console)
    ids = stages.make_identities(workdir, PARTICIPANTS, console)
    adapters = stages.demo_adapters(workdir, ids)
    packages = stages.train_and_pack(workdir, base, adapters, console)
    anvil, deployment = network.start_chain(workdir, ids, console)
    db_url = f"sqlite:///{(workdir / 'gateway.db').resolve()}"
    with ProcessGroup() as group:
        try:
            network.publish_all(packages, ids, deployment, console)
            gateway_port = free_port()
            nodes = network.start_nodes(
                group, workdir, base, ids, deployment, f"http://127.0.0.1:{gateway_port}", console
            )
            network.hand_packages_to_nodes(packages, nodes, console)
            network.cross_fetch(packages, nodes, console)
            api_key = network.create_api_key(db_url)
            gateway_url = network.start_gateway(group, workdir, gateway_port, base, ids, deployment, db_url, console)
            network.wait_for_models(gateway_url, api_key, [a.name for a in adapters], group, len(nodes))
            console.print("• sending requests through the openai client")
            answers = checks.send_requests(gateway_url, api_key, adapters, base_model_name(base))
            adapter_ids = {p.name: p.adapter_id for p in packages}
            blend = [(name, adapter_ids[name], w) for name, w in (("alice/capitals", 0.7), ("bob/elements", 0.3))]
            answers.append(checks.send_ensemble(gateway_url, api_key, blend, adapters[0].questions[0].prompt))
            answers.append(checks.send_structured(gateway_url, api_key, adapters[1]))
            answers.append(checks.send_response(gateway_url, api_key, adapters[-1]))
            answers.append(checks.send_lorax(gateway_url, api_key, adapters[0]))
            answers.append(checks.send_scored(gateway_url, api_key, adapters[0]))
            show_answers(answers, console)
            checks.check_answers(answers)
            console.print(
                f"[green]✓[/] every adapter answered as trained: {_count(answers, 'completion')} completions, "
                f"{_count(answers, 'chat')} chats, {_count(answers, 'system chat')} chats after the shared system "
                f"prompt, {_count(answers, 'stream')} streamed completions, {_count(answers, 'structured chat')} "
                "chat constrained to its taught answers (structured_outputs choice; its prompt counted alike by "
                f"/tokenize), {_count(answers, 'response')} question through the Responses API and "
                f"{_count(answers, 'lorax')} through LoRAX's API (its own client, lorax.Client); scored as "
                "lm-evaluation-harness scores (echo, max_tokens 0, logprobs), it finds its taught answer likelier "
                "than another question's"
            )
            cached = checks.check_prefix_cache(nodes, answers)
            console.print(
                f"[green]✓[/] the shared system prompt's KV was computed once per adapter and node: "
                f"{cached} prompt tokens were read from the nodes' prefix caches"
            )
            sent = checks.sent_requests(answers)  # the base-model comparisons are settled too
            console.print(
                f"• {len(answers) + sum(bool(a.base_request_id) for a in answers)} requests answered; "
                "waiting for settlement on chain"
            )
            checks.wait_settled(db_url, [s.request_id for s in sent])
            client = ChainClient.from_deployment(deployment)
            summary = checks.check_on_chain(client, answers)
            show_attribution(client, ids, console)
            console.print(
                f"[green]✓[/] {summary['records']} records on chain exactly once in {summary['batches']} "
                f"batch(es); rewards accrued = fees = {summary['fees'] / ETHER:.6f} ETH"
            )
            ens = next(a for a in answers if a.kind == "ensemble")
            console.print(
                f"[green]✓[/] the ensemble {ens.adapter} (weights 0.7, 0.3), one request of {ens.prompt_tokens}+"
                f"{ens.completion_tokens} tokens, is on chain as one record per adapter, its tokens shared by weight"
            )
            console.print(
                f"[green]✓[/] {summary['base_records']} of them to the bare base model, at the base price: "
                f"{summary['base_fees'] / ETHER:.6f} ETH, all to the serving node operators"
            )
            explorer_port = free_port()
            explorer = group.start(
                ManagedProcess(
                    "explorer",
                    [
                        "explorer",
                        "--rpc",
                        anvil.rpc_url,
                        "--db",
                        db_url,
                        "--deployment",
                        str(deployment),
                        "--port",
                        str(explorer_port),
                    ],
                    workdir / "logs" / "explorer.log",
                )
            )
            explorer.wait_http(f"http://127.0.0.1:{explorer_port}/", timeout=60)
            console.print(
                f"[bold]explorer[/]: http://127.0.0.1:{explorer_port}/   "
                f"[bold]gateway[/]: {gateway_url}/v1   "
                f"[bold]API key[/]: {api_key}   [bold]chain[/]: {anvil.rpc_url}   logs: {workdir / 'logs'}"
            )
            if not once:
                console.print("running; press Ctrl-C to stop everything")
                wait_for_interrupt()
        finally:
            codes = group.stop_all()
            anvil.stop()
            bad = {name: code for name, code in codes.items() if code not in (0, None)}
            if bad:
                console.print(f"[yellow]processes that did not exit cleanly: {bad}[/]")
            console.print("stopped every process")


def wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM; the caller's `finally` then stops every process in order."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def show_answers(answers: list[checks.Answer], console: Console) -> None:
    """One row per question: the adapter's completion and chat answers (the streamed one is checked, not shown)
    beside the bare base's completion."""
    table = Table(
        title="answers through the gateway (greedy)",
        caption="base alone: the bare base model, random weights; tokens: prompt+completion, completion then chat",
    )
    table.add_column("adapter", no_wrap=True)  # a name whole; a narrow terminal wraps the prompts instead
    for col in ("prompt", "completion", "chat"):
        table.add_column(col)
    table.add_column("base alone", max_width=10, no_wrap=True)  # byte soup, of which one line says enough
    table.add_column("tokens")
    chats = {(a.adapter, a.prompt): a for a in answers if a.kind == "chat"}
    for a in answers:
        if a.kind != "completion":
            continue
        chat = chats.get((a.adapter, a.prompt))
        table.add_row(
            a.adapter,
            a.prompt,
            _printable(a.text.strip()),
            _printable(chat.text.strip()) if chat else "",
            _printable(a.base_text),
            f"{a.prompt_tokens}+{a.completion_tokens}"
            + (f", {chat.prompt_tokens}+{chat.completion_tokens}" if chat else ""),
        )
    console.print(table)


def _count(answers: list[checks.Answer], kind: str) -> int:
    return sum(a.kind == kind for a in answers)


def _printable(text: str) -> str:
    """Text for a terminal cell: control characters and undecodable bytes (U+FFFD) shown as '·'."""
    return "".join("·" if ch == "\ufffd" or not ch.isprintable() else ch for ch in text)


def show_attribution(client, ids: dict[str, Path], console: Console) -> None:
    from ledger.rewards import rewards_summary

    table = Table(title="attribution on chain: who earned what (ETH)")
    for col in ("participant", "address", "as node operator", "as adapter owner", "as dataset contributor", "total"):
        table.add_column(col)
    for name, path in ids.items():
        address = load_identity(path, stages.DEMO_PASSWORD).address
        s = rewards_summary(client, address)
        table.add_row(
            name,
            address,
            *(f"{s.by_role.get(r, 0) / ETHER:.6f}" for r in ("node", "adapter_owner", "dataset")),
            f"{s.accrued / ETHER:.6f}",
        )
    console.print(table)
