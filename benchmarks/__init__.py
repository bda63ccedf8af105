"""Benchmarks of the project; `python -m benchmarks.run` runs them and writes docs/benchmarks.md."""
