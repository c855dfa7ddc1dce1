"""Regenerate the synthetic hippocampus phantom that ships with the package.

    python sample_data/make_phantom.py [outdir]

Writes phantom.nii.gz and phantom_label.nii.gz (1 mm, qform/sform code 1) into `outdir`, by default
src/mednca/sample/, the package data the plugin loads. The phantom comes from mednca.datasets.make_phantom
with seed 0, so running this again reproduces the committed arrays exactly.
"""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from mednca.datasets import write_phantom  # noqa: E402

if __name__ == "__main__":
    outdir = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "src" / "mednca" / "sample"
    for path in write_phantom(outdir):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
