"""The simulator: the shared iteration loop driven by a latency model and an acceptance model."""
