"""Every ``ADASERVE_*`` environment variable the package, its scripts and its tests read, with what it
does. The experiment harness warns about any other ``ADASERVE_*`` variable (a misspelling, or one
read nowhere); the README's table lists these; ``tests/test_harness_config.py`` checks both against every
name the source mentions. The ``exps/`` system switches (``ADASERVE=ON``, ``ADASERVE_PLUS=ON``, ...)
are the harness's own and live in the system registry."""

import os

from adaserve.core.errors import UserError

VARIABLES: dict[str, str] = {
    "ADASERVE_CACHE": "the cache folder: measured profiles, kernel choices, converted models, fetched traces "
                      "(default $XDG_CACHE_HOME/adaserve, else ~/.cache/adaserve)",
    "ADASERVE_CACHE_DIR": "the same as ADASERVE_CACHE",
    "ADASERVE_PROFILE_CACHE": "0: measure the quick profile of `run` / `serve` every time, never cached",
    "ADASERVE_PROFILE_CLOCK": "cpu: time profile points in the thread's CPU time instead of wall time (CPU only)",
    "ADASERVE_PROGRESS": "1 / 0: progress bars on / off (default: on a terminal only)",
    "ADASERVE_NUMBA": "0: the host loops run as numpy array code, not numba-compiled (slower, same results)",
    "ADASERVE_PREPACK": "1 / 0: CPU linears prepacked by oneDNN / plain F.linear (default: timed at load)",
    "ADASERVE_CPU_DECODE": "1 / 0: CPU steps of a few tokens run compiled layers / the operator path "
                           "(default: timed at load)",
    "ADASERVE_GQA_FOLD": "1 / 0: grouped query heads folded into query rows (default: on CUDA only)",
    "ADASERVE_CUDNN_SDPA": "1: attention may use cuDNN's kernels (default: kept out; they plan per shape)",
    "ADASERVE_GRAPH_PARTS": "N: a step runs as at most N CUDA-graphed forwards, one per attention group "
                            "(default 3; 1: a step of several groups runs eagerly)",
    "ADASERVE_DEVICE_MASK": "0: attention masks built dense on the host and copied, not sent as windows spelled out "
                            "on the GPU; 1: windows on the CPU too (default: windows off the CPU)",
    "ADASERVE_PAGED_ATTENTION": "1: decode and tree attention read the paged KV cache with a Triton kernel "
                                "(CUDA; default off: not yet measured on a GPU)",
    "ADASERVE_STAGING": "0: a step's arrays go to the GPU one copy each, not packed into one pinned copy",
    "ADASERVE_TP_TIMEOUT": "seconds a tensor-parallel collective may take before the run ends (default 20)",
    "ADASERVE_TRACES": "tests: a folder holding the artifact's traces to test on; none: the generated ones only",
    "ADASERVE_BIN": "the adaserve command the exps/ scripts run (default .venv/bin/adaserve)",
    "ADASERVE_IMAGE": "docker/ scripts: the image name (default adaserve:latest)",
    "ADASERVE_CONTAINER": "docker/ scripts: the container name (default adaserve)",
    "ADASERVE_CUDA_TEST_DEVICE": "tests: the device tests/test_engine_cuda.py runs on (cpu: a dry run of it)",
}


def env_switch(name: str, on: str, off: str, unset: str) -> bool | None:
    """A 0/1 environment switch: True for 1, False for 0, None when unset, empty or ``auto``; any
    other value is refused with what each setting means (``on``, ``off``, ``unset``)."""
    value = os.environ.get(name, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise UserError(f"{name}={value!r}: use 1 ({on}), 0 ({off}) or leave it unset ({unset})")
    return value == "1"
