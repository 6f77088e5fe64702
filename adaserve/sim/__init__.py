"""The simulator: the shared iteration loop driven by a latency model and an acceptance model."""

#: Names the simulator's cost model; recorded with each simulated result, so that the harness runs
#: a finished point again when the model changes (bump it with every change of what a result
#: would be for the same trace, system and profile).
SIM_MODEL = "3: adaserve_plus learns from the accepted node, as on the engine; exact_latency_stats"
