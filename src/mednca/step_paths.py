"""Which implementation of the Med-NCA step runs on this computer: measured once, then remembered.

``NCALevel`` has two implementations of one step that compute the same function: ``conv`` runs the 3x3
perception as a convolution over every cell (oneDNN), ``gemm`` folds the perception into fc0 and does matrix
products on the firing cells only (23% fewer multiply-adds), in blocks of cells sized for the CPU caches.
Which is faster depends on the convolution kernel oneDNN picks for the CPU (measured from 0.72x to 1.51x the
arithmetic limit on two hosts of the same kind) and the best block on the cache sizes. So the first time a
level of a given shape steps on a machine, every candidate runs a few times on a random state of that shape
(about 0.2-0.5 s in all) and the fastest is used from then on. The choice is kept in memory and in a small
JSON file in the user's cache folder, keyed by CPU model, torch version and thread count, so a later process
does not measure again. ``MEDNCA_STEP=conv`` or ``gemm`` (with ``GEMM_ROWS``) skips the measurement; ``auto``
(or unset) measures. A cache file that cannot be read is ignored and rewritten; one that cannot be written
leaves the choice in memory only.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from functools import cache
from pathlib import Path

import platformdirs
import torch

from .errors import MedNCAError
from .staging import staged_file

PATHS = ("conv", "gemm")
GEMM_ROWS = 1024  # firing cells per thread in one block of the gemm path when the calibration is skipped
CANDIDATES = (("conv", 0), ("gemm", 256), ("gemm", GEMM_ROWS), ("gemm", 4096))  # (path, rows per thread)
ENV = "MEDNCA_STEP"
CACHE_FORMAT = 1
CALIBRATION_CELLS = 16384  # cells of the random state timed (4 slices at 64x64): a few ms per step
CALIBRATION_ROUNDS = 3  # timed rounds of every candidate, after one untimed; the fastest round counts

_chosen: dict[tuple, tuple[str, int]] = {}  # (threads, dtype, channels, hidden, h, w) -> candidate, this process


class StepPathError(MedNCAError, ValueError):
    """An invalid ``MEDNCA_STEP`` setting."""


def choose_path(level, x: torch.Tensor) -> tuple[str, int]:
    """The step implementation for ``level`` stepping states shaped like ``x``, as (path, firing cells per
    thread in a block of the gemm path): the override, or the one measured fastest here (measuring it now if
    no earlier process did)."""
    forced = override()
    if forced is not None:
        return forced, GEMM_ROWS
    threads = torch.get_num_threads()
    key = (threads, x.dtype, level.channels, level.fc0.out_channels, *x.shape[-2:])
    choice = _chosen.get(key)
    if choice is None:
        choice = _chosen[key] = _cached_or_measured(level, x, threads)
    return choice


def override() -> str | None:
    """The path ``MEDNCA_STEP`` forces, or None when it is unset, empty or ``auto``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise StepPathError(f"{ENV} must be one of {', '.join(PATHS)} or auto, not {os.environ[ENV]!r}")
    return value


def calibrate(level, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Seconds per step of every candidate (named as ``label`` names them) for ``level`` on a random state
    of ``shape`` (h, w), best of ``CALIBRATION_ROUNDS`` interleaved rounds. On one thread torch computes on
    the calling thread, so its CPU time is what is measured where the system counts it finely: other
    processes on a busy machine do not blur it. Uses a private random generator: the caller's random stream
    and the model are left as they were."""
    h, w = shape
    gen = torch.Generator().manual_seed(0)
    batch = max(1, round(CALIBRATION_CELLS / (h * w)))
    x = torch.randn((batch, level.channels, h, w), generator=gen, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    fire = torch.rand((batch, h, w), generator=gen) > 0.5
    threads = torch.get_num_threads()
    runs = {
        label(path, rows): (lambda: level.step_conv(x, fire, 1)) if path == "conv"
        else (lambda rows=rows: level.step_gemm(x, fire, 1, rows * threads))
        for path, rows in CANDIDATES
    }
    precise = time.get_clock_info("thread_time").resolution <= 1e-6  # not on Windows (15 ms ticks)
    clock = time.thread_time if threads == 1 and precise else time.perf_counter
    best = dict.fromkeys(runs, float("inf"))
    with torch.no_grad():
        for round_ in range(CALIBRATION_ROUNDS + 1):
            for name, run in runs.items():
                start = clock()
                run()
                if round_:  # the first round warms caches and kernels up
                    best[name] = min(best[name], clock() - start)
    return best


def label(path: str, rows: int) -> str:
    """A candidate's name: ``conv``, or ``gemm/ROWS`` (firing cells per thread in a block)."""
    return path if path == "conv" else f"{path}/{rows}"


def machine_key(threads: int) -> str:
    """What the measurement depends on: the CPU, the torch build and the thread count."""
    return f"{cpu_name()} | torch {torch.__version__} | {threads} threads"


def workload_key(level, x: torch.Tensor) -> str:
    """What is measured on that machine: the number type, the level's size and the slice size."""
    return f"{str(x.dtype).removeprefix('torch.')} channels {level.channels} hidden {level.fc0.out_channels}" \
           f" {x.shape[-2]}x{x.shape[-1]}"


@cache
def cpu_name() -> str:
    """The CPU model, with its family/model numbers and a digest of its feature flags where the system
    lists them (a virtual machine may show only a generic name such as "AMD EPYC")."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine() or "unknown CPU"
    fields: dict[str, str] = {}
    for line in info.splitlines():
        name, sep, value = line.partition(":")
        if not sep:
            if fields:
                break  # the first processor is enough
            continue
        fields.setdefault(name.strip(), value.strip())
    name = fields.get("model name") or fields.get("Processor") or platform.machine() or "unknown CPU"
    flags = fields.get("flags") or fields.get("Features") or ""
    digest = hashlib.sha256(" ".join(sorted(flags.split())).encode()).hexdigest()[:8]
    return f"{name} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, flags {digest})"


def cache_file() -> Path:
    """The JSON file of measured choices, in the user's cache folder."""
    return Path(platformdirs.user_cache_dir("napari-nca")) / "step_paths.json"


def _cached_or_measured(level, x: torch.Tensor, threads: int) -> tuple[str, int]:
    machine, workload = machine_key(threads), workload_key(level, x)
    path = cache_file()
    entry = _read(path).get(machine, {}).get(workload)
    names = {label(*c): c for c in CANDIDATES}
    if isinstance(entry, dict) and entry.get("choice") in names:
        return names[entry["choice"]]
    seconds = calibrate(level, tuple(x.shape[-2:]), x.dtype)
    fastest = min(seconds, key=seconds.get)
    choices = _read(path)  # another process may have added its own measurements meanwhile
    choices.setdefault(machine, {})[workload] = {
        "choice": fastest, "ms_per_step": {name: round(s * 1000, 3) for name, s in seconds.items()},
    }
    _write(path, choices)
    return names[fastest]


def _read(path: Path) -> dict[str, dict]:
    """The cached choices, or none when the file is missing, damaged or of another format."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("machines"), dict):
        return {}
    return {k: v for k, v in data["machines"].items() if isinstance(v, dict)}


def _write(path: Path, choices: dict[str, dict]) -> None:
    """Replace the cache file in one step; a cache folder that cannot be written is not an error."""
    try:
        with staged_file(path) as tmp:
            tmp.write_text(json.dumps({"format": CACHE_FORMAT, "machines": choices}, indent=1, sort_keys=True))
    except OSError:
        pass
