"""The package's dependency rules, checked on the source: imports go one way (core/workload <-
scheduling <- iteration <- executors <- runtime <- front ends), the scheduling core and the
simulator never import torch, and no two modules import each other, directly or round a cycle.
Function-level (lazy) imports count too: they are dependencies all the same."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "adaserve"

# layer of each top-level part; a module may import its own part and parts of a lower layer only
LAYERS = {
    "core": 0, "workload": 1, "scheduling": 2, "iteration": 3, "config": 3, "drafting": 3,
    "sim": 4, "engine": 4, "runtime": 5,
    "bench": 6, "harness": 6, "server": 6,
    "cli": 7, "__main__": 8, "__init__": 8,
}
NO_TORCH = ("core", "workload", "scheduling", "iteration", "config", "drafting", "sim", "harness", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str] = frozenset()) -> set[str]:
    """Modules ``path`` imports; ``from pkg import mod`` depends on ``pkg.mod`` only (when it is one
    of ``modules``), not on the package's ``__init__``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names} & set(modules)
            out.update(subs or {mod})
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    return {m: {i for i in imports_of(p, set(modules)) if i in modules and i != m} for m, p in modules.items()}


def part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_has_a_layer():
    assert {part(m) for m in graph()} <= set(LAYERS)


def test_imports_go_down_the_layers():
    bad = [f"{m} -> {i}" for m, deps in graph().items() for i in deps
           if part(i) != part(m) and LAYERS[part(i)] >= LAYERS[part(m)]]
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_torch_free_parts_do_not_import_torch():
    bad = [module_name(p) for p in PKG.rglob("*.py") if part(module_name(p)) in NO_TORCH
           and any(i == "torch" or i.startswith("torch.") for i in imports_of(p))]
    assert not bad, f"torch imported by {bad}"


def test_no_import_cycles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"
