"""Scans stored in any orientation segment exactly as the canonical file does, and results map back exactly.

The MSD hippocampus files are stored RAS, the orientation the shipped models were trained in; the same
head saved in another index order (every DICOM series is LPS) must give the same labels, voxel for voxel,
once brought back to the canonical layout.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from orientation_support import reoriented

from mednca.inference import quality_map, record_growth, segment, slice_axis
from mednca.model import MedNCA
from mednca.orientation import Reorientation, axis_codes, plane_of
from mednca.registry import load_model
from mednca.volume import Volume, read_volume, write_volume

CASE = "hippocampus_056"  # held out from the shipped models' training
# DICOM's order, one flip, permuted, permuted and flipped, the slice axis reversed
ORIENTATIONS = ["LPS", "LAS", "PIR", "ASL", "RAI"]
ALL_CODES = ["".join(p) for axes in itertools.permutations(("LR", "AP", "SI")) for p in itertools.product(*axes)]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a > 0, b > 0).sum() / ((a > 0).sum() + (b > 0).sum())


@pytest.fixture(scope="module")
def model():
    return load_model("hippocampus")


@pytest.fixture(scope="module")
def case(hippocampus_dir):
    image = read_volume(hippocampus_dir / "imagesTr" / f"{CASE}.nii.gz")
    truth = read_volume(hippocampus_dir / "labelsTr" / f"{CASE}.nii.gz")
    return Volume(image.array, image.affine), truth.array


@pytest.fixture(scope="module")
def canonical(model, case, one_thread):
    return segment(model, case[0], seed=0)


def test_48_orientations_map_to_the_model_and_back_exactly():
    rng = np.random.default_rng(0)
    ras = Volume(rng.random((4, 5, 6)), np.diag([0.5, 0.7, 3.0, 1.0]))
    assert len(set(ALL_CODES)) == 48
    for codes in ALL_CODES:
        scan = reoriented(ras, codes)
        assert axis_codes(scan.affine) == codes
        to_ras = Reorientation.between(scan.affine, "RAS")
        np.testing.assert_array_equal(to_ras.to_model(scan.array), ras.array, err_msg=codes)
        stacked = np.stack([scan.array, 2 * scan.array])  # leading axes (classes, runs) ride along
        np.testing.assert_array_equal(to_ras.to_scan(to_ras.to_model(stacked)), stacked, err_msg=codes)


def test_the_slice_plane_is_named_from_the_axis_codes():
    assert [plane_of("RAS", a) for a in range(3)] == ["sagittal", "coronal", "axial"]
    assert [plane_of("PIR", a) for a in range(3)] == ["coronal", "axial", "sagittal"]


@pytest.mark.parametrize("codes", ORIENTATIONS)
def test_a_reoriented_scan_gets_the_canonical_labels_and_dice(model, case, canonical, codes, tmp_path):
    image, truth = case
    path = write_volume(reoriented(image, codes), tmp_path / f"{codes}.nii.gz")
    scan = read_volume(path)
    assert axis_codes(scan.affine) == codes
    result = segment(model, scan, seed=0)
    back = Reorientation.between(result.labels.affine, "RAS").to_model(result.labels.array)
    np.testing.assert_array_equal(back, canonical.labels.array)
    np.testing.assert_allclose(result.labels.affine, scan.affine)
    assert dice(back, truth) == pytest.approx(dice(canonical.labels.array, truth))
    assert dice(canonical.labels.array, truth) > 0.8
    assert result.axis == slice_axis(model, scan) and plane_of(codes, result.axis) == "axial"


def test_a_dicom_series_in_lps_order_gets_the_canonical_labels(model, case, canonical, tmp_path):
    image, truth = case
    lps = reoriented(Volume(np.round(image.array).astype(np.int16), image.affine), "LPS")
    rounded = segment(model, Volume(np.round(image.array).astype(np.int16), image.affine), seed=0)
    _write_dicom_series(lps, tmp_path / "series")
    scan = read_volume(tmp_path / "series")
    assert axis_codes(scan.affine) == "LPS"
    np.testing.assert_array_equal(scan.array, lps.array)
    result = segment(model, scan, seed=0)
    back = Reorientation.between(scan.affine, "RAS").to_model(result.labels.array)
    np.testing.assert_array_equal(back, rounded.labels.array)
    assert dice(back, truth) > 0.8


def test_quality_slices_and_growth_use_the_scan_slice_order(model, case, tmp_path):
    image, _ = case
    flipped = reoriented(image, "RAI")  # the slice axis runs the other way
    n = image.shape[2]
    ras_report = quality_map(model, image, runs=2, seed=0)
    rai_report = quality_map(model, flipped, runs=2, seed=0)
    np.testing.assert_allclose(rai_report.slice_nqm, ras_report.slice_nqm[::-1])
    assert rai_report.flagged_slices == [n - 1 - s for s in ras_report.flagged_slices]
    np.testing.assert_array_equal(rai_report.std[:, :, :, ::-1], ras_report.std)

    chosen = [10, 25]
    last_ras = list(record_growth(model, image, slices=chosen, seed=0))[-1].probability
    last_rai = list(record_growth(model, flipped, slices=[n - 1 - s for s in chosen], seed=0))[-1].probability
    np.testing.assert_array_equal(last_rai, last_ras)


def _write_dicom_series(volume: Volume, folder):
    """One file per k-slice with the position and orientation tags readers place slices by (DICOM is LPS)."""
    folder.mkdir()
    lps = np.diag([-1.0, -1.0, 1.0])
    linear = lps @ volume.affine[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    orientation = "\\".join(f"{v:g}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    for k in range(volume.shape[2]):
        position = lps @ (volume.affine @ [0, 0, k, 1])[:3]
        plane = sitk.GetImageFromArray(np.ascontiguousarray(volume.array[:, :, k].T))
        plane.SetSpacing(spacing[:2].tolist())
        tags = {
            "0008|0060": "MR",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.7",
            "0020|000e": "1.2.826.0.1.3680043.2.1125.7.1",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:g}" for v in position),
            "0020|0013": str(k + 1),
            "0018|0050": f"{spacing[2]:g}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(plane)


def test_finetuning_a_reoriented_scan_learns_the_same_model(one_thread):
    from training_support import TINY, same, toy_case, weights

    from mednca.finetuning import finetune
    from mednca.training import new_model

    base = new_model(TINY, MedNCA(TINY).preprocessing, seed=0)
    image, labels = toy_case(7)
    sparse = np.zeros_like(labels.array)
    sparse[..., [1, 4]] = labels.array[..., [1, 4]]
    canonical_model, canonical_report = finetune(base, image, sparse, iterations=5)
    flipped, flipped_labels = reoriented(image, "LPI"), reoriented(Volume(sparse, image.affine), "LPI")
    tuned, report = finetune(base, flipped, flipped_labels, iterations=5)
    n = image.shape[2]
    assert report.slices == sorted(n - 1 - s for s in canonical_report.slices)  # the scan's own slice numbers
    assert same(weights(tuned), weights(canonical_model))
    assert report.dice_after == canonical_report.dice_after


def test_training_cases_are_brought_to_the_model_orientation():
    from training_support import toy_case

    from mednca.data import load_cases

    image, labels = toy_case(2)
    ras = load_cases([(image, labels)])[0]
    pir = load_cases([(reoriented(image, "PIR"), reoriented(labels, "PIR"))])[0]
    np.testing.assert_array_equal(pir.image, ras.image)
    np.testing.assert_array_equal(pir.labels, ras.labels)


def test_the_command_line_segments_a_reoriented_scan_and_the_chosen_plane(tmp_path, case, canonical, model):
    from mednca.cli import main

    image, _ = case
    lps = write_volume(reoriented(image, "LPS"), tmp_path / "lps.nii.gz")
    assert main(["segment", str(lps), "-o", str(tmp_path / "out"), "--threads", "1"]) == 0
    labels = read_volume(tmp_path / "out" / "lps_seg.nii.gz")
    back = Reorientation.between(labels.affine, "RAS").to_model(labels.array)
    np.testing.assert_array_equal(back, canonical.labels.array)

    assert main(["segment", str(lps), "-o", str(tmp_path / "coronal"), "--plane", "coronal", "--threads", "1"]) == 0
    coronal = read_volume(tmp_path / "coronal" / "lps_seg.nii.gz").array
    expected = segment(model, read_volume(lps), axis=1, seed=0).labels.array  # LPS: axis 1 runs P, coronal slices
    np.testing.assert_array_equal(coronal, expected)
