"""The built wheel alone is a working napari-nca: every module and data file is in it, and once installed it
opens every widget in napari and segments from the command line.

The other tests run against the editable install, which reads the repository, so they cannot notice when the
packaging configuration leaves a module or a data file out of the wheel. Here the wheel is built from a copy
of the sources and installed into a fresh virtual environment whose third-party packages (torch, napari, ...)
are borrowed from the project's environment, without downloading them again. Everything runs in subprocesses
from a folder outside the repository, and the tests check that the repository was not what got imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; pytest itself depends on tomli there
    import tomli as tomllib

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = {"mednca": REPO / "src" / "mednca", "napari_nca": REPO / "napari_nca"}
BUILD_FILES = ("pyproject.toml", "README.md", "LICENSE")
# Entries of the project's site-packages that are this project itself (the editable install), not a dependency.
OWN_ENTRIES = ("napari_nca", "napari-nca", "mednca", "__editable__")
PYTHON_WARNING = re.compile(r"\b\w+Warning\b")  # SetuptoolsDeprecationWarning, BuildBackendWarning, ...

RESOLVE_COMMANDS = """
import json, sys
from pathlib import Path
from npe2 import PluginManifest
from npe2.manifest.utils import import_python_name

manifest = PluginManifest.from_distribution("napari-nca")
resolved = {c.id: repr(import_python_name(c.python_name)) for c in manifest.contributions.commands}
modules = {name: m.__file__ for name, m in sys.modules.items() if name.partition(".")[0] in ("mednca", "napari_nca")}
Path(sys.argv[1]).write_text(json.dumps({"resolved": resolved, "modules": modules, "sys_path": sys.path}))
"""

OPEN_WIDGETS = """
import json, sys
from pathlib import Path
import napari
from npe2 import PluginManifest
from npe2.manifest.utils import import_python_name
from qtpy.QtWidgets import QApplication

manifest = PluginManifest.from_distribution("napari-nca")
commands = {c.id: c.python_name for c in manifest.contributions.commands}
viewer = napari.Viewer(show=True)
opened = {}
for contribution in manifest.contributions.widgets:
    dock, widget = viewer.window.add_plugin_dock_widget("napari-nca", contribution.display_name)
    QApplication.processEvents()
    opened[contribution.display_name] = {
        "is_manifest_class": isinstance(widget, import_python_name(commands[contribution.command])),
        "visible": dock.isVisible(),
        "module_file": sys.modules[type(widget).__module__].__file__,
    }
viewer.close()
Path(sys.argv[1]).write_text(json.dumps(opened))
"""


@dataclass
class Installed:
    """The fresh environment holding the wheel, and how to run things in it from outside the repository."""

    python: Path
    scripts: Path
    site_packages: Path
    env: dict[str, str]
    cwd: Path

    def run(self, *args: str | Path) -> subprocess.CompletedProcess:
        # Explicit UTF-8 (tqdm's bars): after napari/Qt tests this process's preferred encoding can be ASCII.
        return subprocess.run([str(a) for a in args], cwd=self.cwd, env=self.env, capture_output=True,
                              encoding="utf-8", errors="replace")

    def run_script(self, script: str, result: Path) -> dict:
        proc = self.run(self.python, "-c", script, result)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(result.read_text())


def _build_requirements_installed() -> bool:
    """Whether this environment already has [build-system] requires, so the build needs nothing from PyPI."""
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in map(Requirement, requires):
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            return False
        if not requirement.specifier.contains(version, prereleases=True):
            return False
    return True


def _manifest():
    from npe2 import PluginManifest

    return PluginManifest.from_file(PACKAGE_SOURCES["napari_nca"] / "napari.yaml")


def _is_inside(path: str | Path, folder: Path) -> bool:
    return Path(path).resolve().is_relative_to(folder.resolve())


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The wheel built from a copy of the sources (so no stale build/ or egg-info can leak in, and the shared
    working tree is not written to), and the verbose build log."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    for folder in PACKAGE_SOURCES.values():
        shutil.copytree(folder, source / folder.relative_to(REPO), ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, source / name)
    isolation = ["--no-build-isolation"] if _build_requirements_installed() else []
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", *isolation, "-w", str(tmp / "dist"), str(source)],
        capture_output=True, encoding="utf-8", errors="replace",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    (wheel,) = (tmp / "dist").glob("napari_nca-*.whl")
    return wheel, log


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Installed:
    """A new virtual environment with the wheel installed and the project's dependencies linked in."""
    tmp = tmp_path_factory.mktemp("installed")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip())

    dependencies = tmp / "dependencies"
    dependencies.mkdir()
    for folder in dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib")):
        for entry in Path(folder).iterdir():
            if not entry.name.lower().startswith(OWN_ENTRIES) and not (dependencies / entry.name).exists():
                (dependencies / entry.name).symlink_to(entry)
    (site_packages / "project_dependencies.pth").write_text(f"{dependencies}\n")

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        PYTHONNOUSERSITE="1",
        MEDNCA_MODELS_DIR=str(tmp / "user_models"),
        NAPARI_CONFIG=str(tmp / "napari_settings.yaml"),
    )
    outside = tmp / "elsewhere"
    outside.mkdir()
    done = Installed(python, venv / "bin", site_packages, env, outside)
    proc = done.run(python, "-m", "pip", "install", "--no-deps", "--no-index", built[0])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return done


def test_wheel_holds_every_file_of_the_packages_and_the_licence(built):
    wheel, _ = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata_text = archive.read(f"{dist_info}/METADATA").decode()
    expected = {
        f"{package}/{path.relative_to(folder).as_posix()}"
        for package, folder in PACKAGE_SOURCES.items()
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert sorted(expected - names) == []
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "License-Expression: MIT" in metadata_text.splitlines()


def test_wheel_builds_without_warnings(built):
    _, log = built
    assert [line for line in log.splitlines() if PYTHON_WARNING.search(line)] == []


def test_every_manifest_python_name_resolves_from_the_installed_wheel(installed, tmp_path):
    result = installed.run_script(RESOLVE_COMMANDS, tmp_path / "resolved.json")
    assert set(result["resolved"]) == {c.id for c in _manifest().contributions.commands}
    assert {"mednca", "napari_nca", "napari_nca._qt"} <= set(result["modules"])
    outside = [f"{name}: {file}" for name, file in result["modules"].items()
               if not _is_inside(file, installed.site_packages)]
    assert outside == []
    assert [p for p in result["sys_path"] if p and _is_inside(p, REPO)] == []


@pytest.mark.gui
def test_every_widget_opens_in_napari_from_the_installed_wheel(installed, tmp_path):
    opened = installed.run_script(OPEN_WIDGETS, tmp_path / "opened.json")
    assert set(opened) == {w.display_name for w in _manifest().contributions.widgets}
    for name, widget in opened.items():
        assert widget["is_manifest_class"], name
        assert widget["visible"], name
        assert _is_inside(widget["module_file"], installed.site_packages), name


def test_console_script_segments_the_shipped_sample(installed, tmp_path):
    import nibabel as nib

    sample = installed.site_packages / "mednca" / "sample" / "phantom.nii.gz"
    output = tmp_path / "phantom_seg.nii.gz"
    proc = installed.run(installed.scripts / "mednca", "segment", sample, "-o", output, "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    labels = np.asarray(nib.load(output).dataobj)
    assert labels.shape == nib.load(sample).shape
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
