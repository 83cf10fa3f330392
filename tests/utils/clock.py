"""A clock a test moves by hand: the code under test is given it where it would read time.monotonic or time.time."""

from __future__ import annotations


class Clock:
    """Callable as a clock; `t` is the time it says, set or moved by the test."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t
