"""Tensor parallelism (`EngineConfig.tensor_parallel` N > 1): the base sharded across N ranks of one
node, Megatron-style as vLLM and nano-vllm do it, with the LoRA stacks sharded to match (S-LoRA).

- q/k/v and gate/up are column-parallel: each rank holds its attention heads (its kv heads when N divides
  them, else the one kv head its query heads read, replicated) and its slice of the MLP's intermediate
  columns; LoRA A stays whole and B keeps the rank's output columns.
- o_proj and down_proj are row-parallel: each rank holds the input rows matching its heads / columns; LoRA A
  keeps those input rows and B stays whole. A rank's output is a partial sum x_i W_i + (x_i A_i) B, and since
  B is replicated, sum_i (x_i A_i) B = (sum_i x_i A_i) B: one all-reduce of the layer output carries both the
  base's and the adapter's partial sums. A row-parallel bias is added once, after it.
- The embedding and lm_head are replicated, not vocab-parallel: only rank 0 samples and needs the whole row
  of logits, so a vocab split would cost an all-gather of [B, vocab] per step to save vocab x hidden per rank
  (0.5-1 GB for a 128k vocabulary at bf16); the other ranks never compute logits.
- Rank 0 is the engine (one scheduler, one sampler, one identity to the network). Ranks 1..N-1 are spawned
  worker processes that hold their own shard, KV cache (their heads) and slot buffer (their LoRA shard), and
  replay rank 0's steps and slot writes. Those come over a pipe per worker, not a collective: an idle engine
  waits indefinitely for requests, and a collective would time out; a pipe also reports a dead parent (EOF).
- Collectives (the per-layer all-reduces) have a timeout, and rank 0 checks its workers before each step: a
  rank that dies or raises fails the step in one line, stops the other ranks, and every later step fails
  with the same line instead of hanging.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import socket
import time
import traceback
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from node.engine.config import EngineConfig, ModelConfig

log = logging.getLogger(__name__)

INIT_TIMEOUT_S = 120.0  # workers start Python, import torch and load their shard within this
COLLECTIVE_TIMEOUT_S = 30.0  # one all-reduce waits this long for a rank that stopped answering
_active: TensorParallel | None = None  # torch.distributed has one default group per process


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank failed; the engine cannot run steps any more."""


@dataclasses.dataclass(frozen=True, slots=True)
class Shard:
    """What rank `rank` of `world` holds of a model with config `cfg` (the full model's)."""

    rank: int
    world: int
    cfg: ModelConfig

    @property
    def heads(self) -> int:
        return self.cfg.num_heads // self.world

    @property
    def kv_heads(self) -> int:
        return max(self.cfg.num_kv_heads // self.world, 1)

    @property
    def kv_start(self) -> int:
        # divisible: the rank's own kv heads; else (world a multiple of kv heads) the one its query heads read
        return self.rank * self.cfg.num_kv_heads // self.world

    @property
    def inter(self) -> int:
        return self.cfg.intermediate_size // self.world

    def local_config(self) -> ModelConfig:
        """The config the rank's layers are built from: its heads and intermediate columns."""
        return dataclasses.replace(
            self.cfg, num_heads=self.heads, num_kv_heads=self.kv_heads, intermediate_size=self.inter
        )

    def out_range(self, name: str) -> tuple[int, int]:
        """Rows [start, stop) of column-parallel projection `name`'s full output this rank holds."""
        d = self.cfg.head_dim
        if name == "q_proj":
            return self.rank * self.heads * d, (self.rank + 1) * self.heads * d
        if name in ("k_proj", "v_proj"):
            return self.kv_start * d, (self.kv_start + self.kv_heads) * d
        if name in ("gate_proj", "up_proj"):
            return self.rank * self.inter, (self.rank + 1) * self.inter
        raise ValueError(f"{name} is not a column-parallel projection")

    def out_full(self, name: str) -> int:
        """The full (unsharded) output size of column-parallel projection `name`."""
        c = self.cfg
        return {"q_proj": c.q_size, "k_proj": c.kv_size, "v_proj": c.kv_size}.get(name, c.intermediate_size)

    def in_range(self, name: str) -> tuple[int, int]:
        """Columns [start, stop) of row-parallel projection `name`'s full input this rank holds."""
        if name == "o_proj":
            w = self.heads * self.cfg.head_dim
        elif name == "down_proj":
            w = self.inter
        else:
            raise ValueError(f"{name} is not a row-parallel projection")
        return self.rank * w, (self.rank + 1) * w


def check_tensor_parallel(n: int, cfg: ModelConfig, config: EngineConfig) -> None:
    """Refuse, in one line, a degree this model or device cannot be split into."""
    if n == 1:
        return
    kv = cfg.num_kv_heads
    if cfg.num_heads % n:
        raise ValueError(f"tensor_parallel {n} does not divide num_attention_heads {cfg.num_heads}")
    if kv % n and n % kv:
        raise ValueError(
            f"tensor_parallel {n} neither divides num_key_value_heads {kv} nor is a multiple of it "
            "(kv heads are split when it divides them, replicated when it is a multiple)"
        )
    if cfg.intermediate_size % n:
        raise ValueError(f"tensor_parallel {n} does not divide intermediate_size {cfg.intermediate_size}")
    if config.device.startswith("cuda"):
        if config.device != "cuda":
            raise ValueError(
                f"tensor_parallel {n} places ranks on cuda:0..{n - 1}; give device 'cuda', not {config.device!r}"
            )
        if torch.cuda.device_count() < n:
            raise ValueError(f"tensor_parallel {n} needs {n} GPUs; this host has {torch.cuda.device_count()}")


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if config.device == "cuda" else torch.device(config.device)


def _cpu_threads(world: int) -> int:
    """A CPU rank's share of the host's cores when no thread count is given."""
    return max(1, (os.cpu_count() or 1) // world)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_group = None  # this process's ranks, with the collective timeout (the default group's is the join's)


def _init_group(rank: int, world: int, port: int, cuda: bool, timeout_s: float) -> None:
    """Join the ranks (waiting up to INIT_TIMEOUT_S for the others to start), then open the group the
    all-reduces run in, whose timeout is the one a step waits for a rank that stopped answering."""
    global _group
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S),
    )
    _group = dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=timeout_s), backend=backend)


def all_reduce(t: torch.Tensor) -> None:
    """Sum `t` in place over the ranks (the row-parallel layers' reduction)."""
    dist.all_reduce(t, group=_group)


def all_reduce_max(t: torch.Tensor) -> None:
    """Largest of `t` in place over the ranks (a row-parallel int8 layer's per-token input scale)."""
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_group)


class TensorParallel:
    """Rank 0's side: starts the workers, forwards each step and slot write to them, and watches them."""

    def __init__(self, config: EngineConfig, cfg: ModelConfig) -> None:
        global _active
        n = config.tensor_parallel
        check_tensor_parallel(n, cfg, config)
        if _active is not None or dist.is_initialized():
            raise ValueError("this process already runs a tensor-parallel engine (torch.distributed has one group)")
        self.world = n
        self.shard = Shard(0, n, cfg)
        self.broken: str | None = None
        self.conns: list[Connection] = []
        self.procs = []
        port = _free_port()
        cuda = config.device == "cuda"
        if not cuda and not config.threads:  # N ranks on torch's default (every core) each would oversubscribe
            torch.set_num_threads(_cpu_threads(n))
        timeout_s = COLLECTIVE_TIMEOUT_S  # read now: every rank of this engine gets the same
        if cuda:
            torch.cuda.set_device(0)
        ctx = torch.multiprocessing.get_context("spawn")
        for r in range(1, n):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_worker_main, args=(r, n, port, timeout_s, config, child), daemon=True, name=f"tp-rank-{r}"
            )
            p.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        try:
            _init_group(0, n, port, cuda, timeout_s)
        except Exception as e:
            why = self._diagnose() or f"tensor-parallel ranks did not join: {type(e).__name__}: {e}"
            self._stop()
            raise TensorParallelError(why) from None
        _active = self
        log.info("tensor parallel: %d ranks (%s), rank 0 is the engine", n, "nccl" if cuda else "gloo")

    def attach(self, runner) -> None:
        """Tell the workers the KV cache size rank 0 chose (they hold the same blocks) and wait until each has
        built its shard."""
        runner.tp = self
        self._send(("init", runner.num_blocks))
        deadline = time.monotonic() + INIT_TIMEOUT_S
        for r, conn in enumerate(self.conns, 1):
            while not conn.poll(0.2):
                if not self.procs[r - 1].is_alive():
                    self.fail(self._why(r))
                if time.monotonic() > deadline:
                    self.fail(f"tensor-parallel rank {r} did not load its shard within {INIT_TIMEOUT_S:.0f} s")
            msg = pickle.loads(conn.recv_bytes())
            if msg[0] != "ready":
                self.fail(f"tensor-parallel rank {r} failed to start: {msg[1]}")

    # ---- rank 0 -> workers ----
    def _send(self, msg) -> None:
        if self.broken is not None:
            raise TensorParallelError(self.broken)
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        for r, conn in enumerate(self.conns, 1):
            if not self.procs[r - 1].is_alive():
                self.fail(self._why(r))
            try:
                conn.send_bytes(data)
            except (OSError, EOFError):
                self.fail(self._why(r))

    def forward(self, run, tokens, positions, slots, tables):
        """Send one step's inputs to the workers and run rank 0's part of it (`run`), in lockstep."""
        self._send(("step", tokens, positions, slots, tables))
        try:
            return run(tokens, positions, slots, tables)
        except Exception as e:
            self.fail(self._diagnose() or f"tensor-parallel step failed: {_line(e)}")

    def write_slot(self, slot: int, adapter) -> None:
        """Every rank writes the slot: each lays its own shard of the adapter out (the weights travel whole)."""
        # clones: a view would pickle the whole buffer it views, once per tensor
        weights = None if adapter is None else {k: (a.clone(), b.clone()) for k, (a, b) in adapter.weights.items()}
        try:
            self._send(("slot", slot, weights, None if adapter is None else adapter.scaling))
        except TensorParallelError:
            # a slot write runs inside the scheduler, which fails requests only for adapter errors: the
            # engine is marked stopped here, and the step that follows fails its requests with the line
            pass

    # ---- failure ----
    def _why(self, r: int) -> str:
        p = self.procs[r - 1]
        conn = self.conns[r - 1]
        try:
            if conn.poll(0):
                msg = pickle.loads(conn.recv_bytes())
                if msg[0] == "error":
                    return f"tensor-parallel rank {r} failed: {msg[1]}"
        except (OSError, EOFError):
            pass
        p.join(timeout=2.0)
        if p.exitcode is not None:
            return f"tensor-parallel rank {r} exited (exit code {p.exitcode})"
        return f"tensor-parallel rank {r} stopped answering"

    def _diagnose(self) -> str | None:
        """The first worker that died or reported an error, as a line; None when all look well."""
        deadline = time.monotonic() + 3.0  # a peer's closed socket can reach us before its exit status
        while time.monotonic() < deadline:
            for r, (p, conn) in enumerate(zip(self.procs, self.conns, strict=True), 1):
                if not p.is_alive() or conn.poll(0):
                    return self._why(r)
            time.sleep(0.05)
        return None

    def fail(self, why: str):
        """Stop every rank and raise `why`; every later step raises it too."""
        if self.broken is None:
            self.broken = f"{why}; the tensor-parallel engine is stopped"
            log.error("%s", self.broken)
            self._stop()
        raise TensorParallelError(self.broken)

    def _stop(self) -> None:
        global _active
        for conn in self.conns:
            try:
                conn.send_bytes(pickle.dumps(("stop",)))
            except (OSError, EOFError):
                pass
        for p in self.procs:
            p.join(timeout=2.0)  # a rank that does not take the stop (hung, stopped) is killed
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()  # the default group and the all-reduce group
            except Exception:  # a group whose peer died may refuse a clean teardown; the process ends it
                log.debug("destroy_process_group failed", exc_info=True)
        if _active is self:
            _active = None

    def close(self) -> None:
        if self.broken is None:
            self.broken = "the tensor-parallel engine is closed"
            self._stop()


def _line(e: BaseException) -> str:
    """An exception as one bounded line (gloo's and NCCL's messages run over several)."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _worker_main(rank: int, world: int, port: int, timeout_s: float, config: EngineConfig, conn: Connection) -> None:
    """Rank `rank` (>= 1): build the shard, then replay rank 0's steps and slot writes until told to stop."""
    try:
        _worker_loop(rank, world, port, timeout_s, config, conn)
    except (EOFError, KeyboardInterrupt):  # rank 0 is gone
        pass
    except BaseException as e:
        line = _line(e)
        log.error("tensor-parallel rank %d: %s\n%s", rank, line, traceback.format_exc())
        try:
            conn.send_bytes(pickle.dumps(("error", line)))
        except (OSError, EOFError):
            pass
        os._exit(1)  # without tearing the group down: rank 0 sees the closed peer and the message above
    if dist.is_initialized():
        dist.destroy_process_group()


def _worker_loop(rank: int, world: int, port: int, timeout_s: float, config: EngineConfig, conn: Connection) -> None:
    from node.engine.llm_engine import default_kernel
    from node.engine.loader import build_model, checkpoint_tensors
    from node.engine.lora.mapping import LoRAMapping
    from node.engine.lora.weights import LoadedAdapter
    from node.engine.model_runner import ModelRunner

    cuda = config.device == "cuda"
    if config.threads or not cuda:
        torch.set_num_threads(config.threads or _cpu_threads(world))
    device = rank_device(config, rank)
    if cuda:
        torch.cuda.set_device(device)
    _init_group(rank, world, port, cuda, timeout_s)
    cfg = ModelConfig.from_dir(config.model_dir)
    dtype = config.torch_dtype(cfg)
    shard = Shard(rank, world, cfg)
    mapping = LoRAMapping(config.num_slots, default_kernel(device))
    model = build_model(cfg, mapping, checkpoint_tensors(config.model_dir), device, dtype, config.quantization, shard)
    msg = pickle.loads(conn.recv_bytes())
    if msg[0] != "init":
        return
    rconfig = dataclasses.replace(config, num_kv_blocks=msg[1], device=str(device), slot_images=False)
    runner = ModelRunner(rconfig, shard.local_config(), model, mapping, dtype)
    conn.send_bytes(pickle.dumps(("ready",)))
    while True:
        msg = pickle.loads(conn.recv_bytes())
        kind = msg[0]
        if kind == "step":
            runner.run(*msg[1:])
        elif kind == "slot":
            _, slot, weights, scaling = msg
            adapter = None if weights is None else LoadedAdapter("", "", 0, weights, scaling=scaling)
            copy = runner.write_slot(slot, adapter)
            if copy is not None:
                copy.synchronize()  # rank 0 waits for its own copy; this rank's next step must see it too
        else:
            return
