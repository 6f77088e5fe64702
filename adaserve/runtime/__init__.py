"""Driving the engine: assembling it from an ``EngineConfig`` (build), measuring latency profiles
(profiler) and replaying traces in real time (replay). Front ends (cli, server, bench, harness) use
this package; the engine package itself only runs steps."""
