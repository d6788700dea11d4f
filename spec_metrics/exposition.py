"""The /metrics response: prometheus_client's content negotiation, our fast writer.

Same behaviour as prometheus_client's WSGI/ASGI apps (OPTIONS and GET, `name[]`
filtering, gzip when accepted, the format chosen from the Accept header), but a
SpecDecodeCollector in the registry is written by `SpecDecodeCollector.render_text`
(cached prefixes, see textformat.py) instead of sample by sample. Other collectors in the
registry, a `name[]` query and escaping schemes other than the legacy ones go through
prometheus_client's own writers, so the bytes are the same either way.
"""

from __future__ import annotations

import gzip
from typing import Any, Callable, NamedTuple
from urllib.parse import parse_qs

from prometheus_client import exposition as classic
from prometheus_client.openmetrics import exposition as openmetrics

from .collector import _RENDER_REQUEST, PrerenderRequest
from .exemplars import ShownExemplars

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
    """`encoder(registry)`, with every SpecDecodeCollector written by its fast writer, and
    the exemplars this response carries (to mark shown once it was sent as OpenMetrics)."""
    om = _fast_format(encoder)
    if om is None:
        return encoder(registry), []
    parts: list[bytes] = []
    shown: list[ShownExemplars] = []
    foreign: list = []

    def flush() -> None:
        if foreign:
            text = encoder(_Families(foreign))
            parts.append(text[:-len(_EOF)] if om and text.endswith(_EOF) else text)
            foreign.clear()

    _RENDER_REQUEST.active = True
    try:
        for family in registry.collect():
            if isinstance(family, PrerenderRequest):
                flush()
                text, exemplars = family.collector.render_text(om)
                parts.append(text.encode("utf-8"))
                shown.append(exemplars)
            else:
                foreign.append(family)
    finally:
        _RENDER_REQUEST.active = False
    flush()
    if om:
        parts.append(_EOF)
    return b"".join(parts), shown


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
