"""Tools for measuring the dynamic head: synthetic gate patterns and timing helpers."""
from .patterns import blob_mask, fixed_gates, random_mask

__all__ = ["blob_mask", "random_mask", "fixed_gates"]
