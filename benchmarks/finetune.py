"""Fine-tuning where it matters: scans unlike the training data.

Takes held-out validation cases of a model, applies a domain shift a scanner or protocol could cause
(inverted contrast, a strong smooth bias field, ghosting), annotates a few slices (the true labels of
N slices spread over the structure), fine-tunes on them with the defaults, and reports Dice at native
resolution on the OTHER slices -- the ones the user did not annotate -- before and after.

    python benchmarks/finetune.py MODEL DATA_DIR [N_CASES] [N_SLICES]
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from mednca.data import load_cases
from mednca.registry import load_model
from mednca.training import annotated_slices, finetune, native_dice
from mednca.volume import Volume


def invert(img: np.ndarray, rng) -> np.ndarray:
    return img.max() - img


def bias_field(img: np.ndarray, rng) -> np.ndarray:
    """Smooth multiplicative field varying by a factor of about 5 across the crop (a badly placed coil)."""
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in img.shape), indexing="ij")
    coeffs = rng.normal(0, 1, 3)
    coeffs = 0.8 * coeffs / np.linalg.norm(coeffs)
    field = np.exp(sum(c * g for c, g in zip(coeffs, grids, strict=True)) + 0.4 * grids[0] * grids[1])
    return img * field


def ghosting(img: np.ndarray, rng) -> np.ndarray:
    """Motion ghosts: shifted copies of the image along the phase-encoding axis (axis 1), at half intensity."""
    n = img.shape[1]
    return img + 0.6 * np.roll(img, n // 3, axis=1) + 0.4 * np.roll(img, -n // 3, axis=1)


SHIFTS = {"inverted": invert, "bias field": bias_field, "ghosting": ghosting}


def fmt(d: dict) -> str:
    return f"{d['whole']:.3f} ({d['anterior']:.3f}/{d['posterior']:.3f})"


def main(model_path: str, data: str, n_cases: int = 3, n_slices: int = 4) -> None:
    torch.set_num_threads(1)
    model = load_model(model_path)
    val = model.provenance.get("validation_cases", [])
    cases = [c for c in load_cases(data) if c.case_id in set(val)][:n_cases]
    axis = model.preprocessing.axis
    rng = np.random.default_rng(0)
    print(f"model {model_path} ({model.provenance.get('iterations')} iterations); {len(cases)} of its validation "
          f"cases; {n_slices} annotated slices per volume; fine-tuning defaults; Dice whole (anterior/posterior) "
          "at native resolution on the slices NOT annotated; torch threads 1")
    header = f"{'case':18s} {'shift':11s} {'before':22s} {'after':22s} {'seconds':>7s}"
    print(header)
    print("-" * len(header))
    rows = []
    for case in cases:
        clean = native_dice(model, case.image, case.labels)
        print(f"{case.case_id:18s} {'none':11s} {fmt(clean):22s}")
        fg = annotated_slices(case.labels, axis)
        chosen = [fg[int(i)] for i in np.linspace(0, len(fg) - 1, n_slices + 2)[1:-1].round()]
        others = [s for s in range(case.labels.shape[axis]) if s not in chosen]
        for name, shift in SHIFTS.items():
            img = shift(case.image, rng).astype(np.float32)
            sparse = np.zeros_like(case.labels)
            for s in chosen:
                idx = [slice(None)] * 3
                idx[axis] = s
                sparse[tuple(idx)] = case.labels[tuple(idx)]
            t = time.perf_counter()
            tuned, report = finetune(model, Volume(img, np.eye(4)), sparse)
            seconds = time.perf_counter() - t
            held = np.take(img, others, axis=axis), np.take(case.labels, others, axis=axis)
            before, after = native_dice(model, *held), native_dice(tuned, *held)
            rows.append((name, before, after, seconds))
            print(f"{case.case_id:18s} {name:11s} {fmt(before):22s} {fmt(after):22s} {seconds:7.1f}", flush=True)
    print("-" * len(header))
    for name in SHIFTS:
        sel = [r for r in rows if r[0] == name]
        b = {k: float(np.mean([r[1][k] for r in sel])) for k in ("whole", "anterior", "posterior")}
        a = {k: float(np.mean([r[2][k] for r in sel])) for k in ("whole", "anterior", "posterior")}
        print(f"{'mean':18s} {name:11s} {fmt(b):22s} {fmt(a):22s} {np.mean([r[3] for r in sel]):7.1f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
