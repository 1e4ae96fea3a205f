"""Benchmarks of the attngate ops (``python benchmarks/run.py --help``)."""
