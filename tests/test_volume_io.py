"""Reading and writing volumes keeps their place in the patient: a segmentation written by napari-nca
lies exactly on its scan in any other viewer, whatever the orientation, obliquity and voxel size."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mednca.errors import VolumeError
from mednca.volume import Volume, read_volume, write_volume

SPACING = (0.7, 1.3, 2.5)
ORIGIN = (-12.5, 40.25, 7.0)
SHAPE = (9, 11, 6)


def oblique_linear() -> np.ndarray:
    """Axis directions: a 0.4 rad rotation about (1, 2, 3) applied to flipped, swapped axes (i towards
    posterior, j towards left, k towards inferior), so the grid is neither RAS nor axis-aligned."""
    axis = np.array([1.0, 2.0, 3.0]) / np.sqrt(14.0)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(0.4) * k + (1 - np.cos(0.4)) * k @ k
    flips = np.array([[0.0, -1, 0], [-1, 0, 0], [0, 0, -1]])
    return rotation @ flips


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = oblique_linear() @ np.diag(SPACING)
    affine[:3, 3] = ORIGIN
    return affine


def scan_data() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32)


@pytest.fixture
def nifti_scan(tmp_path):
    img = nib.Nifti1Image(scan_data(), oblique_affine())
    img.set_qform(oblique_affine(), code=1)
    img.set_sform(oblique_affine(), code=2)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"test scan"
    path = tmp_path / "scan.nii.gz"
    nib.save(img, path)
    return path


def itk_scan(labels: bool = False) -> sitk.Image:
    data = scan_data() if not labels else (scan_data() > 100).astype(np.int16)
    image = sitk.GetImageFromArray(data.transpose())  # ITK arrays are [z, y, x]
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(oblique_linear().ravel().tolist())
    return image


def test_nifti_labels_keep_oblique_geometry_and_header(nifti_scan, tmp_path):
    scan = read_volume(nifti_scan)
    assert scan.shape == SHAPE and scan.array.dtype == np.float32
    np.testing.assert_allclose(scan.affine, oblique_affine(), atol=1e-4)
    np.testing.assert_allclose(scan.spacing, SPACING, rtol=1e-5)
    np.testing.assert_allclose(scan.origin, ORIGIN, atol=1e-4)
    np.testing.assert_allclose(scan.direction, oblique_linear(), atol=1e-5)

    labels = (scan.array > 100).astype(np.uint8) * 2
    out = write_volume(scan.like(labels), tmp_path / "labels.nii.gz")

    source, written = nib.load(nifti_scan), nib.load(out)
    np.testing.assert_allclose(written.affine, source.affine, rtol=0, atol=1e-6)
    assert written.header.get_qform(coded=True)[1] == 1
    assert written.header.get_sform(coded=True)[1] == 2
    np.testing.assert_allclose(written.header.get_qform(), source.header.get_qform(), atol=1e-6)
    assert written.header.get_xyzt_units() == ("mm", "sec")
    assert written.header["descrip"].item() == b"test scan"
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)


def test_new_volume_is_written_with_scanner_codes(tmp_path):
    out = write_volume(Volume(np.zeros(SHAPE, bool), oblique_affine()), tmp_path / "mask.nii")
    written = nib.load(out)
    assert written.header.get_qform(coded=True)[1] == 1 and written.header.get_sform(coded=True)[1] == 1
    np.testing.assert_allclose(written.affine, oblique_affine(), atol=1e-5)
    assert written.get_data_dtype() == np.uint8


def test_itk_formats_keep_geometry_in_nifti_index_order(tmp_path):
    src = tmp_path / "scan.nrrd"
    sitk.WriteImage(itk_scan(), str(src))
    scan = read_volume(src)
    assert scan.shape == SHAPE
    np.testing.assert_array_equal(scan.array, scan_data())
    itk = sitk.ReadImage(str(src))
    for index in [(0, 0, 0), (8, 0, 5), (3, 10, 2)]:
        lps = np.array(itk.TransformIndexToPhysicalPoint(index))
        ras = scan.affine @ np.array([*index, 1.0])
        np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-6)

    labels = (scan.array > 100).astype(np.uint8)
    for name in ("labels.mha", "labels.nrrd", "labels.mhd"):
        out = write_volume(scan.like(labels), tmp_path / name)
        back = sitk.ReadImage(str(out))
        np.testing.assert_allclose(back.GetSpacing(), SPACING, rtol=1e-6)
        np.testing.assert_allclose(back.GetOrigin(), ORIGIN, atol=1e-6)
        np.testing.assert_allclose(back.GetDirection(), oblique_linear().ravel(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), labels.transpose())
        np.testing.assert_array_equal(read_volume(out).array, labels)


def test_nifti_and_nrrd_of_one_scan_give_the_same_affine(tmp_path):
    image = itk_scan()
    sitk.WriteImage(image, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "a.nrrd"))
    from_nifti, from_nrrd = read_volume(tmp_path / "a.nii.gz"), read_volume(tmp_path / "a.nrrd")
    np.testing.assert_allclose(from_nifti.affine, from_nrrd.affine, atol=1e-4)
    np.testing.assert_array_equal(from_nifti.array, from_nrrd.array)


def test_float_map_is_written_as_float32(nifti_scan, tmp_path):
    scan = read_volume(nifti_scan)
    probability = np.random.default_rng(1).random(SHAPE)
    out = write_volume(scan.like(probability), tmp_path / "probability.nii.gz")
    written = read_volume(out)
    assert written.array.dtype == np.float32
    np.testing.assert_allclose(written.array, probability, rtol=1e-6)


def test_writing_leaves_the_source_untouched(nifti_scan, tmp_path):
    before, mtime = nifti_scan.read_bytes(), nifti_scan.stat().st_mtime_ns
    scan = read_volume(nifti_scan)
    write_volume(scan.like(np.ones(SHAPE, np.uint8)), tmp_path / "labels.nii.gz")
    assert nifti_scan.read_bytes() == before and nifti_scan.stat().st_mtime_ns == mtime


def test_refuses_to_overwrite_the_scan_the_labels_came_from(nifti_scan, tmp_path):
    before = nifti_scan.read_bytes()
    labels = read_volume(nifti_scan).like(np.ones(SHAPE, np.uint8))
    link = tmp_path / "link.nii.gz"
    os.symlink(nifti_scan, link)
    for target in (nifti_scan, tmp_path / "sub" / ".." / "scan.nii.gz", link):
        with pytest.raises(VolumeError, match="scan.nii.gz|link.nii.gz"):
            write_volume(labels, target)
    assert nifti_scan.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.nii.gz", "scan.nii.gz"]


def test_a_previous_output_may_be_overwritten(nifti_scan, tmp_path):
    scan = read_volume(nifti_scan)
    out = tmp_path / "labels.nii.gz"
    write_volume(scan.like(np.zeros(SHAPE, np.uint8)), out)
    write_volume(scan.like(np.full(SHAPE, 2, np.uint8)), out)
    assert (read_volume(out).array == 2).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "scan.nii.gz"]


def test_a_failed_write_keeps_the_previous_output(nifti_scan, tmp_path, monkeypatch):
    scan = read_volume(nifti_scan)
    out = write_volume(scan.like(np.zeros(SHAPE, np.uint8)), tmp_path / "labels.nii.gz")
    before = out.read_bytes()

    def fail_midway(img, filename):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", fail_midway)
    with pytest.raises(VolumeError, match=f"cannot write {out}: disk full"):
        write_volume(scan.like(np.ones(SHAPE, np.uint8)), out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "scan.nii.gz"]


def test_a_folder_that_cannot_be_made_is_a_volume_error_with_the_systems_reason(nifti_scan):
    scan = read_volume(nifti_scan)
    with pytest.raises(VolumeError, match=r"cannot write .*scan.nii.gz/out/labels.nii.gz: Not a directory"):
        write_volume(scan.like(np.zeros(SHAPE, np.uint8)), nifti_scan / "out" / "labels.nii.gz")


def write_dicom_series(folder, n_slices=5, spacing=(0.8, 0.9, 3.0)) -> np.ndarray:
    """A tiny CT-like series, one file per slice, with the tags a reader orders and places slices by."""
    folder.mkdir()
    data = np.arange(n_slices * 7 * 6, dtype=np.int16).reshape(n_slices, 7, 6)  # [z, y, x]
    for z in range(n_slices):
        slice_ = sitk.GetImageFromArray(data[z])
        slice_.SetSpacing(spacing[:2])  # GDCM writes Pixel Spacing (0028|0030) from the image itself
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.1.2",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0032": f"-10\\20\\{z * spacing[2]}",
            "0020|0013": str(z + 1),
            "0018|0050": str(spacing[2]),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_)
    return data


def test_reads_a_dicom_series_folder(tmp_path):
    data = write_dicom_series(tmp_path / "series")
    volume = read_volume(tmp_path / "series")
    assert volume.shape == (6, 7, 5)
    np.testing.assert_allclose(volume.spacing, (0.8, 0.9, 3.0), rtol=1e-5)
    np.testing.assert_array_equal(volume.array, data.transpose())
    np.testing.assert_allclose(volume.origin, (10, -20, 0), atol=1e-6)  # DICOM positions are LPS


def test_refuses_to_overwrite_the_data_file_of_a_metaimage_source(tmp_path):
    sitk.WriteImage(itk_scan(), str(tmp_path / "a.mhd"), True)  # a.mhd names its data file a.zraw
    (tmp_path / "a.mhd").rename(tmp_path / "scan.mhd")
    data_before = (tmp_path / "a.zraw").read_bytes()
    scan = read_volume(tmp_path / "scan.mhd")
    with pytest.raises(VolumeError, match="a.zraw"):
        write_volume(scan.like(np.zeros(SHAPE, np.uint8)), tmp_path / "a.mhd")
    assert (tmp_path / "a.zraw").read_bytes() == data_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zraw", "scan.mhd"]


def test_reads_a_decathlon_case_with_its_labels(hippocampus_dir):
    image = read_volume(hippocampus_dir / "imagesTr" / "hippocampus_374.nii.gz")
    labels = read_volume(hippocampus_dir / "labelsTr" / "hippocampus_374.nii.gz")
    assert image.shape == labels.shape
    assert np.issubdtype(labels.array.dtype, np.integer)
    assert set(np.unique(labels.array)) == {0, 1, 2}
    np.testing.assert_allclose(image.affine, labels.affine, atol=1e-4)


def test_one_dicom_file_reads_its_whole_series(tmp_path):
    data = write_dicom_series(tmp_path / "series")
    volume = read_volume(tmp_path / "series" / "slice002.dcm")
    assert volume.shape == (6, 7, 5)
    np.testing.assert_array_equal(volume.array, data.transpose())
    assert all(f.suffix == ".dcm" for f in volume.derived_from) and len(volume.derived_from) == 5
