"""Package boundaries: services share code only through `kvfuse`, and servers never use the SDK.

Every import statement is read from the source (`ast`, lazy imports inside functions
included), so a boundary crossed only on some code path is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVICES = ("cache_server", "prefill_worker", "decode_worker", "controller")


def imported_modules(path: Path) -> set[str]:
    """The absolute module names `path` imports (for `from a import b`: `a` and `a.b`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def crossings(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """Each module file of `package` (a folder) that imports a module inside one of
    `forbidden` → those imports; empty when the boundary holds."""
    files = sorted((REPO / package).rglob("*.py"))
    assert files, package
    found = {}
    for path in files:
        names = imported_modules(path)
        bad = sorted(n for n in names if any(n == f or n.startswith(f"{f}.") for f in forbidden))
        if bad:
            found[str(path.relative_to(REPO))] = bad
    return found


def test_cache_server_does_not_import_the_client_sdk() -> None:
    assert crossings("cache_server", ("kvfuse.client",)) == {}


@pytest.mark.parametrize("package", SERVICES)
def test_no_service_imports_another(package: str) -> None:
    assert crossings(package, tuple(s for s in SERVICES if s != package)) == {}


@pytest.mark.parametrize("package", ["kvfuse/transport", "kvfuse/client"])
def test_the_core_imports_no_service(package: str) -> None:
    assert crossings(package, SERVICES) == {}


def test_transport_does_not_import_the_client_sdk() -> None:
    assert crossings("kvfuse/transport", ("kvfuse.client",)) == {}


def test_the_scan_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from kvfuse.client.prefill import PrefillClient\n")
    assert "kvfuse.client.prefill" in imported_modules(module)
