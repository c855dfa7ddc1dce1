"""The ``mednca`` command: segment scans, import the authors' model, list and describe models.

Errors the user can fix (a bad file, an unknown model) are printed as one line and give exit status 1;
a command line that cannot be parsed gives 2. When several scans are segmented, a bad one does not stop
the others.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from .checkpoint import read_metadata, save_model
from .data import data_pairs
from .errors import MedNCAError
from .evaluation import evaluate_iter, select_cases
from .inference import quality_iter, segment_iter, torch_threads
from .progress import run_to_end
from .registry import DEFAULT_MODEL, list_models, load_model, resolve
from .training import AUTHORS_RECIPE, Recipe, train_iter
from .volume import read_volume, write_volume

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MedNCAError as e:
        print(f"mednca: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mednca: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mednca", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("segment", help="segment scans (files or folders of scans)")
    p.add_argument("inputs", nargs="+", type=Path, help="scan files, DICOM series folders or folders of scans")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="output folder (or a file name when segmenting one scan)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="model name, .safetensors file or the authors' folder")
    p.add_argument("--quality", type=int, default=0, metavar="N",
                   help="also compute a quality map from N stochastic runs (N >= 2) and write the std map")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=None, help="slice axis (default: the model's)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("import-reference", help="convert the Med-NCA authors' checkpoint folder")
    p.add_argument("directory", type=Path, help="folder with model0.pth, model1.pth and config.dt")
    p.add_argument("-o", "--output", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", help="describe a model")
    p.add_argument("model", help="model name or .safetensors file")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("models", help="list the shipped and the user's models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("evaluate", help="Dice (and NQM) of a model on a labelled Decathlon task folder")
    p.add_argument("model", help="model name, .safetensors file or the authors' folder")
    p.add_argument("data", type=Path, help="Decathlon task folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--quality", type=int, default=0, metavar="N",
                   help="score quality maps of N stochastic runs (N >= 2): NQM per case and its correlation with Dice")
    p.add_argument("--cases", default=None, metavar="validation|all|ID,ID,...",
                   help="which cases (default: the model's validation cases when it records them, else all)")
    p.add_argument("--limit", type=int, default=None, metavar="K", help="only the first K of those cases")
    p.add_argument("--csv", type=Path, default=None, help="also write the per-case table as CSV")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("train", help="train a model on a labelled Decathlon task folder")
    p.add_argument("data", type=Path, help="Decathlon task folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the trained model (.safetensors)")
    p.add_argument("--iterations", type=int, default=20000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of cases held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, split, batches and augmentation")
    p.add_argument("--eval-every", type=int, default=1000, help="validation Dice every N iterations")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="training state for --resume (default: OUTPUT with the suffix .ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--best", type=Path, default=None, help="also keep the model with the best validation Dice here")
    p.add_argument("--init", default=None, metavar="MODEL", help="start from this model's weights and architecture")
    p.add_argument("--authors-recipe", action="store_true",
                   help="the Med-NCA authors' plain recipe (no augmentation, exponential decay)")
    p.add_argument("--crop", type=int, default=None,
                   help="side of the fine-level training window (default: the recipe's, 16); larger sees more context")
    p.add_argument("--no-augment", action="store_true", help="train on the slices as they are")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    p.set_defaults(func=cmd_train)
    return parser


def find_scans(inputs: list[Path]) -> list[Path]:
    """Expand folders into the scans they hold; a folder without scan files is taken as a DICOM series."""
    scans: list[Path] = []
    for path in inputs:
        if not path.exists():
            raise MedNCAError(f"input not found: {path}")
        if path.is_dir():
            inside = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SCAN_SUFFIXES))
            scans.extend(inside or [path])
        else:
            scans.append(path)
    return scans


def output_path(scan: Path, output: Path, single: bool, suffix: str) -> Path:
    """Where the result for ``scan`` goes: a NIfTI beside the others in ``output``, or ``output`` itself."""
    if single and output.name.lower().endswith(SCAN_SUFFIXES) and suffix == "seg":
        return output
    folder = output.parent if single and output.name.lower().endswith(SCAN_SUFFIXES) else output
    name = scan.name
    for ext in SCAN_SUFFIXES:
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return folder / f"{name}_{suffix}.nii.gz"


def cmd_segment(args) -> int:
    if args.quality == 1 or args.quality < 0:
        raise MedNCAError("--quality needs at least 2 runs")
    model = load_model(args.model)
    scans = find_scans(args.inputs)
    failures = 0
    for scan in scans:
        try:
            line = _segment_one(model, scan, args, single=len(scans) == 1)
        except MedNCAError as e:
            failures += 1
            line = f"{scan}: FAILED: {e}"
        tqdm.write(line)
    if failures:
        print(f"mednca: {failures} of {len(scans)} scans failed", file=sys.stderr)
    return 1 if failures else 0


def _segment_one(model, scan: Path, args, single: bool) -> str:
    start = time.perf_counter()
    volume = read_volume(scan)
    opts = dict(axis=args.axis, seed=args.seed, threads=args.threads)
    if args.quality:
        gen = quality_iter(model, volume, args.quality, **opts)
    else:
        gen = segment_iter(model, volume, **opts)
    result = _drive(gen, scan.name)
    seg_path = write_volume(result.labels, output_path(scan, args.output, single, "seg"))
    extra = ""
    if args.quality:
        std = volume.like(result.std.max(0))
        std_path = write_volume(std, output_path(scan, args.output, single, "std"))
        worst = ", ".join(str(s) for s in result.flagged_slices[:5]) or "none"
        extra = f"  NQM {result.nqm:.4f}  std map {std_path}  least trustworthy slices: {worst}"
    counts = ", ".join(
        f"{name} {int((result.labels.array == i + 1).sum())} vox" for i, name in enumerate(model.config.class_names)
    )
    shape = "x".join(str(s) for s in volume.shape)
    return f"{scan} -> {seg_path}  [{shape}]  {counts}{extra}  {time.perf_counter() - start:.1f} s"


def _drive(gen, name: str):
    """Run an engine generator to its result with a progress bar on stderr."""
    with tqdm(desc=name, unit="slice", leave=False, file=sys.stderr) as bar:

        def show(p):
            bar.total, bar.n = p.total, p.done
            bar.refresh()

        return run_to_end(gen, show)


def cmd_import(args) -> int:
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


def cmd_evaluate(args) -> int:
    if args.quality == 1 or args.quality < 0:
        raise MedNCAError("--quality needs at least 2 runs")
    if args.limit is not None and args.limit < 1:
        raise MedNCAError("--limit needs at least 1 case")
    model = load_model(args.model)
    recorded = model.provenance.get("validation_cases")
    if args.cases is None:
        cases = "validation" if recorded else "all"
    elif args.cases in ("validation", "all"):
        cases = args.cases
    else:
        cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    chosen = [case for case, _, _ in select_cases(model, data_pairs(args.data), cases)][: args.limit]
    if cases == "validation":
        print(f"evaluating on {len(chosen)} of the model's {len(recorded)} validation cases", file=sys.stderr)
    elif args.cases is None:
        print(f"the model records no validation cases: evaluating on {len(chosen)} cases, which may include "
              "cases it was trained on", file=sys.stderr)
    gen = evaluate_iter(model, args.data, quality_runs=args.quality, seed=args.seed, cases=chosen,
                        threads=args.threads)
    with tqdm(total=len(chosen), unit="case", file=sys.stderr, leave=False) as bar:

        def show(p):
            bar.n = p.done
            bar.set_description(p.stage)

        report = run_to_end(gen, show)
    report.meta["model"] = str(args.model)
    print(report.table())
    for path, write in ((args.csv, report.to_csv), (args.json, report.to_json)):
        if path is not None:
            print(f"wrote {write(path)}")
    return 0


def cmd_train(args) -> int:
    output = args.output
    if output.suffix != ".safetensors":
        raise MedNCAError(f"the model file must end in .safetensors, not {output.name!r}")
    if output.exists():
        raise MedNCAError(f"{output} already exists; choose another name (a trained model is never overwritten)")
    checkpoint = args.checkpoint or output.with_suffix(".ckpt")
    if checkpoint.exists() and not args.resume:
        raise MedNCAError(f"a training checkpoint exists at {checkpoint}: add --resume to continue it, "
                          "or remove it to start afresh")
    if args.resume and not checkpoint.exists():
        print(f"no checkpoint at {checkpoint} yet: starting from iteration 0", file=sys.stderr)
    options = dict(
        iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction,
        seed=args.seed, eval_every=args.eval_every, checkpoint_path=checkpoint,
        checkpoint_every=args.checkpoint_every, resume=args.resume, best_path=args.best,
    )
    if args.init is not None:
        options["init_model"] = load_model(args.init)
    recipe = AUTHORS_RECIPE if args.authors_recipe else Recipe()
    if args.crop is not None:
        recipe = replace(recipe, crop=args.crop)
    if args.no_augment:
        recipe = replace(recipe, augment=False)
    options["recipe"] = recipe
    data_pairs(args.data)  # a bad folder is reported now, with its reason, not by the training loop
    print(f"reading {args.data} ...", file=sys.stderr)
    gen = train_iter(args.data, **options)
    saved_at, at, dice = None, 0, None
    bar = tqdm(total=args.iterations, unit="it", file=sys.stderr, desc="training")
    try:
        with torch_threads(args.threads):
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
                    bar.set_postfix(loss=f"{event.loss:.4f}", dice=f"{dice['whole']:.3f}" if dice else "-",
                                    refresh=False)
                bar.refresh()
    except KeyboardInterrupt:
        gen.close()
        bar.close()
        print(f"mednca: training interrupted at iteration {at}; {output} was not written", file=sys.stderr)
        if saved_at is None:
            print("no checkpoint was saved yet (one is saved every "
                  f"{args.checkpoint_every} iterations)", file=sys.stderr)
        else:
            print(f"the checkpoint {checkpoint} holds iteration {saved_at}; continue with:\n  "
                  f"{_resume_command(args, checkpoint)}", file=sys.stderr)
        return 130
    bar.close()
    path = save_model(model, output)
    n_val = len(model.provenance.get("validation_cases", []))
    print(f"trained {args.iterations} iterations in {model.provenance.get('train_seconds', 0):.0f} s -> {path}")
    if dice:
        print(f"validation Dice (model space, {n_val} held-out cases): {_dice_text(dice)}")
    if n_val:
        print(f"native-resolution Dice on those cases: mednca evaluate {path} {args.data} --cases validation")
    return 0


def _dice_text(dice: dict[str, float]) -> str:
    rest = ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if k != "whole")
    return f"whole {dice['whole']:.3f}" + (f" ({rest})" if rest else "")


def _resume_command(args, checkpoint: Path) -> str:
    """The command line that continues this run: the same setup, else the checkpoint is refused."""
    parts = ["mednca train", str(args.data), "-o", str(args.output), "--checkpoint", str(checkpoint), "--resume",
             "--iterations", str(args.iterations), "--batch-size", str(args.batch_size),
             "--val-fraction", str(args.val_fraction), "--seed", str(args.seed)]
    for flag, value in (("--lr", args.lr), ("--init", args.init), ("--best", args.best), ("--crop", args.crop)):
        if value is not None:
            parts += [flag, str(value)]
    parts += [flag for flag, on in (("--authors-recipe", args.authors_recipe), ("--no-augment", args.no_augment)) if on]
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
