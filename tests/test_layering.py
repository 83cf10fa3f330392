"""The package arrows point one way, and the light modules stay light.

Layers, lowest first: common; ledger; node.adapters; node.engine and node.p2p; node's own modules;
gateway; devnet (the root CLI, the demo and the explorer). A package imports only packages below it
(its own modules too), and no product module imports the tests. Checked on the source with ast, so
in-function imports count as much as module-level ones.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("common", "ledger", "node", "gateway", "devnet")

# what each layer may import from the project (besides itself)
ALLOWED = {
    "common": set(),
    "ledger": {"common"},
    "node.adapters": {"common", "ledger"},
    "node.engine": {"common", "ledger", "node.adapters"},
    "node.p2p": {"common", "ledger", "node.adapters"},
    "node": {"common", "ledger", "node.adapters", "node.engine", "node.p2p"},
    "gateway": {"common", "ledger", "node", "node.adapters", "node.engine", "node.p2p"},
    "devnet": {"common", "ledger", "node", "node.adapters", "node.engine", "node.p2p", "gateway"},
}


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (None: not ours)."""
    parts = module.split(".")
    if parts[0] not in PRODUCT and parts[0] != "tests":
        return None
    if parts[0] == "node" and len(parts) > 1 and f"node.{parts[1]}" in ALLOWED:
        return f"node.{parts[1]}"
    return parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
    return out


def product_files() -> list[Path]:
    return sorted(p for pkg in PRODUCT for p in (ROOT / pkg).rglob("*.py"))


def test_arrows_point_down() -> None:
    wrong = []
    for path in product_files():
        mine = layer_of(module_name(path))
        for line, target in imports_of(path):
            theirs = layer_of(target)
            if theirs is None or theirs == mine:
                continue
            if theirs not in ALLOWED[mine]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({mine}) imports {target} ({theirs})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_every_product_module_has_a_layer() -> None:
    # a new top-level package must be placed in ALLOWED, not slip past the check above
    assert all(layer_of(module_name(p)) in ALLOWED for p in product_files())


def test_the_check_sees_a_wrong_arrow(tmp_path: Path) -> None:
    # the checker itself: an upward import, an in-function one and a relative one are all seen
    bad = ROOT / "ledger" / "_layering_probe.py"
    bad.write_text("def f():\n    from node import api\n\nfrom ..gateway import main\n")
    try:
        found = dict(imports_of(bad))
        assert found == {2: "node", 4: "gateway"}
        assert layer_of("node.api") not in ALLOWED["ledger"]
    finally:
        bad.unlink()


@pytest.mark.parametrize(
    ("module", "heavy"),
    [
        ("common.wire", ("torch", "web3", "transformers", "fastapi", "sqlalchemy")),
        ("ledger.types", ("web3", "torch", "sqlalchemy")),
        ("gateway.router", ("fastapi", "web3", "torch", "transformers", "sqlalchemy")),
    ],
)
def test_light_modules_load_nothing_heavy(module: str, heavy: tuple[str, ...]) -> None:
    # what makes an import slow is what it drags in; the time itself is measured by
    # `python -X importtime -c "import <module>"` (docs/architecture.md has the figures)
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} loads {out.stdout.strip()}"
