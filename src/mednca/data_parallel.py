"""Training on several processes that share every batch (data-parallel, over gloo).

Why processes and not threads: a training step is hundreds of small operations, and torch's threads wait for
each other at every one of them, so two threads run at well under twice the speed of one (1.43x on a free
2-core machine as measured for issue 16; far slower than one thread when other jobs load the cores), while
one-thread processes only meet twice a step. Each process computes its share of the batch; the loss's batch
sums (BCE and the soft Dice's overlaps) and then the gradients are added up over the processes, so every
process holds the gradient of the whole batch and takes the same optimiser step. The model has 70,016
parameters: adding up its gradient takes about 0.7 ms a step over loopback. Each process still draws the whole
batch (so all random streams stay in step) and augments it, so two processes spend 1.24, 1.16 and 1.09 times
the CPU of one per sample at batch 8, 16 and 40 (``benchmarks/training.py``).

``start_workers`` starts the processes beyond the calling one (rank 0) with the ``spawn`` method (a fork of a
process with threads, such as a viewer, is unsafe) and returns rank 0's ``BatchShare``; ``Workers.stop`` ends
them (a cancelled training does not wait for them).
"""

from __future__ import annotations

import queue
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .errors import MedNCAError

# A worker waits this long in a sum for the others (rank 0 evaluates and saves checkpoints meanwhile).
TIMEOUT = timedelta(minutes=30)
START_SECONDS = 300  # for a worker to import torch and report ready
WORKER_NAME = "mednca-training-worker"  # the processes' names (multiprocessing), followed by the rank


class BatchShare:
    """One process's part of data-parallel training: which batch items it computes, and sums over all
    processes. ``rank`` 0 is the calling process, ``size`` the number of processes."""

    def __init__(self, group: dist.ProcessGroup, rank: int, size: int):
        self.group, self.rank, self.size = group, rank, size

    def part(self, batch: int) -> slice:
        """This process's items of a batch of ``batch`` (contiguous, sizes differing by at most one)."""
        return slice(batch * self.rank // self.size, batch * (self.rank + 1) // self.size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over all processes (a new tensor; every process gets the same)."""
        out = tensor.detach().clone()
        try:
            self.group.allreduce([out]).wait()
        except RuntimeError as e:  # gloo: a peer closed its connection, or the timeout passed
            raise MedNCAError(f"another training process ended or stopped answering ({_reason(e)}); "
                              "a run with a checkpoint resumes from it") from None
        return out

    def sum_gradients(self, parameters: Iterable[torch.Tensor]) -> None:
        """Replace every parameter's gradient by its sum over all processes, in one message."""
        params = list(parameters)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        total = self.sum(torch.cat([g.reshape(-1) for g in grads]))
        for p, chunk in zip(params, total.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p).clone()


def _reason(error: RuntimeError) -> str:
    """gloo's reason in a few words: its first sentence without the source location (e.g. "Connection closed
    by peer [127.0.0.1]:14720"; the rest of its message is advice for torch's own developers)."""
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]


def join(store_path: str, rank: int, size: int) -> BatchShare:
    """Join the process group whose rendezvous file is ``store_path``, over the loopback interface (gloo's
    default looks up the machine's host name, which some laptops cannot resolve)."""
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = TIMEOUT
    return BatchShare(dist.ProcessGroupGloo(dist.FileStore(store_path, size), rank, size, options), rank, size)


class Workers:
    """The processes started for one training run, and the folder of their rendezvous file."""

    def __init__(self, processes: list, folder: Path):
        self.processes, self.folder = processes, folder

    def stop(self) -> None:
        """End the workers (at once: a finished worker has already exited) and remove the folder."""
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join()
        shutil.rmtree(self.folder, ignore_errors=True)


def start_workers(size: int, target: Callable, payload: dict) -> tuple[BatchShare, Workers]:
    """Start ``size - 1`` processes running ``target(rank, size, store_path, ready, payload)`` (a module-level
    function that first puts its rank on the ``ready`` queue, then calls ``join``), and join them as rank 0.
    Refuses with a one-line error when a worker dies or does not report within ``START_SECONDS``."""
    ctx = mp.get_context("spawn")
    folder = Path(tempfile.mkdtemp(prefix="mednca-train-"))
    store_path = str(folder / "rendezvous")
    ready = ctx.Queue()
    procs = [ctx.Process(target=target, args=(rank, size, store_path, ready, payload), daemon=True,
                         name=f"{WORKER_NAME}-{rank}") for rank in range(1, size)]
    workers = Workers(procs, folder)
    try:
        for p in procs:
            p.start()
        _wait_ready(procs, ready)
        return join(store_path, 0, size), workers
    except BaseException:
        workers.stop()
        raise


def _wait_ready(procs: list, ready) -> None:
    waiting = set(range(1, len(procs) + 1))
    deadline = time.monotonic() + START_SECONDS
    while waiting:
        try:
            waiting.discard(ready.get(timeout=0.5))
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                raise MedNCAError(f"a training worker process ended before training began "
                                  f"(exit code {dead[0].exitcode})") from None
            if time.monotonic() > deadline:
                raise MedNCAError(f"training worker processes did not start within {START_SECONDS} s") from None
