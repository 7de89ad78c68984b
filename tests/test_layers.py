"""The folders are layers: each imports only the folders below it, and no module imports itself
back through others. The README's "Layout of the code" section draws the same order."""

from __future__ import annotations

import pytest
from import_graph import FOLDERS, REPO, all_modules, folder_of, imports_of, module_file

LAYERS = FOLDERS  # low to high: store, pipelines, extract, train, evaluate
RANK = {folder: index for index, folder in enumerate(LAYERS)}


def test_the_installed_packages_are_the_layers_and_every_subpackage():
    """setup.cfg maps exactly the layers, and lists every folder with an __init__.py under them
    (a package left out of ``packages`` is missing from a non-editable install)."""
    import configparser

    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    mapped = dict(line.split("=") for line in setup["options"]["package_dir"].strip().splitlines())
    assert {k.strip(): v.strip() for k, v in mapped.items()} == {
        f"astar.{folder}": folder for folder in LAYERS
    }
    listed = set(setup["options"]["packages"].split())
    found = {
        "astar." + ".".join(init.parent.relative_to(REPO).parts)
        for folder in LAYERS
        for init in (REPO / folder).rglob("__init__.py")
    }
    assert listed == found


@pytest.mark.parametrize("module", all_modules())
def test_imports_point_down_the_layers(module):
    upward = sorted(
        f"{module} imports {name} ({folder_of(name)} is above {folder_of(module)})"
        for name in imports_of(module)
        if RANK[folder_of(name)] > RANK[folder_of(module)]
    )
    assert not upward, "\n".join(upward)


def _cycles(edges=imports_of) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted; ``edges(m)``
    gives the modules ``m`` imports."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges(node):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in all_modules():
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_itself_back():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle():
    """The check can fail: a made-up edge train.model -> train.loop closes a loop."""

    def with_edge(module):
        extra = {"astar.train.loop"} if module == "astar.train.model" else set()
        return imports_of(module) | extra

    assert any("astar.train.model" in group for group in _cycles(with_edge))


def test_relative_and_bare_package_imports_are_seen(tmp_path, monkeypatch):
    """Two import forms the graph must not skip: ``from astar import x`` counts, a relative
    import is refused (it would otherwise go unchecked)."""
    import import_graph

    source = tmp_path / "probe.py"
    monkeypatch.setattr(import_graph, "module_file", lambda name: source)
    source.write_text("from astar import store\n")
    import_graph.imports_of.cache_clear()
    assert "astar.store" in import_graph.imports_of("astar.train.probe")
    source.write_text("from .loop import Trainer\n")
    import_graph.imports_of.cache_clear()
    with pytest.raises(ValueError, match="relative import"):
        import_graph.imports_of("astar.train.probe")
    import_graph.imports_of.cache_clear()


def test_the_stores_lazy_names_are_its_type_checking_imports():
    """astar.store imports its names on first use: the map and the imports tools read agree,
    and every name resolves to the module the map says."""
    import ast
    import importlib

    import astar.store

    tree = ast.parse(module_file("astar.store").read_text())
    listed = {
        alias.name: node.module.rsplit(".", 1)[1]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module.startswith("astar.store.")
        for alias in node.names
    }
    assert listed == astar.store._EXPORTS
    for name, module in listed.items():
        defined = getattr(importlib.import_module(f"astar.store.{module}"), name)
        assert getattr(astar.store, name) is defined, name
