"""The package's layout: no module of llama/ imports itself back through others at import time, and the
reference model holds nothing of the fast path."""

import ast
from pathlib import Path
from typing import Dict, List, Set

LLAMA = Path(__file__).resolve().parents[1] / "llama"


def module_imports(root: Path) -> Dict[str, Set[str]]:
    """For each module of the package at `root`, the package's modules it imports at module level."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:  # module level only: imports inside functions run later
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_circle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import circle (a list of modules ending where it starts), or [] if there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: List[str]) -> List[str]:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                circle = visit(nxt, path + [nxt])
                if circle:
                    return circle
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            circle = visit(start, [start])
            if circle:
                return circle
    return []


def test_no_module_of_the_package_imports_itself_back():
    graph = module_imports(LLAMA)
    assert {"llama.model", "llama.generation", "llama.cli.chat", "llama.cli.options"} <= graph.keys()
    assert find_circle(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_the_reference_model_imports_nothing_of_the_fast_path():
    graph = module_imports(LLAMA)
    assert not {m for m in graph["llama.model"] if m.startswith("llama.fast")}
    source = (LLAMA / "model.py").read_text()
    for word in ("wqkv", "w13", "kv_len", "last_pos"):
        assert word not in source, word
