"""The import rules of the architecture (DESIGN.md, "Packages and who may import whom" and
"Inside gateway/, layers point down"), read from the source with `ast` so a new import that
breaks one fails here instead of in review.

Rules are by module prefix: a rule about `gateway.api` covers every module under gateway/api/,
including ones added later. Every import counts, also those under `if TYPE_CHECKING:` and inside
functions: a layer that must not know another must not name it at all.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("devices", "gateway", "simulator")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path, module: str) -> set[str]:
    """The absolute names of every module `path` imports (`from a import b` counts as a.b too:
    b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


@cache
def imports() -> dict[str, set[str]]:
    """Module name -> the modules it imports, for every module of our packages."""
    return {
        _module_name(path): _imported(path, _module_name(path))
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(
    graph: dict[str, set[str]],
    importer: str,
    forbidden: tuple[str, ...],
    allowed: tuple[str, ...] = (),
) -> list[str]:
    """`module imports name` for each module of `graph` under `importer` (a prefix) importing a
    name under one of `forbidden`, except modules under `allowed`."""
    return sorted(
        f"{module} imports {name}"
        for module, names in graph.items()
        if _within(module, importer) and not any(_within(module, a) for a in allowed)
        for name in names
        if any(_within(name, f) for f in forbidden)
    )


def test_the_source_is_found() -> None:
    found = imports()
    for module in ("devices.formats", "gateway.app", "gateway.api.writes", "simulator.run"):
        assert module in found
    assert "devices.formats" in found["gateway.ingest"]


@pytest.mark.parametrize(
    ("importer", "forbidden", "why"),
    [
        ("devices", ("gateway", "simulator"), "the device domain knows no service or client"),
        ("simulator", ("gateway", "devices"), "the simulator is an outside client"),
        (
            "gateway.store",
            (
                "gateway.api",
                "gateway.mqtt",
                "gateway.app",
                "gateway.errors",
                "gateway.ingest",
                "gateway.writer",
                # and the other services and the wiring above the store
                "gateway.aggregation",
                "gateway.auth",
                "gateway.runtime",
                "gateway.server",
                "gateway.cli",
            ),
            "storage knows nothing of HTTP, MQTT or the services above it",
        ),
    ],
)
def test_packages_import_only_what_is_below(
    importer: str, forbidden: tuple[str, ...], why: str
) -> None:
    assert violations(imports(), importer, forbidden) == [], why


def test_only_the_app_imports_the_routers() -> None:
    outside = [
        line
        for package in PACKAGES
        for line in violations(
            imports(), package, ("gateway.api",), allowed=("gateway.api", "gateway.app")
        )
    ]
    assert outside == [], "gateway/api/* is bound into the app by gateway/app.py alone"


def test_the_store_stands_on_the_vocabulary_only() -> None:
    """The store imports store modules and the shared words below it, nothing else of ours: the
    read path is router -> services (aggregation, history) -> store -> vocabulary."""
    vocabulary = ("gateway.store", "gateway.buckets", "gateway.settings", "gateway.timespec")
    graph = imports()
    above = sorted(
        f"{module} imports {name}"
        for module, names in graph.items()
        if _within(module, "gateway.store")
        for name in names
        if _within(name, "gateway") and not any(_within(name, v) for v in vocabulary)
    )
    assert above == []
    assert {n for n in graph["gateway.buckets"] if _within(n, "gateway")} == set()
    for service in ("gateway.aggregation", "gateway.history"):
        assert violations(graph, service, ("gateway.api",)) == []


class TestTheRulesCatchABreak:
    """The parser sees the import forms a break would use."""

    @pytest.mark.parametrize(
        ("source", "expected"),
        [
            ("import gateway.api.writes", {"gateway.api.writes"}),
            ("from gateway.api import writes", {"gateway.api", "gateway.api.writes"}),
            ("from ..api import reads", {"gateway.api", "gateway.api.reads"}),
            ("from . import errors", {"gateway.store", "gateway.store.errors"}),
            (
                "def f():\n    from gateway.mqtt.service import Reason",
                {"gateway.mqtt.service", "gateway.mqtt.service.Reason"},
            ),
        ],
    )
    def test_import_forms(self, tmp_path: Path, source: str, expected: set[str]) -> None:
        path = tmp_path / "readings.py"
        path.write_text(source)
        assert _imported(path, "gateway.store.readings") == expected

    def test_a_store_module_naming_http_is_caught(self) -> None:
        broken = dict(imports())
        broken["gateway.store.readings"] = broken["gateway.store.readings"] | {"gateway.errors"}
        assert violations(broken, "gateway.store", ("gateway.errors",)) == [
            "gateway.store.readings imports gateway.errors"
        ]
