"""Command help as a terminal shows it.

Typer's rich help keeps a docstring's single line breaks, so a paragraph wrapped at the source's width
broke again wherever a narrower terminal wrapped it (a line of two words, then the rest). Each paragraph
of a command's docstring and of every explicit help text becomes one line, which the terminal wraps once.
Blank lines still part paragraphs. Our help texts hold no lists or preformatted blocks, which this would
join.

Help is click's plain layout, not typer's rich panels: at 80 columns the panels gave an option's help a
third of the width and cut words short ("LORAMESH_KEY_PAS…"); the plain layout wraps each option's help
under it, as argparse (vLLM) and clap (Foundry) do (and a bracket in a help text is a bracket, not markup).
"""

from __future__ import annotations

import inspect

import typer


def one_line_paragraphs(text: str) -> str:
    """`text` with each blank-line-separated paragraph joined into one line."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(text).split("\n\n"))


def _reflow_info(info) -> None:
    """A registered command, group or callback: its help text, else its callback's docstring."""
    if isinstance(getattr(info, "help", None), str):
        info.help = one_line_paragraphs(info.help)
    callback = getattr(info, "callback", None)
    if callback is not None and isinstance(callback.__doc__, str):
        callback.__doc__ = one_line_paragraphs(callback.__doc__)


def reflow_help(app: typer.Typer) -> typer.Typer:
    """Reflow the help of `app`, its commands and its sub-apps, in place, in the plain layout (again is
    harmless)."""
    app.rich_markup_mode = None
    _reflow_info(app.info)
    if app.registered_callback is not None:
        _reflow_info(app.registered_callback)
    for command in app.registered_commands:
        _reflow_info(command)
    for group in app.registered_groups:
        _reflow_info(group)
        reflow_help(group.typer_instance)
    return app
