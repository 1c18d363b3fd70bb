"""Benchmarks of the retriever: MAT replay, draft latency, index size and build rate.

`specdraft bench replay|latency|index` (see `specdraft.bench.cli`). Each benchmark is a
function returning a frozen result dataclass with a `table()` for printing.
"""
