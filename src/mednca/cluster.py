"""Cohorts on a Dask cluster: ``mednca segment|evaluate --workers N`` or ``--scheduler ADDRESS``.

One task per scan (or evaluated case). ``--workers N`` starts a LocalCluster of N single-threaded worker
processes here; ``--scheduler`` uses a running cluster (``dask scheduler``/``dask worker``, dask-jobqueue on
SLURM or PBS, dask-kubernetes), whose workers need napari-nca installed and the scans and output folders at the
same paths as here (a shared file system). Paths are sent absolute, so a worker's working folder does not
matter; the printed lines and the results table spell them as the command line did.

Nothing finished is lost, whatever stops:

- a worker segments a scan with the in-process code (``cli._segment_one``): the same outputs, the same row,
  the same rule for skipping a scan whose results exist, and every file written atomically on the worker;
- the results table is kept here and rewritten as scans finish (once for the scans that finished together),
  so re-running the command fills in only what is missing;
- a scan that fails (a bad file) becomes a failed row; a worker that dies mid-scan costs nothing: the
  scheduler gives its scans to other workers (a scan that keeps killing workers, past Dask's
  ``allowed-failures``, is reported as failed), and the staging folder it left is removed at the end of the run;
- Ctrl-C cancels the scans not started and lets the workers finish those in hand, so that every result
  written has its row; the worker processes of a LocalCluster ignore the terminal's Ctrl-C for that reason.

``mednca evaluate`` runs the same way, a task per case, its scores table (``evaluation.ScoreTable``) kept here
as cases finish; a case writes no file, so Ctrl-C keeps the cases finished and cancels the rest at once.

The model travels once per worker: its safetensors bytes ride in a WorkerPlugin, which the scheduler hands to
every worker, also to those that join or are restarted later, and each loads it once (verified, as any model
file) into a per-process cache; a task carries only the model's name. ``benchmarks/cluster.py`` measures it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
from tqdm import tqdm

from .batch import Job, batch_summary
from .checkpoint import load_model_file, save_model
from .errors import MedNCAError
from .evaluation import evaluate_iter
from .model import MedNCA
from .progress import run_to_end
from .report import ReportFile, failure_row
from .staging import remove_stale_temp

try:
    from distributed import Client, Event, Future, LocalCluster, WorkerPlugin, as_completed, get_worker
    from distributed.scheduler import KilledWorker
except ImportError as e:  # the base install: the cluster is an extra
    raise MedNCAError(f"--scheduler and --workers need Dask distributed ({e}): "
                      "pip install 'napari-nca[cluster]'") from None

from .cli import _case_error, _os_text, _segment_one  # noqa: E402  (cli imports this module only when asked for a cluster)

CONNECT_SECONDS = 30  # to reach a --scheduler before giving up
# Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers, which also pins glibc's mmap threshold at 128 KiB: every
# MB-sized tensor inference allocates is then a fresh mmap, page faults included. Measured on a hippocampus scan at
# 1 thread: 7.0 s instead of 4.4 s (4.9 s with MALLOC_MMAP_THRESHOLD_=33554432 beside it, glibc's largest). The
# LocalCluster leaves it unset; the workers of a --scheduler are checked, and the user told.
UNTRIMMED = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
_MODELS: dict[str, MedNCA] = {}  # in each worker process: the models its plugins loaded, by plugin name


# ------------------------------------------------------------------------------------------ the cluster


@contextmanager
def connect(scheduler: str | None, workers: int | None) -> Iterator[Client]:
    """A client of the scheduler at ``scheduler``, else of a new LocalCluster of ``workers`` single-threaded
    processes (closed, with its workers, on leaving)."""
    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout=CONNECT_SECONDS)
        except (OSError, TimeoutError, ValueError) as e:
            raise MedNCAError(f"cannot reach the Dask scheduler at {scheduler} ({e})") from None
        if not client.scheduler_info().get("workers"):
            print(f"mednca: the scheduler at {scheduler} has no workers yet; the scans wait for them",
                  file=sys.stderr)
        elif any(client.run(_mmap_pinned).values()):
            print("mednca: the workers run with MALLOC_TRIM_THRESHOLD_ set (the Dask nanny's default), which makes "
                  "segmenting about 1.6 times slower; start them with MALLOC_MMAP_THRESHOLD_=33554432 in their "
                  "environment", file=sys.stderr)
    else:
        with dask.config.set({UNTRIMMED: None}):  # unset in the workers: see UNTRIMMED
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        client = Client(cluster)
        client.register_plugin(IgnoreCtrlC())
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _mmap_pinned() -> bool:
    """On a worker: whether glibc's mmap threshold is pinned at 128 KiB (see UNTRIMMED)."""
    return "MALLOC_TRIM_THRESHOLD_" in os.environ and "MALLOC_MMAP_THRESHOLD_" not in os.environ


class IgnoreCtrlC(WorkerPlugin):
    """Worker processes on this machine ignore Ctrl-C, which a terminal sends them too: the command stops them
    itself, after letting them finish the scans in hand (a worker stopped mid-scan would leave its result
    unwritten, or written without its row in the table)."""

    name = "mednca-ignore-ctrl-c"

    def setup(self, worker) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # plugins are set up in the worker's main thread


class ModelPlugin(WorkerPlugin):
    """A model file's bytes, loaded once by every worker that receives the plugin (the scheduler sends it to
    each worker once, including workers that start later)."""

    def __init__(self, name: str, data: bytes):
        self.name = name
        self.data = data

    def setup(self, worker) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"{self.name}.safetensors"
            path.write_bytes(self.data)
            _MODELS[self.name] = load_model_file(path)

    def teardown(self, worker) -> None:
        _MODELS.pop(self.name, None)


@contextmanager
def shared_model(client: Client, model: MedNCA) -> Iterator[str]:
    """Send ``model`` to every worker once; yields the name tasks find it under, and removes it on leaving."""
    name = f"mednca-model-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as folder:
        data = save_model(model, Path(folder) / "model.safetensors").read_bytes()
    try:
        client.register_plugin(ModelPlugin(name, data))
    except Exception as e:  # raised on a worker: a missing package, a different napari-nca version
        raise MedNCAError(f"the Dask workers could not load the model ({type(e).__name__}: {e}); every worker "
                          "needs napari-nca installed (pip install 'napari-nca[cluster]')") from None
    try:
        yield name
    finally:
        try:
            client.unregister_worker_plugin(name)
        except Exception:  # the run is over either way; a worker that left freed the model with its process
            pass


def _worker_model(name: str) -> MedNCA:
    try:
        return _MODELS[name]
    except KeyError:
        raise RuntimeError(f"the model {name} was not set up on this worker") from None


def _finished(futures: dict[Future, object], what: str) -> Iterator[list[tuple[Future, object, str | None]]]:
    """The futures as they finish, in batches of those that finished together (so that a results table is
    rewritten once per batch, not once per scan, when hundreds of workers finish scans faster than a large
    table can be written): (future, result, None) or (future, None, error) each, with a progress bar."""
    with tqdm(total=len(futures), unit=what, file=sys.stderr, leave=False) as bar:
        for batch in as_completed(futures).batches():
            yield [_outcome(future) for future in batch]
            bar.update(len(batch))


def _outcome(future: Future) -> tuple[Future, object, str | None]:
    try:
        return future, future.result(), None
    except KilledWorker:
        return future, None, "the workers running it died repeatedly (too little memory? see their logs)"
    except Exception as e:  # raised by the task, not by the scan (those it reports itself)
        return future, None, f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------ segment


def segment_scan(model: str, job: Job, options: argparse.Namespace, threads: int,
                 stop: str | None = None) -> tuple[str, str, dict | None] | None:
    """The task of one scan, on a worker: segment it as the in-process command does (or skip it when its
    results exist); a scan that cannot be segmented is returned as a failure, not raised. None, and nothing
    written, when the Dask Event named ``stop`` is set as it starts: the command was interrupted, and a task
    that starts then would write a result the command no longer waits for."""
    if stop is not None and Event(stop).is_set():
        return None
    try:
        line, outcome, row = _segment_one(_worker_model(model), job, options, threads, bar=False)
    except (MedNCAError, MemoryError, OSError) as e:
        error = _scan_error(e)
        line, outcome, row = f"{job.scan}: FAILED: {error}", "failed", failure_row(job.scan, error)
    if row is not None:
        row["worker"] = get_worker().address
    return line, outcome, row


def _scan_error(error: BaseException) -> str:
    """A scan's failure as the in-process command words it."""
    if isinstance(error, MemoryError):  # a header claiming gigabytes, a quality map too large for the worker
        return f"not enough memory for this scan ({str(error) or 'no detail'})"
    if isinstance(error, OSError):
        return _os_text(error)
    return str(error)


def segment_on_cluster(jobs: list[Job], args, model: MedNCA, table: ReportFile | None) -> int:
    """``mednca segment`` with ``--scheduler``/``--workers``: every job a task; prints a line per scan as it
    finishes, keeps the results table, and returns the exit status (1 when a scan failed, 130 on Ctrl-C).

    Ctrl-C stops new scans from starting, cancels those not started and waits for those in hand, so that every
    result a worker writes gets its row (a second Ctrl-C leaves them: a worker may then still write a result
    the table lacks)."""
    options = argparse.Namespace(overwrite=args.overwrite, plane=args.plane, seed=args.seed, quality=args.quality)
    # A scan with no result yet is computed whatever its task finds: a worker that died after writing a result
    # but before reporting it has the scan retried, and the retry must make the row, not skip the scan.
    fresh = argparse.Namespace(**{**vars(options), "overwrite": True})
    threads = args.threads or 1  # single-threaded workers: one per core is the fastest layout
    sent = [Job(_absolute(job.scan), {k: _absolute(p) for k, p in job.outputs.items()}) for job in jobs]
    outcomes = Counter()

    def record(batch: list[tuple[Future, object, str | None]]) -> None:
        rows = []
        for future, result, error in batch:
            if result is None and error is None:  # started after Ctrl-C, so it did nothing
                continue
            job = jobs[futures[future]]
            if error is None:
                line, outcome, row = _as_given(result, job, sent[futures[future]])
            else:
                line, outcome, row = f"{job.scan}: FAILED: {error}", "failed", failure_row(job.scan, error)
            tqdm.write(line)
            outcomes[outcome] += 1
            rows += [row] if row is not None else []
        if table is not None and rows:
            table.add_all(rows)  # writes the table once, with the whole batch

    with connect(args.scheduler, args.workers) as client, shared_model(client, model) as name:
        token = uuid.uuid4().hex[:8]
        stop = f"mednca-stop-{token}"
        futures = {client.submit(segment_scan, name, job, options if _any_exists(job) else fresh, threads, stop,
                                 pure=False, key=f"mednca-segment-{token}-{i}"): i for i, job in enumerate(sent)}
        recorded = set()
        try:
            for batch in _finished(futures, "scan"):
                record(batch)
                recorded.update(future for future, _, _ in batch)  # after: an interrupted record is done again
        except KeyboardInterrupt:
            # First no scan may start, then those already started are the ones to wait for: in the other
            # order, a worker could start a scan between the two, and write a result without a row.
            Event(stop, client=client).set()
            in_hand = [f for f in _in_hand(client, futures) if f not in recorded]
            client.cancel([f for f in futures if f not in in_hand])
            print(f"mednca: interrupted; finishing the {len(in_hand)} scan(s) in progress (Ctrl-C again to leave "
                  "them)", file=sys.stderr)
            try:
                for batch in _finished({f: futures[f] for f in in_hand}, "scan"):
                    record(batch)
            except KeyboardInterrupt:
                client.cancel(in_hand)
            print(f"mednca: stopped after {sum(outcomes.values())} of {len(jobs)} scans; their results are kept, "
                  "and running the same command again does the rest", file=sys.stderr)
            return 130
        finally:
            _remove_staging(jobs)
    return batch_summary(outcomes, len(jobs), args.report if table is not None else None)


def _in_hand(client: Client, futures) -> list[Future]:
    """The futures whose scans a worker is segmenting or has finished (its result may be on its way here)."""
    held = set()
    for keys in client.run(_held_keys).values():
        held.update(keys)
    return [f for f in futures if f.key in held or f.done()]


def _held_keys(dask_worker) -> list:
    """On a worker: the tasks it is running or holds the result of."""
    return [key for key, ts in dask_worker.state.tasks.items() if ts.state in ("executing", "long-running", "memory")]


def _any_exists(job: Job) -> bool:
    return any(path.exists() for path in job.outputs.values())


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _as_given(result: tuple[str, str, dict | None], job: Job, sent: Job) -> tuple[str, str, dict | None]:
    """A worker's line and row with the paths spelled as on the command line, so the table's rows match those
    of an in-process run of the same command."""
    pairs = [(sent.scan, job.scan), *((sent.outputs[k], job.outputs[k]) for k in job.outputs)]

    def respell(text):
        if not isinstance(text, str):
            return text
        for absolute, given in pairs:
            text = text.replace(str(absolute), str(given))
        return text

    line, outcome, row = result
    return respell(line), outcome, None if row is None else {k: respell(v) for k, v in row.items()}


def _remove_staging(jobs: list[Job]) -> None:
    """Remove the staging folders of workers on this machine that died while writing (a worker on another
    machine leaves its folder to the next run there)."""
    for folder in sorted({path.parent for job in jobs for path in job.outputs.values()}):
        stale = remove_stale_temp(folder)
        if stale:
            print(f"mednca: removed {len(stale)} temporary folder(s) in {folder} left by a worker that died",
                  file=sys.stderr)


# ----------------------------------------------------------------------------------------------- evaluate


def evaluate_case(model: str, data: Path, case: str, options: dict) -> tuple[list, str | None, str]:
    """The task of one case, on a worker: its rows (one per condition), or no rows and why it failed, and the
    worker's address."""
    worker = get_worker().address
    try:
        return run_to_end(evaluate_iter(_worker_model(model), data, cases=[case], **options)).rows, None, worker
    except (MedNCAError, MemoryError, OSError) as e:
        return [], _case_error(case, e), worker


def evaluate_on_cluster(args, model: MedNCA, cases: list[str], perturb, record) -> None:
    """``mednca evaluate`` with ``--scheduler``/``--workers``: every case a task; ``record(case, rows, error,
    worker)`` is called here for each case as it finishes (rows, or an error).

    Ctrl-C records the cases already finished, cancels the others and raises KeyboardInterrupt: unlike a
    segmentation, a case in progress leaves no file behind, so nothing is worth waiting for."""
    options = dict(quality_runs=args.quality, seed=args.seed, threads=args.threads or 1, perturb=perturb)
    with connect(args.scheduler, args.workers) as client, shared_model(client, model) as name:
        token = uuid.uuid4().hex[:8]
        futures = {client.submit(evaluate_case, name, _absolute(args.data), case, options, pure=False,
                                 key=f"mednca-evaluate-{token}-{i}"): case for i, case in enumerate(cases)}
        recorded = set()

        def done(future: Future, result, error: str | None) -> None:
            rows, error, worker = result if error is None else ([], error, "")
            if error is not None:  # the data folder as the command line spelled it
                error = error.replace(str(_absolute(args.data)), str(args.data))
            record(futures[future], rows, error, worker)
            recorded.add(future)

        try:
            for batch in _finished(futures, "case"):
                for outcome in batch:
                    done(*outcome)
        except KeyboardInterrupt:
            client.cancel([f for f in futures if not f.done()])
            for future in [f for f in futures if f.done() and f not in recorded and not f.cancelled()]:
                done(*_outcome(future))
            raise
