"""``smallmind install-desktop-entry``: put SmallMind in the desktop's application menu (Linux, XDG).

Writes ``smallmind.desktop`` to ``$XDG_DATA_HOME/applications`` (default ``~/.local/share``) and the
icon (resources/icon.svg) to ``$XDG_DATA_HOME/icons/hicolor/scalable/apps/smallmind.svg``; the entry
starts this installation's ``smallmind`` (the script beside this Python, else ``python -m
smallmind_app``). ``--remove`` takes both away again. resources/smallmind.desktop is the same entry
for packagers (``Exec=smallmind``). No Qt, no engine: it runs without a display.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from .paths import RESOURCES_DIR

APP_ID = "smallmind"
ICON_FILE = RESOURCES_DIR / "icon.svg"


def data_home() -> Path:
    value = os.environ.get("XDG_DATA_HOME", "").strip()
    return Path(value) if value else Path.home() / ".local" / "share"


def launcher() -> list[str]:
    """The command that starts this installation's app."""
    script = Path(sys.executable).with_name(APP_ID)
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which(APP_ID)
    return [found] if found else [sys.executable, "-m", "smallmind_app"]


def _quoted(argument: str) -> str:
    """An Exec argument as the Desktop Entry spec wants it (quoted when it holds reserved characters)."""
    if not any(c in argument for c in " \t\n\"'\\><~|&;$*?#()`"):
        return argument
    escaped = "".join("\\" + c if c in '"`$\\' else c for c in argument)
    return f'"{escaped}"'


def entry_text(command: Sequence[str], icon: str = APP_ID) -> str:
    return (
        "[Desktop Entry]\n"
        "Type=Application\n"
        "Version=1.5\n"
        "Name=SmallMind\n"
        "GenericName=AI chat\n"
        "Comment=Chat with a language model that runs on your own CPU\n"
        f"Exec={' '.join(_quoted(a) for a in command)}\n"
        f"Icon={icon}\n"
        "Terminal=false\n"
        "Categories=Utility;Development;\n"
        "Keywords=LLM;chat;AI;assistant;\n"
    )


def entry_paths(home: Path | None = None) -> tuple[Path, Path]:
    """(the .desktop file, the icon file) under ``home`` (default: the XDG data dir)."""
    home = home or data_home()
    return home / "applications" / f"{APP_ID}.desktop", home / "icons/hicolor/scalable/apps" / f"{APP_ID}.svg"


def install(home: Path | None = None) -> tuple[Path, Path]:
    """Write the entry and its icon; OSError when a folder cannot be written."""
    entry, icon = entry_paths(home)
    icon.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ICON_FILE, icon)
    entry.parent.mkdir(parents=True, exist_ok=True)
    entry.write_text(entry_text(launcher()), encoding="utf-8")
    return entry, icon


def remove(home: Path | None = None) -> list[Path]:
    removed = []
    for path in entry_paths(home):
        if path.exists():
            path.unlink()
            removed.append(path)
    return removed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="smallmind install-desktop-entry",
        description="Add SmallMind to the desktop's application menu (writes a .desktop file and the icon).",
    )
    parser.add_argument("--remove", action="store_true", help="remove the entry and the icon instead")
    args = parser.parse_args(argv)
    try:
        if args.remove:
            removed = remove()
            print("\n".join(f"removed {path}" for path in removed) or "nothing to remove")
            return 0
        entry, icon = install()
    except OSError as exc:
        print(f"smallmind install-desktop-entry: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {entry}\nwrote {icon}\nSmallMind is in the application menu (log out and in if not yet).")
    return 0
