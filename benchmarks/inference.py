"""Inference speed and memory on this machine, as ratios measured side by side in one run.

    python benchmarks/inference.py [--shared ../shared] [--repeats 3]

For hippocampus_374 (39 slices, 16 steps at 16x16 then 16 at 64x64) with the authors' model imported:
ms per slice-step per level, per slice and per volume at 1 and 2 threads, the 10-run quality map, the
achieved rate in GFLOP/s of the plain algorithm's arithmetic against this machine's float32 matmul peak
measured in the same run, and the speed-up over a plain implementation of the authors' operations
(channels-last state, transposes, concatenation, dense layers on every cell, written below as the baseline).
Peak memory of a large scan is measured by benchmarks/memory.py.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mednca.inference import CHUNK, quality_iter, segment, torch_threads
from mednca.model import MedNCA
from mednca.preprocess import prepare_slices
from mednca.registry import load_model
from mednca.volume import image_array, read_volume

REPO = Path(__file__).resolve().parents[1]
MACS_PER_CELL_STEP = 2 * 32 * 32 * 9 + 96 * 128 + 128 * 32  # 34,816: two 3x3 convs, fc0, fc1


class AuthorsBackbone(nn.Module):
    """The authors' per-step operations, as their BackboneNCA does them (the baseline)."""

    def __init__(self, level: nn.Module):
        super().__init__()
        c = level.channels
        self.p0 = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.p1 = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.fc0 = nn.Linear(3 * c, level.fc0.out_channels)
        self.fc1 = nn.Linear(level.fc0.out_channels, c, bias=False)
        with torch.no_grad():  # our kernels are the authors' transposed: transpose back for [B, C, W, H]
            self.p0.weight.copy_(level.perceive.weight[:c].transpose(-1, -2))
            self.p1.weight.copy_(level.perceive.weight[c:].transpose(-1, -2))
            self.p0.bias.copy_(level.perceive.bias[:c])
            self.p1.bias.copy_(level.perceive.bias[c:])
            self.fc0.weight.copy_(level.fc0.weight[:, :, 0, 0])
            self.fc0.bias.copy_(level.fc0.bias)
            self.fc1.weight.copy_(level.fc1.weight[:, :, 0, 0])

    def forward(self, x: torch.Tensor, steps: int, fire_rate: float) -> torch.Tensor:
        for _ in range(steps):
            y = x.transpose(1, 3)
            dx = torch.cat((y, self.p0(y), self.p1(y)), 1).transpose(1, 3)
            dx = self.fc1(F.relu(self.fc0(dx)))
            fire = (torch.rand([dx.size(0), dx.size(1), dx.size(2), 1]) > fire_rate).float()
            x2 = (y + (dx * fire).transpose(1, 3)).transpose(1, 3).clone()
            x = torch.cat((x[..., :1], x2[..., 1:]), 3)
        return x


def authors_forward(levels: list[AuthorsBackbone], image: torch.Tensor) -> torch.Tensor:
    """Two-level Med-NCA on ``[B, 64, 64]`` inputs, channels-last state as in the authors' code."""
    small = F.interpolate(image[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    x = torch.zeros(image.shape[0], 16, 16, 32)
    x[..., 0] = small
    x = levels[0](x, 16, 0.5)
    x = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=4, mode="nearest").permute(0, 2, 3, 1).contiguous()
    x[..., 0] = image
    return levels[1](x, 16, 0.5)[..., 1]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(threads: int) -> float:
    """Best float32 matmul rate in GFLOP/s at ``threads`` threads."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    with torch_threads(threads):
        a @ b
        t = best_time(lambda: a @ b, 7)
    return 2 * 2048**3 / t / 1e9


def run_levels(model: MedNCA, inputs: torch.Tensor, level: int) -> float:
    """Seconds for the steps of one level over all slices (the other level excluded)."""
    cfg = model.config
    size = cfg.level_size(level)
    image = F.interpolate(inputs, size=size, mode="bilinear", align_corners=False) if level == 0 else inputs
    state = torch.zeros(inputs.shape[0], cfg.channels, *size).contiguous(memory_format=torch.channels_last)
    state[:, :1] = image
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, inputs.shape[0], CHUNK):
            x = state[i : i + CHUNK]
            for _ in range(cfg.steps[level]):
                x = model.backbones[level].step(x, torch.rand((x.shape[0], *size), generator=gen) > 0.5, 1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ref = args.shared / "reference" / "mednca_hippocampus"
    scan = args.shared / "data" / "hippocampus" / "imagesTr" / "hippocampus_374.nii.gz"
    if not ref.is_dir() or not scan.is_file():
        sys.exit(f"needs the shared data: {ref} and {scan}")
    model = load_model(str(ref))
    volume = read_volume(scan)
    n = volume.shape[2]
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image_array(volume), 2, 0)))
    inputs = prepare_slices(slices, (64, 64), model.preprocessing)
    flop = 2 * MACS_PER_CELL_STEP * n * 16 * (16 * 16 + 64 * 64)
    baseline = [AuthorsBackbone(level).eval() for level in model.backbones]
    print(f"hippocampus_374: {n} slices, {flop / 1e9:.0f} GFLOP per run (plain algorithm), torch {torch.__version__}")
    with torch.no_grad():
        ours_mask = model(inputs, torch.Generator().manual_seed(0))[:, 0] > 0
        base_mask = authors_forward(baseline, inputs[:, 0]) > 0
    overlap = 2 * (ours_mask & base_mask).sum() / (ours_mask.sum() + base_mask.sum())
    print(f"baseline and ours compute the same model: Dice between their masks {overlap:.3f} (runs differ by chance)")
    rows = []
    for threads in (1, 2):
        with torch_threads(threads):
            peak = matmul_peak(threads)
            t_ours = best_time(lambda: segment(model, volume, seed=0), args.repeats)
            with torch.no_grad():
                t_base = best_time(lambda: authors_forward(baseline, inputs[:, 0]), max(1, args.repeats - 1))
            t_l0 = run_levels(model, inputs, 0)
            t_l1 = run_levels(model, inputs, 1)
            t_q = best_time(lambda: _drain(quality_iter(model, volume, 10, seed=0)), 1)
        limit = flop / (peak * 1e9)
        rows.append((threads, peak, t_ours, t_base, t_l0, t_l1, t_q, limit))
        print(f"\n--- {threads} thread(s) ---")
        print(f"matmul peak (2048x2048 float32)     {peak:8.1f} GFLOP/s")
        print(f"arithmetic limit (FLOP / peak)      {limit * 1000:8.0f} ms per volume")
        print(f"ours: per volume (preprocessing to labels) {t_ours * 1000:8.0f} ms,"
              f" {t_ours / n * 1000:6.1f} ms per slice")
        print(f"      level 0 (16x16) per slice-step       {t_l0 / (n * 16) * 1000:8.3f} ms")
        print(f"      level 1 (64x64) per slice-step       {t_l1 / (n * 16) * 1000:8.3f} ms")
        rate = flop / t_ours / 1e9
        print(f"      effective rate {rate:6.1f} GFLOP/s = {rate / peak:.2f} of matmul peak;"
              f" time / arithmetic limit = {t_ours / limit:.2f}")
        print(f"authors' operations (baseline), model only  {t_base * 1000:8.0f} ms per volume")
        print(f"speed-up over the baseline                  {t_base / t_ours:8.2f}x")
        print(f"10-run quality map                   {t_q * 1000:8.0f} ms = {t_q / t_ours:.1f}x one run")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {rss:.0f} MB")


def _drain(gen):
    for _ in gen:
        pass


if __name__ == "__main__":
    main()
