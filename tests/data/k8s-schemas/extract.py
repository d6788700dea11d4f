"""Extract the JSON schemas of the CRDs the Kubernetes manifests use (README.md beside this).

    python tests/data/k8s-schemas/extract.py OPERATOR_CHECKOUT/example/prometheus-operator-crd

reads monitoring.coreos.com_{prometheusrules,podmonitors,servicemonitors}.yaml from that
folder (a prometheus-operator checkout at a release tag) and writes each CRD's v1
`openAPIV3Schema`, with its `description` texts removed and keys sorted, to
prometheus-operator-v<version>/<kind>-monitoring-v1.json here, <version> being the CRD's
`operator.prometheus.io/version` annotation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
PLURALS = ("prometheusrules", "podmonitors", "servicemonitors")


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items()
                if not (k == "description" and isinstance(v, str))}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def main(crd_dir: str) -> None:
    for plural in PLURALS:
        crd = yaml.safe_load((Path(crd_dir) / f"monitoring.coreos.com_{plural}.yaml").read_text())
        version = crd["metadata"]["annotations"]["operator.prometheus.io/version"]
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        kind = crd["spec"]["names"]["kind"].lower()
        out = HERE / f"prometheus-operator-v{version}" / f"{kind}-monitoring-v1.json"
        out.parent.mkdir(exist_ok=True)
        schema = _strip(v1["schema"]["openAPIV3Schema"])
        out.write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(out.relative_to(HERE))


if __name__ == "__main__":
    main(sys.argv[1])
