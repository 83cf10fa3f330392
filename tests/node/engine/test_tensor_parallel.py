"""Tensor parallelism (node/engine/parallel.py): TP=2 on CPU (gloo, a second process) against TP=1 on the
same weights and adapters — every step's logits, greedy outputs, a mixed batch of adapters and base-only
rows — over Llama (GQA, kv heads split), Qwen3 (q/k norm), Qwen2 (qkv bias) and Mistral with one kv head
(replicated on both ranks), an int8 base; and a rank that dies fails the step in one line, never hangs.

One tensor-parallel engine runs per process at a time (torch.distributed's one default group), so each test
builds its own and closes it; they start in a few seconds."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import pytest
import torch

from node.engine import GenerationRequest, SamplingParams
from tests.utils.engine import ADAPTER_SPECS, make_world

PROMPTS = ([5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32], [40, 41])
MAX_TOKENS = 8


def _requests(world, tag: str) -> list[GenerationRequest]:
    """Base-only rows and each adapter, twice over the prompts: one mixed batch of 2 x (1 + adapters) rows."""
    ids = [None] + [a.adapter_id for a in world.adapters]
    out = []
    for k in range(2):
        for i, a in enumerate(ids):
            out.append(
                GenerationRequest(
                    request_id=f"{tag}-{k}-{i}",
                    adapter_id=a,
                    prompt_token_ids=list(PROMPTS[(i + k) % len(PROMPTS)]),
                    params=SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
                )
            )
    return out


def _run(engine, world, tag: str):
    """Greedy outputs by request and each step's logits, with every adapter resident first (one batch)."""
    for a in world.adapters:
        engine.prefetch(a.adapter_id).result(timeout=60)
        engine.make_resident(a.adapter_id)
    steps: list[torch.Tensor] = []
    sample = engine._sample

    def recording(seqs, logits):
        steps.append(logits.detach().clone())
        return sample(seqs, logits)

    engine._sample = recording
    try:
        done = engine.generate(_requests(world, tag))
    finally:
        engine._sample = sample
    return {k: (e.token_ids, e.error) for k, e in done.items()}, steps


@contextlib.contextmanager
def _engine(world, **kwargs):
    e = world.engine(threads=1, num_slots=len(world.adapters), **kwargs)
    try:
        yield e
    finally:
        e.close()


def _compare(world, tol: float = 1e-5, **kwargs) -> None:
    with _engine(world, **kwargs) as one:
        ref, ref_steps = _run(one, world, "r")
    with _engine(world, tensor_parallel=2, **kwargs) as two:
        assert two.tp is not None and len(two.tp.procs) == 1 and two.tp.procs[0].is_alive()
        got, got_steps = _run(two, world, "r")
    assert all(err is None for _, err in got.values()), got
    assert got == ref  # greedy tokens of every row, base-only and adapters
    assert len(got_steps) == len(ref_steps) and len(ref_steps) >= MAX_TOKENS
    assert ref_steps[0].shape[0] == 2 * (1 + len(world.adapters))  # the whole mixed batch in one step
    for a, b in zip(ref_steps, got_steps, strict=True):
        scale = a.abs().max().item()
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module")
def mistral_mqa_world(tmp_path_factory):
    # one kv head: TP=2 replicates it (each rank's query heads read the same kv head)
    return make_world(
        tmp_path_factory.mktemp("mistral-mqa"), model_type="mistral", specs=ADAPTER_SPECS[1:3], num_kv_heads=1
    )


def test_llama_gqa_matches_tp1(llama_world):
    _compare(llama_world)


def test_qwen3_matches_tp1(qwen3_world):
    _compare(qwen3_world)


def test_qwen2_qkv_bias_matches_tp1(qwen2_world):
    _compare(qwen2_world)


def test_replicated_kv_head_matches_tp1(mistral_mqa_world):
    _compare(mistral_mqa_world)


def test_int8_base_matches_tp1(llama_world):
    # int8 scales each output row over its whole input, also for a row-parallel shard that keeps only some
    # columns (quant.quantize_columns): the shards are the unsharded int8 weight's bits. On x86 the inputs are
    # int8 too, each token scaled by its largest magnitude over the whole input (the ranks' max), so a shard's
    # codes are TP=1's; an input a partial sum's rounding moves across a rounding boundary takes the next code,
    # hence a tolerance of 1e-2 of the largest logit (and bf16's 2^-8 where the weight-only kernel runs)
    _compare(llama_world, tol=1e-2, quantization="int8")


def test_fp8_kv_cache_matches_tp1(llama_world):
    # each rank caches its own kv heads, each (token, head) with its own scale: the codes are TP=1's, up to an
    # element whose key or value lands on a rounding boundary of e4m3 after a shard's matmul rounds differently
    _compare(llama_world, tol=1e-2, kv_cache_dtype="fp8")


def test_refuses_what_it_cannot_split(llama_world):
    # 4 heads, 2 kv heads, 256 intermediate columns: 3 divides none of them
    with pytest.raises(ValueError, match=r"^tensor_parallel 3 does not divide num_attention_heads 4$"):
        llama_world.engine(tensor_parallel=3)
    with pytest.raises(ValueError, match="cuda_graphs='static' does not run with tensor_parallel > 1"):
        llama_world.config(tensor_parallel=2, cuda_graphs="static")
    with pytest.raises(ValueError, match="tensor_parallel must be >= 1"):
        llama_world.config(tensor_parallel=0)


def _req(world, tag: str, adapter: bool | int = True) -> GenerationRequest:
    """A short greedy request on adapter 0 (or the adapter of that index; False: base only)."""
    return GenerationRequest(
        request_id=tag,
        adapter_id=None if adapter is False else world.adapters[0 if adapter is True else adapter].adapter_id,
        prompt_token_ids=[5, 6, 7],
        params=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
    )


def _generate_bounded(engine, reqs, limit_s: float = 30.0):
    t0 = time.monotonic()
    done = engine.generate(reqs)
    elapsed = time.monotonic() - t0
    assert elapsed < limit_s, f"a failed rank took {elapsed:.1f}s to surface"
    return done


def test_killed_rank_is_one_clear_error_not_a_hang(llama_world):
    with _engine(llama_world, tensor_parallel=2) as e:
        ok = _generate_bounded(e, [_req(llama_world, "before")])
        assert ok["before"].error is None and len(ok["before"].token_ids) == 4
        worker = e.tp.procs[0]
        os.kill(worker.pid, signal.SIGKILL)  # between steps
        worker.join(timeout=10)
        done = _generate_bounded(e, [_req(llama_world, "after")])
        err = done["after"].error
        assert done["after"].finish_reason == "error"
        assert "tensor-parallel rank 1 exited (exit code -9); the tensor-parallel engine is stopped" in err
        assert "\n" not in err
        # stopped for good: later requests (a new adapter's slot write among them) fail at once with the same line
        again = _generate_bounded(
            e, [_req(llama_world, "again", adapter=False), _req(llama_world, "other", adapter=2)], limit_s=5.0
        )
        assert again["again"].error == err and again["other"].error == err
        assert not any(p.is_alive() for p in e.tp.procs)
        assert not torch.distributed.is_initialized()


def test_rank_killed_inside_a_step_is_one_clear_error(llama_world):
    with _engine(llama_world, tensor_parallel=2) as e:
        run = e.runner.run
        worker = e.tp.procs[0]

        def kill_then_run(*args):  # rank 0 enters the step's all-reduces with its peer gone
            os.kill(worker.pid, signal.SIGKILL)
            worker.join(timeout=10)
            return run(*args)

        e.runner.run = kill_then_run
        done = _generate_bounded(e, [_req(llama_world, "during")])
        err = done["during"].error
        assert "tensor-parallel rank 1 exited (exit code -9)" in err and "\n" not in err
        assert not torch.distributed.is_initialized()
        # a TP engine can start again in this process once the broken one is shut down
    with _engine(llama_world, tensor_parallel=2) as e2:
        ok = _generate_bounded(e2, [_req(llama_world, "restart")])
        assert ok["restart"].error is None


def test_rank_exception_is_reported_with_its_own_line(llama_world):
    with _engine(llama_world, tensor_parallel=2) as e:
        # a step only the worker runs, with a token id past the vocabulary: its embedding lookup raises there
        e.tp._send(("step", [10**6], [[0]], [-1], [[0]]))
        e.tp.procs[0].join(timeout=30)
        done = _generate_bounded(e, [_req(llama_world, "next")])
        err = done["next"].error
        assert "tensor-parallel rank 1 failed: IndexError: " in err and "\n" not in err, err
        assert err.endswith("; the tensor-parallel engine is stopped")


def test_async_engine_serves_then_reports_a_dead_rank(llama_world):
    # the node's engine: requests stream from rank 0; a rank's death ends the next request with the line
    import asyncio

    from node.engine import AsyncEngine, FinishEvent

    engine = AsyncEngine(llama_world.config(threads=1, tensor_parallel=2), store=llama_world.store).start()
    try:

        async def final(tag: str) -> FinishEvent:
            events = [ev async for ev in engine.submit(_req(llama_world, tag))]
            return events[-1]

        ok = asyncio.run(asyncio.wait_for(final("a"), 60))
        assert ok.error is None and len(ok.token_ids) == 4
        worker = engine.core.tp.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        t0 = time.monotonic()
        bad = asyncio.run(asyncio.wait_for(final("b"), 30))  # bounded: wait_for raises rather than hang
        assert time.monotonic() - t0 < 30
        assert bad.finish_reason == "error" and "tensor-parallel rank 1 exited (exit code -9)" in bad.error
    finally:
        engine.close()
    assert not torch.distributed.is_initialized()


def test_hung_rank_times_out_in_one_line(llama_world, monkeypatch):
    from node.engine import parallel

    monkeypatch.setattr(parallel, "COLLECTIVE_TIMEOUT_S", 5.0)  # the engine's setting, read when it starts
    with _engine(llama_world, tensor_parallel=2) as e:
        worker = e.tp.procs[0]
        run = e.runner.run

        def stop_then_run(*args):  # the worker takes the step, then never answers the all-reduce
            os.kill(worker.pid, signal.SIGSTOP)
            return run(*args)

        e.runner.run = stop_then_run
        try:
            done = _generate_bounded(e, [_req(llama_world, "hung")])
        finally:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGCONT)
        err = done["hung"].error
        assert err.startswith("engine step failed: TensorParallelError: tensor-parallel step failed: "), err
        assert err.endswith("; the tensor-parallel engine is stopped") and "\n" not in err
        worker.join(timeout=10)
        assert not worker.is_alive()


def test_workers_exit_when_the_engine_process_dies(llama_world, tmp_path):
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from node.engine import LLMEngine, EngineConfig\n"
        "if __name__ == '__main__':\n"
        f"    e = LLMEngine(EngineConfig(model_dir={str(llama_world.base_dir)!r}, num_kv_blocks=32, block_size=8,"
        " tensor_parallel=2))  # threads: each rank its share\n"
        "    print(e.tp.procs[0].pid, flush=True)\n"
        "    os._exit(0)  # no cleanup: the worker must notice on its own\n"
    )
    path = tmp_path / "die.py"
    path.write_text(script)
    # the worker inherits the script's stdout: a file, not a pipe, so the run ends with the engine process
    log = tmp_path / "die.out"
    with log.open("w") as out:
        subprocess.run(
            [sys.executable, str(path)],
            stdout=out,
            stderr=subprocess.DEVNULL,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
            check=True,
        )
    pid = int(log.read_text().split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the tensor-parallel worker outlived its engine process by 30 s")


def test_node_setting_reaches_the_engine(llama_world, tmp_path):
    from node.settings import NodeSettings

    s = NodeSettings(base=llama_world.base_dir, store=tmp_path, port=0, tensor_parallel=2)
    assert s.engine_config().tensor_parallel == 2
    assert s.engine_config().cuda_graphs == "off"  # no decode graphs under TP
    assert NodeSettings(base=llama_world.base_dir, store=tmp_path, port=0).engine_config().tensor_parallel == 1
