"""Inference speed on this machine, as ratios measured side by side in one run.

    python benchmarks/inference.py [--shared ../shared] [--repeats 3] [--threads 1 2] [--folder 12]

Prints the CPU (model, the vector and matrix extensions it has, the one torch uses), the load average, and for
hippocampus_374 (39 slices, 16 steps at 16x16 then 16 at 64x64) with the authors' model, at each thread count:
the step implementation chosen for each level (``mednca.step_paths``) and the candidates' timings, ms per
volume on each path (MEDNCA_STEP=conv, gemm) and as chosen, ms per slice-step per level and path, the 10-run
quality map, all against the arithmetic limit (the plain algorithm's FLOP over this machine's float32 matmul
peak, measured in the same interleaved rounds), and the speed-up over a plain implementation of the authors'
operations (channels-last state, transposes, concatenation, dense layers on every cell: the baseline below).
At 1 thread the ratios use the CPU time of this process, which other jobs on a busy machine do not inflate
(wall times beside them); at 2 threads, wall time. Last, whole processes at 1 thread on a folder of scans:
``mednca segment`` against a script doing the same reading, preprocessing and writing around the authors'
operations. Peak memory of a large scan is measured by benchmarks/memory.py.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mednca import step_paths
from mednca.inference import CHUNK, quality_iter, segment, torch_threads
from mednca.model import MedNCA
from mednca.preprocess import prepare_slices, restore_slices
from mednca.registry import load_model
from mednca.volume import image_array, read_volume, write_volume

REPO = Path(__file__).resolve().parents[1]
MACS_PER_CELL_STEP = 2 * 32 * 32 * 9 + 96 * 128 + 128 * 32  # 34,816: two 3x3 convs, fc0, fc1 on every cell
FOLDED_MACS_PER_FIRING_CELL = 9 * 32 * 128 + 128 * 32  # 40,960: the gemm path, on firing cells only
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


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


def model_inputs(model: MedNCA, volume) -> torch.Tensor:
    """The scan's axial slices prepared as the model's metadata says (hippocampus scans: axis 2)."""
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image_array(volume), 2, 0)))
    return prepare_slices(slices, model.config.input_size, model.preprocessing)


@contextmanager
def step_path(path: str | None):
    """Run the block with MEDNCA_STEP set to ``path`` (None: the measured choice)."""
    before = os.environ.pop(step_paths.ENV, None)
    if path is not None:
        os.environ[step_paths.ENV] = path
    try:
        yield
    finally:
        os.environ.pop(step_paths.ENV, None)
        if before is not None:
            os.environ[step_paths.ENV] = before


def interleaved(runs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Best (wall, CPU) seconds of every run, over ``repeats`` rounds that take each run in turn, so that a
    change of load on a shared machine touches all of them alike."""
    best = {name: (float("inf"), float("inf")) for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def run_level(model: MedNCA, inputs: torch.Tensor, level: int) -> None:
    """The steps of one level over all slices in chunks (the other level excluded)."""
    cfg = model.config
    size = cfg.level_size(level)
    image = F.interpolate(inputs, size=size, mode="bilinear", align_corners=False) if level == 0 else inputs
    state = torch.zeros(inputs.shape[0], cfg.channels, *size).contiguous(memory_format=torch.channels_last)
    state[:, :1] = image
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i in range(0, inputs.shape[0], CHUNK):
            x = state[i : i + CHUNK]
            for _ in range(cfg.steps[level]):
                x = model.backbones[level].step(x, torch.rand((x.shape[0], *size), generator=gen) > 0.5, 1)


def cpu_line() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        have = [f for f in FLAGS if f in flags.split()]
    except (OSError, StopIteration):
        have = ["(flags not listed)"]
    return (f"CPU: {step_paths.cpu_name()}; {', '.join(have) or 'none of ' + '/'.join(FLAGS)}; "
            f"torch uses {torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} logical CPUs")


def load_line() -> str:
    return "load average (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def show_choices(model: MedNCA) -> None:
    """The step implementation chosen per level at the current thread count (measured now when no earlier
    run on this machine did), and what a calibration measures now."""
    for level, backbone in enumerate(model.backbones):
        size = model.config.level_size(level)
        start = time.perf_counter()
        chosen = step_paths.label(*step_paths.choose_path(backbone, torch.empty(1, model.config.channels, *size)))
        took = time.perf_counter() - start
        start = time.perf_counter()
        now = step_paths.calibrate(backbone, size)
        again = time.perf_counter() - start
        # a calibration takes a tenth of a second or more, reading the cache a millisecond
        print(f"level {level} {size}: {chosen} ({f'measured now, {took:.2f} s' if took > 0.05 else 'cached'});"
              f" calibrating again took {again:.2f} s, ms per step of 16384 cells: "
              + ", ".join(f"{k} {v * 1000:.2f}" for k, v in now.items()))


def on_path(path: str | None, fn):
    """``fn`` run with MEDNCA_STEP set to ``path`` (None: the measured choice)."""
    def run():
        with step_path(path):
            fn()
    return run


def speed(model: MedNCA, volume, inputs: torch.Tensor, flop: float, threads: int, repeats: int) -> None:
    """Every path on hippocampus_374 at ``threads`` threads, against the arithmetic limit and the baseline."""
    n = inputs.shape[0]
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    baseline = [AuthorsBackbone(level).eval() for level in model.backbones]
    runs = {"matmul": lambda: a @ b}
    for path in ("conv", "gemm", None):
        runs[path or "chosen"] = on_path(path, lambda: segment(model, volume, seed=0))
    for path in ("conv", "gemm"):
        for lv in (0, 1):
            runs[f"{path} level {lv}"] = on_path(path, lambda lv=lv: run_level(model, inputs, lv))
    with torch_threads(threads):
        show_choices(model)
        a @ b
        best = interleaved(runs, repeats)
        with torch.no_grad():
            best["baseline"] = interleaved({"b": lambda: authors_forward(baseline, inputs[:, 0])},
                                           max(1, repeats - 1))["b"]
        best["quality"] = interleaved({"q": lambda: _drain(quality_iter(model, volume, 10, seed=0))}, 1)["q"]
    clock = 1 if threads == 1 else 0  # index into (wall, cpu): CPU time where it measures the work alone
    peak = 2 * 2048**3 / best["matmul"][clock] / 1e9
    limit = flop / (peak * 1e9)
    print(f"matmul peak (2048x2048 float32)        {peak:8.1f} GFLOP/s ({'CPU' if clock else 'wall'} time)")
    print(f"arithmetic limit (plain FLOP / peak)   {limit * 1000:8.0f} ms per volume")
    for name in ("conv", "gemm", "chosen"):
        wall, cpu = best[name]
        print(f"{name:6s} per volume (preprocessing to labels) {cpu * 1000:6.0f} ms CPU, {wall * 1000:6.0f} ms wall"
              f" = {best[name][clock] / limit:.2f}x the arithmetic limit")
    for path in ("conv", "gemm"):
        l0, l1 = (best[f"{path} level {lv}"][clock] / (n * 16) * 1000 for lv in (0, 1))
        print(f"{path:6s} per slice-step: level 0 (16x16) {l0:6.3f} ms, level 1 (64x64) {l1:6.3f} ms")
    t_ours, t_base, t_q = best["chosen"][clock], best["baseline"][clock], best["quality"][clock]
    print(f"authors' operations (baseline), model only {t_base * 1000:8.0f} ms per volume"
          f" -> chosen path {t_base / t_ours:.2f}x faster")
    print(f"10-run quality map {t_q * 1000:8.0f} ms = {t_q / t_ours:.1f}x one run"
          f" = {t_q / (10 * limit):.2f}x ten runs' arithmetic limit")
    print(load_line())


def folder_processes(shared: Path, ref: Path, count: int) -> None:
    """``mednca segment`` and the authors' operations as whole processes at 1 thread on ``count`` scans."""
    scans = sorted((shared / "data" / "hippocampus" / "imagesTr").glob("hippocampus_*.nii.gz"))[:count]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "scans"
        folder.mkdir()
        for scan in scans:
            (folder / scan.name).symlink_to(scan)
        commands = {
            "ours": [sys.executable, "-c", "import sys; from mednca.cli import main; sys.exit(main())",
                     "segment", str(folder), "-o", f"{tmp}/ours", "--model", str(ref), "--threads", "1"],
            "baseline": [sys.executable, __file__, "--authors-process", f"{tmp}/baseline", "--shared", str(shared),
                         *map(str, scans)],
        }
        times = {}
        for name, command in commands.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            times[name] = (time.perf_counter() - start, cpu)
        dice = []
        for scan in scans:
            stem = scan.name.removesuffix(".nii.gz")
            ours = read_volume(Path(tmp) / "ours" / f"{stem}_seg.nii.gz").array > 0
            base = read_volume(Path(tmp) / "baseline" / f"{stem}_seg.nii.gz").array > 0
            dice.append(2 * (ours & base).sum() / max(1, ours.sum() + base.sum()))
    print(f"\n--- whole processes, 1 thread, {len(scans)} scans ({scans[0].name} to {scans[-1].name}) ---")
    for name, (wall, cpu) in times.items():
        print(f"{name:8s} {wall:6.1f} s wall, {cpu:6.1f} s CPU")
    print(f"ours is {times['baseline'][1] / times['ours'][1]:.2f}x faster in CPU time,"
          f" {times['baseline'][0] / times['ours'][0]:.2f}x in wall time;"
          f" Dice between the two outputs: mean {np.mean(dice):.3f}, lowest {min(dice):.3f} (runs differ by chance)")
    print(load_line())


def authors_process(shared: Path, out: Path, scans: list[Path]) -> None:
    """The baseline as a whole process: read, preprocess, the authors' operations, restore, write labels."""
    torch.set_num_threads(1)
    model = load_model(str(shared / "reference" / "mednca_hippocampus"))
    levels = [AuthorsBackbone(level).eval() for level in model.backbones]
    out.mkdir(parents=True, exist_ok=True)
    for scan in scans:
        volume = read_volume(scan)
        inputs = model_inputs(model, volume)
        with torch.no_grad():
            prob = torch.cat([torch.sigmoid(authors_forward(levels, inputs[i : i + CHUNK, 0]))
                              for i in range(0, inputs.shape[0], CHUNK)])
            native = restore_slices(prob[:, None], volume.shape[:2])[:, 0].numpy()
        labels = np.moveaxis(native > 0.5, 0, 2).astype(np.uint8)
        write_volume(volume.like(labels), out / scan.name.replace(".nii.gz", "_seg.nii.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to measure (on a busy machine more than 1 measures the load)")
    parser.add_argument("--folder", type=int, default=12, metavar="N",
                        help="scans for the whole-process comparison at 1 thread (0: skip it)")
    parser.add_argument("--authors-process", type=Path, default=None, metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("scans", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.authors_process is not None:
        return authors_process(args.shared, args.authors_process, args.scans)
    ref = args.shared / "reference" / "mednca_hippocampus"
    scan = args.shared / "data" / "hippocampus" / "imagesTr" / "hippocampus_374.nii.gz"
    if not ref.is_dir() or not scan.is_file():
        sys.exit(f"needs the shared data: {ref} and {scan}")
    print(cpu_line())
    print(load_line() + " (other jobs share this machine: compare the ratios, measured in the same rounds)")
    model = load_model(str(ref))
    volume = read_volume(scan)
    inputs = model_inputs(model, volume)
    n = inputs.shape[0]
    cells = n * 16 * (16 * 16 + 64 * 64)
    flop = 2 * MACS_PER_CELL_STEP * cells
    print(f"hippocampus_374: {n} slices, {flop / 1e9:.0f} GFLOP per run (plain algorithm; the gemm path does"
          f" {FOLDED_MACS_PER_FIRING_CELL * 0.5 / MACS_PER_CELL_STEP:.2f} of it), torch {torch.__version__}")
    baseline = [AuthorsBackbone(level).eval() for level in model.backbones]
    with torch.no_grad(), torch_threads(1):
        ours_mask = model(inputs, torch.Generator().manual_seed(0))[:, 0] > 0
        base_mask = authors_forward(baseline, inputs[:, 0]) > 0
    overlap = 2 * (ours_mask & base_mask).sum() / (ours_mask.sum() + base_mask.sum())
    print(f"baseline and ours compute the same model: Dice between their masks {overlap:.3f} (runs differ by chance)")
    for threads in args.threads:
        print(f"\n--- {threads} thread(s) ---")
        speed(model, volume, inputs, flop, threads, args.repeats)
    if args.folder:
        folder_processes(args.shared, ref, args.folder)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {rss:.0f} MB")


def _drain(gen):
    for _ in gen:
        pass


if __name__ == "__main__":
    main()
