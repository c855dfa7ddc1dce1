"""Bad input gives one clear VolumeError naming the file and the problem, never a traceback from nibabel or
SimpleITK, and odd but valid intensities are made safe for inference."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mednca.errors import VolumeError
from mednca.volume import Volume, check_labels, image_array, read_volume


def save_nifti(path, data):
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return path


def volume(array) -> Volume:
    return Volume(np.asarray(array), np.eye(4))


def test_truncated_nifti(tmp_path):
    path = save_nifti(tmp_path / "cut.nii.gz", np.random.default_rng(0).random((16, 16, 16), np.float32))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(VolumeError, match="cut.nii.gz"):
        read_volume(path)


def test_random_bytes_named_nifti(tmp_path):
    path = tmp_path / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(VolumeError, match="noise.nii.gz"):
        read_volume(path)


def test_damaged_itk_file(tmp_path):
    path = tmp_path / "scan.mha"
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkInt16), str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(VolumeError, match="scan.mha"):
        read_volume(path)


def test_4d_file_is_refused_but_a_single_time_point_is_read(tmp_path):
    with pytest.raises(VolumeError, match=r"4D.*\(8, 8, 8, 3\)"):
        read_volume(save_nifti(tmp_path / "series.nii.gz", np.zeros((8, 8, 8, 3), np.float32)))
    assert read_volume(save_nifti(tmp_path / "one.nii.gz", np.zeros((8, 8, 8, 1), np.float32))).shape == (8, 8, 8)


def test_2d_file(tmp_path):
    with pytest.raises(VolumeError, match=r"flat.nii.gz is a 2D"):
        read_volume(save_nifti(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.float32)))
    path = tmp_path / "flat.mha"
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkUInt8), str(path))
    with pytest.raises(VolumeError, match=r"flat.mha is a 2D"):
        read_volume(path)


def test_missing_file(tmp_path):
    with pytest.raises(VolumeError, match="not found.*nothing.nii.gz"):
        read_volume(tmp_path / "nothing.nii.gz")


def test_unknown_extension(tmp_path):
    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG")
    with pytest.raises(VolumeError, match=r"scan.png: unsupported file type.*\.nii\.gz"):
        read_volume(path)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(VolumeError, match="without a DICOM series"):
        read_volume(tmp_path)


def test_nan_and_inf_become_the_finite_extremes():
    data = np.array([np.nan, -np.inf, 3.0, 7.5, np.inf, -2.0, 0.0, 1.0], np.float64).reshape(2, 2, 2)
    out = image_array(volume(data))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out.ravel(), [-2, -2, 3, 7.5, 7.5, -2, 0, 1])


@pytest.mark.parametrize("data", [np.array([[[-1024, 0], [3000, 7]]], np.int16), np.eye(2, dtype=bool)[None]])
def test_integer_and_boolean_images_are_cast(data):
    out = image_array(volume(data))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, data.astype(np.float64))


@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((3, 3, 3), np.uint8), r"the image is constant \(all values 0.0\): nothing to segment"),
        (np.full((3, 3, 3), 7.5), r"constant \(all values 7.5\)"),
        (np.where(np.eye(3, dtype=bool)[None], np.nan, 2.0), r"constant \(all values 2.0\)"),  # NaN is no contrast
        (np.array([1e-50, 2e-50, 3e-50, 0]).reshape(2, 2, 1), "differ by less than float32 can tell apart"),
    ],
)
def test_an_image_without_contrast_is_refused_not_segmented(data, message):
    with pytest.raises(VolumeError, match=message):
        image_array(volume(data))


def test_values_beyond_float32_are_refused_not_turned_into_infinity():
    data = np.array([0.0, 1.0, 5e38, -2.0]).reshape(2, 2, 1)
    with pytest.raises(VolumeError, match=r"values from -2 to 5e\+38, beyond what float32 holds"):
        image_array(volume(data))
    data[1, 0, 0] = 3e38  # the largest values float32 holds are kept
    assert np.isfinite(image_array(volume(data))).all()


@pytest.mark.parametrize(
    "data, message",
    [
        (np.full((2, 2, 2), np.nan, np.float32), "no finite value"),
        (np.ones((2, 2, 2), np.complex64), "complex"),
        (np.full((2, 2, 2), "a"), "<U1"),
    ],
)
def test_images_that_cannot_be_segmented(data, message):
    with pytest.raises(VolumeError, match=message):
        image_array(volume(data))


def test_labels_of_another_shape():
    with pytest.raises(VolumeError, match=r"\(4, 4, 3\).*\(4, 4, 4\)"):
        check_labels(np.zeros((4, 4, 3), np.uint8), volume(np.zeros((4, 4, 4))))


def test_labels_on_another_grid():
    shifted = Volume(np.zeros((4, 4, 4), np.uint8), np.diag([-1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(VolumeError, match="another grid"):
        check_labels(shifted, volume(np.zeros((4, 4, 4))))


@pytest.mark.parametrize(
    "labels, message",
    [(np.array([0, -1]), "negative"), (np.array([0.0, 0.5]), "fractional"), (np.array([0.0, np.nan]), "NaN")],
)
def test_invalid_label_values(labels, message):
    data = np.zeros((2, 2, 2))
    data[0, 0, :] = labels
    with pytest.raises(VolumeError, match=message):
        check_labels(data, volume(np.zeros((2, 2, 2))))


def test_integral_float_labels_become_integers():
    labels = np.zeros((3, 3, 3), np.float64)
    labels[1, 1, 1], labels[0, 0, 0] = 2.0, 1.0
    out = check_labels(labels, volume(np.zeros((3, 3, 3))))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)
    assert check_labels(labels * 300, volume(np.zeros((3, 3, 3)))).dtype == np.int16


def test_a_siemens_mosaic_is_refused_with_how_to_convert_it(tmp_path):
    folder = tmp_path / "mosaic"
    folder.mkdir()
    tiles = sitk.GetImageFromArray(np.arange(64 * 64, dtype=np.int16).reshape(64, 64))
    for tag, value in {"0008|0008": "ORIGINAL\\PRIMARY\\M\\ND\\MOSAIC", "0008|0060": "MR",
                       "0020|000e": "1.2.826.0.1.3680043.2.1125.9.1", "0020|0013": "1"}.items():
        tiles.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(folder / "IM0001.dcm"))
    writer.Execute(tiles)
    for path in (folder, folder / "IM0001.dcm"):
        with pytest.raises(VolumeError, match="Siemens mosaic.*dcm2niix"):
            read_volume(path)
