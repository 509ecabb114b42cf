"""Interim: forwards to the baseline until the optimised protocol lands (same commit series)."""
from .baseline import reciprocal, rsqrt  # noqa: F401
