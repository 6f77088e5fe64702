"""Every constant is written once, and model constants come from a model's family (never its
name). The import layering is checked in tests/test_architecture.py."""

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
