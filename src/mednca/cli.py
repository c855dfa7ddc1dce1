"""The ``mednca`` command: segment scans, train and evaluate models, import the authors' model, list models.

Errors the user can fix (a bad file, an unknown model, a folder that cannot be written) are printed as one
line and give exit status 1; a command line that cannot be parsed, or an option value out of range, gives 2.
Nothing is lost: every place a result goes is checked before the work starts, results that exist are kept
(running a command again resumes it), and in a batch a scan or case that fails does not stop the others.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from .artefacts import ARTEFACTS, CLEAN, parse_artefacts
from .batch import Job, batch_summary, find_scans, plan
from .checkpoint import read_metadata, save_model
from .data import data_pairs
from .errors import MedNCAError
from .evaluation import EvaluationReport, ScoreTable, evaluate_iter, select_cases
from .finetuning import FINETUNE, finetune_iter
from .inference import quality_iter, segment_iter, torch_threads
from .orientation import PLANE_NAMES, axis_codes, axis_of_plane, plane_of
from .preprocess import MAX_CONTEXT, Preprocessing
from .progress import run_to_end
from .registry import DEFAULT_MODEL, list_models, load_model, resolve
from .report import ReportFile, failure_row, result_row
from .staging import remove_stale_temp
from .threads import default_threads
from .training import AUTHORS_RECIPE, Recipe, train_iter
from .volume import check_labels, read_volume, write_volume

DESCRIPTION = """\
Segment medical scans (the hippocampus in MRI) with Med-NCA models,
and train, evaluate, import and list the models.
'mednca COMMAND --help' describes each command, with examples."""
MAX_QUALITY_RUNS = 100  # 100 runs of a 256-slice scan hold about 0.8 GB of probabilities
MAX_SEED = 2**32 - 1
THREADS_HELP = (
    "CPU threads for the computation (default: the cores not already busy, from the 1-minute load average; "
    "at least 1)"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MedNCAError as e:
        return _error(str(e))
    except MemoryError as e:
        return _error(f"not enough memory ({str(e) or 'no detail'})")
    except OSError as e:
        return _error(_os_text(e))
    except KeyboardInterrupt:
        print("mednca: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> int:
    print(f"mednca: error: {message}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------- options


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; every option with a real default says it (``None`` and off say nothing:
    their help explains what happens without them)."""

    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if quiet or "%(default)" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def whole_number(low: int, high: int | None = None):
    """An argparse type: a whole number from ``low`` (to ``high``), refused with the allowed range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: give a whole number {allowed}")
        return value

    return parse


def quality_runs(text: str) -> int:
    """``--quality``: 0 (no quality map) or 2 to ``MAX_QUALITY_RUNS`` runs."""
    value = whole_number(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("1 run makes no quality map: it compares 2 or more runs (0 turns it off)")
    if value > MAX_QUALITY_RUNS:
        raise argparse.ArgumentTypeError(
            f"{value} runs is more than the {MAX_QUALITY_RUNS} allowed: memory grows with the runs (100 runs of a "
            "256-slice scan take about 0.8 GB) and a few dozen runs already give a steady map"
        )
    return value


def learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a positive learning rate (such as 1e-3)")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < 1:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"{text} is out of range: give a fraction from 0 (none) up to, not "
                                         "including, 1")
    return value


def cluster_options(p: argparse.ArgumentParser, item: str) -> None:
    """``--scheduler`` / ``--workers``: the batch as Dask tasks, one per ``item`` (see ``mednca.cluster``)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help=f"run on this running Dask cluster (such as tcp://10.0.0.5:8786), one task per {item}; "
                            "its workers need napari-nca and the same paths to the files (a shared file system). "
                            "Needs the cluster extra: pip install 'napari-nca[cluster]'")
    group.add_argument("--workers", type=whole_number(1), default=None, metavar="N",
                       help=f"run on N worker processes on this machine (a Dask LocalCluster), one task per {item}; "
                            "each uses --threads threads (default 1)")


SEGMENT_EXAMPLES = """\
examples:
  mednca segment scan.nii.gz -o scan_seg.nii.gz
      segment one scan; the labels go to scan_seg.nii.gz
  mednca segment scans/ -o results/ --quality 10
      every scan in scans/: results/NAME_seg.nii.gz, and a quality (std) map from 10 runs, NAME_std.nii.gz
  mednca segment scans/ -o results/
      after an interruption: scans whose results exist are skipped; --overwrite recomputes them

Files named like results (*_seg, *_std) are left out of a folder, so scans and results may share one.
Scans with the same name in different folders get the folder's name in their results' names."""

TRAIN_EXAMPLES = """\
examples:
  mednca train Task04_Hippocampus/ -o my_model.safetensors --iterations 5000
      train a model; Ctrl-C stops it and prints the command that continues from its checkpoint
  mednca train Task04_Hippocampus/ -o refined.safetensors --init hippocampus --lr 1e-3 --best best.safetensors
      continue from the shipped model's weights, keeping the model with the best validation Dice too
  mednca train Task04_Hippocampus/ -o my_model.safetensors --workers 2
      share every batch among 2 one-thread processes: the same training, faster on 2 free cores

A model file, --best or a checkpoint that exists is never replaced; all are checked before training starts."""

EVALUATE_EXAMPLES = """\
examples:
  mednca evaluate hippocampus Task04_Hippocampus/
      Dice of the shipped model on its own validation cases (scans it was not trained on)
  mednca evaluate my_model.safetensors Task04_Hippocampus/ --quality 10 --csv scores.csv
      also score the quality map (NQM per case), and save the table for a spreadsheet
  mednca evaluate hippocampus Task04_Hippocampus/ --cases all --report scores.parquet --workers 2
      a long run: each case's scores are kept as it finishes; after Ctrl-C the same command scores the rest

A case that cannot be scored is reported under the table; the others are still scored."""

IMPORT_EXAMPLES = """\
examples:
  mednca import-reference mednca_hippocampus/ -o authors.safetensors
      convert the authors' checkpoint folder; then: mednca segment scan.nii.gz -o out/ --model authors.safetensors"""

INFO_EXAMPLES = """\
examples:
  mednca info hippocampus
      architecture, preprocessing and training record of the shipped model
  mednca info my_model.safetensors"""

MODELS_EXAMPLES = """\
examples:
  mednca models
      the shipped models, then the ones saved in your models folder, each with its file"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mednca", description=DESCRIPTION, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help, examples, func):
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=examples,
                           formatter_class=HelpFormatter)
        p.set_defaults(func=func)
        return p

    model_help = "model name (see 'mednca models'), .safetensors file or the authors' checkpoint folder"
    p = command("segment", "segment scans (files, DICOM series folders or folders of scans)", SEGMENT_EXAMPLES,
                cmd_segment)
    p.add_argument("inputs", nargs="+", type=Path, help="scan files, DICOM series folders or folders of scans")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output folder, or a file name such as scan_seg.nii.gz when segmenting one scan")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--quality", type=quality_runs, default=0, metavar="N",
                   help=f"also make a quality map: N stochastic runs (2 to {MAX_QUALITY_RUNS}) whose disagreement "
                        "(std) is written as NAME_std.nii.gz, with the NQM score; 0 makes none")
    p.add_argument("--seed", type=whole_number(0, MAX_SEED), default=0,
                   help="seed of the model's random cell updates: the same seed gives the same labels")
    p.add_argument("--plane", choices=PLANE_NAMES, default=None,
                   help="the plane to segment slice by slice (default: the one the model was trained on; the "
                        "scan's orientation is read from its file)")
    p.add_argument("--threads", type=whole_number(1), default=None, help=THREADS_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="recompute scans whose results exist and replace those files (without it they are skipped)")
    p.add_argument("--report", type=Path, default=None, metavar="FILE.csv|FILE.json|FILE.parquet",
                   help="also keep a results table, one row per scan: verdict (with --quality), NQM, slices worth "
                        "checking, volume of each class in mL (with its sd and 95%% interval across the runs); "
                        "rows of scans skipped in a later run are kept")
    cluster_options(p, "scan")

    p = command("import-reference", "convert the Med-NCA authors' checkpoint folder into a model file",
                IMPORT_EXAMPLES, cmd_import)
    p.add_argument("directory", type=Path, help="folder with model0.pth, model1.pth and config.dt")
    p.add_argument("-o", "--output", type=Path, required=True, help="the new model file (.safetensors)")

    p = command("info", "describe a model: architecture, preprocessing, how it was trained", INFO_EXAMPLES, cmd_info)
    p.add_argument("model", help=model_help)

    command("models", "list the shipped models and the user's", MODELS_EXAMPLES, cmd_models)

    p = command("evaluate", "Dice (and NQM) of a model on a labelled Decathlon task folder", EVALUATE_EXAMPLES,
                cmd_evaluate)
    p.add_argument("model", help=model_help)
    p.add_argument("data", type=Path, help="Decathlon task folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--quality", type=quality_runs, default=0, metavar="N",
                   help=f"score quality maps of N stochastic runs (2 to {MAX_QUALITY_RUNS}): NQM per case and its "
                        "correlation with Dice; 0 scores the plain segmentation")
    p.add_argument("--cases", default=None, metavar="validation|all|ID,ID,...",
                   help="which cases (default: the model's validation cases when it records them, else all)")
    p.add_argument("--limit", type=whole_number(1), default=None, metavar="K",
                   help="only the first K of those cases (default: all of them)")
    p.add_argument("--csv", type=Path, default=None, help="also write the per-case table as CSV to this file")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON to this file")
    p.add_argument("--report", type=Path, default=None, metavar="FILE.csv|FILE.json|FILE.parquet",
                   help="keep a results table, written as cases finish (case, artefact, Dice per class, NQM and "
                        "verdict with --quality, seconds, worker, error); running the same command again scores "
                        "only the cases missing from it. It belongs to one model, --seed and --quality: another "
                        "is refused")
    p.add_argument("--seed", type=whole_number(0, MAX_SEED), default=0,
                   help="seed of the model's random cell updates: the same seed gives the same scores")
    p.add_argument("--threads", type=whole_number(1), default=None, help=THREADS_HELP)
    p.add_argument("--perturb", default="", metavar="A,B,...|all",
                   help="also score every case under these MRI artefacts (fixed strengths, the same scans for every "
                        f"model): {', '.join(ARTEFACTS)}, or all")
    cluster_options(p, "case")

    p = command("train", "train a model on a labelled Decathlon task folder", TRAIN_EXAMPLES, cmd_train)
    p.add_argument("data", type=Path, help="Decathlon task folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the trained model (a new .safetensors file)")
    p.add_argument("--iterations", type=whole_number(1), default=20000, help="training steps")
    p.add_argument("--batch-size", type=whole_number(1), default=16, help="slices per training step")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help=f"peak learning rate (default: the recipe's, {Recipe().lr:g}, or "
                        f"{AUTHORS_RECIPE.lr:g} with --authors-recipe)")
    p.add_argument("--val-fraction", type=fraction, default=0.1,
                   help="fraction of the cases held out for validation (0: none, and no validation Dice)")
    p.add_argument("--seed", type=whole_number(0, MAX_SEED), default=0,
                   help="seeds weights, split, batches and augmentation: the same seed gives the same model")
    p.add_argument("--eval-every", type=whole_number(1), default=1000, help="validation Dice every N iterations")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="training state for --resume (default: OUTPUT with the suffix .ckpt)")
    p.add_argument("--checkpoint-every", type=whole_number(1), default=None, metavar="N",
                   help="save the training state every N iterations (default: 500, or a tenth of the run when "
                        "that is shorter)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--best", type=Path, default=None,
                   help="also keep the model with the best validation Dice in this new .safetensors file")
    p.add_argument("--init", default=None, metavar="MODEL",
                   help="start from this model's weights and architecture (default: new random weights)")
    p.add_argument("--authors-recipe", action="store_true",
                   help="the Med-NCA authors' plain recipe (no augmentation, exponential decay)")
    p.add_argument("--crop", type=whole_number(1), default=None,
                   help="side of the fine-level training window (default: the recipe's, 16); larger sees more context")
    p.add_argument("--no-augment", action="store_true", help="train on the slices as they are")
    p.add_argument("--artefacts", type=fraction, default=None, metavar="SHARE",
                   help="give this share of the training slices one MRI artefact (spike, ghosting, motion, thick "
                        "slices, blur, strong noise, inverted contrast), for a model that holds up on corrupted "
                        "scans (default: 0)")
    p.add_argument("--thick-across", type=fraction, default=None, metavar="SHARE",
                   help="replace this share of the training slices by what a scan of 2-5 times the slice spacing "
                        "shows there (a blend of the slices around), for scans with thick slices (default: 0)")
    p.add_argument("--spatial", type=fraction, default=None, metavar="SHARE",
                   help="rotate (up to 15 degrees), scale (0.9-1.1 per axis) and shift this share of the training "
                        "slices with their labels, for structures in other poses and crops (default: 0)")
    p.add_argument("--context", type=whole_number(0, MAX_CONTEXT), default=None, metavar="N",
                   help="a new model reads N neighbouring slices on each side with the slice it segments (default: 0, "
                        "the slice alone; a model given by --init keeps its own)")
    p.add_argument("--threads", type=whole_number(1), default=None, help=THREADS_HELP)
    p.add_argument("--workers", type=whole_number(1), default=1, metavar="N",
                   help="share every batch among N processes of one thread each (the same training up to rounding; "
                        "a checkpoint resumes with any number); at most --batch-size")
    p = command("finetune", "adapt a model to one scan from a few annotated slices", FINETUNE_EXAMPLES, cmd_finetune)
    p.add_argument("scan", type=Path, help="the scan (a file, or a DICOM series folder)")
    p.add_argument("labels", type=Path,
                   help="label map on the scan's grid (same shape and geometry) in the model's classes; the slices "
                        "with any label are learned from")
    p.add_argument("-o", "--output", type=Path, required=True, help="the adapted model (a new .safetensors file)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=model_help)
    p.add_argument("--slices", type=whole_number(0), nargs="+", default=None, metavar="S",
                   help="learn from these slices only (indices along the scan axis the model slices), labelled or "
                        "not: an empty one teaches 'nothing here' (default: every slice with a label)")
    p.add_argument("--iterations", type=whole_number(1), default=FINETUNE.iterations,
                   help="training steps of the adapted model (and of each model that checks it)")
    p.add_argument("--lr", type=learning_rate, default=FINETUNE.lr, help="learning rate")
    p.add_argument("--seed", type=whole_number(0, MAX_SEED), default=0,
                   help="seeds batches, augmentation and the model's random cell updates: the same seed gives the "
                        "same model")
    p.add_argument("--threads", type=whole_number(1), default=None, help=THREADS_HELP)
    p.add_argument("--force", action="store_true",
                   help="write the adapted model even when it is not expected to segment the other slices better")
    return parser


# ---------------------------------------------------------------------------------------------- segment


def cmd_segment(args) -> int:
    scans, notes = find_scans(args.inputs)
    jobs = plan(scans, args.output, ("seg", "std") if args.quality else ("seg",))
    for folder in sorted({path.parent for job in jobs for path in job.outputs.values()}):
        writable_folder(folder, "output folder")
        stale = remove_stale_temp(folder)
        if stale:
            notes.append(f"removed {len(stale)} temporary folder(s) in {folder} left by a mednca run that was killed")
    for note in notes:
        print(f"mednca: {note}", file=sys.stderr)
    table = None if args.report is None else ReportFile(args.report)
    model = load_model(args.model)
    if args.scheduler or args.workers:
        from .cluster import segment_on_cluster

        return segment_on_cluster(jobs, args, model, table)
    threads = args.threads or default_threads()
    outcomes = Counter()
    for job in jobs:
        row, error = None, None
        try:
            line, outcome, row = _segment_one(model, job, args, threads)
        except MedNCAError as e:
            error = str(e)
        except MemoryError as e:  # a header claiming gigabytes, a quality map too large for this machine
            error = f"not enough memory for this scan ({str(e) or 'no detail'})"
        except OSError as e:  # the file system failing under a read
            error = _os_text(e)
        if error is not None:
            line, outcome, row = f"{job.scan}: FAILED: {error}", "failed", failure_row(job.scan, error)
        tqdm.write(line)
        outcomes[outcome] += 1
        if table is not None and row is not None:
            table.add(row)
    return batch_summary(outcomes, len(jobs), args.report if table is not None else None)


def _segment_one(model, job: Job, args, threads: int, bar: bool = True) -> tuple[str, str, dict | None]:
    """Segment one scan and write its results; returns the line to print, the outcome and the results row.
    ``bar``: show the scan's progress (a Dask worker does not: its output is not the user's terminal)."""
    start = time.perf_counter()
    volume = read_volume(job.scan)
    if not args.overwrite and _results_exist(job, volume.shape):
        shown = ", ".join(str(p) for p in job.outputs.values())
        return f"{job.scan}: skipped, its results exist ({shown})", "skipped", None
    axis = None if args.plane is None else axis_of_plane(axis_codes(volume.affine), args.plane)
    opts = dict(axis=axis, seed=args.seed, threads=threads)
    if args.quality:
        gen = quality_iter(model, volume, args.quality, **opts)
    else:
        gen = segment_iter(model, volume, **opts)
    result = _drive(gen, job.scan.name) if bar else run_to_end(gen)
    seg_path = write_volume(result.labels, job.outputs["seg"])
    volumes = ", ".join(v.text() for v in result.volumes)
    if args.quality:
        write_volume(volume.like(result.std.max(0)), job.outputs["std"])
        worst = ", ".join(str(s) for s in result.flagged_slices[:5]) or "none"
        plane = plane_of(axis_codes(volume.affine), result.axis)
        judged = f"\n    verdict: {result.verdict.text()}\n    {plane} slices worth checking: {worst}"
    else:
        judged = "  (not judged: --quality 10 adds a verdict)"
    seconds = time.perf_counter() - start
    line = f"{job.scan} -> {seg_path}  [{_dims(volume.shape)}]  {volumes}  {seconds:.1f} s{judged}"
    return line, "segmented", result_row(job.scan, job.outputs, result, seconds)


def _results_exist(job: Job, shape: tuple[int, ...]) -> bool:
    """Whether all of the scan's results exist from an earlier run (readable, on the scan's grid), so it can be
    skipped; None of them: False. Anything between is refused rather than overwritten."""
    present = [path for path in job.outputs.values() if path.exists()]
    if not present:
        return False
    for path in present:
        try:
            found = read_volume(path).shape
        except MedNCAError as e:
            raise MedNCAError(f"{path} exists but is not a readable volume ({e}); move it away, or add "
                              "--overwrite to replace it") from None
        if found != shape:
            raise MedNCAError(f"{path} exists but is not a result of this scan (shape {_dims(found)}, the scan's "
                              f"is {_dims(shape)}); move it away, or add --overwrite to replace it")
    missing = [path for path in job.outputs.values() if path not in present]
    if missing:
        raise MedNCAError(f"{present[0]} exists but {missing[0]} does not (an earlier run made other results): "
                          "add --overwrite to compute them all again")
    return True


def _dims(shape) -> str:
    return "x".join(str(s) for s in shape)


def _drive(gen, name: str):
    """Run an engine generator to its result with a progress bar on stderr."""
    with tqdm(desc=name, unit="slice", leave=False, file=sys.stderr) as bar:

        def show(p):
            bar.total, bar.n = p.total, p.done
            bar.refresh()

        return run_to_end(gen, show)


def writable_folder(folder: Path, what: str) -> None:
    """Create ``folder`` when needed and write a file there, so a folder that cannot take the results is
    reported before the work, not after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), folder)
        raise MedNCAError(f"cannot use {folder} as the {what}: {blocking} is a file, not a folder") from None
    except OSError as e:
        raise MedNCAError(f"cannot write to the {what} {folder}: {e.strerror or e}") from None


def new_file(path: Path, what: str, suffix: str | None = None) -> None:
    """Check, before the work, that ``path`` can become a new file: right suffix, nothing there yet, a
    writable folder."""
    if suffix is not None and path.suffix != suffix:
        raise MedNCAError(f"{what} must end in {suffix}, not {path.name!r}")
    if path.is_dir():
        raise MedNCAError(f"{what} {path} is a folder; give a file name")
    if path.exists():
        raise MedNCAError(f"{path} already exists; choose another name ({what} is never overwritten)")
    writable_folder(path.parent, f"folder of {what}")


def _os_text(error: OSError) -> str:
    """An operating-system error as one line: the file and the system's reason."""
    reason = error.strerror or str(error) or type(error).__name__
    return f"{error.filename}: {reason}" if error.filename else reason


# ------------------------------------------------------------------------------------------- models


def cmd_import(args) -> int:
    new_file(args.output, "the model file", ".safetensors")
    model = load_model(args.directory)
    path = save_model(model, args.output)
    print(f"imported {args.directory} -> {path} ({model.n_parameters} parameters)")
    return 0


def cmd_info(args) -> int:
    path = resolve(args.model)
    if path.is_dir():
        model = load_model(path)
        meta = {"architecture": model.config.to_dict(), "preprocessing": model.preprocessing.to_dict(),
                "provenance": model.provenance}
    else:
        meta = read_metadata(path)
        meta.pop("sha256", None)
    print(f"model: {path}")
    print(json.dumps(meta, indent=2, default=str))
    return 0


def cmd_models(args) -> int:
    entries = list_models()
    if not entries:
        print("no models found")
    for e in entries:
        print(f"{e.summary}\n    {e.path}")
    return 0


# --------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> int:
    perturb = parse_artefacts(args.perturb)
    conditions = (CLEAN, *perturb)
    _check_report_files(args)
    model = load_model(args.model)
    table = None
    if args.report is not None:
        table = ScoreTable(args.report, model, str(args.model), seed=args.seed, quality_runs=args.quality)
    recorded = model.provenance.get("validation_cases")
    if args.cases is None:
        cases = "validation" if recorded else "all"
    elif args.cases in ("validation", "all"):
        cases = args.cases
    else:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    scans = {case: str(image) for case, image, _ in select_cases(model, data_pairs(args.data), cases)}
    chosen = list(scans)[: args.limit]
    if cases == "validation":
        print(f"evaluating on {len(chosen)} of the model's {len(recorded)} validation cases", file=sys.stderr)
    elif args.cases is None:
        print(f"the model records no validation cases: evaluating on {len(chosen)} cases, which may include "
              "cases it was trained on", file=sys.stderr)
    results = {} if table is None else table.scored(chosen, conditions)
    todo = [case for case in chosen if case not in results]
    if results:
        print(f"mednca: {len(results)} of {len(chosen)} cases already scored in {args.report} (same model and "
              f"settings); scoring the other {len(todo)}", file=sys.stderr)
    failed: dict[str, str] = {}

    def record(case: str, rows: list, error: str | None, worker: str) -> None:
        """Keep a finished case: in the table first, so a Ctrl-C between the two never shows a score that
        the table lacks."""
        if table is not None:
            if error is None:
                table.add(case, scans[case], rows, worker)
            else:
                table.add_failure(case, scans[case], conditions, error, worker)
        if error is None:
            results[case] = rows
        else:
            failed[case] = error

    interrupted = False
    try:
        if todo and (args.scheduler or args.workers):
            from .cluster import evaluate_on_cluster

            evaluate_on_cluster(args, model, todo, perturb, record)
        elif todo:
            _evaluate_here(args, model, todo, perturb, record)
    except KeyboardInterrupt:
        interrupted = True
    rows = [row for case in chosen for row in results.get(case, [])]
    failed = {case: failed[case] for case in chosen if case in failed}
    meta = {"seed": args.seed, "model": str(args.model), "cases": cases, "failed": failed}
    report = EvaluationReport(rows, tuple(model.config.class_names), args.quality, meta)
    if rows:
        print(report.table())
    for case, reason in failed.items():
        print(f"{case}: FAILED: {reason}")
    if interrupted:
        kept = (f"the scores so far are in {args.report}, and running the same command again scores the rest"
                if table is not None else "--report FILE keeps scores as cases finish, for a later run to go on")
        print(f"mednca: interrupted after {len(results) + len(failed)} of {len(chosen)} cases; {kept}",
              file=sys.stderr)
        return 130
    if failed:
        retry = " (running the same command again retries the failed ones)" if table is not None else ""
        print(f"mednca: {len(failed)} of {len(chosen)} cases failed; the scores above are of the other "
              f"{len(chosen) - len(failed)}{retry}", file=sys.stderr)
    if table is not None:
        print(f"mednca: results table {args.report}", file=sys.stderr)
    for path, write in ((args.csv, report.to_csv), (args.json, report.to_json)):
        if path is not None:
            print(f"wrote {write(path)}")
    return 1 if failed else 0


def _check_report_files(args) -> None:
    """--csv, --json and --report: distinct files, in folders that can be written, before any work."""
    seen: dict[Path, str] = {}
    for option, path in (("--csv", args.csv), ("--json", args.json), ("--report", args.report)):
        if path is None:
            continue
        if path.is_dir():
            raise MedNCAError(f"{path} is a folder; give a file name to write the report to")
        if path.resolve() in seen:
            raise MedNCAError(f"{seen[path.resolve()]} and {option} name the same file")
        seen[path.resolve()] = option
        writable_folder(path.parent, "report folder")


def _evaluate_here(args, model, cases: list[str], perturb, record) -> None:
    """Score the cases in this process, one at a time, so that a case that fails costs only itself;
    ``record(case, rows, error, worker)`` keeps each as it finishes."""
    threads = args.threads or default_threads()
    with tqdm(total=len(cases), unit="case", file=sys.stderr, leave=False) as bar:
        for case in cases:
            bar.set_description(case)
            rows, error = [], None
            try:
                gen = evaluate_iter(model, args.data, quality_runs=args.quality, seed=args.seed, cases=[case],
                                    threads=threads, perturb=perturb)
                rows = run_to_end(gen).rows
            except (MedNCAError, MemoryError, OSError) as e:
                error = _case_error(case, e)
            record(case, rows, error, "")
            bar.update(1)


def _case_error(case: str, error: BaseException) -> str:
    """Why a case could not be scored, in one line (in this process and on a Dask worker alike)."""
    if isinstance(error, MemoryError):
        return f"not enough memory ({str(error) or 'no detail'})"
    if isinstance(error, OSError):
        return _os_text(error)
    return str(error).removeprefix(f"case {case}: ")


# ------------------------------------------------------------------------------------------------ train


def cmd_train(args) -> int:
    output = args.output
    new_file(output, "the model file", ".safetensors")
    checkpoint = args.checkpoint or output.with_suffix(".ckpt")
    if checkpoint.exists() and not args.resume:
        raise MedNCAError(f"a training checkpoint exists at {checkpoint}: add --resume to continue it, "
                          "or remove it to start afresh")
    if args.resume and not checkpoint.exists():
        print(f"no checkpoint at {checkpoint} yet: starting from iteration 0", file=sys.stderr)
    _check_train_files(args, output, checkpoint)
    if args.workers > args.batch_size:
        raise MedNCAError(f"--workers {args.workers} is more than the --batch-size {args.batch_size} they share")
    if args.workers > 1 and (args.threads or 1) > 1:
        raise MedNCAError("--workers runs every process on one thread: leave out --threads or give 1")
    every = args.checkpoint_every or max(1, min(500, args.iterations // 10))
    options = dict(
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction,
        seed=args.seed, eval_every=args.eval_every, checkpoint_path=checkpoint, checkpoint_every=every,
        resume=args.resume, best_path=args.best, workers=args.workers,
        # a loss reported at every evaluation and checkpoint: divergence is seen before either saves weights
        log_every=math.gcd(50, args.eval_every, every),
    )
    if args.init is not None:
        options["init_model"] = load_model(args.init)
        have = options["init_model"].preprocessing.context
        if args.context is not None and args.context != have:
            raise MedNCAError(f"--init {args.init} reads {have} neighbouring slices on each side, not --context "
                              f"{args.context}: a model keeps the inputs it was trained on")
    elif args.context:
        options["preprocessing"] = Preprocessing(context=args.context)  # train_iter gives the model its channels
    recipe = (AUTHORS_RECIPE if args.authors_recipe else Recipe()).given(
        crop=args.crop, augment=False if args.no_augment else None, artefacts=args.artefacts,
        thick_across=args.thick_across, spatial=args.spatial)
    options["recipe"] = recipe
    data_pairs(args.data)  # a bad folder is reported now, with its reason, not by the training loop
    print(f"reading {args.data} ...", file=sys.stderr)
    gen = train_iter(args.data, **options)
    saved_at, at, dice = None, 0, None
    bar = tqdm(total=args.iterations, unit="it", file=sys.stderr, desc="training")
    try:
        with torch_threads(1 if args.workers > 1 else args.threads or default_threads()):
            while True:
                try:
                    event = next(gen)
                except StopIteration as stop:
                    model = stop.value
                    break
                at = event.iteration
                bar.n = at
                if event.kind == "checkpoint":
                    saved_at = at
                elif event.kind == "eval":
                    dice = event.val_dice
                    bar.set_postfix_str(_dice_text(dice), refresh=False)
                    tqdm.write(f"iteration {at}: validation Dice {_dice_text(dice)}", file=sys.stderr)
                elif event.kind == "step":
                    if not math.isfinite(event.loss):
                        gen.close()
                        raise _diverged(args, recipe, f"the loss became {event.loss} by iteration {at}",
                                        checkpoint if saved_at is not None else None)
                    bar.set_postfix(loss=f"{event.loss:.4f}", dice=f"{dice['whole']:.3f}" if dice else "-",
                                    refresh=False)
                bar.refresh()
    except KeyboardInterrupt:
        gen.close()
        bar.close()  # before the lines below, so they are not drawn over
        print(f"mednca: training interrupted at iteration {at}; {output} was not written", file=sys.stderr)
        if saved_at is None:
            print(f"no checkpoint was saved yet (one is saved every {every} iterations)", file=sys.stderr)
        else:
            print(f"the checkpoint {checkpoint} holds iteration {saved_at}; continue with:\n  "
                  f"{_resume_command(args, checkpoint)}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    if not all(torch.isfinite(t).all() for t in model.state_dict().values()):
        raise _diverged(args, recipe, "the weights are no longer finite numbers", checkpoint)  # written by this run
    path = save_model(model, output)
    n_val = len(model.provenance.get("validation_cases", []))
    print(f"trained {args.iterations} iterations in {model.provenance.get('train_seconds', 0):.0f} s -> {path}")
    if dice:
        print(f"validation Dice (model space, {n_val} held-out cases): {_dice_text(dice)}")
    if n_val:
        print(f"native-resolution Dice on those cases: mednca evaluate {path} {args.data} --cases validation")
    return 0


def _check_train_files(args, output: Path, checkpoint: Path) -> None:
    """Every file training writes, checked before it starts: hours of training never end in a refused name."""
    if checkpoint.resolve() == output.resolve():
        raise MedNCAError(f"the checkpoint and the model would both be {output}: give --checkpoint another name")
    if checkpoint.is_dir():
        raise MedNCAError(f"the checkpoint {checkpoint} is a folder; give a file name")
    writable_folder(checkpoint.parent, "folder of the checkpoint")
    best = args.best
    if best is None:
        return
    if args.val_fraction == 0:
        raise MedNCAError("--best needs validation cases to choose the best model: set --val-fraction above 0")
    if best.resolve() in (output.resolve(), checkpoint.resolve()):
        raise MedNCAError(f"--best {best} names the same file as the model or the checkpoint: give another name")
    if args.resume and checkpoint.exists() and best.exists():  # written by the run being continued
        if best.suffix != ".safetensors":
            raise MedNCAError(f"--best must end in .safetensors, not {best.name!r}")
        return
    new_file(best, "the best model (--best)", ".safetensors")


def _diverged(args, recipe: Recipe, what: str, checkpoint: Path | None) -> MedNCAError:
    """The error for a training whose numbers blew up. It removes the checkpoint this run wrote (None: it
    wrote none), which only a run with the same learning rate could continue, into the same divergence, and
    a --best model whose weights are no longer finite; a best model saved before the divergence is kept."""
    removed = [p for p in (checkpoint,) if p is not None and p.exists()]
    removed += [p for p in (args.best,) if p is not None and p.exists() and not _finite_file(p)]
    for path in removed:
        path.unlink()
    lr = args.lr if args.lr is not None else recipe.lr
    note = f"; removed {', '.join(map(str, removed))}, written by the diverged run" if removed else ""
    return MedNCAError(f"training diverged ({what}); lower --lr (it was {lr:g}); {args.output} was not "
                       f"written{note}")


def _finite_file(path: Path) -> bool:
    """Whether every floating-point tensor in a safetensors file (a model or a checkpoint) is finite."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return all(
                torch.isfinite(t).all() for t in (f.get_tensor(k) for k in f.keys()) if t.is_floating_point()  # noqa: SIM118
            )
    except (SafetensorError, OSError):
        return True  # not ours to judge, so not ours to remove


def _dice_text(dice: dict[str, float]) -> str:
    rest = ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if k != "whole")
    return f"whole {dice['whole']:.3f}" + (f" ({rest})" if rest else "")


def _resume_command(args, checkpoint: Path) -> str:
    """The command line that continues this run: the same setup, else the checkpoint is refused."""
    parts = ["mednca train", str(args.data), "-o", str(args.output), "--checkpoint", str(checkpoint), "--resume",
             "--iterations", str(args.iterations), "--batch-size", str(args.batch_size),
             "--val-fraction", str(args.val_fraction), "--seed", str(args.seed)]
    if args.workers > 1:
        parts += ["--workers", str(args.workers)]
    for flag, value in (("--lr", args.lr), ("--init", args.init), ("--best", args.best), ("--crop", args.crop),
                        ("--artefacts", args.artefacts), ("--thick-across", args.thick_across),
                        ("--spatial", args.spatial), ("--context", args.context)):
        if value is not None:
            parts += [flag, str(value)]
    parts += [flag for flag, on in (("--authors-recipe", args.authors_recipe), ("--no-augment", args.no_augment)) if on]
    return " ".join(parts)


# --------------------------------------------------------------------------------------------- finetune

FINETUNE_EXAMPLES = """\
examples:
  mednca finetune scan.nii.gz scan_corrected.nii.gz -o my_scanner.safetensors
      adapt the default model to this scan from the slices labelled in scan_corrected.nii.gz
  mednca finetune scan.nii.gz labels.nii.gz -o adapted.safetensors --model my_model --slices 12 18 24
      learn from those three slices only; then: mednca segment scan.nii.gz -o out/ --model adapted.safetensors

Label 3 to 5 slices spread over the structure. Each annotated slice is left out in turn to estimate the Dice
on the slices that were not annotated, before and after; the adapted model is written only when it is
expected to be better (--force writes it anyway). The model file records the base model, the slices used
and the estimate."""


def cmd_finetune(args) -> int:
    new_file(args.output, "the model file", ".safetensors")
    model = load_model(args.model)
    scan = read_volume(args.scan)
    labels = read_volume(args.labels)
    try:
        check_labels(labels, scan)
    except MedNCAError as e:
        raise MedNCAError(f"{args.labels} does not fit {args.scan}: {' '.join(str(e).split())}") from None
    gen = finetune_iter(model, scan, labels, args.slices, iterations=args.iterations, lr=args.lr, seed=args.seed,
                        base_name=str(args.model))
    bars = []  # made at the first step: labels that do not fit are refused before any bar is drawn
    try:
        with torch_threads(args.threads or default_threads()):
            tuned, report = run_to_end(gen, lambda event: _finetune_progress(bars, event, args.iterations))
    finally:
        for bar in bars:
            bar.close()
    plane = plane_of(model.preprocessing.orientation, model.preprocessing.axis)
    print(f"fine-tuned {args.model} on {len(report.slices)} {plane} slice(s) of {args.scan} "
          f"({', '.join(map(str, report.slices))}) in {report.seconds:.0f} s")
    print(f"Dice on the annotated slices, which it trained on: {report.dice_before['whole']:.3f} -> "
          f"{report.dice_after['whole']:.3f}")
    after = "no estimate" if report.estimate_after is None else f"{report.estimate_after:.3f}"
    print(f"expected Dice on the slices it did not train on: {report.estimate_before:.3f} -> {after}")
    print(report.advice)
    if not report.recommended and not args.force:
        raise MedNCAError(f"{args.output} was not written: the adapted model is not expected to be better "
                          "(--force writes it anyway)")
    path = save_model(tuned, args.output)
    print(f"wrote {path}")
    return 0


def _finetune_progress(bars: list, event, iterations: int) -> None:
    """One bar over the whole job: the adapted model's steps, then those of the models that check it."""
    if not bars:
        bars.append(tqdm(total=iterations, unit="it", file=sys.stderr, leave=False))
    bar = bars[0]
    if event.kind == "step":
        bar.set_description("training")
        bar.total, bar.n = iterations, event.iteration
    elif event.kind == "fold":
        bar.set_description("checking on held-out slices")
        bar.total, bar.n = iterations + event.total, iterations + event.iteration
    bar.refresh()


if __name__ == "__main__":
    sys.exit(main())
