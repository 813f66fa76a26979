"""Benchmarks of the FwPKM memory core (see bench_memory.py)."""
