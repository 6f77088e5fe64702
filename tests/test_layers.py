"""Architecture rules that code review alone would miss: the scheduling layer, the iteration
module, the simulator and the CLI parser never import torch."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("code", [
    "import adaserve.scheduling.policies, adaserve.scheduling.selection, adaserve.iteration",
    "import adaserve.sim.run, adaserve.harness.runner",
    "from adaserve.cli import build_parser; build_parser()",
])
def test_no_torch_import(code):
    check = code + "; import sys; assert 'torch' not in sys.modules, 'torch was imported'"
    p = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr


