"""The code map names code that exists.

`docs/architecture.md` and the README point at files and at what they define (`gateway/request.py:ServedRequest.
respond`); a rename that forgets them leaves a newcomer a map of a house that is gone. Each `path` or
`path:Name` / `path:Class.member` in backquotes must name a file of the repository and, for Python, a top-level
name it defines (not one it imports: the file named is the name's home) and a member of that class; a bare
`Class.member` must name a class of the product that has that member. A path written short (`lora/weights.py`,
under the engine's table row) is taken as the end of a repository path. `bench/NOTES.md` is left out: it is a
dated log, naming files as they were on the day of each run.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("docs/architecture.md", "README.md")
SKIPPED_DIRS = {".venv", "node_modules", ".git", "__pycache__", "out", "cache", "lib"}
REFERENCE = re.compile(r"`([\w./-]+\.(?:py|sol|sh|toml))(?::([A-Za-z_][\w.]*))?")
MEMBER = re.compile(r"`([A-Z]\w+)\.(?!(?:md|py|toml|json|txt)`)([A-Za-z_]\w*)")  # not a file name
PRODUCT = ("common", "ledger", "node", "gateway", "devnet")


@functools.cache
def repository_files() -> tuple[str, ...]:
    """Every file of the checkout, its skipped folders (the environment, tools, helpers' scratch) never walked."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.startswith("scratch_")]
        rel = Path(folder).relative_to(ROOT)
        found += [(rel / f).as_posix() for f in files]
    return tuple(found)


def candidates(path: str) -> list[str]:
    files = repository_files()
    if path in files:
        return [path]
    return [f for f in files if f.endswith("/" + path)]


@functools.cache
def defined(path: str) -> dict[str, set[str] | None]:
    """Top-level names a Python file defines: a class maps to its members (methods, nested classes, class-level
    and `self.` attributes), anything else to None."""
    tree = ast.parse((ROOT / path).read_text())
    names: dict[str, set[str] | None] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members: set[str] = set()
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    members.add(sub.name)
                elif isinstance(sub, ast.AnnAssign) and isinstance(sub.target, ast.Name):
                    members.add(sub.target.id)
                elif isinstance(sub, ast.Assign):
                    members.update(t.id for t in sub.targets if isinstance(t, ast.Name))
                elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    members.add(sub.attr)
            names[node.name] = members
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = None
        elif isinstance(node, ast.Assign):
            names.update((t.id, None) for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = None
    return names


def resolves(path: str, symbol: str | None) -> bool:
    found = candidates(path)
    if symbol is None or not path.endswith(".py"):
        return bool(found)
    head, _, member = symbol.partition(".")
    for f in found:
        names = defined(f)
        if head not in names:
            continue
        members = names[head]
        if not member or (members is not None and member.split(".")[0] in members):
            return True
    return False


@functools.cache
def product_classes() -> dict[str, list[set[str]]]:
    classes: dict[str, list[set[str]]] = {}
    for f in repository_files():
        if f.endswith(".py") and f.split("/")[0] in PRODUCT:
            for name, members in defined(f).items():
                if members is not None:
                    classes.setdefault(name, []).append(members)
    return classes


def member_exists(cls: str, member: str) -> bool:
    return any(member in members for members in product_classes().get(cls, []))


def references(doc: str) -> list[tuple[str, str | None]]:
    text = (ROOT / doc).read_text()
    return sorted({(m.group(1), m.group(2)) for m in REFERENCE.finditer(text)}, key=lambda r: (r[0], r[1] or ""))


@pytest.mark.parametrize("doc", DOCS)
def test_every_named_file_and_symbol_exists(doc):
    refs = references(doc)
    assert len(refs) > 20, f"{doc}: the pattern found only {len(refs)} references"
    missing = [f"{path}:{symbol}" if symbol else path for path, symbol in refs if not resolves(path, symbol)]
    text = (ROOT / doc).read_text()
    members = sorted({m.groups() for m in MEMBER.finditer(text)})
    missing += [f"{cls}.{member}" for cls, member in members if not member_exists(cls, member)]
    assert missing == [], f"{doc} names code that is not there: {missing}"


def test_the_check_sees_a_missing_member_and_a_missing_file():
    assert resolves("gateway/router.py", "Router.route")
    assert resolves("lora/weights.py", "decode_lora")  # a path written short
    assert not resolves("gateway/router.py", "Router.no_such_method")
    assert not resolves("gateway/router.py", "no_such_function")
    assert not resolves("gateway/no_such_module.py", None)
    assert not resolves("gateway/request.py", "node_cache_salt")  # imported there, defined in gateway/keys.py
    assert not resolves("common/wire.py", "parse_json.anything")  # a function has no members
    assert member_exists("ServedRequest", "respond")
    assert not member_exists("ServedRequest", "no_such_method")
    assert not member_exists("NoSuchClass", "respond")
