"""Make a training stage's final weights the shipped default, with the whole training history in its provenance.

    python benchmarks/ship_model.py benchmarks/results/stageN --command "python benchmarks/train_hippocampus.py ..."
        --start "stage N-1's final weights (...)" --schedule-note "..." --selected "why it was adopted"
    python benchmarks/ship_model.py --new-lineage benchmarks/results/stageM benchmarks/results/stageN
        --command ... --command ... --start ... --start ... (one of each per stage, oldest first)

Run it only after benchmarks/adoption.py has accepted the stage. The shipped file keeps its provenance flat: one
entry per stage (iterations, seconds, recipe, batch size, machine, start, log, command), totals over all stages and
the new weights' validation Dice (model space from the stage's file, native resolution from the end of its log).
A stage's own file nests every earlier stage under "started_from", which is complete but unreadable in `mednca info`.
A stage continues the shipped default: it is appended to the default's stages. A stage started from one that was
never shipped continues that one's lineage instead, which --new-lineage ships whole: the lineage's stage folders,
oldest first, the first started from random weights (a model of another architecture, such as one that reads
neighbouring slices, trained over several stages); each earlier stage's figures come from the last stage's
"started_from" chain, checked against a weights file in that stage's folder, and replace the default's stages.
The verdict's limits are dropped: they belong to the old weights, and benchmarks/calibrate_quality.py --write sets
them again from the new model's robustness rows. The script checks that the shipped weights are the stage's.
"""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path

from mednca.checkpoint import load_model_file, save_model, weights_digest
from mednca.registry import load_model

SHIPPED = Path(__file__).resolve().parents[1] / "src" / "mednca" / "models" / "hippocampus.safetensors"
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"]
NATIVE = re.compile(r"native Dice, (\d+) validation cases, (\w+): mean ([0-9.]+)")
TEXTS = ("command", "start", "schedule_note", "selected")  # given per stage on the command line


def native_dice(log: Path) -> dict[str, float]:
    """The last native-resolution Dice per class the training log reports (written when the stage finishes)."""
    found = {}
    for line in log.read_text().splitlines():
        match = NATIVE.search(line)
        if match:
            found[match.group(2)] = float(match.group(3))
    missing = {"anterior", "posterior", "whole"} - set(found)
    if missing:
        raise SystemExit(f"{log} reports no native Dice for {sorted(missing)}: has the stage finished?")
    return found


def stage_entry(stage: dict, folder: Path, texts: dict[str, str]) -> dict:
    """One stage of the shipped provenance: its figures from its weights' provenance, its story from the user."""
    return {
        "iterations": stage["iterations"], "train_seconds": stage["train_seconds"], "recipe": stage["recipe"],
        "batch_size": stage["batch_size"],
        "processes": f"{stage.get('training_processes', 1)} process(es) (--workers)", "trained_on": stage["trained_on"],
        "start": texts["start"], "log": f"{folder.as_posix()}/train.log", "command": texts["command"],
        "schedule_note": texts["schedule_note"], "selected": texts["selected"],
    }


def lineage(last: dict, folders: list[Path]) -> list[dict]:
    """The provenance of every stage of a new lineage, oldest first, from the last stage's "started_from" chain."""
    chain = [last]
    while "started_from" in chain[0]:
        chain.insert(0, chain[0]["started_from"])
    if len(chain) != len(folders):
        raise SystemExit(f"the last stage's weights descend from {len(chain)} stage(s) since random weights, "
                         f"but {len(folders)} stage folders were given")
    for stage, folder in zip(chain[:-1], folders[:-1], strict=True):
        files = {(p["iterations"], p["train_seconds"]) for p in
                 (load_model_file(f).provenance for f in sorted(folder.glob("*.safetensors"))
                  if f.name != "training_state.safetensors")}
        if (stage["iterations"], stage["train_seconds"]) not in files:
            raise SystemExit(f"no weights file in {folder} is the start the last stage records "
                             f"({stage['iterations']} iterations, {stage['train_seconds']} s)")
    return chain


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", type=Path, nargs="+",
                        help="the stage's results folder, holding final.safetensors and train.log (with --new-lineage: "
                             "every stage of the lineage, oldest first)")
    parser.add_argument("--new-lineage", action="store_true",
                        help="the stages replace the default's instead of continuing them")
    parser.add_argument("--command", action="append", required=True,
                        help="the training command, with the data folder written DATA")
    parser.add_argument("--start", action="append", required=True, help="what the stage started from")
    parser.add_argument("--schedule-note", action="append", required=True,
                        help="how the schedule ran (sessions, resumes)")
    parser.add_argument("--selected", action="append", required=True,
                        help="which weights were taken and the evidence for it")
    args = parser.parse_args(argv)
    if not args.new_lineage and len(args.stages) != 1:
        parser.error("several stage folders are a lineage: add --new-lineage")
    if any(len(getattr(args, name)) != len(args.stages) for name in TEXTS):
        parser.error("give --command, --start, --schedule-note and --selected once per stage folder")
    given = zip(*(getattr(args, name) for name in TEXTS), strict=True)  # one tuple of texts per stage
    texts = [dict(zip(TEXTS, stage_texts, strict=True)) for stage_texts in given]

    folder = args.stages[-1]
    candidate = load_model_file(folder / "final.safetensors")
    stage = candidate.provenance
    default = load_model("hippocampus")
    if not args.new_lineage and (candidate.config, candidate.preprocessing) != (default.config, default.preprocessing):
        raise SystemExit(f"{folder} has another architecture or preprocessing than the default, so it cannot continue "
                         "the default's stages: ship its lineage with --new-lineage")
    provenance = copy.deepcopy(default.provenance)
    if args.new_lineage:
        chain = lineage(stage, args.stages)
        provenance["stages"] = [stage_entry(s, f, t) for s, f, t in zip(chain, args.stages, texts, strict=True)]
        provenance["seed"], provenance["validation_cases"] = stage["seed"], stage["validation_cases"]  # its own split
        provenance["iterations"] = sum(s["iterations"] for s in chain)
        provenance["train_seconds"] = round(sum(s["train_seconds"] for s in chain), 1)
    else:
        provenance["stages"].append(stage_entry(stage, folder, texts[0]))
        provenance["iterations"] += stage["iterations"]
        provenance["train_seconds"] = round(provenance["train_seconds"] + stage["train_seconds"], 1)
    stages = len(provenance["stages"])
    count = NUMBERS[stages - 1] if stages <= len(NUMBERS) else str(stages)
    provenance["source"] = f"trained with mednca.training, from scratch, in {count} stages"
    provenance["validation_dice_model_space"] = stage["validation_dice_model_space"]
    native = native_dice(folder / "train.log")
    provenance["validation_dice_native"] = {
        **{name: native[name] for name in ("anterior", "posterior", "whole")},
        "cases": len(provenance["validation_cases"]),
        "statistic": provenance["validation_dice_native"]["statistic"],
    }
    provenance.pop("quality_criteria", None)
    candidate.provenance = provenance
    save_model(candidate, SHIPPED)

    shipped = load_model_file(SHIPPED)
    digest = weights_digest(shipped.state_dict())
    if digest != weights_digest(candidate.state_dict()):
        raise SystemExit("the shipped weights differ from the stage's")
    print(f"shipped {SHIPPED.name}: weights {digest[:16]}, {provenance['iterations']} iterations, "
          f"{provenance['train_seconds'] / 3600:.1f} h in {len(provenance['stages'])} stages, "
          f"native whole Dice {native['whole']}; now run benchmarks/calibrate_quality.py --write")


if __name__ == "__main__":
    main()
