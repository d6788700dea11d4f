"""What Prometheus 3 asks for when it scrapes, and what /metrics answers (docs/prometheus3.md).

No Prometheus 3 binary runs here, so its requests are pinned as data: the Accept headers
below are the ones Prometheus 3 builds from `scrape_protocols` and the name escaping scheme
(scrape.go `acceptHeader`, config.go `DefaultScrapeProtocols` /
`DefaultProtoFirstScrapeProtocols`; the same strings are pinned by Prometheus' own
scrape_test.go), and what it does with the answer is written down from its source: the
Content-Type must parse (Go's mime.ParseMediaType) to a media type it knows, else the scrape
fails; OpenMetrics is parsed with exemplars; histogram `le` values are normalized
(labels.FormatOpenMetricsFloat). Every request goes through the real HTTP server on
127.0.0.1, and every body must equal prometheus_client's own writer for the same header.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import math
import re
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client import exposition as classic
from prometheus_client.metrics import disable_created_metrics, enable_created_metrics
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

import spec_metrics
from spec_metrics.catalog import (
    DEFAULT_STAGE_BUCKETS,
    DEFAULT_STEP_BUCKETS,
    METRICS,
    SPAN_EXPORT_METRICS,
)

from .conftest import run_step

ROOT = Path(__file__).resolve().parents[1]

# ---- what Prometheus 3 sends -------------------------------------------------------------

# Prometheus >= 3.4 with its defaults (scrape_protocols OpenMetricsText1.0.0,
# OpenMetricsText0.0.1, PrometheusText1.0.0, PrometheusText0.0.4; metric_name_escaping_scheme
# allow-utf-8): only the 1.0.0 formats carry the escaping parameter.
PROM3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2")
# Prometheus 3.0-3.3: `escaping=allow-utf-8` appended to every protocol; up to 3.2 the text
# 1.0.0 entry already had one, so it carries it twice.
PROM3_0_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;escaping=allow-utf-8;q=0.5,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;escaping=allow-utf-8;q=0.3,*/*;q=0.2")
PROM3_3_ACCEPT = PROM3_0_ACCEPT.replace(";escaping=allow-utf-8;escaping=", ";escaping=")
# `scrape_native_histograms: true` (3.8+; before, --enable-feature=native-histograms), or
# --enable-feature=created-timestamp-zero-ingestion: protobuf first. prometheus_client serves
# no protobuf, nor do we.
PROM3_PROTO_FIRST = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
    "encoding=delimited;q=0.6,"
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1")
# metric_name_validation_scheme: legacy (or metric_name_escaping_scheme: underscores).
PROM3_UNDERSCORES = PROM3_ACCEPT.replace("allow-utf-8", "underscores")
# metric_name_escaping_scheme: dots / values (not defaults; see docs/prometheus3.md).
PROM3_DOTS = PROM3_ACCEPT.replace("allow-utf-8", "dots")
PROM3_VALUES = PROM3_ACCEPT.replace("allow-utf-8", "values")
# scrape_protocols limited to one format.
PROM3_ONLY_TEXT_1 = "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.6,*/*;q=0.5"
PROM3_ONLY_TEXT_004 = "text/plain;version=0.0.4;q=0.6,*/*;q=0.5"
PROM3_ONLY_PROTO = ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;"
                    "encoding=delimited;q=0.6,*/*;q=0.5")

OPENMETRICS_UTF8 = ("application/openmetrics-text; version=1.0.0; charset=utf-8; "
                    "escaping=allow-utf-8")
TEXT_004 = "text/plain; version=0.0.4; charset=utf-8"

# Accept header -> the exact Content-Type we answer (prometheus_client 0.26's negotiation).
ANSWERS = {
    PROM3_ACCEPT: OPENMETRICS_UTF8,
    PROM3_0_ACCEPT: OPENMETRICS_UTF8,
    PROM3_3_ACCEPT: OPENMETRICS_UTF8,
    PROM3_PROTO_FIRST: OPENMETRICS_UTF8,
    PROM3_UNDERSCORES: OPENMETRICS_UTF8.replace("allow-utf-8", "underscores"),
    PROM3_DOTS: OPENMETRICS_UTF8.replace("allow-utf-8", "dots"),
    PROM3_VALUES: OPENMETRICS_UTF8.replace("allow-utf-8", "values"),
    PROM3_ONLY_TEXT_1: "text/plain; version=1.0.0; charset=utf-8; escaping=allow-utf-8",
    PROM3_ONLY_TEXT_004: TEXT_004,
    PROM3_ONLY_PROTO: TEXT_004,
}
IDS = ["default", "3.0-3.2", "3.3", "proto-first", "underscores", "dots", "values",
       "only-text-1.0.0", "only-text-0.0.4", "only-proto"]


def _accept_header(protocols: list[str], escaping: str) -> str:
    """Prometheus 3.4+'s header for `scrape_protocols` in order and a name escaping scheme
    (weights from 0.6 down; only the 1.0.0 text formats carry `escaping`)."""
    headers = {
        "PrometheusProto": "application/vnd.google.protobuf;"
                           "proto=io.prometheus.client.MetricFamily;encoding=delimited",
        "PrometheusText0.0.4": "text/plain;version=0.0.4",
        "PrometheusText1.0.0": "text/plain;version=1.0.0",
        "OpenMetricsText0.0.1": "application/openmetrics-text;version=0.0.1",
        "OpenMetricsText1.0.0": "application/openmetrics-text;version=1.0.0",
    }
    weight = len(headers) + 1
    parts = []
    for protocol in protocols:
        value = headers[protocol]
        if protocol in ("PrometheusText1.0.0", "OpenMetricsText1.0.0"):
            value += f";escaping={escaping}"
        parts.append(f"{value};q=0.{weight}")
        weight -= 1
    return ",".join([*parts, f"*/*;q=0.{weight}"])


DEFAULT_PROTOCOLS = ["OpenMetricsText1.0.0", "OpenMetricsText0.0.1", "PrometheusText1.0.0",
                     "PrometheusText0.0.4"]


def test_the_pinned_headers_are_what_prometheus_3_builds() -> None:
    assert _accept_header(DEFAULT_PROTOCOLS, "allow-utf-8") == PROM3_ACCEPT
    assert _accept_header(["PrometheusProto", *DEFAULT_PROTOCOLS],
                          "allow-utf-8") == PROM3_PROTO_FIRST
    assert _accept_header(DEFAULT_PROTOCOLS, "underscores") == PROM3_UNDERSCORES
    assert _accept_header(["PrometheusText1.0.0"], "allow-utf-8") == PROM3_ONLY_TEXT_1
    assert _accept_header(["PrometheusText0.0.4"], "allow-utf-8") == PROM3_ONLY_TEXT_004
    assert _accept_header(["PrometheusProto"], "allow-utf-8") == PROM3_ONLY_PROTO


# ---- what Prometheus 3 does with the answer ----------------------------------------------

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 2045 token, as Go's mime package reads it
_PARAM = re.compile(rf'\s*;\s*({_TOKEN})=({_TOKEN}|"(?:[^"\\]|\\.)*")\s*')


def _go_parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """Go's mime.ParseMediaType, for the values a server sends: `type/subtype` then
    `; key=value` parameters (token or quoted string), keys case-insensitive and never
    repeated. Raises ValueError where Go returns an error: Prometheus 3 then fails the scrape
    (no fallback_scrape_protocol by default)."""
    match = re.match(rf"\s*({_TOKEN})/({_TOKEN})", value)
    if match is None:
        raise ValueError(f"no media type in {value!r}")
    params: dict[str, str] = {}
    pos = match.end()
    while pos < len(value.rstrip()):
        param = _PARAM.match(value, pos)
        if param is None:
            raise ValueError(f"bad parameter at {value[pos:]!r}")
        key = param.group(1).lower()
        if key in params:
            raise ValueError(f"duplicate parameter {key!r}")
        params[key] = param.group(2).strip('"')
        pos = param.end()
    return f"{match.group(1)}/{match.group(2)}".lower(), params


def _prometheus3_parser(content_type: str) -> str:
    """The parser Prometheus 3 picks (textparse.New / extractMediaType), or ValueError."""
    media_type, _ = _go_parse_media_type(content_type)
    if media_type not in ("application/openmetrics-text", "application/vnd.google.protobuf",
                          "text/plain"):
        raise ValueError(f"unsupported Content-Type {content_type!r}")
    return media_type


def _go_format_openmetrics_float(value: float) -> str:
    """Prometheus 3's labels.FormatOpenMetricsFloat, applied to every histogram `le`: Go's
    strconv.FormatFloat(f, 'g', -1, 64) (shortest digits; exponent form below 1e-4 or from
    1e6 on, at least two exponent digits), then ".0" where there is neither '.' nor 'e'."""
    if value == 1:
        return "1.0"
    if value == 0:
        return "0.0"
    if value == -1:
        return "-1.0"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    sign, digit_tuple, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    digits = "".join(map(str, digit_tuple))
    point = len(digits) + exponent  # Go's digs.dp: where the decimal point goes
    exp = point - 1
    if exp < -4 or exp >= 6:
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        text = f"{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    elif point <= 0:
        text = "0." + "0" * -point + digits
    elif point >= len(digits):
        text = digits + "0" * (point - len(digits))
    else:
        text = digits[:point] + "." + digits[point:]
    text = ("-" if sign else "") + text
    return text if ("." in text or "e" in text) else text + ".0"


@pytest.mark.parametrize("value, expected", [
    (1.0, "1.0"), (0.0, "0.0"), (10.0, "10.0"), (2.5, "2.5"), (0.005, "0.005"),
    (0.0001, "0.0001"), (5e-05, "5e-05"), (123456.0, "123456.0"), (1e6, "1e+06"),
    (123456789.0, "1.23456789e+08"), (1.5e-7, "1.5e-07"), (math.inf, "+Inf"),
])
def test_go_float_format_oracle(value: float, expected: str) -> None:
    # Go's own outputs for these (strconv 'g', -1); the oracle must reproduce them.
    assert _go_format_openmetrics_float(value) == expected


# ---- through the real server --------------------------------------------------------------


@pytest.fixture
def served(make_hooks, registry, exporter):
    """A registry with our collector (traced steps, so exemplars), a prometheus_client
    Counter and Histogram next to it (their `_created` series), served on 127.0.0.1."""
    hooks = make_hooks(trace_ratio=1.0, group_label="tenant", max_groups=2)
    for step in range(4):
        run_step(hooks, None, [step % 3, 1, 4], 4)
    hooks.declare_drafter("llama-3-8b", "eagle-head", 4)
    Counter("app_requests", "Requests the host application served.", registry=registry).inc(3)
    Histogram("app_latency_seconds", "Host latency.", registry=registry,
              buckets=(0.005, 1, 2.5)).observe(0.2)
    with spec_metrics.start_http_server(port=0, registry=registry) as server:
        yield server, registry, exporter


def _get(url: str, accept: str, accept_encoding: str | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    headers = {"Accept": accept, "User-Agent": "Prometheus/3.5.0"}
    if accept_encoding:
        headers["Accept-Encoding"] = accept_encoding
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, dict(response.headers.items()), response.read()


@pytest.mark.parametrize("accept", list(ANSWERS), ids=IDS)
def test_prometheus3_requests_get_the_negotiated_format(served, accept: str) -> None:
    server, registry, _ = served
    status, headers, body = _get(server.url, accept)
    assert status == 200
    assert headers["Content-Type"] == ANSWERS[accept]
    # The same bytes prometheus_client's own writer produces for this header and registry.
    encoder, content_type = classic.choose_encoder(accept)
    assert content_type == ANSWERS[accept]
    assert body == encoder(registry)
    # Prometheus 3 accepts the Content-Type (a failed parse or unknown type fails the scrape).
    assert _prometheus3_parser(headers["Content-Type"]) in (
        "application/openmetrics-text", "text/plain")


@pytest.mark.parametrize("accept", [PROM3_ACCEPT, PROM3_0_ACCEPT, PROM3_3_ACCEPT,
                                    PROM3_PROTO_FIRST, PROM3_UNDERSCORES], ids=IDS[:5])
def test_openmetrics_with_exemplars_for_prometheus3(served, accept: str) -> None:
    server, registry, exporter = served
    _, headers, body = _get(server.url, accept)
    media_type, params = _go_parse_media_type(headers["Content-Type"])
    assert (media_type, params["version"], params["charset"]) == (
        "application/openmetrics-text", "1.0.0", "utf-8")
    assert params["escaping"] == ("underscores" if accept == PROM3_UNDERSCORES else "allow-utf-8")
    # Byte-equal to an explicit OpenMetrics 1.0.0 writer call with that escaping.
    assert body == openmetrics.generate_latest(registry, escaping=params["escaping"],
                                               version="1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    exemplars = {f.name: [s.exemplar for s in f.samples if s.exemplar is not None]
                 for f in families.values()}
    # Our histogram buckets and counters carry exemplars, each naming an exported span.
    assert exemplars["spec_decode_accepted_tokens"]
    assert exemplars["spec_decode_step_duration_seconds"]
    spans = {(format(s.context.trace_id, "032x"), format(s.context.span_id, "016x"))
             for s in exporter.get_finished_spans()}
    for exemplar in (e for found in exemplars.values() for e in found):
        assert (exemplar.labels["trace_id"], exemplar.labels["span_id"]) in spans


def test_allow_utf8_and_underscores_give_the_same_bytes(served) -> None:
    # Every name we write is in the legacy charset: both schemes leave it alone.
    server, _, _ = served
    bodies = {_get(server.url, accept)[2] for accept in (
        PROM3_ACCEPT, PROM3_0_ACCEPT, PROM3_3_ACCEPT, PROM3_PROTO_FIRST, PROM3_UNDERSCORES)}
    assert len(bodies) == 1
    for spec in (*METRICS, *SPAN_EXPORT_METRICS):
        assert re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", spec.family), spec.family  # no colon


@pytest.mark.parametrize("accept", [PROM3_DOTS, PROM3_VALUES], ids=["dots", "values"])
def test_dots_and_values_escaping_are_prometheus_clients(served, accept: str) -> None:
    # Not Prometheus 3's defaults. prometheus_client 0.26 rewrites even legacy-valid names
    # for them (dots: every `_` doubled; values: sample lines get a U__ prefix while HELP and
    # TYPE lines keep the name): we answer exactly as it does, documented as unsupported.
    server, registry, _ = served
    _, headers, body = _get(server.url, accept)
    scheme = accept.split("escaping=")[1].split(";")[0]
    assert body == openmetrics.generate_latest(registry, escaping=scheme, version="1.0.0")
    assert headers["Content-Type"].endswith(f"escaping={scheme}")
    if scheme == "dots":
        assert b"\nspec__decode__accepted__tokens__total{" in body
    else:
        assert b"\nU__spec__decode__accepted__tokens__total{" in body
        assert b"# TYPE spec_decode_accepted_tokens counter\n" in body


def test_text_fallbacks_carry_no_exemplars(served) -> None:
    server, registry, _ = served
    for accept, content_type in ((PROM3_ONLY_TEXT_1, ANSWERS[PROM3_ONLY_TEXT_1]),
                                 (PROM3_ONLY_TEXT_004, TEXT_004), (PROM3_ONLY_PROTO, TEXT_004)):
        _, headers, body = _get(server.url, accept)
        assert headers["Content-Type"] == content_type
        assert b"trace_id" not in body and b"# EOF" not in body
        assert b"spec_decode_accepted_tokens_total{" in body


def test_gzip_as_prometheus_asks(served) -> None:
    # Prometheus sends Accept-Encoding: gzip unless enable_compression is false.
    server, registry, _ = served
    _, headers, body = _get(server.url, PROM3_ACCEPT, accept_encoding="gzip")
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == OPENMETRICS_UTF8
    assert gzip.decompress(body) == openmetrics.generate_latest(registry, escaping="allow-utf-8")


def test_wsgi_and_asgi_apps_answer_the_same_content_type(served) -> None:
    _, registry, _ = served
    captured: dict[str, list] = {}

    def start_response(status: str, headers: list) -> None:
        captured["headers"] = headers

    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "HTTP_ACCEPT": PROM3_ACCEPT, "wsgi.input": io.BytesIO()}
    b"".join(spec_metrics.make_wsgi_app(registry)(environ, start_response))
    assert ("Content-Type", OPENMETRICS_UTF8) in captured["headers"]

    messages: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"",
             "headers": [(b"accept", PROM3_ACCEPT.encode())]}
    asyncio.run(spec_metrics.make_asgi_app(registry)(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    assert (b"content-type", OPENMETRICS_UTF8.encode()) in start["headers"]


# ---- bucket bounds --------------------------------------------------------------------------

_LE = re.compile(r'_bucket\{(?:[^}]*,)?le="([^"]*)"')


@pytest.mark.parametrize("accept", [PROM3_ACCEPT, PROM3_ONLY_TEXT_004], ids=["om", "text"])
def test_bucket_bounds_are_written_as_prometheus3_stores_them(served, accept: str) -> None:
    # Prometheus 3 normalizes `le` (FormatOpenMetricsFloat): le="1" would be stored as "1.0".
    # We write bounds as prometheus_client does (floatToGoString), which is already that form,
    # so a series has the same labels in Prometheus 2 and 3 and in our rules and dashboards.
    server, _, _ = served
    text = _get(server.url, accept)[2].decode()
    bounds = _LE.findall(text)
    assert bounds
    for bound in bounds:
        assert bound == _go_format_openmetrics_float(float(bound)) == floatToGoString(bound)
    for expected in ("5e-05", "0.005", "0.0001", "1.0", "10.0", "+Inf"):
        assert f'le="{expected}",method="eagle",stage="verify"' in text
    for expected in ("0.0", "1.0", "4.0", "+Inf"):  # accepted-length buckets: counts
        assert re.search(rf'spec_decode_accepted_length_bucket\{{le="{re.escape(expected)}",',
                         text)
    assert 'app_latency_seconds_bucket{le="1.0"}' in text  # prometheus_client's own


def test_every_configured_bound_survives_prometheus3_normalization(make_hooks, registry) -> None:
    # Default layouts and user buckets given as ints or in exponent range.
    for bound in (*DEFAULT_STAGE_BUCKETS, *DEFAULT_STEP_BUCKETS):
        assert floatToGoString(bound) == _go_format_openmetrics_float(bound)
    hooks = make_hooks(stage_buckets=(0.0001, 1, 3, 250_000, 1_000_000),
                       step_buckets=(2, 123456789))
    run_step(hooks, None, [1], 1)
    text = openmetrics.generate_latest(registry).decode()
    rendered = spec_metrics._prometheus.exposition.render(registry, openmetrics.generate_latest)
    assert rendered.decode() == text
    bounds = set(_LE.findall(text))
    assert {"0.0001", "1.0", "3.0", "250000.0", "1e+06", "2.0", "1.23456789e+08"} <= bounds
    for bound in bounds:
        assert bound == _go_format_openmetrics_float(float(bound))


def test_le_literals_in_committed_rules_and_dashboards_are_normalized() -> None:
    # A query on le="1" would match nothing in Prometheus 3: every literal in the queries we
    # ship must be in the normalized form. (alerts/tests/ holds promtool's input series, not
    # queries.)
    files = [*ROOT.glob("dashboards/*.json"), *ROOT.glob("alerts/*.yml")]
    assert files
    literals = set()
    for path in files:
        text = path.read_text()
        if path.suffix == ".json":
            text = json.dumps(json.loads(text))  # one escaping style: le=\"0.0\"
        literals |= set(re.findall(r'le=\\?"([^"\\]*)\\?"', text))
    assert literals
    for literal in literals:
        assert literal == _go_format_openmetrics_float(float(literal)), literal


# ---- _created -------------------------------------------------------------------------------


def test_created_series_as_prometheus_client_writes_them(served) -> None:
    # Our collector writes no `_created` series; prometheus_client's own Counter and
    # Histogram do, unless PROMETHEUS_DISABLE_CREATED_SERIES (or disable_created_metrics())
    # turned them off. Either way the response equals prometheus_client's.
    server, registry, _ = served
    body = _get(server.url, PROM3_ACCEPT)[2].decode()
    created = {line.split("{")[0].split(" ")[0] for line in body.splitlines()
               if not line.startswith("#") and "_created" in line.split(" ")[0]}
    assert created == {"app_requests_created", "app_latency_seconds_created"}
    disable_created_metrics()  # what PROMETHEUS_DISABLE_CREATED_SERIES=True does at import
    try:
        body = _get(server.url, PROM3_ACCEPT)[2]
        assert b"_created" not in body and b"app_requests_total 3.0" in body
        assert body == openmetrics.generate_latest(registry, escaping="allow-utf-8")
    finally:
        enable_created_metrics()


def test_vllm_compat_counters_follow_the_created_switch() -> None:
    # The vLLM-named compat counters stand in for vLLM's own prometheus_client Counters:
    # `_created` when those would have it, none when created series are turned off.
    from spec_metrics.integrations.vllm import VllmCompatCollector

    registry = CollectorRegistry()
    collector = VllmCompatCollector("tiny", registry=registry)
    collector.add_engine("0", 2)

    def body() -> bytes:
        return openmetrics.generate_latest(registry, escaping="allow-utf-8")

    assert b"\nvllm:spec_decode_num_drafts_created{" in body()
    disable_created_metrics()
    try:
        assert b"_created" not in body()
    finally:
        enable_created_metrics()
    assert b"\nvllm:spec_decode_num_drafts_created{" in body()


def test_colon_names_depend_on_the_escaping_prometheus_asks_for(registry) -> None:
    # prometheus_client 0.26 (and so vLLM's own /metrics) writes OpenMetrics sample names
    # with `underscores` escaping through the label-name charset: the colon of vLLM's names
    # becomes `_` on sample lines (HELP/TYPE keep it). Prometheus 3's default asks for
    # allow-utf-8 and gets `vllm:...`; Prometheus 2 (no escaping parameter) and Prometheus 3
    # with legacy names get `vllm_...`. Pinned so that a prometheus_client fix is noticed;
    # our own names have no colon (docs/prometheus3.md).
    from spec_metrics.integrations.vllm import VllmCompatCollector

    VllmCompatCollector("tiny", registry=registry).add_engine("0", 2)
    prometheus2 = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                   "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    with spec_metrics.start_http_server(port=0, registry=registry) as server:
        for accept, name in ((PROM3_ACCEPT, b"vllm:spec_decode_num_drafts_total{"),
                             (PROM3_UNDERSCORES, b"vllm_spec_decode_num_drafts_total{"),
                             (prometheus2, b"vllm_spec_decode_num_drafts_total{"),
                             (PROM3_ONLY_TEXT_004, b"vllm:spec_decode_num_drafts_total{")):
            body = _get(server.url, accept)[2]
            assert b"\n" + name in body, accept
            assert body == classic.choose_encoder(accept)[0](registry)
