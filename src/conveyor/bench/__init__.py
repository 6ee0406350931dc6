"""`conveyor bench`: the benchmark scenarios, measured on a fresh database each.

See docs/performance.md for what each scenario measures and the latest numbers.
"""
