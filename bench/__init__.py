"""Benchmarks for streamd: programs that print a table and write JSON results.

Run one with `python -m bench <scenario> [options]` from the repository root;
`python -m bench --help` lists the scenarios. Nothing here is a test: there
are no timing assertions, only measurements.
"""
