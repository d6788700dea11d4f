"""Prometheus: aggregation of finished steps and their exposition.

collector.py (`SpecDecodeCollector`, a prometheus_client custom collector) aggregates
records into series.py's per-method histograms and counters, with exemplars.py's slots
(shown only once their spans were exported); textformat.py is its fast writer and
exposition.py the /metrics response that uses it. Imports the catalog, `_support` and
`_tracing` (for exemplar sources). Internal: import from `spec_metrics`.
"""
