"""OpenTelemetry: which steps are traced and their spans, built after the fact.

sink.py (`TraceSink`) selects steps (outliers.py's running quantile, traceparent.py's
sampled request contexts, a ratio, a priority token bucket) and builds their spans from the
recorded timestamps; step_exemplars.py says where a traced step's spans are, for exemplars;
span_fate.py follows whether those spans were exported; processor.py is the public
`SpanExportProcessor`, which reports that fate and counts every span on /metrics. Imports
the catalog, `_support` and `_version`, never the metrics side. Internal: import from
`spec_metrics`.
"""
