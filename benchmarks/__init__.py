"""Benchmarks of the toolkit: `python -m benchmarks [--quick] [--json PATH]` runs the suite
(see suite.py); the other modules are focused studies that print their own reports."""
