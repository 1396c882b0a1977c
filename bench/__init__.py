"""Benchmarks of the DESIGN 7 budgets; run them with ``make bench`` (``python -m bench``)."""
