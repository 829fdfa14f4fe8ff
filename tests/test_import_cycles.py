"""No import cycles among pipeline/ modules, read from the source with `ast` (nothing imported).

Every import counts, at module level or inside a function: a lazy import still makes the two
modules depend on each other, it only hides it from Python's import order. `from package
import module` is an edge to the module; `from module import name` an edge to the module.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "pipeline").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _edges(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            targets.update(submodules if len(submodules) == len(node.names) else [base])
    resolved = set()
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_cycles() -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles_among_pipeline_modules() -> None:
    assert import_cycles() == []


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch) -> None:
    """The check can fail: two modules that import each other (one lazily) are reported."""
    package = tmp_path / "pipeline"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pipeline.b import thing\n")
    (package / "b.py").write_text("def thing():\n    from pipeline import a\n    return a\n")
    (package / "c.py").write_text("import pipeline.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_cycles() == [["pipeline.a", "pipeline.b"]]


# ---- floors: packages import downward only ----------------------------------------------

# Package-level cycles that are known and meant: each family's registry entry names its tiny
# builder (pipeline.testing), and the tiny builders build models through the registry.
KNOWN_PACKAGE_CYCLES = [["pipeline.inference", "pipeline.testing"]]


def _unit(module: str) -> str:
    """The floor a module lives on: a top-level module, or a subpackage as a whole."""
    return ".".join(module.split(".")[:2])


def package_cycles() -> list[list[str]]:
    """Groups of top-level modules and subpackages of pipeline/ that import each other (an
    import "upward": e.g. pipeline.sink -> pipeline.shard while pipeline.shard -> pipeline.sink)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        for target in _edges(name, path, modules):
            if _unit(name) != _unit(target):
                graph.setdefault(_unit(name), set()).add(_unit(target))

    def reach(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    units = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    reachable = {u: reach(u) for u in units}
    groups = {tuple(sorted(u2 for u2 in units if u2 == u or (u2 in reachable[u] and u in reachable[u2])))
              for u in units}
    return sorted(list(g) for g in groups if len(g) > 1)


def test_no_package_imports_upward() -> None:
    """pipeline/ is a house of floors (records, config and the ledger near the ground; dataset,
    prepare, sink, shard above; outcomes, runner, progress, cli on top): a top-level module or
    subpackage never imports one that imports it back. The ledger lives beside records.py, so
    sink, prepare and dataset need nothing from shard/."""
    assert package_cycles() == KNOWN_PACKAGE_CYCLES


def test_the_floor_checker_finds_an_upward_import(tmp_path, monkeypatch) -> None:
    package = tmp_path / "pipeline"
    for sub in ("low", "high"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "high" / "run.py").write_text("from pipeline.low.sink import write\n")
    (package / "high" / "ledger.py").write_text("VERDICT = 1\n")
    (package / "low" / "sink.py").write_text("from pipeline.high.ledger import VERDICT\n")  # no module cycle
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_cycles() == []
    assert package_cycles() == [["pipeline.high", "pipeline.low"]]
