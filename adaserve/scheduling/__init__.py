"""Scheduling policies: plans, candidate-tree selection, speculation parameters. No torch import."""
