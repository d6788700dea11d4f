"""The /metrics response: prometheus_client's content negotiation, our fast writer.

Same behaviour as prometheus_client's WSGI/ASGI apps (OPTIONS and GET, `name[]`
filtering, gzip when accepted, the format chosen from the Accept header). The registry's
collectors are written in registry order: each SpecDecodeCollector by its own fast writer
(`_render_text`: cached prefixes, see textformat.py), every other collector's families by
prometheus_client's writer, so the bytes are what prometheus_client would write for the whole
registry. A `name[]` query, escaping schemes other than the legacy ones, a registry with
target info or one that is not a CollectorRegistry go through prometheus_client's writers
alone (SpecDecodeCollector.collect() yields ordinary families).
"""

from __future__ import annotations

import gzip
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs

from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.registry import Collector

from spec_metrics._prometheus.collector import SpecDecodeCollector
from spec_metrics._prometheus.exemplars import ShownExemplars

__all__ = ["MetricsResponse", "metrics_response", "render", "render_marking"]

_EOF = b"# EOF\n"
_LEGACY_ESCAPING = (openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8)  # same bytes for our names


class _Families:
    """A registry-like view of a list of families, for prometheus_client's writers."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self) -> list:
        return self._families


def _fast_format(encoder: Callable[[Any], bytes]) -> bool | None:
    """True/False: OpenMetrics 1.x / classic with legacy escaping; None: not ours to write."""
    func = getattr(encoder, "func", encoder)
    keywords = getattr(encoder, "keywords", {})
    if keywords.get("escaping", openmetrics.UNDERSCORES) not in _LEGACY_ESCAPING:
        return None
    if func is openmetrics.generate_latest:
        return str(keywords.get("version", "1.0.0")).startswith("1.") or None
    if func is classic.generate_latest:
        return False
    return None


def render(registry: Any, encoder: Callable[[Any], bytes]) -> bytes:
    """`encoder(registry)`, with every SpecDecodeCollector written by its fast writer."""
    return render_marking(registry, encoder)[0]


def render_marking(registry: Any, encoder: Callable[[Any], bytes]
                   ) -> tuple[bytes, list[ShownExemplars]]:
    """`encoder(registry)` with every SpecDecodeCollector written by its fast writer, and
    the exemplars this response carries (to mark shown once it was sent as OpenMetrics)."""
    om = _fast_format(encoder)
    collectors = _collectors_in_order(registry) if om is not None else None
    if collectors is None or not any(isinstance(c, SpecDecodeCollector) for c in collectors):
        return encoder(registry), []
    parts: list[bytes] = []
    shown: list[ShownExemplars] = []
    foreign: list = []

    def flush() -> None:
        if foreign:
            text = encoder(_Families(foreign))
            parts.append(text[:-len(_EOF)] if om and text.endswith(_EOF) else text)
            foreign.clear()

    for collector in collectors:
        if isinstance(collector, SpecDecodeCollector):
            flush()
            text, exemplars = collector._render_text(bool(om))
            parts.append(text.encode("utf-8"))
            shown.append(exemplars)
        else:
            foreign.extend(collector.collect())
    flush()
    if om:
        parts.append(_EOF)
    return b"".join(parts), shown


def _collectors_in_order(registry: Any) -> list[Collector] | None:
    """The collectors of a CollectorRegistry in the order its collect() visits them, or None
    where that cannot be known (another registry type, target info set).

    prometheus_client has no public way to list a registry's collectors; its
    `_collector_to_names` (insertion-ordered, guarded by `_lock`) has been stable since
    0.4. Should it change, every response takes prometheus_client's own path: the same
    bytes, slower (tests/test_exposition.py would notice the speed path is gone)."""
    names = getattr(registry, "_collector_to_names", None)
    lock = getattr(registry, "_lock", None)
    if not isinstance(names, dict) or lock is None:
        return None
    get_target_info = getattr(registry, "get_target_info", None)
    if get_target_info is not None and get_target_info():
        return None
    with lock:
        return list(names)


class MetricsResponse(NamedTuple):
    status: str
    headers: list[tuple[str, str]]
    body: bytes
    # The exemplars the body carries: call `sent()` once the response went out.
    shown: list[ShownExemplars]

    def sent(self) -> None:
        """The response was sent: if it was OpenMetrics, its exemplars were shown and newer
        ones may replace them (the classic format carries none)."""
        if any(k == "Content-Type" and v.startswith("application/openmetrics-text")
               for k, v in self.headers):
            for exemplars in self.shown:
                exemplars.mark()


def metrics_response(registry: Any, method: str, accept: str | None,
                     accept_encoding: str | None, query: str,
                     disable_compression: bool = False) -> MetricsResponse:
    """(status, headers, body, shown) for a request to /metrics, as prometheus_client
    answers."""
    if method == "OPTIONS":
        return MetricsResponse("200 OK", [("Allow", "OPTIONS,GET")], b"", [])
    if method != "GET":
        return MetricsResponse(
            "405 Method Not Allowed", [("Allow", "OPTIONS,GET")],
            f"# HTTP 405 Method Not Allowed: {method}; use OPTIONS or GET\n".encode(), [])
    encoder, content_type = classic.choose_encoder(accept or "")
    params = parse_qs(query or "")
    shown: list[ShownExemplars] = []
    if "name[]" in params:
        body = encoder(registry.restricted_registry(params["name[]"]))
    else:
        body, shown = render_marking(registry, encoder)
    headers = [("Content-Type", content_type)]
    if not disable_compression and classic.gzip_accepted(accept_encoding or ""):
        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    return MetricsResponse("200 OK", headers, body, shown)
