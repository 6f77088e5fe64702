"""Every constant is written once, model constants come from a model's family (never its name),
and the torch-free layers import one way, without cycles."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adaserve"

# name -> pattern of a definition (or a copy) in the source
SINGLE_SOURCE = {
    "artifact baseline (ARTIFACT_BASELINE_MS)": r"^\s*ARTIFACT_BASELINE_MS\s*=",
    "artifact Llama verification table": r"\b55,\s*85,\s*105\b",
    "KV block size (scheduling.admission.BLOCK_SIZE)": r"\b(BLOCK_SIZE|BLOCK|block_size)\b[^=\n(]*=\s*16\b",
}


def _sources() -> dict[str, str]:
    return {str(p.relative_to(PACKAGE.parent)): p.read_text(encoding="utf-8")
            for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("what", list(SINGLE_SOURCE))
def test_constant_is_defined_once(what):
    pattern = re.compile(SINGLE_SOURCE[what], re.MULTILINE)
    sites = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}"
             for path, text in _sources().items() for m in pattern.finditer(text)]
    assert len(sites) == 1, f"{what} is written at {sites}: import the one definition instead"


def test_no_model_constant_is_chosen_by_name():
    pattern = re.compile(r"""startswith\(\s*["']qwen|["']qwen["']\s+in\s""", re.IGNORECASE)
    sites = [f"{path}:{text.count(chr(10), 0, m.start()) + 1}"
             for path, text in _sources().items() for m in pattern.finditer(text)]
    assert not sites, f"model constants chosen by name at {sites}: use the model's family"


# The torch-free layers and what each may import (besides itself): data flows one way.
LAYERS = {"core": set(), "workload": {"core"}, "scheduling": {"core"},
          "iteration": {"core", "scheduling"}, "sim": {"core", "scheduling", "iteration"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """adaserve modules ``path`` imports anywhere (inside functions too)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("adaserve.")}


def _graph() -> dict[str, set[str]]:
    files = [p for layer in LAYERS for p in
             ([PACKAGE / f"{layer}.py"] if (PACKAGE / f"{layer}.py").exists()
              else sorted((PACKAGE / layer).rglob("*.py")))]
    modules = {_module_name(p): p for p in files}
    return {m: {i for i in _imports(p) if i in modules} for m, p in modules.items()}


def _layer(module: str) -> str:
    return module.split(".")[1]


def test_torch_free_layers_import_one_way():
    wrong = sorted(f"{m} -> {i}" for m, deps in _graph().items() for i in deps
                   if _layer(i) != _layer(m) and _layer(i) not in LAYERS[_layer(m)])
    assert not wrong, f"imports against the data flow: {wrong}"


def test_torch_free_layers_have_no_import_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for dep in sorted(graph[m]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"
