"""Integrations with inference libraries. Each module is imported explicitly by the user and
imports its library lazily, so `import spec_metrics` stays light."""
