"""What every layer shares: the hooks' configuration (config.py), rejected-input and
decision counters (drops.py), one verify pass reduced to histograms (summary.py), the package
logger (log.py), the fork reset (forking.py) and the exporter thread with a deadline
(export_caller.py).
Imports nothing of the package but the catalog. Internal: import from `spec_metrics`.
"""
