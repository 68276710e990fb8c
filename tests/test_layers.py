"""The import direction of docs/architecture.md, checked on the source: a module imports only
from its own layer or the layers below it, the sync and mount layers never import each other,
and no diskrsync import hides inside a function (where it would dodge a cycle)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# folder -> the package it is installed as (pyproject's package-dir)
FOLDERS = {"diskrsync": "diskrsync", "compression": "diskrsync.compression",
           "synccore": "diskrsync.synccore", "fsmount": "diskrsync.fsmount"}
# top to bottom; a module may import from its own layer and any layer below it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("diskrsync.cli",)),
    ("sync", ("diskrsync.synccore",)),
    ("mount", ("diskrsync.fsmount",)),
    ("format and stores", ("diskrsync.compression",)),
    ("base", ("diskrsync.base", "diskrsync")),
]
RANK = {"cli": 3, "sync": 2, "mount": 2, "format and stores": 1, "base": 0}


def layer_of(module: str) -> str:
    for name, prefixes in LAYERS:
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return name
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS and the docs")


def modules() -> list[tuple[str, Path]]:
    found = []
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found.append((".".join([package, *parts]), path))
    return found


def imports(tree: ast.Module, module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported diskrsync module, line, inside a function or class) for every import."""
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef
                                         | ast.ClassDef)
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, nested) for a in child.names
                           if a.name.startswith("diskrsync"))
            elif isinstance(child, ast.ImportFrom) and child.module:
                base = child.module
                if child.level:  # relative: resolve against this package
                    pkg = module.split(".")[: -child.level or None]
                    if path.name == "__init__.py":
                        pkg = module.split(".")[: len(module.split(".")) - child.level + 1]
                    base = ".".join([*pkg, child.module])
                if base.startswith("diskrsync"):
                    out.append((base, child.lineno, nested))
            visit(child, inner)

    visit(tree, False)
    return out


@pytest.mark.pure
def test_every_import_goes_down_the_layers() -> None:
    problems = []
    for module, path in modules():
        mine = layer_of(module)
        tree = ast.parse(path.read_text(), str(path))
        for target, line, nested in imports(tree, module, path):
            where = f"{path.relative_to(REPO)}:{line}"
            if nested:
                problems.append(f"{where}: {target} imported inside a function or class")
            theirs = layer_of(target)
            if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine] and theirs != mine):
                problems.append(f"{where}: {mine} layer imports {target} ({theirs} layer)")
    assert not problems, "\n".join(problems)


@pytest.mark.pure
def test_the_checker_sees_a_violation() -> None:
    """The check itself: an upward import and a function-local one are both reported."""
    tree = ast.parse("from diskrsync.cli.main import main\n"
                     "def f():\n    from diskrsync.base import errors\n")
    found = imports(tree, "diskrsync.compression.x", REPO / "compression" / "x.py")
    assert found == [("diskrsync.cli.main", 1, False), ("diskrsync.base", 3, True)]
    assert RANK[layer_of(found[0][0])] > RANK[layer_of("diskrsync.compression.x")]
    assert layer_of("diskrsync.fsmount.vfs") != layer_of("diskrsync.synccore.push")


@pytest.mark.process
@pytest.mark.parametrize("module", ["diskrsync.cli.push", "diskrsync.cli.images",
                                    "diskrsync.cli.main"])
def test_local_commands_do_not_load_the_ssh_stack(module: str) -> None:
    """paramiko costs ~0.2 s to import: a local push, info or verify must not pay it (a
    request type living beside the SSH connection code once pulled it into every push)."""
    code = f"import sys, {module}; print('paramiko' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip()
    assert out == "False"
