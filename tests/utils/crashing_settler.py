"""A settler process that dies at a crash point: the crash tests' entry, never the product's.

    python -m tests.utils.crashing_settler SPEC <the arguments of `loramesh settler run`>

builds the very settler `loramesh settler run` builds (ledger.cli.run_settler, from the same options) with an
on_point hook that kills the process, abruptly, the SPEC-th time it reaches the point SPEC names:
"point" or "point@k" (k >= 1), the point one of CRASH_POINTS. The process then exits with CRASH_EXIT_CODE,
leaving the database and the chain as a power cut would.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

# the Settler's on_point names; in_flight: every batch of a step sent, no receipt awaited yet
CRASH_POINTS = ("before_send", "after_send", "in_flight", "after_receipt")
CRASH_EXIT_CODE = 97

log = logging.getLogger(__name__)


class CrashHook:
    """Settler(on_point=CrashHook("after_send@3")): dies the 3rd time the settler reaches after_send."""

    def __init__(self, spec: str) -> None:
        name, at, count = spec.partition("@")
        if name not in CRASH_POINTS or (at and not (count.isdigit() and int(count) >= 1)):
            raise ValueError(f"a crash point is one of {', '.join(CRASH_POINTS)} (optionally @N), got {spec!r}")
        self.spec, self.point, self.times = spec, name, int(count or 1)
        self.seen = 0

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen >= self.times:
            log.warning("crash injection at %s", self.spec)
            logging.shutdown()
            os._exit(CRASH_EXIT_CODE)


def main(argv: list[str]) -> None:
    from common.logs import configure_logging
    from ledger.cli import run_settler, settler_app, settler_settings

    hook = CrashHook(argv[0])
    # the options of `settler run`, parsed by that very command: the same names, defaults and checks
    run = typer.main.get_command(settler_app).commands["run"]
    with run.make_context("settler run", list(argv[1:])) as ctx:
        params = dict(ctx.params)
    drain, config = params.pop("drain"), params.pop("config")
    configure_logging()
    n = run_settler(settler_settings(config, **params), drain=drain, on_point=hook)
    print(f"settled {n} records")


if __name__ == "__main__":
    main(sys.argv[1:])
