"""Drafting that needs no torch, shared by the engine and the simulator (docs/architecture.md)."""
