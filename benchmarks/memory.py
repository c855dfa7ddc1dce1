"""Peak memory of segmenting a large scan with the shipped default model, each case in its own process.

    python benchmarks/memory.py [--shape 512 512 200] [--threads 2] [--quality N]

A synthetic float32 scan (512x512x200 = 200 MB) is segmented in a fresh child process, once stored RAS (the
model's own orientation) and once in DICOM's LPS order (reoriented on the way in and out). Each child
reports its resident memory after loading torch and the model, after making the scan, and at its peak, so
the printed figures separate what the engine needs from what the interpreter and the scan already hold.
``--quality N`` adds an N-run quality map (two float maps per class instead of one).
The target (issue: peak at most 1.5 GB for 512x512x200 with the shipped two-class model) is printed beside.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TARGET_MB = 1536


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_mb() -> float:
    """Resident memory now (Linux), unlike the peak, which remembers every temporary since the start."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(shape: tuple[int, int, int], orientation: str, threads: int, runs: int) -> None:
    import numpy as np

    from mednca.inference import quality_map, segment
    from mednca.registry import load_model
    from mednca.volume import Volume

    model = load_model("hippocampus")
    loaded = current_mb()
    data = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    data *= 20
    data += 100
    affine = np.eye(4) if orientation == "RAS" else np.diag([-1.0, -1.0, 1.0, 1.0])
    volume = Volume(data, affine)
    with_scan = current_mb()
    start = time.perf_counter()
    result = quality_map(model, volume, runs, threads=threads) if runs else segment(model, volume, threads=threads)
    seconds = time.perf_counter() - start
    labelled = int((result.labels.array > 0).sum())
    print(json.dumps({"loaded_mb": loaded, "with_scan_mb": with_scan, "peak_mb": peak_mb(), "seconds": seconds,
                      "scan_mb": data.nbytes / 2**20, "labelled": labelled}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 200))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality", type=int, default=0, metavar="N", help="also an N-run quality map")
    parser.add_argument("--child", nargs=2, metavar=("ORIENTATION", "RUNS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = tuple(args.shape)
    if args.child:
        child(shape, args.child[0], args.threads, int(args.child[1]))
        return
    print(f"synthetic {'x'.join(map(str, shape))} float32 scan, shipped model 'hippocampus', {args.threads} threads")
    for orientation, runs in (("RAS", 0), ("LPS", 0), ("RAS", args.quality))[: 3 if args.quality else 2]:
        out = subprocess.run([sys.executable, __file__, "--shape", *map(str, shape), "--threads", str(args.threads),
                              "--child", orientation, str(runs)], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        what = f"{runs}-run quality map" if runs else "segment"
        engine = r["peak_mb"] - r["with_scan_mb"]
        print(f"{what:20s} {orientation}: peak {r['peak_mb']:6.0f} MB = {r['peak_mb'] / TARGET_MB:.2f} of the "
              f"{TARGET_MB} MB target; torch+model {r['loaded_mb']:.0f} MB, scan {r['scan_mb']:.0f} MB, engine "
              f"{engine:.0f} MB = {engine / r['scan_mb']:.1f}x the scan; {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
