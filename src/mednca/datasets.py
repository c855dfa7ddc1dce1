"""Data to try the engine on without patient data: a synthetic hippocampus phantom that ships with the
package, and a downloader for one real case of the Medical Segmentation Decathlon (Task04, hippocampus).

The phantom is made from a fixed seed with numpy alone, so the same code always gives the same volume; it
imitates the MSD hippocampus crops (about 36x50x36 voxels of T1 MRI at 1 mm, a curved hippocampus lying along
axis 1 and sliced along axis 2, label 1 anterior and 2 posterior). It is not anatomy: a model trained on real
scans segments it imperfectly, which is what the fine-tuning demo needs.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import MedNCAError

SAMPLE_DIR = Path(__file__).with_name("sample")
PHANTOM_FILES = ("phantom.nii.gz", "phantom_label.nii.gz")
PHANTOM_SHAPE = (36, 50, 36)

DECATHLON_URL = "https://msd-for-monai.s3-us-west-2.amazonaws.com/Task04_Hippocampus.tar"
DECATHLON_TASK = "Task04_Hippocampus"
DECATHLON_ARCHIVE = DECATHLON_TASK + ".tar"


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """White noise low-passed with a Gaussian in Fourier space, scaled to unit standard deviation: the
    texture of tissue at a scale of about `sigma` voxels, without needing scipy."""
    noise = rng.standard_normal(shape)
    freqs = np.meshgrid(*(np.fft.fftfreq(n) for n in shape), indexing="ij")
    gain = np.exp(-2.0 * (np.pi * sigma) ** 2 * sum(f**2 for f in freqs))
    field = np.fft.ifftn(np.fft.fftn(noise) * gain).real
    return (field - field.mean()) / field.std()


def _tube(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised distance of every voxel to a tube with elliptical cross-section swept along a centre
    line (points `centre` [n,3] with half-axes `radii` [n,3]); also the curve parameter `t` of the nearest
    point, which splits the tube into parts along its length. Distance < 1 means inside."""
    best = np.full(grid.shape[1:], np.inf)
    where = np.zeros(grid.shape[1:])
    for point, radius, position in zip(centre, radii, t, strict=True):
        dist = np.sqrt(sum(((grid[a] - point[a]) / radius[a]) ** 2 for a in range(3)))
        closer = dist < best
        best[closer] = dist[closer]
        where[closer] = position
    return best, where


def _inside(dist: np.ndarray) -> np.ndarray:
    """Fraction of a voxel inside a shape whose normalised distance is `dist`: a soft edge, as partial volume
    blurs boundaries in a real scan."""
    return np.clip((1.0 - dist) / 0.25 + 0.5, 0.0, 1.0)


def make_phantom(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A hippocampus-like test volume: returns (image float32 [36,50,36], label uint8 with 0 background,
    1 anterior, 2 posterior, affine 4x4 at 1 mm).

    White/grey-matter texture with dark CSF, a banana-shaped grey structure running from posterior-superior
    (low axis 1, high axis 2) to anterior-inferior, split across its length into the two labels, a smooth
    multiplicative bias field and Rician noise. Intensities are whole numbers in 0..255, as in the uint8 MSD
    scans, so the shipped file (stored as uint8) holds exactly this array.
    """
    rng = np.random.default_rng(seed)
    shape = PHANTOM_SHAPE
    grid = np.indices(shape, dtype=np.float64)

    # Background: white matter with folded ribbons of grey matter along the zero set of a smooth random
    # field, which looks more like cortex than blobs do.
    white = 1.0 / (1.0 + np.exp(-4.0 * (np.abs(_smooth_field(rng, shape, 2.5)) - 0.6)))
    tissue = 0.6 + 0.42 * white + 0.04 * _smooth_field(rng, shape, 1.0)

    # Hippocampus centre line: posterior tail high in axis 2, bending down to a thick anterior head.
    t = np.linspace(0.0, 1.0, 240)
    centre = np.stack([14.0 + 5.0 * t, 6.0 + 38.0 * t, 10.0 + 15.0 * (1.0 - t) ** 2], axis=1)
    radii = np.stack([3.5 + 3.5 * t, np.full_like(t, 4.0), 3.0 + 2.0 * t], axis=1)
    wobble = 0.12 * _smooth_field(rng, shape, 2.0)
    dist, along = _tube(grid, centre, radii, t)
    hippocampus = dist + wobble < 1.0

    # CSF: the temporal horn lying on the upper side of the hippocampus, and a cistern in one corner.
    horn_centre = centre + np.stack([np.zeros_like(t), np.zeros_like(t), radii[:, 2] + 1.4], axis=1)
    horn_radii = np.stack([0.8 * radii[:, 0], np.full_like(t, 3.0), np.full_like(t, 1.6)], axis=1)
    horn_dist, horn_along = _tube(grid, horn_centre, horn_radii, t)
    horn = np.where(horn_along > 0.15, _inside(horn_dist + wobble), 0.0)
    cistern_dist = np.sqrt(((grid[0] - 2.0) / 7.0) ** 2 + ((grid[1] - 20.0) / 14.0) ** 2 + ((grid[2] - 8.0) / 9.0) ** 2)
    inside = _inside(dist + wobble)
    csf = np.maximum(horn, _inside(cistern_dist + wobble)) * (1.0 - inside)

    grey = 0.6 + 0.03 * _smooth_field(rng, shape, 1.5)
    signal = tissue * (1.0 - inside - csf) + grey * inside + 0.18 * csf

    # Bias field: a slow multiplicative drift of about +-15 % across the crop.
    coords = [(grid[a] / (shape[a] - 1) - 0.5) for a in range(3)]
    slopes = rng.uniform(-0.25, 0.25, 3)
    curvature = rng.uniform(-0.3, 0.3, 3)
    bias = np.exp(sum(slopes[a] * coords[a] + curvature[a] * coords[a] ** 2 for a in range(3)))

    # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
    sigma = 0.035
    real = signal * bias + sigma * rng.standard_normal(shape)
    imaginary = sigma * rng.standard_normal(shape)
    magnitude = np.sqrt(real**2 + imaginary**2)

    image = np.clip(np.round(magnitude * 200.0), 0, 255).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    split = 0.55  # the head (anterior) takes the last 45 % of the centre line: parts of similar volume
    label[hippocampus & (along > split)] = 1
    label[hippocampus & (along <= split)] = 2
    return image, label, np.eye(4)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write through a temporary file in the same folder and rename, so an interrupted run never leaves a
    half-written file where the package expects a whole one."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial.nii.gz")
    try:
        nib.save(image, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_phantom(outdir: str | os.PathLike = SAMPLE_DIR, seed: int = 0) -> tuple[Path, Path]:
    """Generate the phantom and save it as (image, label) NIfTI files in `outdir`; returns their paths. The
    image is stored as uint8 (its values are whole numbers in 0..255), which keeps both files small."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    image, label, affine = make_phantom(seed)
    paths = tuple(outdir / name for name in PHANTOM_FILES)
    _save_nifti(image.astype(np.uint8), affine, paths[0])
    _save_nifti(label, affine, paths[1])
    return paths


def phantom_paths() -> tuple[Path, Path]:
    """Paths of the phantom image and label that ship inside the package (mednca/sample/)."""
    paths = tuple(SAMPLE_DIR / name for name in PHANTOM_FILES)
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise MedNCAError(
            f"the sample phantom is missing ({', '.join(missing)}); regenerate it with "
            "`python sample_data/make_phantom.py` from a source checkout, or reinstall napari-nca"
        )
    return paths


def _case_members(case: str) -> tuple[str, str]:
    """Archive members of a case; the name is checked so that it cannot point outside the task folder."""
    if not re.fullmatch(r"[A-Za-z0-9_]+", case):
        raise MedNCAError(f"not a Decathlon case name: {case!r} (expected a name like 'hippocampus_367')")
    return tuple(f"{DECATHLON_TASK}/{folder}/{case}.nii.gz" for folder in ("imagesTr", "labelsTr"))


def fetch_decathlon_case(
    case: str = "hippocampus_367",
    cache_dir: str | os.PathLike | None = None,
    url: str = DECATHLON_URL,
    archive: str | os.PathLike | None = None,
) -> tuple[Path, Path]:
    """Image and label paths of one training case of the MSD Task04 hippocampus data set.

    The Decathlon tarball (about 27 MB) is downloaded once from `url` into `cache_dir` (default: the user
    cache folder of napari-nca) and only the two files of `case` are extracted; later calls find them there
    and need no network. Pass `archive`, the path of a Task04_Hippocampus.tar downloaded by other means, to
    extract from it instead of downloading. The tarball's checksum is not pinned (pooch's known_hash=None):
    the data set publishes none that we could verify offline, so the download is trusted as served.
    Raises MedNCAError when the download fails or the case is not in the archive.
    """
    import platformdirs

    try:
        import pooch
        import requests
    except ImportError as error:
        raise MedNCAError(f"fetching Decathlon data needs pooch: pip install pooch ({error})") from error

    cache = Path(cache_dir) if cache_dir is not None else Path(platformdirs.user_cache_dir("napari-nca"))
    extract_dir = cache / "decathlon"
    members = _case_members(case)
    paths = tuple(extract_dir / member for member in members)
    if all(path.is_file() for path in paths):
        return paths

    untar = pooch.Untar(members=list(members), extract_dir=str(extract_dir))
    if archive is not None:
        archive = Path(archive)
        if not archive.is_file():
            raise MedNCAError(f"Decathlon archive not found: {archive}")
        try:
            untar(str(archive), "fetch", None)
        except tarfile.TarError as error:
            raise MedNCAError(f"{archive} is not a readable tar archive ({error})") from error
    else:
        try:
            pooch.retrieve(url, known_hash=None, fname=DECATHLON_ARCHIVE, path=cache, processor=untar)
        except tarfile.TarError as error:
            raise MedNCAError(
                f"the file downloaded from {url} is not a readable tar archive ({error}); "
                f"delete {cache / DECATHLON_ARCHIVE} and try again"
            ) from error
        except (requests.RequestException, OSError) as error:
            raise MedNCAError(
                f"could not download {url} (no network?): {error}. Download {DECATHLON_ARCHIVE} from "
                "http://medicaldecathlon.com and pass the file with "
                "fetch_decathlon_case(archive='path/to/Task04_Hippocampus.tar')"
            ) from error
    if not all(path.is_file() for path in paths):
        raise MedNCAError(f"case {case!r} is not in the Decathlon archive (looked for {', '.join(members)})")
    return paths
