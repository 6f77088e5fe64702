"""Requests, SLOs, traces, latency profiles, metrics and result files. No torch."""
