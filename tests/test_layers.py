"""The packages' floors hold: launch -> umt -> data_pipeline, never upward; the model and the
objectives are a library of their own (an export carries umt/model/ as its remote code); no
import cycle; no module past ~600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("umt", "data_pipeline", "launch")
FLOOR = {"launch": 2, "umt": 1, "data_pipeline": 0}
MAX_LINES = 600


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES: set[str] = set()


def imports(path: Path, name: str, top_level_only: bool) -> set[str]:
    """Project modules `path` imports (every import, or those run when it is imported)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = import_time_nodes(tree) if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:  # a submodule by its name, else the module named
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in MODULES else base)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def import_time_nodes(tree: ast.AST):
    """Every node that runs when the module is imported: all but function bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        yield node
        yield from import_time_nodes(node)


def project_graph(top_level_only: bool) -> dict[str, set[str]]:
    mods = modules()
    MODULES.update(mods)
    graph = {}
    for name, path in mods.items():
        targets = set()
        for target in imports(path, name, top_level_only):
            while target and target not in mods:  # `from pkg import name`: the module or pkg
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


# Upward imports that run only when called, each for a reason of the design.
LAZY_UPWARD = {
    # Curation scores pairs with a UMT export (DESIGN: scoring models come in through a small
    # scorer interface; the data side imports no model code at module level).
    ("data_pipeline.curate.scorers", "umt.export"),
}


def upward(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {
        (name, target)
        for name, targets in graph.items()
        for target in targets
        if FLOOR[target.split(".")[0]] > FLOOR[name.split(".")[0]]
    }


def test_no_import_runs_to_a_higher_floor():
    assert not upward(project_graph(top_level_only=True))  # none when a module is imported
    assert upward(project_graph(top_level_only=False)) == LAZY_UPWARD


def test_the_model_and_objectives_are_a_library():
    """umt.model imports only itself (an export copies it as remote code; `training`, which
    gives the network its objective, is not copied); umt.objectives only itself,
    umt.distributed and how samples are identified."""
    allowed = {
        "umt.model": ("umt.model",),
        "umt.objectives": (
            "umt.objectives", "umt.distributed", "data_pipeline.sample_ids",
        ),
    }  # fmt: skip
    wrong = []
    for name, targets in project_graph(top_level_only=False).items():
        for package, ok in allowed.items():
            if name in ("umt.model.training", "umt.model"):  # builds it with its objective
                continue
            if name == package or name.startswith(package + "."):
                wrong += [f"{name} imports {t}" for t in targets if not t.startswith(ok)]
    assert not wrong, wrong


def test_no_import_cycle():
    graph = project_graph(top_level_only=True)
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_no_module_is_past_600_lines():
    long = {
        name: n
        for name, path in modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
