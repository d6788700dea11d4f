"""The shipped `alerts/alertmanager.example.yml`: valid for the real `amtool`, routes by
severity, fits the generated rules' labels and annotations, and inhibits the other
spec-decode alerts of a method while SpecDecodeMetricsAbsent fires, on a real Alertmanager
(alerts posted the way Prometheus posts them, labelled as the generated rules label them).
tests/e2e/test_alertmanager_e2e.py runs the same config behind a real Prometheus."""

from __future__ import annotations

import re
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from spec_metrics.ops.rules import ALERTS, RuleParams, build_rules
from tests import alertmanager as support
from tests.alertmanager import EXAMPLE, amtool_binary, example_config

alertmanager, webhook = support.alertmanager, support.webhook  # the fixtures

ABSENT, LOW, MEAN = ("SpecDecodeMetricsAbsent", "SpecDecodeAcceptanceRateLow",
                     "SpecDecodeMeanAcceptedLengthLow")
PARAMS = RuleParams(severities={LOW: "critical"})


def _amtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([amtool_binary(), *args], capture_output=True, text=True, timeout=60)


def _example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))


def _generated_alerts(params: RuleParams = PARAMS) -> dict[str, dict]:
    return {r["alert"]: r for g in build_rules(params)["groups"] for r in g["rules"]
            if "alert" in r}


def test_amtool_check_config():
    result = _amtool("check-config", str(EXAMPLE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    assert "1 inhibit rules" in result.stdout and "2 receivers" in result.stdout


@pytest.mark.parametrize("labels,receiver", [
    (["severity=critical", f"alertname={LOW}"], "pager"),
    (["severity=warning", f"alertname={MEAN}"], "chat"),
    (["severity=info"], "chat"),  # anything else: the default receiver
])
def test_routes_by_severity(labels, receiver):
    result = _amtool("config", "routes", "test", f"--config.file={EXAMPLE}",
                     f"--verify.receivers={receiver}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


def test_example_fits_the_generated_rules():
    example, alerts = _example(), _generated_alerts(RuleParams())
    keys = ["method", *RuleParams().const_labels]
    # Grouping and inhibition use labels every generated alert carries.
    assert set(keys) <= set(example["route"]["group_by"])
    (rule,) = example["inhibit_rules"]
    assert rule["equal"] == keys
    targets = [re.fullmatch(r'(\w+)(=~|!=)"(.*)"', m).groups() for m in rule["target_matchers"]]
    for name in ALERTS:
        matched = all(bool(re.fullmatch(value, name)) == (op == "=~") for _, op, value in targets)
        assert matched == (name != ABSENT), name
    assert rule["source_matchers"] == [f'alertname="{ABSENT}"']
    # The receivers' templates name only annotations the rules write, which every alert has.
    text = EXAMPLE.read_text(encoding="utf-8")
    used = set(re.findall(r"Annotations\.(\w+)", text))
    assert used == {"summary", "description", "runbook_url", "dashboard_url"}
    for name, alert in alerts.items():
        assert used <= set(alert["annotations"]), name
        # The labels the alert's vector keeps (its first `by`/`on` list) include them all.
        kept = re.search(r"\b(?:by|on) \(([^)]*)\)", alert["expr"]).group(1).split(", ")
        assert set(keys) <= set(kept), (name, kept)


def _alert(name: str, labels: dict[str, str]) -> dict:
    """An alert as Prometheus posts it for the generated rule `name` (its labels, its
    annotations unexpanded: Alertmanager does not read them)."""
    rule = _generated_alerts()[name]
    now = datetime.now(timezone.utc)
    return {"labels": {"alertname": name, **rule["labels"], **labels},
            "annotations": rule["annotations"],
            "startsAt": now.isoformat(), "endsAt": (now + timedelta(minutes=5)).isoformat(),
            "generatorURL": "http://127.0.0.1:9090/graph"}


def test_metrics_absent_inhibits_the_other_alerts_of_its_method(alertmanager, webhook):
    am = alertmanager(example_config(webhook.url))
    ours = {"method": "draft_model", "model": "tiny-gpt", "engine": "vllm"}
    other = {**ours, "model": "other-gpt"}
    # The absence alert, per target: job and instance besides method/model/engine.
    am.post_alerts([_alert(ABSENT, {"job": "spec", "instance": "10.0.0.1:9464", **ours})])
    assert webhook.wait_for(lambda n: n.alerts(ABSENT), timeout=20), am.log()
    am.post_alerts([_alert(LOW, ours), _alert(MEAN, ours), _alert(LOW, other)])
    delivered = webhook.wait_for(lambda n: n.alerts(LOW), timeout=20)
    assert delivered is not None, am.log()
    # Routing by severity: the critical one pages, the absence alert (warning) went to chat.
    assert delivered.path == "/pager" and delivered.payload["receiver"] == "pager"
    assert [a["labels"]["model"] for a in delivered.alerts(LOW)] == ["other-gpt"]
    assert [n.path for n in webhook.received() if n.alerts(ABSENT)] == ["/chat"]
    # Alertmanager holds both alerts of our model, inhibited by the absence alert.
    time.sleep(3)  # group_wait and a few group_intervals: nothing else may arrive
    inhibited = {a["labels"]["alertname"]: a["status"] for a in am.alerts()
                 if a["labels"]["model"] == "tiny-gpt" and a["labels"]["alertname"] != ABSENT}
    (absent,) = [a for a in am.alerts() if a["labels"]["alertname"] == ABSENT]
    assert inhibited == {n: {"state": "suppressed", "inhibitedBy": [absent["fingerprint"]],
                             "silencedBy": []} for n in (LOW, MEAN)}, inhibited
    leaked = [a for n in webhook.received() for a in n.payload["alerts"]
              if a["labels"]["model"] == "tiny-gpt" and a["labels"]["alertname"] != ABSENT]
    assert not leaked, leaked
