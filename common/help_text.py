"""Command help as a terminal shows it: click's plain layout, not typer's rich panels.

At 80 columns the panels gave an option's help a third of the width and cut words short ("LORAMESH_KEY_PAS…"),
and they kept a docstring's single line breaks, so a paragraph wrapped at the source's width broke again wherever
a narrower terminal wrapped it. The plain layout wraps each paragraph of a command's help once, at the terminal's
width (up to 80 columns), and each option's help under it, as argparse (vLLM) and clap (Foundry) do; a bracket in
a help text is a bracket, not markup.
"""

from __future__ import annotations

import typer


def plain_help(app: typer.Typer) -> typer.Typer:
    """Put `app` and its sub-apps in the plain help layout, in place (again is harmless)."""
    app.rich_markup_mode = None
    for group in app.registered_groups:
        plain_help(group.typer_instance)
    return app
