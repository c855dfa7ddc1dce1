"""What a clinician reads off a result: volumes in mL with their spread, slices worth checking, a verdict."""

from __future__ import annotations

import numpy as np
import pytest

from mednca.checkpoint import load_model_file, save_model
from mednca.errors import MedNCAError
from mednca.inference import quality_map, segment
from mednca.model import MedNCA, NCAConfig
from mednca.quality import (
    DEFAULT_CRITERIA,
    QualityCriteria,
    criteria_of,
    judge,
    scattered_share,
    slice_scores,
    slices_to_check,
    volume_estimates,
    voxel_ml,
)
from mednca.volume import Volume

ANISOTROPIC = np.diag([0.5, 0.5, 3.0, 1.0])  # 0.75 mm^3 voxels


def test_volumes_follow_the_voxel_spacing_per_class_and_whole():
    labels = np.zeros((40, 40, 10), np.uint8)
    labels[:20, :20, :4] = 1  # 1600 voxels
    labels[20:30, :20, :4] = 2  # 800 voxels
    result = volume_estimates(np.array([1600, 800]), ("anterior", "posterior"), voxel_ml(ANISOTROPIC))
    assert [v.name for v in result] == ["anterior", "posterior", "whole"]
    assert [v.ml for v in result] == pytest.approx([1.2, 0.6, 1.8])
    rotated = ANISOTROPIC.copy()
    rotated[:3, :3] = np.array([[0, -3.0, 0], [0.5, 0, 0], [0, 0, 0.5]])  # same voxel size, other axes
    assert voxel_ml(rotated) == pytest.approx(0.00075)


def test_the_volume_spread_comes_from_the_single_runs():
    runs = np.array([[1000, 500], [1100, 500], [900, 500], [1000, 520]])
    anterior, posterior, whole = volume_estimates(np.array([1000, 505]), ("a", "p"), 0.001, runs)
    assert anterior.ml == pytest.approx(1.0) and anterior.runs_mean_ml == pytest.approx(1.0)
    assert anterior.sd_ml == pytest.approx(np.std([1.0, 1.1, 0.9, 1.0]))
    assert posterior.low_ml == pytest.approx(0.5) and posterior.high_ml == pytest.approx(0.5185)
    assert whole.ml == pytest.approx(1.505) and whole.sd_ml > 0
    assert "±" in anterior.text() and "mL" in anterior.text()


def test_a_segmentation_reports_its_volumes_in_ml(one_thread):
    torch_model = MedNCA(NCAConfig(channels=8, hidden=16, steps=(3, 3), input_size=(16, 16)))
    image = np.zeros((16, 16, 6), np.float32)
    image[4:12, 4:12] = 1.0
    result = segment(torch_model, Volume(image, ANISOTROPIC))
    (volume,) = result.volumes
    assert volume.ml == pytest.approx((result.labels.array == 1).sum() * 0.00075)


def test_per_slice_scores_do_not_explode_where_nothing_is_predicted():
    mass = np.array([0.5, 2.0, 300.0, 320.0, 310.0, 3.0, 0.0])
    std = np.array([0.4, 1.5, 30.0, 35.0, 200.0, 2.0, 0.0])
    scores = slice_scores(std, mass)
    nqm_per_slice = std / np.maximum(mass, 1.0)
    assert nqm_per_slice[0] > nqm_per_slice[3]  # what the per-slice NQM did: an empty end slice ranks high
    assert slices_to_check(scores, QualityCriteria(slice_check=0.5)) == [4]
    assert slices_to_check(slice_scores(np.zeros(3), np.zeros(3)), DEFAULT_CRITERIA) == []


def test_scattered_labels_are_measured_against_the_largest_piece():
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:8, 2:8, 2:8] = 1  # 216 voxels
    assert scattered_share(labels) == 0.0
    labels[15, 15, 15] = 2
    labels[18, 2, 10] = 1
    assert scattered_share(labels) == pytest.approx(2 / 218)
    assert scattered_share(np.zeros((3, 3, 3), np.uint8)) == 0.0


def test_the_verdict_names_its_reasons():
    criteria = QualityCriteria(nqm_check=0.1, nqm_fail=0.3, volume_cv_check=0.05, volume_cv_fail=0.2,
                               scatter_check=0.2)
    steady = np.array([3.0, 3.02, 2.98])
    assert judge(0.05, steady, 0.0, 500, criteria).level == "ok"
    unsure = judge(0.2, steady, 0.0, 500, criteria)
    assert unsure.level == "check" and "disagree on 20%" in unsure.reasons[0]
    failed = judge(0.5, steady, 0.0, 500, criteria)
    assert failed.level == "fail" and failed.headline == "likely failed"
    wobbly = judge(0.05, np.array([3.0, 4.0, 2.0]), 0.0, 500, criteria)
    assert wobbly.level == "fail" and "volume varies" in wobbly.reasons[0]
    assert judge(0.05, steady, 0.4, 500, criteria).level == "check"
    assert judge(0.0, None, 0.0, 0, criteria).reasons == ("nothing was segmented",)


def test_criteria_travel_in_the_model_file_and_are_checked(tmp_path):
    model = MedNCA(NCAConfig(channels=8, hidden=16, steps=(2, 2), input_size=(16, 16)))
    assert criteria_of(model.provenance) == DEFAULT_CRITERIA
    own = QualityCriteria(nqm_check=0.12, nqm_fail=0.25, calibration={"source": "test"})
    model.provenance["quality_criteria"] = own.to_dict()
    loaded = load_model_file(save_model(model, tmp_path / "m.safetensors"))
    assert criteria_of(loaded.provenance) == own
    with pytest.raises(MedNCAError, match="nqm_check"):
        QualityCriteria.from_dict({**own.to_dict(), "nqm_check": -1})
    with pytest.raises(MedNCAError, match="unknown"):
        QualityCriteria.from_dict({**own.to_dict(), "colour": "red"})
    with pytest.raises(MedNCAError, match="failing limit"):
        QualityCriteria(nqm_check=0.3, nqm_fail=0.2)


def test_a_quality_map_carries_volumes_runs_and_a_verdict(one_thread):
    model = MedNCA(NCAConfig(channels=8, hidden=16, steps=(3, 3), input_size=(16, 16), output_channels=2,
                             class_names=("a", "b")))
    image = np.random.default_rng(0).normal(size=(16, 16, 5)).astype(np.float32)
    report = quality_map(model, Volume(image, ANISOTROPIC), runs=3, seed=1)
    assert report.run_counts.shape == (3, 2)
    whole = report.volumes[-1]
    assert whole.name == "whole"
    assert whole.ml == pytest.approx((report.labels.array > 0).sum() * 0.00075)
    assert whole.runs_mean_ml == pytest.approx(report.run_counts.sum(1).mean() * 0.00075)
    assert report.verdict.level in ("ok", "check", "fail") and report.criteria == DEFAULT_CRITERIA


def test_the_shipped_model_carries_calibrated_limits_with_their_provenance():
    from mednca.registry import load_model

    criteria = criteria_of(load_model("hippocampus").provenance)
    assert criteria != DEFAULT_CRITERIA
    calibration = criteria.calibration
    assert calibration["runs"] == 10 and calibration["cases"] >= 5 and "none" in calibration["conditions"]
    assert calibration["sensitivity_failed"] == 1.0 and calibration["false_alarms_clean_good"] <= 0.1


@pytest.mark.slow
def test_a_clean_held_out_scan_is_ok_and_the_same_scan_with_a_spike_is_likely_failed(hippocampus_dir, one_thread):
    from mednca.artefacts import scan_under
    from mednca.registry import load_model
    from mednca.volume import read_volume

    model = load_model("hippocampus")
    scan = read_volume(hippocampus_dir / "imagesTr" / "hippocampus_056.nii.gz")  # held out from its training
    clean = quality_map(model, scan, runs=10, seed=0)
    assert clean.verdict.level == "ok" and clean.verdict.reasons == ()
    assert 3.0 < clean.volumes[-1].ml < 4.5  # the reference labels hold 3.73 mL
    # the robustness suite's spiked scan of this case, on which the model fails (Dice 0.41, NQM 0.73)
    spiked = quality_map(model, scan_under(scan, "hippocampus_056", "spike", 0), runs=10, seed=0)
    assert spiked.verdict.level == "fail" and spiked.verdict.headline == "likely failed"
    assert any("disagree" in reason for reason in spiked.verdict.reasons)
