"""The layering the house style asks for, read from the source: the GUI reaches the engine only
through smallmind_app/worker/, and the engine never imports Qt or the app."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "smallmind_app"
# The worker's modules are the app's one bridge to the engine (worker/engine_options.py and the other
# Qt-free modules beside the worker included); __main__.py hands the command-line subcommands to
# engine.cli without starting the GUI.
MAY_IMPORT_ENGINE = {"__main__.py"} | {f"worker/{p.name}" for p in (APP / "worker").glob("*.py")}
MAY_IMPORT_SERVER = {"worker/api_server.py"}  # the in-app API server


def imported_modules(path: Path) -> set[str]:
    """Every absolute module a file imports, anywhere in it (functions included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def app_files_importing(package: str) -> list[str]:
    """The app's modules (paths under smallmind_app/) that import ``package``."""
    return [
        p.relative_to(APP).as_posix()
        for p in sorted(APP.rglob("*.py"))
        if package in top_level(imported_modules(p))
    ]


def test_only_the_worker_imports_the_engine() -> None:
    importers = app_files_importing("engine")
    assert [name for name in importers if name not in MAY_IMPORT_ENGINE] == []
    assert "worker/engine_worker.py" in importers
    assert [name for name in app_files_importing("smallmind_server") if name not in MAY_IMPORT_SERVER] == []


def test_the_engine_imports_neither_qt_nor_the_app() -> None:
    engine_files = sorted((ROOT / "engine").rglob("*.py"))
    assert engine_files
    offenders = {
        str(p.relative_to(ROOT)): sorted(bad)
        for p in engine_files
        if (bad := top_level(imported_modules(p)) & {"PySide6", "smallmind_app"})
    }
    assert offenders == {}
