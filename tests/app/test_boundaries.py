"""The layering the house style asks for, read from the source: the GUI reaches the engine only
through smallmind_app/worker/, and the engine never imports Qt or the app."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "smallmind_app"
# The worker's modules are the app's one bridge to the engine (worker/engine_options.py and the other
# Qt-free modules beside the worker included). The command line (smallmind_cli) is above the app.
MAY_IMPORT_ENGINE = {f"worker/{p.name}" for p in (APP / "worker").glob("*.py")}
MAY_IMPORT_SERVER = {"worker/api_server.py"}  # the in-app API server
ENGINE_MODULES = {"engine"} | {f"engine.{p.stem}" for p in (ROOT / "engine").glob("*.py")}
# The Qt-free logic beside each room's widgets: importing these (and all they import) loads no Qt, so
# they run in a script, a test or the settings file's check without a QApplication.
QT_FREE = [
    "smallmind_app.paths",
    "smallmind_app.wording",
    "smallmind_app.colors",
    "smallmind_app.chat.conversation_model",
    "smallmind_app.chat.structured_output",
    "smallmind_app.documents.choices",
    "smallmind_app.history.store",
    "smallmind_app.history.records",
    "smallmind_app.history.schema",
    "smallmind_app.history.message_versions",
    "smallmind_app.history.search_index",
    "smallmind_app.settings.app_settings",
    "smallmind_app.settings.presets",
    "smallmind_app.engines.endpoints",
    "smallmind_app.engines.engine_keys",
    "smallmind_app.worker.engine_options",
    "smallmind_app.worker.local_engine",
    "smallmind_app.worker.replies",
    "smallmind_app.worker.limits",
    "smallmind_app.worker.remote_requests",
    "smallmind_app.worker.downloads",
    "smallmind_app.worker.api_server",
    "smallmind_app.worker.snapshots",
    "smallmind_app.window.tab_models",
]


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
    assert imported_modules(APP / "paths.py") & ENGINE_MODULES == {"engine.paths"}  # directories only
    assert [name for name in importers if name not in MAY_IMPORT_ENGINE | {"paths.py"}] == []
    assert "worker/engine_worker.py" in importers
    assert [name for name in app_files_importing("smallmind_server") if name not in MAY_IMPORT_SERVER] == []


def test_the_engine_imports_neither_qt_nor_the_app() -> None:
    engine_files = sorted((ROOT / "engine").rglob("*.py"))
    assert engine_files
    above_the_engine = {"PySide6", "smallmind_app", "smallmind_server", "smallmind_cli", "fastapi", "uvicorn"}
    offenders = {
        str(p.relative_to(ROOT)): sorted(bad)
        for p in engine_files
        if (bad := top_level(imported_modules(p)) & above_the_engine)
    }
    assert offenders == {}


def test_the_command_line_is_above_the_engine_the_server_and_the_app() -> None:
    """smallmind_cli imports the three, none of them imports it; the server imports neither Qt nor the app."""
    packages = ("engine", "smallmind_server", "smallmind_app")
    below = {name: sorted((ROOT / name).rglob("*.py")) for name in packages}
    importers = [
        str(p.relative_to(ROOT))
        for files in below.values()
        for p in files
        if "smallmind_cli" in top_level(imported_modules(p))
    ]
    assert importers == []
    server_offenders = [
        str(p.relative_to(ROOT))
        for p in below["smallmind_server"]
        if top_level(imported_modules(p)) & {"PySide6", "smallmind_app"}
    ]
    assert server_offenders == []
    cli_files = (ROOT / "smallmind_cli").glob("*.py")
    assert set(packages) <= set().union(*(top_level(imported_modules(p)) for p in cli_files))


def test_the_qt_free_modules_load_no_qt() -> None:
    """Run in a fresh interpreter: what a module imports, directly or not, is in sys.modules."""
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {QT_FREE!r}]; "
        "sys.exit(sorted(m for m in sys.modules if m.split('.')[0] == 'PySide6')[:3] or 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_qt_free_modules_are_every_module_without_qt() -> None:
    """A new Qt-free module is listed above (so that the check covers it), a module with Qt is not."""
    without_qt = {
        "smallmind_app." + p.relative_to(APP).with_suffix("").as_posix().replace("/", ".")
        for p in APP.rglob("*.py")
        if p.name != "__init__.py" and "PySide6" not in top_level(imported_modules(p))
    }
    # __main__ and desktop_entry start no window; bubbles.py makes HTML with code_blocks' Qt Markdown
    not_qt_logic = {"smallmind_app.__main__", "smallmind_app.desktop_entry", "smallmind_app.chat.bubbles"}
    not_listed = without_qt - set(QT_FREE) - not_qt_logic
    assert sorted(not_listed) == [] and set(QT_FREE) <= without_qt
