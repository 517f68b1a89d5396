"""Benchmarks and figure makers, run as scripts (`python bench/precision.py`); a package so that a notebook
running inside a chapter folder imports them by name (chapter 01 has a bench.py of its own)."""
