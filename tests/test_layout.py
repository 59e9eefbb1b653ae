"""The shape of the code: no import cycle in neo/, readers never import the training package, and the
model never imports the config (docs/design.md, "Layers"). The same static check the repository's
reviewers run; written here so that a clone has it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

NEO = Path(__file__).resolve().parents[1] / "neo"
FORBIDDEN = {  # importer prefix -> prefixes it must not import
    "neo.generate": ("neo.train",),
    "neo.evaluate": ("neo.train",),
    "neo.export": ("neo.train",),
    "neo.checkpoint": ("neo.train",),
    "neo.model": ("neo.config", "neo.train"),
    "neo.parallel": ("neo.config", "neo.train"),
}


def _module(path: Path) -> str:
    parts = path.relative_to(NEO.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> neo modules it imports (absolute or relative, at any depth of the file)."""
    files = {_module(p): p for p in NEO.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = mod.split(".")[
                        : len(mod.split(".")) - node.level + (path.name == "__init__.py")
                    ]
                    base = ".".join(package + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[mod] = {t for t in targets if t in files and t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (edges into a package's own children, which
    re-export them, do not count)."""
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_neo():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("importer, banned", sorted(FORBIDDEN.items()))
def test_layers_import_downwards_only(importer, banned):
    graph = import_graph()
    bad = [
        f"{m} imports {t}"
        for m, ts in graph.items()
        if m.startswith(importer)
        for t in ts
        if t.startswith(banned)
    ]
    assert bad == []


def test_the_check_sees_a_cycle():
    """Negative control: the cycle finder reports a made-up two-module cycle."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_no_sys_path_hacks_anywhere():
    root = NEO.parent
    offenders = [str(p.relative_to(root)) for folder in ("neo", "launch", "bench", "tests") for p in
                 (root / folder).rglob("*.py") if "sys.path.insert" in p.read_text() and p.name != "test_layout.py"]  # fmt: skip
    assert offenders == []
