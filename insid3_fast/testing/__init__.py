"""Test support shipped with the package: the published-code oracle (``testing.published``).

Nothing in the production path imports this package; the tests, the benchmarks' reference
column and the thin ``insid3_fast.reference`` alias do.
"""
