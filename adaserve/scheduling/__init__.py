"""Scheduling policies: plans, candidate-tree selection, speculation parameters. No torch import."""

# policies in their own modules register themselves with policies.make_policy on import
from adaserve.scheduling import adaserve_plus  # noqa: E402,F401
