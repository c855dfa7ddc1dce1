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
from pathlib import Path

from tqdm import tqdm

from .checkpoint import read_metadata, save_model
from .errors import MedNCAError
from .inference import quality_iter, segment_iter
from .registry import DEFAULT_MODEL, list_models, load_model, resolve
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
        while True:
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value
            bar.total = p.total
            bar.n = p.done
            bar.refresh()


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


if __name__ == "__main__":
    sys.exit(main())
