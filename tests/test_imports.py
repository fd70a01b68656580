"""faceforge's subpackages import each other one way only: the graph of `faceforge.X` imports between
top-level modules and packages has no cycle, and `import faceforge` stays free of torch (the CLI starts fast)."""

import ast
import subprocess
import sys
from pathlib import Path

import faceforge

ROOT = Path(faceforge.__file__).parent


def _unit(path: Path) -> str:
    """The top-level module or package a file belongs to: 'cli' for cli.py, 'eval' for eval/metrics.py."""
    first = path.relative_to(ROOT).parts[0]
    return first.removesuffix(".py")


def import_graph() -> dict[str, dict[str, str]]:
    """unit -> {imported unit: 'file:line' of one import}, from every `import faceforge.X` / `from faceforge.X`."""
    graph: dict[str, dict[str, str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        source = _unit(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            elif isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                continue
            for module in modules:
                parts = module.split(".")
                if parts[0] == "faceforge" and len(parts) > 1 and parts[1] != source:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    graph.setdefault(source, {}).setdefault(parts[1], where)
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search, grey/black marks)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "grey"
        path.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == "grey":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "black"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}}) == []


def test_subpackages_import_one_way():
    graph = import_graph()
    assert "heads" in graph["engine"] and "tokenizer" in graph["heads"]  # the scan sees real imports
    cycle = find_cycle(graph)
    links = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import cycle: " + "; ".join(links)


def test_import_faceforge_does_not_import_torch():
    code = "import sys, faceforge, faceforge.cli; faceforge.Config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_no_file_points_outside_the_project():
    """Users have the repository only: sources, recipes, benchmarks and docs name no file outside it."""
    outside = "shared" + "/"  # spelled in two parts so that this file does not match itself
    repo = Path(__file__).resolve().parents[1]
    files = [repo / "README.md", *(p for d in ("src", "benchmarks", "docs", "tests") for p in (repo / d).rglob("*"))]
    hits = [str(p.relative_to(repo)) for p in files
            if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".sh", ".txt"} and outside in p.read_text()]
    assert not hits, f"files pointing outside the project: {hits}"
