"""Prometheus: aggregation of finished steps and their exposition.

collector.py (`SpecDecodeCollector`, a prometheus_client custom collector) aggregates
records into series.py's per-method histograms and counters, with exemplars.py's slots
(shown only once their spans were exported); textformat.py is its fast writer and
exposition.py the /metrics response that uses it. The OTLP metrics push reads the same
collectors: otlp_data.py (their families as the SDK's metric data), otlp_push.py (the
thread), otlp_config.py (settings), otlp_totals.py (its counts on /metrics); loaded on
first use only. Imports the catalog, `_support`, `_tracing` (for exemplar sources) and
`_version`. Internal: import from `spec_metrics`.
"""
