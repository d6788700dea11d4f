"""End to end, issue 17 item 2: alerts delivered through a real Alertmanager.

The chain is the one an operator runs: `spec-metrics demo` -> a real Prometheus loaded with
the generated rules (windows shortened) -> a real Alertmanager (Debian's
`prometheus-alertmanager`, loopback, its own storage dir, no clustering) configured from the
shipped `alerts/alertmanager.example.yml` (its routes and inhibit rules; each receiver
replaced by a webhook on loopback, one path per receiver; group timings shortened).

* `test_low_acceptance_delivered_then_resolved`: the demo collapses its drafter, then
  restores it (`--collapse-at`, `--recover-at`). Nothing reaches the webhook before the
  collapse; after it, SpecDecodeAcceptanceRateLow (generated as `critical`) reaches the
  pager receiver with its labels, a description carrying the value Prometheus recorded, an
  absolute runbook link to an anchor that exists and a dashboard link;
  SpecDecodeMeanAcceptedLengthLow (`warning`) reaches chat; after the recovery both are
  delivered `resolved`. The other alerts keep their production `for:` (10-15 min): they
  cannot fire in a one-minute run, so any delivery before the collapse would be a bug.
* `test_metrics_absent_inhibits_the_fleet_alerts`: two replicas of one engine (in-process
  hooks, each on its own /metrics). One replica's hooks are closed while its server stays
  up: SpecDecodeMetricsAbsent fires and is delivered. Then the other replica's acceptance
  collapses: SpecDecodeAcceptanceRateLow fires in Prometheus, reaches Alertmanager, and is
  inhibited there, never delivered.
"""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from spec_metrics.ops.dashboards import DASHBOARD_UID
from spec_metrics.ops.rules import (
    DOCS_BASE_URL,
    GRAFANA_URL,
    RUNBOOK_URL,
    RuleParams,
    build_rules,
    write_rules,
)
from tests.alertmanager import Notification, example_config, unix_time

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
LOW, MEAN, ABSENT = ("SpecDecodeAcceptanceRateLow", "SpecDecodeMeanAcceptedLengthLow",
                     "SpecDecodeMetricsAbsent")
DEMO_LABELS = {"method": "draft_model", "model": "tiny-gpt", "engine": "spec_metrics-demo"}

# The demo: healthy for 18 s of its loop (rate window, `for` and group_wait fit in it three
# times over), collapsed for 20 s (the delivery bound below plus slack), then recovered.
COLLAPSE_AT_S, RECOVER_AT_S, DURATION_S = 18.0, 38.0, 60.0
SCRAPE_S = EVAL_S = 1.0
RATE_WINDOW_S, FOR_S = 5.0, 3.0
GROUP_WAIT_S = GROUP_INTERVAL_S = 1.0
PARAMS = RuleParams(rate_window="5s", scrape_interval="1s", evaluation_interval="1s",
                    acceptance_for="3s", mean_length_for="3s", severities={LOW: "critical"})
# From the collapse to the webhook, at most: a scrape, a rate window of collapsed data, the
# recording then the alerting group, `for` plus an evaluation, Alertmanager's group_wait,
# and the hops Prometheus -> Alertmanager -> webhook (well under a second).
DELIVERY_BOUND_S = SCRAPE_S + RATE_WINDOW_S + 2 * EVAL_S + FOR_S + EVAL_S + GROUP_WAIT_S + 0.5
# From the recovery to the resolved notification: a scrape, the rate window refilling (the
# acceptance crosses 25% well within it), two evaluations (no `for` on resolving), a
# group_interval, the hops.
RESOLVE_BOUND_S = SCRAPE_S + RATE_WINDOW_S + 2 * EVAL_S + GROUP_INTERVAL_S + 0.5
SLACK_S = 4.0  # scheduling on a loaded 2-core machine (demo, Prometheus, Alertmanager, pytest)


def _record(params: RuleParams, prefix: str) -> str:
    (name,) = [r["record"] for g in build_rules(params)["groups"] for r in g["rules"]
               if r.get("record", "").startswith(prefix)]
    return name


def _rule(params: RuleParams, alert: str) -> dict[str, Any]:
    (rule,) = [r for g in build_rules(params)["groups"] for r in g["rules"]
               if r.get("alert") == alert]
    return rule


def _humanize_percentage(value: float) -> str:
    """Prometheus' humanizePercentage: Go's %.4g of value x 100, then '%'."""
    return format(value * 100, ".4g") + "%"


def _fired(n: Notification, alert: str, status: str) -> list[dict[str, Any]]:
    return [a for a in n.alerts(alert) if a["status"] == status]


def test_low_acceptance_delivered_then_resolved(tmp_path, prometheus, demo, alertmanager,
                                                webhook, demo_model_cached):
    test_started = time.monotonic()
    am = alertmanager(example_config(webhook.url, group_wait=f"{GROUP_WAIT_S:g}s",
                                     group_interval=f"{GROUP_INTERVAL_S:g}s"))
    run = demo("--duration", str(DURATION_S), "--collapse-at", str(COLLAPSE_AT_S),
               "--recover-at", str(RECOVER_AT_S), "--sample-ratio", "0")
    prom = prometheus([run.target], write_rules(tmp_path / "rules", PARAMS),
                      scrape_interval=f"{SCRAPE_S:g}s", evaluation_interval=f"{EVAL_S:g}s",
                      alertmanagers=[am.target])
    offset = time.time() - time.monotonic()  # monotonic -> Prometheus' (wall) time axis
    record = _record(PARAMS, "method_model_engine:spec_decode_acceptance:")

    def diagnostics() -> str:
        return (f"{run.diagnostics()}\n--- prometheus alerts ---\n{prom.alerts()}\n"
                f"--- alertmanager alerts ---\n{am.alerts()}\n--- alertmanager log ---\n"
                f"{am.log()}\n--- webhook ---\n"
                + "\n".join(f"{n.at - test_started:.1f}s {n.path} {n.payload['status']} "
                            f"{[a['labels']['alertname'] for a in n.payload['alerts']]}"
                            for n in webhook.received()))

    def alive() -> None:
        assert run.process.poll() is None, "the demo exited early\n" + diagnostics()

    # Healthy phase: the rules are evaluated on real data, Prometheus has our Alertmanager,
    # and nothing is delivered until the demo says its drafter collapsed.
    healthy: list[tuple[float, float]] = []
    wired = False
    deadline = time.monotonic() + COLLAPSE_AT_S + 60  # model loading on a busy machine
    while run.stderr.first("drafter collapsed") is None:
        alive()
        assert time.monotonic() < deadline, "no collapse in time\n" + diagnostics()
        wired = wired or [a["url"] for a in prom.get("/api/v1/alertmanagers")[
            "activeAlertmanagers"]] == [f"{am.url}/api/v2/alerts"]
        values = [float(s["value"][1]) for s in prom.query(record)["result"]]
        healthy += [(time.monotonic(), v) for v in values if math.isfinite(v)]
        time.sleep(0.5)
    collapse = run.stderr.first("drafter collapsed")
    assert wired, "Prometheus never listed the Alertmanager\n" + diagnostics()
    healthy = [(t, v) for t, v in healthy if t < collapse]
    assert len(healthy) >= 8, f"acceptance seldom evaluated: {healthy}\n" + diagnostics()
    assert min(v for _, v in healthy) > PARAMS.acceptance_rate_min, healthy
    early = [n for n in webhook.received() if n.at < collapse]
    assert not early, "delivered before the collapse\n" + diagnostics()

    # Firing: the critical alert pages, the warning goes to chat, both within the bound.
    paged = webhook.wait_for(lambda n: bool(_fired(n, LOW, "firing")),
                             timeout=DELIVERY_BOUND_S + SLACK_S + 10, alive=alive)
    assert paged is not None, f"{LOW} never delivered\n" + diagnostics()
    delivered_after = paged.at - collapse
    assert delivered_after <= DELIVERY_BOUND_S + SLACK_S, (delivered_after, diagnostics())
    assert delivered_after >= FOR_S, delivered_after  # pending for `for` first
    assert paged.path == "/pager" and paged.payload["receiver"] == "pager"
    assert paged.payload["status"] == "firing"
    (alert,) = _fired(paged, LOW, "firing")
    assert alert["labels"] == {"alertname": LOW, "severity": "critical", **DEMO_LABELS}
    assert unix_time(alert["startsAt"]) >= offset + collapse - 1.0, alert  # active after it
    rule = _rule(PARAMS, LOW)
    annotations = alert["annotations"]
    assert annotations["summary"] == rule["annotations"]["summary"]
    # The description carries the value that fired it: one Prometheus recorded for the
    # alert's input between the alert becoming active and its delivery, as humanizePercentage
    # writes it.
    template = rule["annotations"]["description"]
    for label, value in DEMO_LABELS.items():
        template = template.replace(f"{{{{ $labels.{label} }}}}", value)
    before, placeholder, after = template.partition("{{ $value | humanizePercentage }}")
    assert placeholder and "{{" not in before + after, template
    match = re.fullmatch(re.escape(before) + r"(\S+%)" + re.escape(after),
                         annotations["description"])
    assert match, (annotations["description"], template)
    window = int(paged.at - collapse + 5)
    recorded = prom.query(f"{record}[{window}s]", at=offset + paged.at)["result"]
    values = [float(v) for s in recorded for _, v in s["values"]]
    assert match.group(1) in {_humanize_percentage(v) for v in values}, (match.group(1), values)
    assert float(match.group(1)[:-1]) < PARAMS.acceptance_rate_min * 100
    # Links an operator can open: the runbook section (absolute, its anchor in the runbook),
    # the dashboard for the alert's labels.
    runbook_url = annotations["runbook_url"]
    assert runbook_url == f"{RUNBOOK_URL}#{LOW.lower()}"
    assert runbook_url.startswith(DOCS_BASE_URL + "/") and DOCS_BASE_URL.startswith("https://")
    anchor = runbook_url.split("#", 1)[1]
    assert f'<a id="{anchor}"></a>' in (ROOT / "docs" / "runbook.md").read_text()
    query = urllib.parse.urlencode({f"var-{k}": DEMO_LABELS[k]
                                    for k in ("method", "model", "engine")})
    assert annotations["dashboard_url"] == f"{GRAFANA_URL}/d/{DASHBOARD_UID}?{query}"
    chat = webhook.wait_for(lambda n: bool(_fired(n, MEAN, "firing")), timeout=10, alive=alive)
    assert chat is not None and chat.path == "/chat", diagnostics()
    assert _fired(chat, MEAN, "firing")[0]["labels"]["severity"] == "warning"

    # Resolution: delivered once acceptance recovered, not before.
    recovered = None
    while recovered is None:
        alive()
        assert time.monotonic() < deadline + RECOVER_AT_S, "no recovery\n" + diagnostics()
        recovered = run.stderr.first("drafter recovered")
        time.sleep(0.2)
    resolved = webhook.wait_for(lambda n: bool(_fired(n, LOW, "resolved")),
                                timeout=RESOLVE_BOUND_S + SLACK_S + 10, alive=alive)
    assert resolved is not None, f"{LOW} never resolved\n" + diagnostics()
    assert resolved.at > recovered, "resolved before the recovery\n" + diagnostics()
    assert resolved.at - recovered <= RESOLVE_BOUND_S + SLACK_S, (resolved.at - recovered,
                                                                 diagnostics())
    assert resolved.path == "/pager" and resolved.payload["status"] == "resolved"
    (gone,) = _fired(resolved, LOW, "resolved")
    assert gone["labels"] == alert["labels"]
    assert unix_time(gone["endsAt"]) >= offset + recovered - 1.0, gone
    assert webhook.wait_for(lambda n: bool(_fired(n, MEAN, "resolved")), timeout=10,
                            alive=alive), diagnostics()
    # In between, only firing notifications of the two alerts (each delivered once).
    between = [n for n in webhook.received() if n.at < recovered]
    assert {a["labels"]["alertname"] for n in between for a in n.payload["alerts"]} == {LOW, MEAN}
    assert all(a["status"] == "firing" for n in between for a in n.payload["alerts"]), (
        diagnostics())
    print(f"\nalertmanager e2e: {LOW} delivered {delivered_after:.1f}s after the collapse "
          f"(bound {DELIVERY_BOUND_S:g}s + {SLACK_S:g}s), resolved "
          f"{resolved.at - recovered:.1f}s after the recovery (bound {RESOLVE_BOUND_S:g}s + "
          f"{SLACK_S:g}s); description {annotations['description']!r}; test "
          f"{time.monotonic() - test_started:.1f}s")


class _Replica:
    """One engine replica: its own hooks, registry and /metrics on loopback, fed by a thread
    at ~100 steps/s of 4 requests x K=4 with `accepted` tokens each."""

    def __init__(self, engine: str) -> None:
        from prometheus_client import CollectorRegistry

        from spec_metrics import SpecDecodeHooks, start_http_server

        self.accepted = 3
        self.labels = {"method": "draft_model", "model": "tiny-gpt", "engine": engine}
        registry = CollectorRegistry()
        self.hooks = SpecDecodeHooks("draft_model", labels={"model": "tiny-gpt",
                                                             "engine": engine},
                                     registry=registry, tracing=False)
        self.server = start_http_server(port=0, host="127.0.0.1", registry=registry)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            hooks = self.hooks
            hooks.draft_start()
            hooks.draft_end()
            hooks.verify_start()
            hooks.verify_end(np.full(4, self.accepted, dtype=np.int64), 4)
            hooks.end_step()

    def close_hooks(self) -> None:
        """The instrumentation breaks (the hooks unregister their collector), the server
        keeps running: its target stays up."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(10)
            self.hooks.close()

    def close(self) -> None:
        self.close_hooks()
        self.server.close()


INHIBIT_PARAMS = RuleParams(rate_window="4s", scrape_interval="1s", evaluation_interval="1s",
                            acceptance_for="2s", mean_length_for="2s", absent_for="2s",
                            severities={LOW: "critical"})


def test_metrics_absent_inhibits_the_fleet_alerts(tmp_path, prometheus, alertmanager, webhook):
    test_started = time.monotonic()
    am = alertmanager(example_config(webhook.url, group_wait=f"{GROUP_WAIT_S:g}s",
                                     group_interval=f"{GROUP_INTERVAL_S:g}s"))
    replicas = [_Replica("e2e-fleet"), _Replica("e2e-fleet")]
    try:
        prom = prometheus([r.target for r in replicas],
                          write_rules(tmp_path / "rules", INHIBIT_PARAMS),
                          scrape_interval=f"{SCRAPE_S:g}s", evaluation_interval=f"{EVAL_S:g}s",
                          alertmanagers=[am.target])
        _inhibition_scenario(prom, am, webhook, replicas, test_started)
    finally:
        for replica in replicas:
            replica.close()


def _inhibition_scenario(prom: Any, am: Any, webhook: Any, replicas: list[_Replica],
                         test_started: float) -> None:
    broken, serving = replicas
    labels = broken.labels
    drafts = _record(INHIBIT_PARAMS, "method_model_engine:spec_decode_drafts:")

    def diagnostics() -> str:
        return (f"--- prometheus alerts ---\n{prom.alerts()}\n--- alertmanager alerts ---\n"
                f"{am.alerts()}\n--- alertmanager log ---\n{am.log()}\n--- webhook ---\n"
                + "\n".join(f"{n.at - test_started:.1f}s {n.path} {n.payload['status']} "
                            f"{[a['labels']['alertname'] for a in n.payload['alerts']]}"
                            for n in webhook.received()))

    def wait(what: str, check: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not (found := check()):
            assert time.monotonic() < deadline, f"no {what} in {timeout:g}s\n" + diagnostics()
            time.sleep(0.2)
        return found

    # Both replicas scraped, with traffic through the rules' guard.
    wait("traffic from both replicas", lambda: prom.query(
        "count(spec_decode_drafts_total) == 2")["result"] and prom.query(
        f"{drafts} > 1")["result"], 30)
    # One replica's instrumentation breaks while its server keeps answering.
    broken.close_hooks()
    absent = wait(f"{ABSENT} delivered", lambda: next(
        (n for n in webhook.received() if _fired(n, ABSENT, "firing")), None), 30)
    (alert,) = _fired(absent, ABSENT, "firing")
    assert alert["labels"] == {"alertname": ABSENT, "severity": "warning", "job": "spec_metrics",
                               "instance": broken.target, **labels}, alert
    assert absent.path == "/chat"
    # Then the remaining replica's acceptance collapses: the fleet alerts fire in
    # Prometheus and reach Alertmanager, which inhibits them.
    serving.accepted = 0

    def inhibited() -> dict[str, Any]:
        (source,) = [a for a in am.alerts() if a["labels"]["alertname"] == ABSENT]
        held = {a["labels"]["alertname"]: a for a in am.alerts()
                if a["labels"]["alertname"] in (LOW, MEAN)}
        if len(held) < 2:
            return {}
        return {name: a for name, a in held.items()
                if a["status"]["inhibitedBy"] == [source["fingerprint"]]}

    wait(f"{LOW} firing in Prometheus", lambda: [
        a for a in prom.alerts() if a["labels"]["alertname"] == LOW and a["state"] == "firing"],
        30)
    held = wait(f"{LOW} and {MEAN} inhibited in Alertmanager", inhibited, 10)
    assert {n: a["status"]["state"] for n, a in held.items()} == {LOW: "suppressed",
                                                                  MEAN: "suppressed"}
    assert held[LOW]["labels"] == {"alertname": LOW, "severity": "critical", **labels}
    time.sleep(GROUP_WAIT_S + 2 * GROUP_INTERVAL_S + 1)  # when it would have been sent
    leaked = [(n.path, a["labels"]) for n in webhook.received() for a in n.payload["alerts"]
              if a["labels"]["alertname"] != ABSENT]
    assert not leaked, f"inhibited alerts delivered: {leaked}\n" + diagnostics()
    assert [a for a in prom.alerts() if a["labels"]["alertname"] == ABSENT
            and a["state"] == "firing"], "the inhibiting alert resolved\n" + diagnostics()
    print(f"\ninhibition e2e: {ABSENT} delivered, {LOW} and {MEAN} inhibited; test "
          f"{time.monotonic() - test_started:.1f}s")
