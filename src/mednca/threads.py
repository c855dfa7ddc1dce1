"""How many CPU threads torch should use when the user does not say.

Torch starts one thread per physical core whether or not the cores are free. On a laptop that is already busy
(a viewer, a browser, another segmentation) the extra threads wait on each other: measured on a loaded
2-core machine, 2 threads cost 4.5 times the CPU of 1 and finished 3.5 to 4.5 times later. So the default
is the cores this process may run on that the 1-minute load average leaves free, at least 1, and never more
than torch's own default.
"""

from __future__ import annotations

import os

import torch

_TORCH_DEFAULT = torch.get_num_threads()  # torch's choice at import: the physical cores


def default_threads() -> int:
    """Threads for torch: the free cores (cores this process may use minus the 1-minute load average,
    rounded), at least 1 and at most torch's default."""
    return max(1, min(_TORCH_DEFAULT, round(usable_cores() - _load_average())))


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def _load_average() -> float:
    """Runnable processes over the last minute, 0 where the system does not say (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
