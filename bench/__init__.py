"""Benchmarks for hachat: `python -m bench.http_bench`, `bench.realtime_bench`, `bench.failover_bench`."""
