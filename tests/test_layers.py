"""The folders are layers: each imports only the folders below it, and no module imports itself
back through others. The README's "Layers" section draws the same order."""

from __future__ import annotations

import pytest
from import_graph import FOLDERS, all_modules, folder_of, imports_of

LAYERS = FOLDERS  # low to high: store, pipelines, extract, train, evaluate
RANK = {folder: index for index, folder in enumerate(LAYERS)}


def test_the_package_has_the_folders_the_layers_name():
    assert {folder_of(module) for module in all_modules()} == set(LAYERS)


@pytest.mark.parametrize("module", all_modules())
def test_imports_point_down_the_layers(module):
    upward = sorted(
        f"{module} imports {name} ({folder_of(name)} is above {folder_of(module)})"
        for name in imports_of(module)
        if RANK[folder_of(name)] > RANK[folder_of(module)]
    )
    assert not upward, "\n".join(upward)


def _cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in imports_of(node):
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


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The check can fail: a made-up edge train.model -> train.loop closes a loop."""
    import import_graph

    real = import_graph.imports_of

    def with_edge(module):
        extra = {"astar.train.loop"} if module == "astar.train.model" else set()
        return real(module) | extra

    monkeypatch.setattr(__import__(__name__), "imports_of", with_edge)
    assert any("astar.train.model" in group for group in _cycles())
