"""Average the weights of several model files of one training run into one model file.

    python benchmarks/average_weights.py OUT.safetensors RUN/snapshot_12000.safetensors ... RUN/final.safetensors

Checkpoints late in a run whose learning rate has decayed lie close together; their plain average can sit nearer
the middle of the basin than any one of them. The files must share architecture and preprocessing; anything else
is refused. The output keeps the last file's provenance without its measured Dice (that was the last file's, not
the average's), with the averaged files and their weights digests added, so `mednca info` says what it is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mednca.checkpoint import load_model_file, save_model, weights_digest
from mednca.model import MedNCA
from mednca.training import MEASURED_DICE


def average(paths: list[Path]) -> MedNCA:
    """The model of ``paths[-1]`` with every weight replaced by the mean over all ``paths``."""
    models = [load_model_file(p) for p in paths]
    last = models[-1]
    for path, model in zip(paths, models, strict=True):
        if model.config != last.config or model.preprocessing != last.preprocessing:
            raise SystemExit(f"{path} has another architecture or preprocessing than {paths[-1]}: not averaged")
    states = [m.state_dict() for m in models]
    mean = {k: torch.stack([s[k].double() for s in states]).mean(0).to(v.dtype) for k, v in states[-1].items()}
    last.load_state_dict(mean)
    kept = {k: v for k, v in last.provenance.items() if k not in MEASURED_DICE}
    last.provenance = {**kept, "averaged": [
        {"file": p.as_posix(), "weights": weights_digest(s)[:16]} for p, s in zip(paths, states, strict=True)]}
    return last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("models", type=Path, nargs="+")
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give at least two model files")
    if args.out.resolve() in {p.resolve() for p in args.models}:
        parser.error(f"{args.out} is one of the inputs: write the average to a new file")
    model = average(args.models)
    save_model(model, args.out)
    print(f"{args.out}: mean of {len(args.models)} models, weights {weights_digest(model.state_dict())[:16]}")


if __name__ == "__main__":
    main()
