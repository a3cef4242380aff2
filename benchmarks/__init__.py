"""Benchmarks of the library: `python -m benchmarks.inference`."""
