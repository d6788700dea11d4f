"""Operator tooling around the library: the `spec-metrics` CLI (cli.py), the generators of
the Grafana dashboard (dashboards.py, dashboard_docs.py), alert and recording rules
(rules.py), panel snapshots (snapshot.py), and the CLI's tracer provider (telemetry.py).
Nothing in the hot path imports it."""
