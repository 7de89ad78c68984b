"""The package's import graph, read from the source with ``ast`` (nothing is imported).

Every ``import astar.x.y`` and ``from astar.x.y import z`` counts, at module level or inside a
function: a lazy import is still a dependency. Used by the layering test and the dvc.yaml test.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("store", "pipelines", "extract", "train", "evaluate")  # the package's folders


def module_file(module: str) -> Path | None:
    """``astar.train.loop`` -> REPO/train/loop.py (or a package's __init__.py); None if absent."""
    parts = module.split(".")[1:]
    if not parts or parts[0] not in FOLDERS:
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def all_modules() -> list[str]:
    """Every module of the package, as ``astar.<folder>...``."""
    found = []
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found.append(".".join(("astar", *parts)))
    return found


@cache
def lazy_exports(package: str) -> dict[str, str]:
    """A package's names imported on first use (its ``_EXPORTS``: name -> submodule), as
    ``astar.store`` has; {} for a package that imports them eagerly."""
    path = module_file(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "_EXPORTS" for target in node.targets
        ):
            return {
                name: f"{package}.{module}" for name, module in ast.literal_eval(node.value).items()
            }
    return {}


def _runtime_nodes(tree: ast.AST):
    """Every node but the bodies of ``if TYPE_CHECKING:`` (imports that never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


@cache
def imports_of(module: str) -> frozenset[str]:
    """The astar modules ``module`` imports directly when it runs (a ``from pkg import name``
    that names a submodule, or a lazily exported name, counts as that submodule; imports under
    ``if TYPE_CHECKING:`` do not count)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("astar."))
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:  # the package imports absolutely; a relative one goes unseen
                raise ValueError(f"{path}:{node.lineno}: relative import; write astar.<folder>...")
            if node.module == "astar":  # from astar import store
                found.update(f"astar.{alias.name}" for alias in node.names)
                continue
            if not (node.module or "").startswith("astar."):
                continue
            found.add(node.module)
            lazy = lazy_exports(node.module)
            for alias in node.names:
                if module_file(f"{node.module}.{alias.name}") is not None:
                    found.add(f"{node.module}.{alias.name}")
                elif alias.name in lazy:
                    found.add(lazy[alias.name])
    found.discard(module)
    return frozenset(name for name in found if module_file(name) is not None)


def closure(module: str) -> set[str]:
    """``module`` and everything it imports, transitively (packages' __init__ included)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imports_of(name))
        parts = name.split(".")  # importing a.b.c runs a/__init__ and a/b/__init__ first
        todo.extend(".".join(parts[:i]) for i in range(2, len(parts)))
    return {name for name in seen if module_file(name) is not None}


def folder_of(module: str) -> str:
    return module.split(".")[1]


def files_of(modules: set[str]) -> set[Path]:
    return {module_file(name) for name in modules}
