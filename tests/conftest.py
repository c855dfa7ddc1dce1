"""Shared fixtures. Data from ../shared (the hippocampus MRIs and the authors' model) is found beside the
repository; tests that need it skip with the reason when it is absent."""

from __future__ import annotations

import locale
import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The step implementation is chosen by a timing the first time a shape runs (mednca.step_paths), so two runs
# that tests compare voxel for voxel (in-process against Dask workers, 1 thread against 2) could take
# different paths, which agree only to float rounding (tests/test_step_paths.py checks both and the
# choice itself). Fixing the path here keeps those comparisons exact; MEDNCA_STEP=conv runs the suite on the
# other path.
os.environ.setdefault("MEDNCA_STEP", "gemm")
SHARED = Path(os.environ.get("MEDNCA_SHARED", REPO.parent / "shared"))
# A suite started in the background by a shell without job control (`cmd &` in a script) inherits Ctrl-C
# ignored, and so would every command the tests start, which then run to the end through the Ctrl-C the
# tests press. A terminal's Ctrl-C reaches a user's command with its default handling: the tests give theirs
# the same.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        pytest.skip(f"{what} not found at {path} (set MEDNCA_SHARED to the shared folder)")
    return path


@pytest.fixture(autouse=True)
def _locale_kept():
    """The process locale as it was before the test. GDCM's DICOM writer, which tests use to make series,
    sets it to "C": Python's default text encoding would then be ASCII for every later test (a subprocess's
    UTF-8 output could not be read). napari-nca itself never writes DICOM."""
    saved = locale.setlocale(locale.LC_ALL)
    yield
    locale.setlocale(locale.LC_ALL, saved)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED, "the shared data folder")


@pytest.fixture(scope="session")
def hippocampus_dir(shared_dir) -> Path:
    return _need(shared_dir / "data" / "hippocampus", "the MSD hippocampus data")


@pytest.fixture(scope="session")
def reference_dir(shared_dir) -> Path:
    return _need(shared_dir / "reference" / "mednca_hippocampus", "the Med-NCA authors' reference model")


@pytest.fixture(scope="session")
def reference_model(reference_dir):
    from mednca.checkpoint import import_reference

    return import_reference(reference_dir)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the test machine is shared."""
    from mednca.inference import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def model_file(tmp_path):
    """A tiny one-class model file (tests/cli_support.py); a module may override it with other classes."""
    from cli_support import tiny_model_file

    return tiny_model_file(tmp_path / "tiny.safetensors")


@pytest.fixture
def scans(tmp_path):
    """A folder of two small synthetic scans, a.nii.gz and b.nii.gz."""
    from cli_support import write_scan

    folder = tmp_path / "scans"
    for seed, name in enumerate(("a", "b")):
        write_scan(folder / f"{name}.nii.gz", seed)
    return folder
