"""Scans and label maps as 3D arrays that carry their place in the patient.

A :class:`Volume` is an array in NIfTI index order (i, j, k) plus its voxel-to-world affine in RAS
millimetres, as nibabel gives it. The affine is part of the data, as in TorchIO: a segmentation written
without it no longer lies on the scan in any viewer, so every volume we make from a scan inherits it, and
:func:`write_volume` writes exactly that geometry back. NIfTI files also keep their header, so the output
carries the source's qform/sform codes, units and description.

NIfTI goes through nibabel; NRRD, MetaImage and DICOM series through SimpleITK, whose arrays are [z, y, x]
and whose world is LPS: both are converted on the way in and out, so callers only ever see one convention.

Writing never destroys data: files go to a temporary name in the destination folder and are renamed into
place, and a volume refuses to be written over any file its data was read or derived from. The temporary
folder's name says who made it (``.mednca-tmp-<host>-<pid>-...``), so what a killed writer left behind can be
recognised and removed later (``staging.remove_stale_temp``) without touching a write still in progress.
"""

from __future__ import annotations

import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError

from .errors import VolumeError
from .staging import temp_path

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIX = ".dcm"
READABLE = (
    "NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), or DICOM (a series folder or any .dcm"
    " file of the series)"
)
LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS: ITK's world has x and y pointing the other way
SCANNER = 1  # NIfTI xform code: coordinates of the scanner
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(eq=False)
class Volume:
    """A 3D array with its voxel-to-world geometry.

    ``array`` is indexed (i, j, k) as in NIfTI; ``affine`` maps (i, j, k, 1) to RAS millimetres.
    ``source`` is the file (or DICOM folder) this array was read from, None for computed data.
    ``header`` is the NIfTI header of the source, kept so outputs carry its xform codes and units.
    ``derived_from`` holds every file the data came from, carried through :meth:`like`, so a segmentation
    can never be written over the scan it was computed from.
    """

    array: np.ndarray = field(repr=False)
    affine: np.ndarray
    source: Path | None = None
    header: nib.Nifti1Header | None = field(default=None, repr=False)
    derived_from: frozenset[Path] = frozenset()

    def __post_init__(self):
        if not isinstance(self.array, np.ndarray) or self.array.ndim != 3:
            shape = getattr(self.array, "shape", type(self.array).__name__)
            raise VolumeError(f"a volume needs a 3D array, got shape {shape}")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.isfinite(affine).all():
            raise VolumeError(f"a volume's affine must be a finite 4x4 matrix, got {affine.shape}")
        self.affine = affine
        if self.source is not None:
            self.source = Path(self.source)
            self.derived_from = frozenset(self.derived_from) | {self.source.resolve()}

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k: the lengths of the affine's columns."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """World (RAS) position of the centre of voxel (0, 0, 0)."""
        return self.affine[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """Unit vectors (columns) of the i, j, k axes in RAS world space."""
        return self.affine[:3, :3] / self.spacing

    def like(self, array: np.ndarray) -> Volume:
        """A new volume holding ``array`` on this volume's grid (its segmentation, a probability map...)."""
        array = np.asanyarray(array)
        if array.shape != self.shape:
            raise VolumeError(f"an array of shape {array.shape} does not fit a volume of shape {self.shape}")
        header = None if self.header is None else self.header.copy()
        return Volume(array, self.affine.copy(), None, header, self.derived_from)


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a 3D scan or label map; any problem becomes a :class:`VolumeError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"file not found: {path}")
    if path.is_dir():
        return _read_dicom_folder(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return _read_nifti(path)
    if name.endswith(ITK_SUFFIXES):
        return _read_itk(path)
    if is_dicom_file(path):
        return _read_dicom_series_of(path)
    raise VolumeError(f"{path.name}: unsupported file type; napari-nca reads {READABLE}")


def write_volume(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` to ``path`` (format from the extension) with its geometry, atomically.

    Label arrays (bool, integer) are stored as the smallest of uint8/int16/int32 that holds them, everything
    else as float32. The file the volume's data came from is never overwritten. A failure of the file system
    (a full disk, a read-only folder) is a :class:`VolumeError` naming the file and the system's reason.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith(NIFTI_SUFFIXES + ITK_SUFFIXES):
        raise VolumeError(f"{path.name}: cannot write this file type; use .nii.gz, .nii, .nrrd, .mha or .mhd")
    if path.is_dir():
        raise VolumeError(f"{path} is a folder; give a file name to write to")
    data = _storable(volume.array, path.name)
    _refuse_source(volume, path)
    tmp_dir = temp_path(path.parent)
    try:  # the staging folder is made inside the block that removes it, so no interruption leaves it behind
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_dir.mkdir(mode=0o700)
        staged = tmp_dir / path.name
        if name.endswith(NIFTI_SUFFIXES):
            nib.save(_nifti_image(volume, data), staged)
        else:
            sitk.WriteImage(_itk_image(volume, data), str(staged), True)
        # A header/data pair (.mhd + .zraw): data files first, so the header never names a missing file.
        written = sorted(tmp_dir.iterdir(), key=lambda f: f.name == path.name)
        for f in written:
            _refuse_source(volume, path.parent / f.name)
        for f in written:
            os.replace(f, path.parent / f.name)
    except RuntimeError as e:  # SimpleITK reports every failure as RuntimeError
        raise VolumeError(f"{path.name}: could not be written ({_itk_reason(e)})") from None
    except OSError as e:  # a full disk, a folder made read-only meanwhile, a file system that refuses the name
        raise VolumeError(f"cannot write {path}: {_os_reason(e)}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def image_array(volume: Volume | np.ndarray) -> np.ndarray:
    """The volume's intensities as float32 with only finite values, ready for inference.

    Scanners and resampling leave NaN (and sometimes +-Inf) outside the field of view; one of them would
    turn the percentile normalisation and every NCA update that sees it into NaN, so NaN and -Inf become
    the lowest finite value (background) and +Inf the highest.

    An image without contrast (one value everywhere, or values float32 cannot tell apart) and one whose
    values overflow float32 are refused: normalisation would make noise or infinities of them, and the
    model would label voxels in an image that shows nothing.
    """
    array = volume.array if isinstance(volume, Volume) else np.asanyarray(volume)
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return _with_contrast(array, array.astype(np.float32))
    if not np.issubdtype(array.dtype, np.floating):
        raise VolumeError(f"the image holds {array.dtype} values; a real-valued scan is needed")
    finite = np.isfinite(array)
    if finite.all():
        low, high = array.min(), array.max()
    elif not finite.any():
        raise VolumeError("the image holds no finite value (all NaN or infinite)")
    else:
        low, high = array[finite].min(), array[finite].max()
        array = np.nan_to_num(array, nan=low, neginf=low, posinf=high)
    if max(-float(low), float(high)) > FLOAT32_MAX:
        raise VolumeError(
            f"the image holds values from {float(low):.3g} to {float(high):.3g}, beyond what float32 holds "
            f"(+-{FLOAT32_MAX:.3g}): rescale the image to a realistic intensity range first"
        )
    return _with_contrast(array, array.astype(np.float32))


def _with_contrast(original: np.ndarray, image: np.ndarray) -> np.ndarray:
    """``image`` (the float32 copy of ``original``), refused when it holds no contrast to segment."""
    if image.size and image.min() == image.max():
        if original.min() != original.max():
            raise VolumeError(
                f"the image's values ({original.min():.6g} to {original.max():.6g}) differ by less than float32 "
                "can tell apart: rescale the image to a realistic intensity range first"
            )
        raise VolumeError(f"the image is constant (all values {float(original.flat[0])}): nothing to segment")
    return image


def check_labels(labels: Volume | np.ndarray, volume: Volume) -> np.ndarray:
    """Validate a label map for ``volume`` and return it as integers (uint8 when the labels fit).

    Labels must cover the scan voxel for voxel; a label file on another grid would train or score the
    model against the wrong anatomy, so shape (and geometry, for a read label file) must match.
    """
    if isinstance(labels, Volume):
        if labels.shape == volume.shape and not np.allclose(labels.affine, volume.affine, atol=1e-2):
            raise VolumeError(
                "the labels lie on another grid than the image (their affines differ):\n"
                f"labels {np.round(labels.affine, 3).tolist()}\nimage {np.round(volume.affine, 3).tolist()}"
            )
        labels = labels.array
    labels = np.asanyarray(labels)
    if labels.shape != volume.shape:
        raise VolumeError(f"the labels have shape {labels.shape} but the image has shape {volume.shape}")
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all():
            raise VolumeError("the labels hold NaN or infinite values; labels are class numbers 0, 1, 2, ...")
        if not np.array_equal(labels, np.round(labels)):
            raise VolumeError("the labels hold fractional values; labels are class numbers 0, 1, 2, ...")
    elif not np.issubdtype(labels.dtype, np.integer):
        raise VolumeError(f"the labels hold {labels.dtype} values; labels are class numbers 0, 1, 2, ...")
    if labels.size and labels.min() < 0:
        raise VolumeError(f"the labels hold negative values (down to {labels.min()}); labels are 0, 1, 2...")
    return labels.astype(_label_dtype(labels, "the labels"))


def _read_nifti(path: Path) -> Volume:
    try:
        img = nib.load(path)
        array = np.asanyarray(img.dataobj)
    except (ImageFileError, OSError, EOFError, zlib.error, ValueError) as e:
        raise VolumeError(f"{path.name} is not a readable NIfTI file, or it is truncated ({e})") from None
    if not isinstance(img.header, nib.Nifti1Header):
        raise VolumeError(f"{path.name} is not a NIfTI file but a {type(img).__name__}")
    return Volume(_as_3d(array, path.name), img.header.get_best_affine(), path, img.header.copy())


def _read_itk(path: Path) -> Volume:
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise VolumeError(f"{path.name} is not readable or is damaged ({_itk_reason(e)})") from None
    return _from_itk(image, path, _data_files(path))


def is_dicom_file(path: Path) -> bool:
    """True when ``path`` is named ``.dcm`` or carries the 'DICM' tag after the 128-byte preamble (DICOM files
    often have no extension, and old ones no preamble)."""
    if path.name.lower().endswith(DICOM_SUFFIX):
        return True
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _read_dicom_folder(folder: Path) -> Volume:
    """The series with the most slices in the folder (a localiser series beside the scan is common)."""
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeError(f"{folder} is a folder without a DICOM series; give a scan file or a DICOM folder")
    files = max((sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), s) for s in series), key=len)
    return _read_dicom_files(files, folder)


def _read_dicom_series_of(path: Path) -> Volume:
    """The whole series one DICOM file belongs to (its Series Instance UID, among the files of its folder):
    a user who drops one slice of a scan means the scan."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeError(f"{path.name}: not a readable DICOM file ({_itk_reason(e)})") from None
    uid = reader.GetMetaData("0020|000e").strip() if reader.HasMetaDataKey("0020|000e") else ""
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), uid) if uid else ()
    if str(path.resolve()) not in {str(Path(f).resolve()) for f in files}:
        files = (str(path),)  # a file without a series UID, or one GDCM does not group: the file alone
    return _read_dicom_files(files, path)


def _read_dicom_files(files, source: Path) -> Volume:
    _refuse_mosaic(Path(files[0]), source)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"the DICOM series in {source} cannot be read ({_itk_reason(e)})") from None
    return _from_itk(image, source, [Path(f) for f in files])


def _refuse_mosaic(first: Path, source: Path) -> None:
    """A Siemens mosaic stores a whole volume as tiles of one 2D image (Image Type holds MOSAIC): read as it
    is, it would be segmented as one slice of tiles. Converters such as dcm2niix unpack it."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(first))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # the series reader reports an unreadable file with its reason
    kind = reader.GetMetaData("0008|0008") if reader.HasMetaDataKey("0008|0008") else ""
    if "MOSAIC" in kind.upper():
        raise VolumeError(
            f"{source.name} is a Siemens mosaic (a volume tiled into one image): convert it to NIfTI first, "
            "e.g. with dcm2niix, then open the NIfTI file"
        )


def _from_itk(image: sitk.Image, path: Path, data_files: list[Path]) -> Volume:
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeError(
            f"{path.name} holds {image.GetNumberOfComponentsPerPixel()} values per voxel (a colour or vector "
            "image); one 3D scalar volume is needed"
        )
    array = sitk.GetArrayFromImage(image).transpose()  # ITK [.., z, y, x] -> (i, j, k, ..)
    array = _as_3d(array, path.name)
    n = min(dim, 3)
    direction = np.reshape(image.GetDirection(), (dim, dim))[:n, :n]
    affine = np.eye(4)
    affine[:3, :3] = LPS @ (direction * np.asarray(image.GetSpacing()[:3]))
    affine[:3, 3] = LPS @ np.asarray(image.GetOrigin()[:3])
    derived = frozenset(f.resolve() for f in data_files)
    return Volume(array, affine, path, None, derived)


def _as_3d(array: np.ndarray, name: str) -> np.ndarray:
    """Drop trailing length-1 axes (a 4D file with one time point is still one volume)."""
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3:
        return array
    if array.ndim < 3:
        raise VolumeError(f"{name} is a {array.ndim}D image of shape {array.shape}; a 3D volume is needed")
    raise VolumeError(
        f"{name} is {array.ndim}D with shape {array.shape} (a time series or multi-channel image); "
        "one 3D volume is needed: extract the volume to segment first"
    )


def _data_files(path: Path) -> list[Path]:
    """The data file a .mhd / .nhdr header points to, so it is protected like the header itself."""
    suffix = path.suffix.lower()
    if suffix not in (".mhd", ".nhdr"):
        return []
    sep, keys = ("=", {"elementdatafile"}) if suffix == ".mhd" else (":", {"data file", "datafile"})
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        key, found, value = line.partition(sep)
        if found and key.strip().lower() in keys:
            value = value.strip()
            return [] if value.upper() in ("", "LOCAL") or value.startswith("LIST") else [path.parent / value]
    return []


def _storable(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
        return array.astype(_label_dtype(array, name))
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    raise VolumeError(f"{name}: cannot write {array.dtype} values; labels (integers) or a float map expected")


def _label_dtype(array: np.ndarray, what: str) -> type:
    """Smallest of uint8, int16, int32 holding the values: what viewers and other tools read everywhere."""
    if array.size == 0:
        return np.uint8
    low, high = int(array.min()), int(array.max())
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return dtype
    raise VolumeError(f"{what}: values from {low} to {high} do not fit a 32-bit label image")


def _refuse_source(volume: Volume, target: Path) -> None:
    resolved = target.resolve()
    for protected in volume.derived_from:
        same = protected == resolved or (
            resolved.exists() and protected.exists() and os.path.samefile(protected, resolved)
        )
        if same:
            raise VolumeError(
                f"refusing to write over {target.name}: the data being saved was read or computed from it; "
                "choose another file name"
            )


def _nifti_image(volume: Volume, data: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI image with the source header's forms and codes, or scanner-coded forms for new data."""
    if volume.header is None:
        header = nib.Nifti1Header()
        qform = sform = volume.affine
        qcode = scode = SCANNER
    else:
        header = volume.header.copy()
        qform, qcode = header.get_qform(coded=True)
        sform, scode = header.get_sform(coded=True)
        if not np.allclose(header.get_best_affine(), volume.affine, atol=1e-5):
            # The geometry was changed after reading: the header's forms no longer describe it.
            qform = sform = volume.affine
            qcode, scode = qcode or SCANNER, scode or SCANNER
        header["cal_min"] = header["cal_max"] = 0  # the source's display window does not suit new data
    header.set_data_dtype(data.dtype)
    header.set_qform(qform, code=qcode)
    header.set_sform(sform, code=scode)
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    return image_class(data, header.get_best_affine(), header=header)


def _itk_image(volume: Volume, data: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose()))  # (i, j, k) -> ITK [z, y, x]
    linear = LPS @ volume.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((linear / spacing).ravel().tolist())
    image.SetOrigin((LPS @ volume.affine[:3, 3]).tolist())
    return image


def _os_reason(error: OSError) -> str:
    """The operating system's words for a failed file operation ("No space left on device")."""
    return error.strerror or str(error) or type(error).__name__


def _itk_reason(error: RuntimeError) -> str:
    """SimpleITK's own first line of explanation, without the C++ source location and object address."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = lines[1] if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
    return re.sub(r"^(ITK ERROR|itk::ERROR): \w+\(0x[0-9a-f]+\): ", "", reason).rstrip(":")[:300]
