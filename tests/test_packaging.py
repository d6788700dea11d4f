"""The package as a user gets it: `python -m build` makes an sdist and a wheel, the wheel
installed (not editable) outside the repository imports, serves the README's hook example,
runs the CLI and the demo.

The build runs with `--no-isolation`: the build backend is this venv's setuptools (the dev
extra installs the build-system floor), so no build environment is downloaded and the test
works offline. It builds in a copy of the tree (the root's files and the package), so the
working tree gets no egg-info or build folder. `python -m build` without `--sdist` or
`--wheel` builds the wheel from the unpacked sdist, so a file missing from the sdist fails
the wheel too. The install is `pip install --no-deps --no-index --target`: the wheel's
files only; its dependencies are this venv's, reached because the target comes first on
PYTHONPATH (the venv's editable finder comes after every path entry).
"""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import spec_metrics

from .test_prometheus3 import OPENMETRICS_UTF8, PROM3_ACCEPT

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "spec_metrics"
REPOSITORY = "https://github.com/spec-metrics/spec_metrics"
VERSION = spec_metrics.__version__


def _package_files() -> set[str]:
    """The package's files in the tree, as paths relative to the root."""
    return {path.relative_to(ROOT).as_posix() for path in (ROOT / PACKAGE).rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    source = tmp_path_factory.mktemp("source")
    for path in ROOT.iterdir():
        if path.is_file():
            shutil.copy2(path, source / path.name)
    shutil.copytree(ROOT / PACKAGE, source / PACKAGE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(source)],
        cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "deprecated" not in (result.stdout + result.stderr).lower(), result.stderr
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


@pytest.fixture(scope="module")
def installed(dist: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
         "--disable-pip-version-check", "--target", str(target), str(dist["wheel"])],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return target


def _env(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SPEC_METRICS_CONSUMER")}
    return {**env, "PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _run(target: Path, cwd: Path, *command: str, timeout: float = 120
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), cwd=cwd, env=_env(target), capture_output=True,
                          text=True, timeout=timeout)


# ---- the version, one place -----------------------------------------------------------------


def test_version_is_written_in_one_place() -> None:
    if tomllib is None:
        pytest.skip("reading pyproject.toml needs tomllib (Python >= 3.11)")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "spec_metrics._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?(?:\.dev\d+)?", VERSION)


# ---- what the sdist and the wheel hold ------------------------------------------------------


def _metadata(text: str) -> email.message.Message:
    return email.parser.Parser().parsestr(text)


def test_sdist_holds_the_source_and_the_documents(dist: dict[str, Path]) -> None:
    prefix = f"{PACKAGE}-{VERSION}/"
    assert dist["sdist"].name == f"{PACKAGE}-{VERSION}.tar.gz"
    with tarfile.open(dist["sdist"]) as sdist:
        names = {m.name[len(prefix):] for m in sdist.getmembers() if m.isfile()}
        pkg_info = sdist.extractfile(prefix + "PKG-INFO")
        assert pkg_info is not None
        metadata = _metadata(pkg_info.read().decode())
    assert metadata["Version"] == VERSION
    licenses = {p.name for p in ROOT.glob("LICEN[CS]E*")}  # setuptools adds them by default
    assert {"pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in", "PKG-INFO",
            *licenses} <= names
    assert _package_files() <= names, _package_files() - names
    assert not any(n.startswith(("tests/", "benchmarks/", ".venv")) for n in names)


def test_wheel_holds_the_package_and_py_typed_not_the_tests(dist: dict[str, Path]) -> None:
    assert dist["wheel"].name == f"{PACKAGE}-{VERSION}-py3-none-any.whl"
    dist_info = f"{PACKAGE}-{VERSION}.dist-info/"
    with zipfile.ZipFile(dist["wheel"]) as wheel:
        names = set(wheel.namelist())
        metadata = _metadata(wheel.read(dist_info + "METADATA").decode())
        entry_points = wheel.read(dist_info + "entry_points.txt").decode()
        top_level = wheel.read(dist_info + "top_level.txt").decode().split()
    package = {n for n in names if not n.startswith(dist_info)}
    assert package == _package_files()  # every module, py.typed, nothing else
    assert f"{PACKAGE}/py.typed" in package
    assert top_level == [PACKAGE]
    assert not any(n.startswith(("tests/", "benchmarks/", "examples/")) for n in names)

    assert (metadata["Name"], metadata["Version"]) == (PACKAGE, VERSION)
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Requires-Python"] == ">=3.10"
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().strip() == (ROOT / "README.md").read_text().strip()
    assert "spec-metrics = spec_metrics.ops.cli:main" in entry_points
    assert "spec_metrics = spec_metrics.integrations.vllm_plugin:register" in entry_points


def test_classifiers_and_project_urls(dist: dict[str, Path]) -> None:
    from trove_classifiers import classifiers as known

    with zipfile.ZipFile(dist["wheel"]) as wheel:
        metadata = _metadata(wheel.read(f"{PACKAGE}-{VERSION}.dist-info/METADATA").decode())
    classifiers = metadata.get_all("Classifier")
    assert classifiers and set(classifiers) <= known, set(classifiers) - known
    assert "Typing :: Typed" in classifiers
    # Each Python version classifier is one requires-python admits.
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert versions and all(tuple(map(int, v.split("."))) >= (3, 10) for v in versions)
    assert not any(c.startswith("License ::") for c in classifiers)  # License-Expression
    urls = dict(u.split(", ", 1) for u in metadata.get_all("Project-URL"))
    assert urls == {
        "Homepage": REPOSITORY,
        "Documentation": f"{REPOSITORY}/blob/main/README.md",
        "Issues": f"{REPOSITORY}/issues",
        "Changelog": f"{REPOSITORY}/blob/main/CHANGELOG.md",
    }
    # The documents the URLs name are in the repository.
    for name in ("README.md", "CHANGELOG.md"):
        assert (ROOT / name).is_file()


# ---- the installed wheel, outside the repository -------------------------------------------


def test_installed_copy_imports_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    script = (
        "import importlib.metadata, importlib.resources, json, sys\n"
        "import spec_metrics\n"
        "print(json.dumps({\n"
        "    'file': spec_metrics.__file__,\n"
        "    'version': spec_metrics.__version__,\n"
        "    'metadata': importlib.metadata.version('spec_metrics'),\n"
        "    'py_typed': importlib.resources.files('spec_metrics')"
        ".joinpath('py.typed').is_file(),\n"
        "    'heavy': sorted(m for m in ('torch', 'yaml') if m in sys.modules),\n"
        "}))\n")
    result = _run(installed, tmp_path, sys.executable, "-c", script)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["file"]).is_relative_to(installed), found
    assert found["version"] == found["metadata"] == VERSION
    assert found["py_typed"] is True and found["heavy"] == []


def _readme_hook_example() -> str:
    """The first Python block under the README's "## The hook API" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## The hook API\n", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


# The engine the example leaves to the reader; start_http_server gets a free port (the
# example serves the default 127.0.0.1:9464, which another process may hold).
_HARNESS = '''\
import json, sys, urllib.request
import spec_metrics

_servers = []
_start_http_server = spec_metrics.start_http_server


def _on_a_free_port(port=0, *args, **kwargs):
    server = _start_http_server(0, *args, **kwargs)
    _servers.append(server)
    return server


spec_metrics.start_http_server = _on_a_free_port
ids = ["req-1", "req-2", "req-3"]
tps = ["00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None,
       "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"]
def propose(): pass
def verify(): return [2, 4, 0]
def extend(): pass
'''

_SCRAPE = '''
request = urllib.request.Request(_servers[0].url, headers={"Accept": sys.argv[1]})
with urllib.request.urlopen(request, timeout=10) as response:
    print(json.dumps({"content_type": response.headers["Content-Type"],
                      "body": response.read().decode(), "file": spec_metrics.__file__}))
'''


def test_readme_hook_example_runs_from_the_installed_wheel(installed: Path,
                                                            tmp_path: Path) -> None:
    example = _readme_hook_example()
    assert "spec_metrics.SpecDecodeHooks(" in example and "hooks.end_step()" in example
    script = tmp_path / "hook_example.py"
    script.write_text(_HARNESS + example + _SCRAPE)
    result = _run(installed, tmp_path, sys.executable, str(script), PROM3_ACCEPT)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["file"]).is_relative_to(installed)
    assert found["content_type"] == OPENMETRICS_UTF8
    body = found["body"]
    labels = 'engine="my-engine",method="eagle",model="llama-3-8b"'
    assert f"spec_decode_drafts_total{{{labels}}} 3.0\n" in body  # one per request
    assert f"spec_decode_accepted_tokens_total{{{labels}}} 6.0\n" in body
    assert f"spec_decode_draft_tokens_total{{{labels}}} 12.0\n" in body
    assert body.endswith("# EOF\n")


def test_cli_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    cli = installed / "bin" / "spec-metrics"
    assert cli.is_file()
    version = _run(installed, tmp_path, str(cli), "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"spec-metrics {VERSION}"
    help_text = _run(installed, tmp_path, str(cli), "--help")
    assert help_text.returncode == 0
    for command in ("catalog", "dashboards", "rules", "demo"):
        assert command in help_text.stdout
    catalog = _run(installed, tmp_path, str(cli), "catalog")
    assert catalog.returncode == 0 and "spec_decode_accepted_tokens" in catalog.stdout
    # python -m spec_metrics is the same CLI.
    module = _run(installed, tmp_path, sys.executable, "-m", "spec_metrics", "--version")
    assert module.stdout == version.stdout


def test_demo_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the demo needs torch (the demo extra): not installed in this venv")
    # The models are cached under $XDG_CACHE_HOME/spec_metrics (the demo tests train them
    # once; a cold cache trains here, about a minute on 2 cores).
    cli = installed / "bin" / "spec-metrics"
    traces = tmp_path / "traces.jsonl"
    result = _run(installed, tmp_path, str(cli), "demo", "--duration", "2", "--port", "0",
                  "--device", "cpu", "--quiet", "--sample-ratio", "1",
                  "--traces-file", str(traces), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "spec-metrics demo summary" in result.stdout, result.stdout
    steps = re.search(r"^steps\s+(\d+)", result.stdout, re.M)
    assert steps is not None and int(steps.group(1)) > 0, result.stdout
    assert traces.is_file() and traces.stat().st_size > 0, result.stdout + result.stderr
    assert not list(tmp_path.glob("*.egg-info"))
