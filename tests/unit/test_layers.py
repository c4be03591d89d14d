"""The import rules of ARCHITECTURE.md "Layers", checked on the source with :mod:`ast`.

- ``listeners/`` imports only the standard library, ``websockets`` and ``listeners``;
- ``broker/mqtt/`` imports only the standard library and ``broker.mqtt`` (it may not exist yet: the
  rule holds for whatever is there);
- the listener classes (``listeners.tcp``, ``listeners.websocket``) are wired by ``broker/app.py``
  alone; other broker modules use only the listeners' value types and pure parts.

Every import counts: inside functions, under ``if TYPE_CHECKING:``, relative ones.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: What broker modules other than app.py may import from listeners/.
BROKER_MAY_USE = frozenset(
    {
        "listeners",
        "listeners.address",
        "listeners.connection",
        "listeners.options",
        "listeners.errors",
        "listeners.tls",
        "listeners.forwarded",
        "listeners.proxy_protocol",
    }
)
LISTENER_CLASSES = frozenset({"listeners.tcp", "listeners.websocket"})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Every module ``source`` imports, absolute; ``from a import b`` also counts ``a.b`` (b may be
    a submodule). ``module`` is the importing module's name, for relative imports."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def imports_in(path: Path) -> set[str]:
    return imports_of(path.read_text(), module_name(path), is_package=path.name == "__init__.py")


def top(name: str) -> str:
    return name.partition(".")[0]


def sources(directory: str) -> list[Path]:
    return sorted((REPO / directory).rglob("*.py"))


def test_the_import_walker_sees_every_kind_of_import() -> None:
    source = """
from __future__ import annotations
import os.path
from typing import TYPE_CHECKING
from . import sibling
from .. import uncle
from .pkg import thing
if TYPE_CHECKING:
    from broker.settings import ListenerSettings
def late():
    import amqtt.broker
"""
    found = imports_of(source, "listeners.sub.mod")
    assert {"os.path", "listeners.sub.sibling", "listeners.uncle", "listeners.sub.pkg.thing"} <= found
    assert {"broker.settings", "amqtt.broker", "__future__", "typing"} <= found


def test_there_are_listeners_to_check() -> None:
    assert len(sources("listeners")) >= 10


@pytest.mark.parametrize("path", sources("listeners"), ids=lambda p: str(p.relative_to(REPO)))
def test_listeners_import_only_the_stdlib_and_websockets(path: Path) -> None:
    allowed = sys.stdlib_module_names | {"websockets", "listeners"}
    wrong = sorted(name for name in imports_in(path) if top(name) not in allowed)
    assert wrong == [], f"{path.relative_to(REPO)} imports {wrong}"


def test_mqtt_core_imports_only_the_stdlib_and_itself() -> None:
    # broker/mqtt/ is written by someone else and may not exist yet: check whatever is there.
    problems = []
    for path in sources("broker/mqtt"):
        for name in sorted(imports_in(path)):
            if top(name) not in sys.stdlib_module_names and not (
                name == "broker.mqtt" or name.startswith("broker.mqtt.")
            ):
                problems.append(f"{path.relative_to(REPO)} imports {name}")
    assert problems == []


def broker_may_import(name: str) -> bool:
    # "from listeners.address import X" also yields "listeners.address.X": a name in an allowed module.
    return name in BROKER_MAY_USE or name.rpartition(".")[0] in BROKER_MAY_USE - {"listeners"}


def project_sources() -> list[Path]:
    """Every .py of the project outside listeners/, tests/ and bench/ (and virtualenvs, builds)."""
    skip = {"listeners", "tests", "bench", "build", "dist"}
    found = sorted(REPO.glob("*.py"))
    for directory in sorted(REPO.iterdir()):
        if directory.is_dir() and directory.name not in skip and not directory.name.startswith("."):
            found.extend(sorted(directory.rglob("*.py")))
    return found


def test_only_app_wires_the_listener_classes() -> None:
    problems = []
    checked = project_sources()
    assert REPO / "broker" / "settings.py" in checked
    for path in checked:
        if path == REPO / "broker" / "app.py":
            continue
        for name in sorted(imports_in(path)):
            if top(name) != "listeners":
                continue
            if name in LISTENER_CLASSES or name.startswith(tuple(f"{c}." for c in LISTENER_CLASSES)):
                problems.append(f"{path.relative_to(REPO)} imports {name} (only broker/app.py may)")
            elif path.is_relative_to(REPO / "broker") and not broker_may_import(name):
                problems.append(f"{path.relative_to(REPO)} imports {name}")
    assert problems == []
