"""Baselines the thesis compares against, as thin layers over the shared core (DESIGN.md §3 layer 6)."""
