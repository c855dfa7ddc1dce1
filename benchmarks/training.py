"""Training speed and early convergence: ours against the Med-NCA authors' training.

1. Training samples per second at batch 8, 16 and 40 on 1 and 2 cores, measured in rounds that alternate
   between the contenders in one run, so that load from other processes hits all alike (the ratios are the
   figure; the load average is printed). The authors' side is their training step as their code does it
   (their per-step operations, ``AuthorsBackbone`` from benchmarks/inference.py, on every cell; the whole
   upsampled state cut into one window per sample; their loss; one Adam and ExponentialLR per level), on
   batches already in memory (their data loading and resizing not counted). Ours is ``train_iter`` with
   the default recipe (foreground-biased windows, augmentation), on 1 thread, and on 2 cores both as
   2 threads and as 2 one-thread processes sharing each batch (``workers=2``).
2. Validation Dice (model space, whole hippocampus) after the same short run of our recipe and of the
   authors' settings (``AUTHORS_RECIPE``), same seed, same data, batch 8.
3. From training logs of ``benchmarks/train_hippocampus.py``: training time until the validation Dice
   first reached each target. Several logs are stages of one model (the second started from the first's
   result), so their times and iterations add up. Only this part runs when SHORT_ITERATIONS is 0.

    python benchmarks/training.py DATA_DIR [SHORT_ITERATIONS] [TRAINING_LOG ...] [--batches 8 16 40]
        [--rounds 3] [--seconds 8] [--speed-only]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from inference import AuthorsBackbone  # benchmarks/inference.py, beside this script

from mednca.data import SliceSet, build_slices, load_cases, split_cases
from mednca.data_parallel import WORKER_NAME
from mednca.inference import torch_threads
from mednca.preprocess import Preprocessing
from mednca.training import AUTHORS_RECIPE, HIPPOCAMPUS, Recipe, new_model, train_iter

TARGETS = (0.8, 0.85, 0.875, 0.89)  # 0.89: the Med-NCA paper's hippocampus Dice, rounded up
PAUSE = 1.0  # seconds between rounds: a paused run's worker finishes the step it began before the next round


class AuthorsTraining:
    """The authors' training step (Agent_Med_NCA.get_outputs and Agent_Multi_NCA.batch_step) on a new model."""

    def __init__(self, seed: int = 0):
        self.levels = [AuthorsBackbone(level) for level in new_model(HIPPOCAMPUS, Preprocessing(), seed).backbones]
        with torch.no_grad():
            for level in self.levels:
                level.fc1.weight.zero_()
        self.opts = [torch.optim.Adam(lv.parameters(), lr=1.6e-3, betas=(0.5, 0.5)) for lv in self.levels]
        self.schedulers = [torch.optim.lr_scheduler.ExponentialLR(o, 0.9999) for o in self.opts]

    def step(self, images: torch.Tensor, labels: torch.Tensor, crop: int = 16) -> float:
        """``images [B, 1, 64, 64]``, ``labels [B, K, 64, 64]`` (trained as one class, as they do)."""
        inputs = images.permute(0, 2, 3, 1)  # their channels-last [B, H, W, C]
        targets = labels.amax(1, keepdim=True).permute(0, 2, 3, 1)
        b = inputs.shape[0]
        small = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
        x = self.levels[0](torch.cat((small, small.new_zeros(b, 16, 16, 31)), 3), 16, 0.5)
        x = F.interpolate(x.permute(0, 3, 1, 2), scale_factor=4, mode="nearest").permute(0, 2, 3, 1)
        x = torch.cat((inputs, x[..., 1:]), 3)
        windows, window_targets = torch.zeros(b, crop, crop, 32), torch.zeros(b, crop, crop, 1)
        for i in range(b):
            r, c = random.randint(0, 64 - crop), random.randint(0, 64 - crop)
            windows[i] = x[i, r : r + crop, c : c + crop]
            window_targets[i] = targets[i, r : r + crop, c : c + crop]
        out = self.levels[1](windows, 16, 0.5)
        for opt in self.opts:
            opt.zero_grad()
        p, t = torch.sigmoid(out[..., 1]).reshape(-1), window_targets.reshape(-1)
        loss = F.binary_cross_entropy(p, t) + 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)
        loss.backward()
        for opt, scheduler in zip(self.opts, self.schedulers, strict=True):
            opt.step()
            scheduler.step()
        return loss.item()


def authors_steps(train: SliceSet, batch_size: int) -> Callable[[], None]:
    trainer, gen = AuthorsTraining(), torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(len(train), (batch_size,), generator=gen)
        trainer.step(train.images[idx], train.labels[idx].float())

    return step


def our_steps(train: SliceSet, batch_size: int, workers: int) -> Callable[[], None]:
    """One iteration of ``train_iter`` per call (no evaluation: the run is longer than the benchmark)."""
    run = train_iter(train, iterations=10**9, batch_size=batch_size, val_fraction=0.0, eval_every=10**9,
                     log_every=1, seed=0, workers=workers)
    return lambda: next(run)


def worker_cpu() -> float:
    """CPU seconds used so far by this process's live training workers (Linux: from /proc)."""
    total = 0
    for p in mp.active_children():
        if p.name.startswith(WORKER_NAME):
            with open(f"/proc/{p.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def speed(train: SliceSet, batch_size: int, rounds: int, seconds: float) -> dict[str, tuple[float, float]]:
    """Samples per second and CPU milliseconds per sample (all threads and processes of a contender) of each
    contender: rounds of about ``seconds`` each, alternating; the first round (start-up: processes,
    allocations) is not counted. CPU time is read after the pause that follows a round, once the worker of a
    data-parallel run has finished its part (it waits without using the CPU)."""
    contenders = {  # name: (threads of this process, one step)
        "authors' 1": (1, authors_steps(train, batch_size)),
        "ours 1": (1, our_steps(train, batch_size, 1)),
        "authors' 2": (2, authors_steps(train, batch_size)),
        "ours 2 threads": (2, our_steps(train, batch_size, 1)),
        "ours 2 processes": (1, our_steps(train, batch_size, 2)),
    }
    steps = dict.fromkeys(contenders, 1)
    spent, cpu, done = dict.fromkeys(contenders, 0.0), dict.fromkeys(contenders, 0.0), dict.fromkeys(contenders, 0)
    for rnd in range(rounds + 1):
        for name, (threads, step) in contenders.items():
            cpu_before = time.process_time() + worker_cpu()
            with torch_threads(threads):
                t = time.perf_counter()
                for _ in range(steps[name]):
                    step()
                elapsed = time.perf_counter() - t
            time.sleep(PAUSE)
            if rnd:
                spent[name] += elapsed
                cpu[name] += time.process_time() + worker_cpu() - cpu_before
                done[name] += steps[name]
            steps[name] = max(1, round(seconds * steps[name] / elapsed))
    return {name: (done[name] * batch_size / spent[name], 1000 * cpu[name] / (done[name] * batch_size))
            for name in contenders}


def short_runs(slices, iterations: int, batch_size: int) -> dict[str, dict]:
    out = {}
    for name, recipe in {"ours": Recipe(), "authors'": AUTHORS_RECIPE}.items():
        t = time.perf_counter()
        events = list(train_iter(slices, recipe=recipe, iterations=iterations, batch_size=batch_size,
                                 eval_every=iterations, eval_slices=256, seed=0))
        dice = [e.val_dice for e in events if e.kind == "eval"][-1]
        out[name] = {"dice": dice, "seconds": time.perf_counter() - t}
    return out


def time_to_target(log_paths: list[str], target: float) -> str:
    """Training time (the seconds the logs' step lines carry, restarts excluded, stages added up) until the
    validation Dice first reached ``target``."""
    seconds = iterations = 0
    for stage, log_path in enumerate(log_paths, 1):
        offset_s, offset_it = seconds, iterations
        for line in open(log_path):
            step = re.search(r" it (\d+)/\d+ loss [0-9.]+ (\d+)s", line)
            if step:
                iterations, seconds = offset_it + int(step[1]), offset_s + int(step[2])
            hit = re.search(r" it (\d+) validation Dice .* whole ([0-9.]+)", line)
            if hit and float(hit[2]) >= target:
                return (f"whole Dice {float(hit[2]):.4f} >= {target} at iteration {offset_it + int(hit[1])} "
                        f"(stage {stage}), after {seconds / 60:.0f} min")
    return f"whole Dice never reached {target} (in {iterations} iterations, {seconds / 60:.0f} min)"


def load() -> str:
    """The 1, 5 and 15-minute load averages."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def speed_table(train: SliceSet, batches: list[int], rounds: int, seconds: float) -> None:
    print(f"training samples per second, {rounds} alternating rounds of about {seconds:.0f} s each per contender "
          f"(ours: default recipe; authors': their training step), torch {torch.__version__}")
    print("ratio on 2 cores: ours on 2 one-thread processes against the authors' faster of 1 and 2 threads")
    print("      authors'          ours                     ours / authors'")
    print("batch   1 thr  2 thr   1 thr  2 thr  2 proc      1 core  2 cores   load average before / after")
    cpu = {}
    for bs in batches:
        before = load()
        s = speed(train, bs, rounds, seconds)
        (a1, o1, a2, o2t, o2p), cpu[bs] = (v[0] for v in s.values()), [v[1] for v in s.values()]
        print(f"{bs:5d} {a1:7.1f} {a2:6.1f} {o1:7.1f} {o2t:6.1f} {o2p:7.1f}   {o1 / a1:9.2f} {o2p / max(a1, a2):8.2f}"
              f"   {before} / {load()}", flush=True)
    print("\nCPU milliseconds per sample, all threads and processes of a contender (less sensitive to the load;")
    print("on two free cores, 2 processes would run at 2 x 1000 / this samples per second)")
    print("      authors'          ours")
    print("batch   1 thr  2 thr   1 thr  2 thr  2 proc")
    for bs, (a1, o1, a2, o2t, o2p) in cpu.items():
        print(f"{bs:5d} {a1:7.1f} {a2:6.1f} {o1:7.1f} {o2t:6.1f} {o2p:7.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("short_iterations", type=int, nargs="?", default=300)
    parser.add_argument("logs", nargs="*")
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 16, 40], help="none: no speed table")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of one round of one contender")
    parser.add_argument("--speed-only", action="store_true", help="only the speed table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.short_iterations == 0:
        return report_log(args.logs)
    random.seed(0)
    torch.manual_seed(0)
    slices = build_slices(load_cases(args.data), HIPPOCAMPUS, Preprocessing())
    train_cases, _ = split_cases(len(slices.case_ids), 0.1, 0)
    if args.batches:
        speed_table(slices.subset(train_cases), args.batches, args.rounds, args.seconds)
    if not args.speed_only:
        print(f"\nvalidation Dice (64x64, 256 validation slices) after {args.short_iterations} iterations, "
              "batch 8, seed 0")
        for name, r in short_runs(slices, args.short_iterations, 8).items():
            d = r["dice"]
            print(f"{name:10s} whole {d['whole']:.3f} anterior {d['anterior']:.3f} posterior {d['posterior']:.3f}"
                  f"   ({r['seconds']:.0f} s)")
    if args.logs and not args.speed_only:
        report_log(args.logs)


def report_log(log_paths: list[str]) -> None:
    print(f"\ntraining time to a validation Dice (64x64 probe of validation slices) in {', '.join(log_paths)}:")
    for target in TARGETS:
        print(f"  {time_to_target(log_paths, target)}")


if __name__ == "__main__":
    main()
