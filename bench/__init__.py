"""Benchmarks: every figure is measured in the same invocation as its baseline and printed as a ratio."""
