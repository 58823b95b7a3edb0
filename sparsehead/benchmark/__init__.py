"""Tools for measuring the dynamic head: synthetic gate patterns, operator counts and the benchmark tool."""
from .counting import OpCounter, OpCounts, count_launches, count_ops
from .patterns import blob_mask, fixed_gates, random_mask

__all__ = ["blob_mask", "random_mask", "fixed_gates", "count_ops", "count_launches", "OpCounts", "OpCounter"]
