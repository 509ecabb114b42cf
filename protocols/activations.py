"""Interim: forwards to the baseline until the optimised protocol lands (same commit series)."""
from .baseline import silu, mish, gelu  # noqa: F401
