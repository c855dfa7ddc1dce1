"""Make a training stage's final weights the shipped default, with the whole training history in its provenance.

    python benchmarks/ship_model.py benchmarks/results/stageN --command "python benchmarks/train_hippocampus.py ..."
        --start "stage N-1's final weights (...)" --schedule-note "..." --selected "why it was adopted"

Run it only after benchmarks/adoption.py has accepted the stage. The shipped file keeps its provenance flat: one
entry per stage (iterations, seconds, recipe, batch size, machine, start, log, command), totals over all stages and
the new weights' validation Dice (model space from the stage's file, native resolution from the end of its log).
A stage's own file nests every earlier stage under "started_from", which is complete but unreadable in `mednca info`.
A stage started from one that was never shipped: ship that one first, then this one.
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", type=Path, help="the stage's results folder, holding final.safetensors and train.log")
    parser.add_argument("--command", required=True, help="the training command, with the data folder written DATA")
    parser.add_argument("--start", required=True, help="what the stage started from")
    parser.add_argument("--schedule-note", required=True, help="how the schedule ran (sessions, resumes)")
    parser.add_argument("--selected", required=True, help="which weights were taken and the evidence for it")
    args = parser.parse_args(argv)

    candidate = load_model_file(args.stage / "final.safetensors")
    stage = candidate.provenance
    provenance = copy.deepcopy(load_model("hippocampus").provenance)
    provenance["stages"].append({
        "iterations": stage["iterations"], "train_seconds": stage["train_seconds"], "recipe": stage["recipe"],
        "batch_size": stage["batch_size"],
        "processes": f"{stage.get('training_processes', 1)} process(es) (--workers)", "trained_on": stage["trained_on"],
        "start": args.start, "log": f"{args.stage.as_posix()}/train.log", "command": args.command,
        "schedule_note": args.schedule_note, "selected": args.selected,
    })
    provenance["iterations"] += stage["iterations"]
    provenance["train_seconds"] = round(provenance["train_seconds"] + stage["train_seconds"], 1)
    stages = len(provenance["stages"])
    count = NUMBERS[stages - 1] if stages <= len(NUMBERS) else str(stages)
    provenance["source"] = f"trained with mednca.training, from scratch, in {count} stages"
    provenance["validation_dice_model_space"] = stage["validation_dice_model_space"]
    native = native_dice(args.stage / "train.log")
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
