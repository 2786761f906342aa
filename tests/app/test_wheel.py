"""The wheel carries the app's resources: built from a copy of the source with the venv's setuptools
(offline), installed in a fresh venv, run from outside the repository. And a source checkout reads
the repository's top-level resources/ in place."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from smallmind_app import paths

ROOT = Path(__file__).resolve().parents[2]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "engine",
    "smallmind_app",
    "smallmind_server",
    "smallmind_cli",
    "resources",
)
PACKAGES = ("engine", "smallmind_app", "smallmind_server", "smallmind_cli")

CHECK = """
import sys
from pathlib import Path

import smallmind_app
import smallmind_cli
from smallmind_app import desktop_entry, paths

site = Path(sys.argv[1]).resolve()
assert Path(smallmind_app.__file__).resolve().is_relative_to(site), smallmind_app.__file__
assert Path(smallmind_cli.__file__).resolve().is_relative_to(site), smallmind_cli.__file__
assert paths.RESOURCES_DIR == site / "smallmind_app" / "resources", paths.RESOURCES_DIR
assert (paths.RESOURCES_DIR / "icon.png").stat().st_size > 1000
assert desktop_entry.ICON_FILE.is_file() and (paths.RESOURCES_DIR / "smallmind.desktop").is_file()
print(paths.smollm2_system_prompt())
"""


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
               "--quiet", "-w", str(tmp_path / "dist"), str(source)]  # fmt: skip
    subprocess.run(command, check=True, cwd=tmp_path, timeout=120)
    (wheel,) = (tmp_path / "dist").glob("smallmind-*.whl")
    return wheel


def install(wheel: Path, target: Path) -> Path:
    """A fresh venv with the wheel unpacked in its site-packages (what an installer does with a pure
    wheel) and this venv's site-packages on its path for the dependencies (numpy, platformdirs...),
    but not this checkout: the editable install's finder is not there."""
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    site = Path(
        subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                       check=True, capture_output=True, text=True).stdout.strip()
    )  # fmt: skip
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n", encoding="utf-8")
    return site


def test_the_installed_wheel_finds_the_icon_and_the_default_system_prompt(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    resources = sorted(p.name for p in (ROOT / "resources").iterdir() if p.is_file())
    assert sorted(n.split("/")[-1] for n in names if n.startswith("smallmind_app/resources/")) == resources
    modules = {p.relative_to(ROOT).as_posix() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert sorted(modules - set(names)) == []  # pyproject.toml names every package
    site = install(wheel, tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run(
        [tmp_path / "venv" / "bin" / "python", "-c", CHECK, str(site)],
        cwd=elsewhere, capture_output=True, text=True, timeout=120, check=False,
        env={"PATH": "/usr/bin:/bin", "SMALLMIND_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == paths.smollm2_system_prompt()


def test_a_source_checkout_reads_the_top_level_resources() -> None:
    assert paths.RESOURCES_DIR == ROOT / "resources"
    assert (
        paths.smollm2_system_prompt()
        == (ROOT / "resources" / "default_system_prompt.txt").read_text(encoding="utf-8").strip()
    )
