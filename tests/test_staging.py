"""Every file napari-nca writes appears whole or not at all, and what a killed writer left is cleaned later."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mednca import staging
from mednca.checkpoint import load_model_file, save_model
from mednca.model import MedNCA, NCAConfig


def test_a_failed_write_keeps_the_previous_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("previous")
    with pytest.raises(OSError, match="disk full"), staging.staged_file(target) as tmp:
        tmp.write_text("half of the new")
        raise OSError("disk full")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    target.chmod(0o640)
    with staging.staged_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["table.csv"]
    assert target.stat().st_mode & 0o777 == 0o640  # the replaced file's mode, not mkstemp's private one
    with staging.staged_file(tmp_path / "new.csv") as tmp:
        tmp.write_text("x")
    assert (tmp_path / "new.csv").stat().st_mode & 0o044  # readable by others as any new file


def test_a_ctrl_c_just_as_the_temporary_file_is_made_leaves_nothing(tmp_path, monkeypatch):
    """Ctrl-C can land at any line: also right after the temporary file exists, before writing begins (a
    Dask batch interrupted as it rewrote its results table left one)."""
    target, real_close = tmp_path / "table.csv", os.close

    def interrupted(fd):
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(staging.os, "close", interrupted)
    with pytest.raises(KeyboardInterrupt), staging.staged_file(target) as tmp:
        tmp.write_text("never written")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_a_model_save_killed_midway_leaves_only_a_recognisable_temp_file(tmp_path):
    script = (
        "import os, sys, safetensors.torch as st\n"
        "from mednca import checkpoint\n"
        "from mednca.model import MedNCA, NCAConfig\n"
        "def killed(tensors, path, metadata=None):\n"
        "    open(path, 'wb').write(b'half')\n"
        "    os.kill(os.getpid(), 9)\n"
        "checkpoint.save_file = killed\n"
        "checkpoint.save_model(MedNCA(NCAConfig(channels=8, hidden=16, input_size=(16, 16))), sys.argv[1])\n"
    )
    target = tmp_path / "model.safetensors"
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True)
    assert done.returncode != 0 and not target.exists()
    (left,) = list(tmp_path.iterdir())
    assert left.name.startswith(staging.TEMP_PREFIX)
    assert staging.remove_stale_temp(tmp_path) == [left] and not list(tmp_path.iterdir())
    save_model(MedNCA(NCAConfig(channels=8, hidden=16, input_size=(16, 16))), target)
    assert load_model_file(target).config.channels == 8


@pytest.mark.skipif(os.name != "posix", reason="processes are looked up by id on POSIX only")
def test_only_temporary_folders_of_writers_that_no_longer_run_are_removed(tmp_path):
    import subprocess
    import sys

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    prefix = staging.temp_prefix()  # this host, this process
    stale = tmp_path / prefix.replace(f"-{os.getpid()}-", f"-{ended.pid}-")
    live = tmp_path / f"{prefix}abc"
    other_host = tmp_path / f".mednca-tmp-elsewhere-{ended.pid}-abc"
    for folder in (stale, live, other_host):
        (folder / "inside").mkdir(parents=True)
    assert staging.remove_stale_temp(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_host.name])

