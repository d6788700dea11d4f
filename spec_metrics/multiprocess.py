"""Several worker processes of one engine: one /metrics endpoint per process, summed in PromQL.

prometheus_client's multiprocess mode cannot carry exemplars nor custom collectors, so each
process serves its own /metrics on `base_port + local_rank`, every series carries a constant
`rank` label, and Prometheus scrapes every process (`scrape_config()` writes the job) and sums
with `sum by (...)`. Spans of every process carry the rank in their resource
(`rank_resource()`), so one OTLP collector receives them all, told apart.

    info = rank_from_env()                                  # RANK, LOCAL_RANK, WORLD_SIZE
    hooks = SpecDecodeHooks("eagle", labels=rank_labels({"model": "m"}, info),
                            tracer_provider=TracerProvider(resource=rank_resource(info)))
    start_rank_http_server(info, base_port=9464)            # 127.0.0.1:9464 + local rank
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from prometheus_client.registry import REGISTRY, CollectorRegistry

from spec_metrics.http.server import DEFAULT_HOST, DEFAULT_PORT, MetricsServer

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

__all__ = [
    "RANK_LABEL",
    "RANK_ATTRIBUTE",
    "RankInfo",
    "rank_from_env",
    "rank_labels",
    "rank_resource",
    "start_rank_http_server",
    "file_sd_targets",
    "scrape_config",
    "render_scrape_config",
]

RANK_LABEL = "rank"
# Resource attribute holding the rank as an integer, for trace queries ({resource.<this>=3}).
RANK_ATTRIBUTE = "spec_metrics.rank"
_MAX_PORT = 65535


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits: global rank (the label), local rank on its host (the port
    offset) and world size, as torchrun's RANK, LOCAL_RANK and WORLD_SIZE."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "local_rank", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"spec_metrics: {name} must be an integer >= 0, got {value!r}")
        if not self.rank < self.world_size:
            raise ValueError(f"spec_metrics: rank {self.rank} must be below world_size "
                             f"{self.world_size}")
        if self.local_rank > self.rank:
            raise ValueError(f"spec_metrics: local_rank {self.local_rank} cannot exceed rank "
                             f"{self.rank}")

    def port(self, base_port: int = DEFAULT_PORT) -> int:
        """This process's /metrics port: base_port + local_rank (0 stays 0: any free port)."""
        return 0 if base_port == 0 else base_port + self.local_rank


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"spec_metrics: {name}={raw!r} is not an integer; unset it or set it "
                         "to this process's rank as torchrun does") from None


def rank_from_env(environ: Mapping[str, str] | None = None) -> RankInfo:
    """RankInfo from RANK, LOCAL_RANK and WORLD_SIZE (set by torchrun and most launchers).
    Without RANK this is rank 0 of 1; LOCAL_RANK defaults to RANK (one host), WORLD_SIZE to
    RANK + 1."""
    environ = os.environ if environ is None else environ
    rank = _env_int(environ, "RANK")
    local = _env_int(environ, "LOCAL_RANK")
    world = _env_int(environ, "WORLD_SIZE")
    rank = 0 if rank is None else rank
    return RankInfo(rank=rank, local_rank=rank if local is None else local,
                    world_size=rank + 1 if world is None else world)


def rank_labels(labels: Mapping[str, str] | None = None,
                rank: RankInfo | None = None) -> dict[str, str]:
    """`labels` plus `rank`, for `SpecDecodeHooks(labels=...)`."""
    info = rank_from_env() if rank is None else rank
    out = dict(labels or {})
    value = str(info.rank)
    if out.get(RANK_LABEL, value) != value:
        raise ValueError(f"spec_metrics: labels already hold rank={out[RANK_LABEL]!r}, but this "
                         f"process is rank {value}; drop the rank label, rank_labels() adds it")
    out[RANK_LABEL] = value
    return out


def rank_resource(rank: RankInfo | None = None,
                  attributes: Mapping[str, Any] | None = None) -> "Resource":
    """An OpenTelemetry SDK Resource naming this process: `service.instance.id` =
    "<hostname>-rank-<rank>" and `spec_metrics.rank` = rank, plus `attributes`. The
    standard OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME still win over both."""
    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    info = rank_from_env() if rank is None else rank
    ours = {"service.instance.id": f"{socket.gethostname()}-rank-{info.rank}",
            RANK_ATTRIBUTE: info.rank, **(attributes or {})}
    return Resource.create(ours).merge(OTELResourceDetector().detect())


def start_rank_http_server(rank: RankInfo | None = None, *, base_port: int = DEFAULT_PORT,
                           host: str = DEFAULT_HOST,
                           registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve this process's /metrics and /healthz on host:(base_port + local_rank),
    127.0.0.1 unless told otherwise. `rank` defaults to `rank_from_env()`."""
    info = rank_from_env() if rank is None else rank
    port = info.port(base_port)
    if port > _MAX_PORT:
        raise ValueError(f"spec_metrics: base_port {base_port} + local rank {info.local_rank} "
                         f"is above {_MAX_PORT}; choose a lower base_port")
    try:
        return MetricsServer(host, port, registry)
    except OSError as exc:
        raise OSError(exc.errno, f"spec_metrics: cannot listen on {host}:{port} (base_port "
                      f"{base_port} + local rank {info.local_rank}): {exc.strerror}. Another "
                      "process holds it: choose a base_port whose next ranks-per-host ports "
                      "are free, and regenerate the scrape configuration") from exc


def _check_layout(ranks: int, base_port: int, hosts: Sequence[str]) -> None:
    if not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"spec_metrics: ranks per host must be an integer >= 1, got {ranks!r}")
    if base_port < 1 or base_port + ranks - 1 > _MAX_PORT:
        raise ValueError(f"spec_metrics: ports {base_port}..{base_port + ranks - 1} are not all "
                         f"within 1..{_MAX_PORT}")
    if not hosts or len(set(hosts)) != len(hosts) or not all(hosts):
        raise ValueError(f"spec_metrics: hosts must be distinct and non-empty, got {list(hosts)}")


def _target(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def file_sd_targets(ranks: int, base_port: int = DEFAULT_PORT,
                    hosts: Sequence[str] = (DEFAULT_HOST,)) -> list[dict[str, Any]]:
    """One target group per process: host i, local rank l is rank i * ranks + l on port
    base_port + l (hosts in torchrun's node-rank order). Also the file_sd JSON content."""
    hosts = list(hosts)
    _check_layout(ranks, base_port, hosts)
    return [{"targets": [_target(host, base_port + local)],
             "labels": {RANK_LABEL: str(index * ranks + local)}}
            for index, host in enumerate(hosts) for local in range(ranks)]


def scrape_config(ranks: int, base_port: int = DEFAULT_PORT,
                  hosts: Sequence[str] = (DEFAULT_HOST,), *, job_name: str = "spec_metrics",
                  file_sd_path: str | None = None) -> dict[str, Any]:
    """One Prometheus scrape job for every process: static targets, or a file_sd job reading
    `file_sd_path` (write `file_sd_targets()` there as JSON).

    The target label `rank` puts the rank on `up` and scrape metadata too; honor_labels keeps
    the process's own `rank` label on its series instead of renaming it `exported_rank`
    (the two are equal when the layout matches)."""
    job: dict[str, Any] = {"job_name": job_name, "honor_labels": True}
    if file_sd_path is None:
        job["static_configs"] = file_sd_targets(ranks, base_port, hosts)
    else:
        _check_layout(ranks, base_port, list(hosts))
        job["file_sd_configs"] = [{"files": [file_sd_path]}]
    return job


def render_scrape_config(ranks: int, base_port: int = DEFAULT_PORT,
                         hosts: Sequence[str] = (DEFAULT_HOST,), *, fmt: str = "static",
                         job_name: str = "spec_metrics") -> str:
    """Text for the user: "static" gives a `scrape_configs:` YAML block for prometheus.yml;
    "file_sd" gives the JSON of a file_sd targets file."""
    if fmt == "static":
        try:
            import yaml  # only here: `import spec_metrics` stays light
        except ImportError as exc:
            raise ImportError("a static scrape config is YAML: pip install "
                              "'spec_metrics[ops]' (pyyaml), or use fmt='file_sd'") from exc

        body = {"scrape_configs": [scrape_config(ranks, base_port, hosts, job_name=job_name)]}
        return yaml.safe_dump(body, sort_keys=False, default_flow_style=False)
    if fmt == "file_sd":
        return json.dumps(file_sd_targets(ranks, base_port, hosts), indent=2) + "\n"
    raise ValueError(f"spec_metrics: format must be 'static' or 'file_sd', got {fmt!r}")
