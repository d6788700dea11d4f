"""What every layer shares: the hooks' configuration (config.py), rejected-input and
decision counters (drops.py), the package logger (log.py) and the fork reset (forking.py).
Imports nothing of the package but the catalog. Internal: import from `spec_metrics`.
"""
