"""The import direction ARCHITECTURE.md describes, checked on every import statement of the
package (module level and inside functions): the core never imports ops, integrations or
the demo, and each internal layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import spec_metrics

PACKAGE = Path(spec_metrics.__file__).resolve().parent

# layer -> what it may import besides itself (spec_metrics.<top-level name>)
ALLOWED: dict[str, set[str]] = {
    "catalog": set(),
    "_version": set(),
    "_support": {"catalog"},
    "_tracing": {"catalog", "_support", "_version"},
    "_prometheus": {"catalog", "_support", "_tracing", "_version"},  # _version: OTLP scope
    "_core": {"catalog", "_support", "_tracing", "_prometheus"},
    "http": {"catalog", "_support", "_prometheus"},
    "__init__": {"catalog", "_version", "_support", "_tracing", "_prometheus", "_core", "http"},
    "multiprocess": {"catalog", "_support", "http"},
    "payoff": set(),  # pure arithmetic over hook totals; the demo and docs use it
    # Beside the core: they use the public API and may reach into the internals.
    "integrations": {"__init__", "catalog", "_support", "_tracing", "_prometheus", "_core",
                     "http"},
    "ops": {"__init__", "catalog", "_version", "_support", "_tracing", "_prometheus",
            "_core", "http", "multiprocess", "demo"},
    "demo": {"__init__", "catalog", "_support", "_tracing", "_prometheus", "_core", "http",
             "ops", "payoff"},
    "__main__": {"ops"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:` (type-only imports create no
    runtime dependency; they may name the record types of a higher layer)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            skip |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return [node for node in ast.walk(tree) if id(node) not in skip]


def _imported(tree: ast.AST) -> set[str]:
    """Top-level names under spec_metrics that the module imports at run time."""
    out: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, "relative import: use absolute spec_metrics.* imports"
            parts = node.module.split(".")
            if parts[0] != "spec_metrics":
                continue
            if len(parts) > 1:
                out.add(parts[1])
            else:
                out |= {alias.name if (PACKAGE / alias.name).is_dir()
                        or (PACKAGE / f"{alias.name}.py").exists() else "__init__"
                        for alias in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "spec_metrics":
                    out.add(parts[1] if len(parts) > 1 else "__init__")
    return out


def test_every_import_goes_down_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        assert layer in ALLOWED, f"{path}: a new top-level module; place it in ALLOWED"
        for target in _imported(ast.parse(path.read_text(encoding="utf-8"))) - {layer}:
            if target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports spec_metrics.{target}")
    assert not wrong, "\n".join(wrong)


def test_the_core_never_imports_ops_integrations_or_demo():
    core = {"catalog", "_version", "_support", "_tracing", "_prometheus", "_core", "http",
            "__init__", "multiprocess"}
    for layer in core:
        assert not ALLOWED[layer] & {"ops", "integrations", "demo"}, layer
