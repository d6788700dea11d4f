"""The public API is small and pinned: the hook API, serving /metrics, span export. Moving
or adding a name is a decision (CHANGELOG.md), not an accident."""

from __future__ import annotations

import spec_metrics


def test_all_is_pinned():
    assert spec_metrics.__all__ == [
        "SpecDecodeHooks", "HooksConfig", "StepResult", "StrictModeError",
        "SpecDecodeCollector",
        "start_http_server", "MetricsServer", "make_wsgi_app", "make_asgi_app",
        "make_tls_context", "BasicAuth",
        "SpanExportProcessor", "start_otlp_metrics_exporter", "__version__",
    ]
    for name in spec_metrics.__all__:
        assert getattr(spec_metrics, name) is not None


def test_public_modules_keep_their_paths():
    from spec_metrics import catalog, multiprocess
    from spec_metrics.integrations import sglang, transformers, vllm  # noqa: F401

    assert catalog.METRICS and catalog.STAGES
    assert {"RankInfo", "rank_from_env", "rank_labels", "rank_resource",
            "start_rank_http_server", "scrape_config"} <= set(multiprocess.__all__)


def test_internal_subpackages_are_underscored():
    from pathlib import Path

    package = Path(spec_metrics.__file__).parent
    public = {"http", "ops", "integrations", "demo"}
    for sub in package.iterdir():
        if sub.is_dir() and (sub / "__init__.py").exists():
            assert sub.name.startswith("_") or sub.name in public, sub.name
