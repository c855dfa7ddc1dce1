"""The plugin's reader, writer, sample data and manifest, without a viewer: what napari gets from a file,
and that saving a layer puts it back on the scan's grid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mednca.datasets import phantom_paths
from mednca.errors import MedNCAError, VolumeError
from mednca.volume import read_volume
from napari_nca import _sample_data
from napari_nca._layers import volume_from_data
from napari_nca._reader import get_reader
from napari_nca._writer import write_image, write_labels

REPO = Path(__file__).resolve().parents[1]
# oblique, flipped, anisotropic: a geometry napari's scale/translate alone cannot carry
AFFINE = np.array([[-0.8, 0.1, 0.0, 40.0], [0.0, 0.9, 0.0, -12.5], [0.0, 0.0, 2.5, 7.0], [0, 0, 0, 1]])


def _nifti(path: Path, array: np.ndarray, affine=AFFINE) -> Path:
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _scan(tmp_path, name="scan.nii.gz") -> Path:
    rng = np.random.default_rng(0)
    return _nifti(tmp_path / name, rng.normal(100, 20, (12, 10, 8)).astype(np.float32))


def _layers(path):
    reader = get_reader(str(path))
    assert reader is not None, f"napari-nca should read {path}"
    return reader(str(path))


def test_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    assert get_reader(str(tmp_path / "notes.txt")) is None
    assert get_reader(str(tmp_path / "empty")) is None
    assert get_reader([str(_scan(tmp_path)), str(tmp_path / "notes.txt")]) is None


def test_scan_opens_as_image_with_spacing_and_origin(tmp_path):
    [(data, kwargs, kind)] = _layers(_scan(tmp_path))
    assert kind == "image" and kwargs["name"] == "scan" and data.shape == (12, 10, 8)
    np.testing.assert_allclose(kwargs["scale"], np.linalg.norm(AFFINE[:3, :3], axis=0))
    np.testing.assert_allclose(kwargs["translate"], AFFINE[:3, 3])
    np.testing.assert_allclose(kwargs["metadata"]["mednca_volume"].affine, AFFINE, atol=1e-6)  # float32 header


@pytest.mark.parametrize(
    ("name", "array"),
    [
        ("case_1.nii.gz", np.array([0, 1, 2], np.uint8)[np.indices((6, 5, 4)).sum(0) % 3]),  # few integer values
        ("liver_seg.nii.gz", (np.indices((6, 5, 4)).sum(0) % 2).astype(np.float32)),  # named, whole floats
    ],
)
def test_label_maps_open_as_labels(tmp_path, name, array):
    [(data, _, kind)] = _layers(_nifti(tmp_path / name, array))
    assert kind == "labels"
    assert np.issubdtype(data.dtype, np.integer)
    np.testing.assert_array_equal(data, array)


def test_broken_file_raises_a_clear_error(tmp_path):
    whole = _scan(tmp_path).read_bytes()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VolumeError, match="broken.nii.gz"):
        _layers(broken)


def test_dicom_series_folder_opens_with_its_spacing(tmp_path):
    from test_volume_io import write_dicom_series

    data = write_dicom_series(tmp_path / "series")
    [(array, kwargs, kind)] = _layers(tmp_path / "series")
    assert kind == "image" and kwargs["name"] == "series"
    np.testing.assert_array_equal(array, data.transpose())
    np.testing.assert_allclose(kwargs["scale"], (0.8, 0.9, 3.0), rtol=1e-5)


def test_one_dicom_file_opens_its_series_named_by_its_folder(tmp_path):
    from test_volume_io import write_dicom_series

    data = write_dicom_series(tmp_path / "series")
    [(array, kwargs, _)] = _layers(tmp_path / "series" / "slice000.dcm")
    assert kwargs["name"] == "series"
    np.testing.assert_array_equal(array, data.transpose())


def test_folder_that_looks_like_dicom_is_accepted_and_reports_damage(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    reader = get_reader(str(series))
    assert reader is not None
    with pytest.raises(VolumeError, match="series"):
        reader(str(series))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_saved_labels_keep_the_source_geometry(tmp_path, suffix):
    source = _scan(tmp_path)
    [(_, kwargs, _)] = _layers(source)
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[3:6, 2:7, 1:4] = 2
    meta = {"name": "scan segmentation", "scale": kwargs["scale"], "translate": kwargs["translate"],
            "metadata": kwargs["metadata"]}
    [written] = write_labels(str(tmp_path / f"seg{suffix}"), labels, meta)
    back = read_volume(written)
    np.testing.assert_allclose(back.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(back.array, labels)
    if suffix == ".nii.gz":
        assert nib.load(written).header.get_sform(coded=True)[1] == nib.load(source).header.get_sform(coded=True)[1]


def test_writer_refuses_to_overwrite_the_scan(tmp_path):
    source = _scan(tmp_path)
    before = source.read_bytes()
    [(data, kwargs, _)] = _layers(source)
    with pytest.raises(VolumeError, match="refusing to write over"):
        write_image(str(source), data * 0, {"metadata": kwargs["metadata"]})
    assert source.read_bytes() == before


def test_layer_without_metadata_is_saved_from_scale_and_translate(tmp_path):
    data = np.ones((4, 5, 6), np.float32)
    [written] = write_image(str(tmp_path / "map.nii.gz"), data, {"scale": (2.0, 3.0, 4.0), "translate": (1, 2, 3)})
    np.testing.assert_allclose(nib.load(written).affine, [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])


def test_a_4d_layer_is_refused_with_its_shape():
    with pytest.raises(VolumeError, match=r"4 dimensions"):
        volume_from_data(np.zeros((2, 3, 4, 5)), None)


def test_phantom_sample_gives_scan_and_reference_labels():
    (image, image_kwargs, image_kind), (labels, _, labels_kind) = _sample_data.phantom()
    assert (image_kind, labels_kind) == ("image", "labels")
    assert image.shape == labels.shape
    assert set(np.unique(labels)) == {0, 1, 2}
    assert image_kwargs["metadata"]["mednca_volume"].source == phantom_paths()[0]


def test_decathlon_sample_offline_says_how_to_get_the_data(monkeypatch):
    def offline(*_, **__):
        raise MedNCAError("could not download https://example (no network?)")

    monkeypatch.setattr(_sample_data, "fetch_decathlon_case", offline)
    with pytest.raises(MedNCAError, match="no network"):
        _sample_data.decathlon_case()


def test_manifest_is_valid_and_every_command_resolves():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_file(REPO / "napari_nca" / "napari.yaml")
    for command in manifest.contributions.commands:
        module, attribute = command.python_name.split(":")
        assert hasattr(import_module(module), attribute), command.python_name


@pytest.mark.parametrize("name", ["scan.nii.gz", "SCAN.NII.GZ", "Scan.nrrd", "IM0001.DCM", "series/slice.dcm"])
def test_napari_offers_the_reader_for_scan_files_in_either_case(name):
    npe2 = pytest.importorskip("npe2")
    manager = npe2.PluginManager()
    manager.register(npe2.PluginManifest.from_file(REPO / "napari_nca" / "napari.yaml"))
    assert [r.command for r in manager.iter_compatible_readers([name])] == ["napari-nca.get_reader"]
    assert not list(manager.iter_compatible_readers(["photo.tif"]))


def test_engine_imports_no_gui_code():
    beside_python = Path(sys.executable).parent / "lint-imports"
    lint = str(beside_python) if beside_python.exists() else shutil.which("lint-imports")
    if lint is None:
        pytest.skip("import-linter is not installed")
    result = subprocess.run([lint], cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
