"""Host buffers for adapters as read from their packages, allocated once when the engine starts.

On CUDA they are pinned, so a slot write is one asynchronous copy of the raw bytes. Pinning is a
`cudaHostAlloc`, which holds the driver while it runs: one per cold load made the running batch's
step stall (85-93 ms on the H200, bench/NOTES.md), so the engine pins here, before it serves, and
never again. A buffer goes back to the pool when the last reference to it is dropped (its adapter
left the host cache, and any slot copy in flight finished: the copy holds it), so no buffer is
reused while something may still read it."""

from __future__ import annotations

import logging
import threading
import weakref

import torch

log = logging.getLogger(__name__)


class HostPool:
    def __init__(self, count: int, nbytes: int, pin: bool) -> None:
        self.count = count
        self.nbytes = nbytes
        self._free = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin) for _ in range(count)]
        self._ptrs = frozenset(b.data_ptr() for b in self._free)
        self._lock = threading.Lock()
        if count:
            log.info(
                "adapter host pool: %d %sbuffers of %.1f MiB (%.2f GiB)",
                count,
                "pinned " if pin else "",
                nbytes / 2**20,
                count * nbytes / 2**30,
            )

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A free buffer's first `nbytes` bytes, or None (too big, or every buffer is held). The
        buffer returns to the pool when this tensor object is garbage: whoever holds the bytes'
        readers (an adapter, a slot copy in flight) holds it."""
        with self._lock:
            if nbytes > self.nbytes or not self._free:
                return None
            whole = self._free.pop()
        view = whole[:nbytes]
        weakref.finalize(view, self._give, whole)
        return view

    def owns(self, buf: torch.Tensor) -> bool:
        """Whether `buf` is (the start of) one of this pool's buffers."""
        return buf.data_ptr() in self._ptrs

    def _give(self, whole: torch.Tensor) -> None:
        with self._lock:
            self._free.append(whole)

    def free(self) -> int:
        with self._lock:
            return len(self._free)
