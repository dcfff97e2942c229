"""Benchmarks: ratios measured in one run, written with their command to bench/RESULTS.md."""
