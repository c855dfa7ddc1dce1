"""Model files: our safetensors format round-trips exactly, and foreign, damaged or altered files (weights or
metadata) are refused with a message naming the problem, without ever unpickling anything."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mednca.checkpoint import (
    UnprotectedMetadataWarning,
    import_reference,
    load_model_file,
    model_digest,
    read_metadata,
    save_model,
    weights_digest,
)
from mednca.errors import CheckpointError
from mednca.model import MedNCA, NCAConfig
from mednca.preprocess import Preprocessing


@pytest.fixture
def small_model():
    torch.manual_seed(0)
    cfg = NCAConfig(channels=8, hidden=16, steps=(2, 2), input_size=(16, 16), output_channels=2,
                    class_names=("anterior", "posterior"))
    return MedNCA(cfg, preprocessing=Preprocessing(percentiles=(1.0, 99.0)), provenance={"note": "test"})


def test_round_trip_keeps_weights_architecture_and_metadata(tmp_path, small_model):
    path = save_model(small_model, tmp_path / "m.safetensors")
    loaded = load_model_file(path)
    assert loaded.config == small_model.config
    assert loaded.preprocessing == small_model.preprocessing
    assert loaded.provenance == {"note": "test"}
    for (k, a), (_, b) in zip(small_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert read_metadata(path)["architecture"]["class_names"] == ["anterior", "posterior"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left behind


def test_altered_weights_are_refused(tmp_path, small_model):
    path = save_model(small_model, tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits in the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_model_file(path)


def test_truncated_file_is_refused(tmp_path, small_model):
    path = save_model(small_model, tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="m.safetensors"):
        load_model_file(path)


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a Med-NCA model"):
        load_model_file(path)


def write_model_file(path, tensors, meta, digest):
    """A model file written by hand, with the digest that ``digest`` computes."""
    meta = {**meta, "sha256": digest(tensors, meta) if digest is model_digest else digest(tensors)}
    save_file(tensors, str(path), metadata={"mednca": json.dumps(meta)})
    return path


def file_contents(path):
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["mednca"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_metadata_that_lies_about_the_architecture_is_refused(tmp_path, small_model):
    meta = {"format": "mednca", "format_version": 2, "architecture": MedNCA().config.to_dict(),
            "preprocessing": Preprocessing().to_dict(), "provenance": {}}
    tensors = {k: v.contiguous() for k, v in small_model.state_dict().items()}
    path = write_model_file(tmp_path / "m.safetensors", tensors, meta, model_digest)
    with pytest.raises(CheckpointError, match="shape"):
        load_model_file(path)


TAMPERING = [
    ("architecture", "class_names", ["liver", "tumour"]),
    ("preprocessing", "axis", 0),
    ("architecture", "steps", [2, 40]),
    ("architecture", "fire_rate", 0.25),
    ("preprocessing", "percentiles", [5.0, 95.0]),
]


@pytest.mark.parametrize(("section", "field", "value"), TAMPERING, ids=[t[1] for t in TAMPERING])
def test_edited_metadata_is_refused(tmp_path, small_model, section, field, value):
    """Plausible edits that would load and segment wrongly: the digest covers the metadata (format 2)."""
    path = save_model(small_model, tmp_path / "m.safetensors")
    meta, tensors = file_contents(path)
    meta[section][field] = value
    save_file(tensors, str(path), metadata={"mednca": json.dumps(meta)})
    for read in (load_model_file, read_metadata):
        with pytest.raises(CheckpointError, match="^m.safetensors: the weights and metadata do not match their "
                                                  "checksum; the file was altered or damaged$"):
            read(path)


def test_the_digest_does_not_depend_on_how_the_json_is_laid_out(tmp_path, small_model):
    path = save_model(small_model, tmp_path / "m.safetensors")
    meta, tensors = file_contents(path)
    relaid = json.dumps(dict(reversed(meta.items())), indent=3)
    save_file(tensors, str(path), metadata={"mednca": relaid})
    assert load_model_file(path).config == small_model.config


def test_format_1_files_load_with_a_warning_and_are_still_checked(tmp_path, small_model):
    """Models saved before format 2: weights verified, metadata checked against the schema only."""
    meta = {"format": "mednca", "format_version": 1, "architecture": small_model.config.to_dict(),
            "preprocessing": {"axis": 2, "resize": "bicubic", "percentiles": [1.0, 99.0], "scope": "slice"},
            "provenance": {"note": "old"}}
    tensors = {k: v.contiguous() for k, v in small_model.state_dict().items()}
    path = write_model_file(tmp_path / "old.safetensors", tensors, meta, weights_digest)
    with pytest.warns(UnprotectedMetadataWarning, match="^old.safetensors is a format 1 model file: its weights"):
        loaded = load_model_file(path)
    assert loaded.config == small_model.config and loaded.preprocessing == small_model.preprocessing
    resaved, _ = file_contents(save_model(loaded, tmp_path / "new.safetensors"))
    assert resaved["format_version"] == 2  # saving again protects it
    bad = {**meta, "architecture": {**meta["architecture"], "downscale": 0}}
    write_model_file(path, tensors, bad, weights_digest)
    with pytest.raises(CheckpointError, match="^old.safetensors: architecture.downscale must be an integer from 2"):
        load_model_file(path)
    write_model_file(path, {**tensors, "backbones.0.fc0.bias": tensors["backbones.0.fc0.bias"] + 1}, meta,
                     lambda t: weights_digest(tensors))
    with pytest.raises(CheckpointError, match="^old.safetensors: the weights do not match their checksum"):
        load_model_file(path)


@pytest.mark.parametrize("version", [3, 0, "2", True])
def test_unknown_format_versions_are_refused(tmp_path, small_model, version):
    path = save_model(small_model, tmp_path / "m.safetensors")
    meta, tensors = file_contents(path)
    write_model_file(path, tensors, {**meta, "format_version": version}, model_digest)
    with pytest.raises(CheckpointError, match="newer napari-nca" if version == 3 else "format_version must be"):
        load_model_file(path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_a_pickle_is_never_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(CheckpointError):
        load_model_file(path)
    folder = tmp_path / "authors"
    folder.mkdir()
    (folder / "config.dt").write_text(json.dumps([{"channel_n": 32}]))
    torch.save({"x": _Exploit()}, folder / "model0.pth")
    with pytest.raises(CheckpointError, match="model0.pth"):
        import_reference(folder)
    assert "pickle code ran" not in capsys.readouterr().out


def test_missing_file_and_wrong_suffix(tmp_path, small_model):
    with pytest.raises(CheckpointError, match="not found"):
        load_model_file(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match=".safetensors"):
        save_model(small_model, tmp_path / "m.pth")


def test_import_of_the_authors_checkpoint(reference_dir, tmp_path):
    model = import_reference(reference_dir)
    assert model.n_parameters == 70_016
    assert model.config.steps == (16, 16) and model.config.input_size == (64, 64)
    assert model.provenance["licence"] == "MIT"
    # kernels are transposed: the authors convolve a channels-last state after transpose(1, 3)
    p0 = torch.load(reference_dir / "model0.pth", map_location="cpu", weights_only=True)["p0.weight"]
    torch.testing.assert_close(model.backbones[0].perceive.weight[:32], p0.transpose(-1, -2))
    reloaded = load_model_file(save_model(model, tmp_path / "ref.safetensors"))
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = model(image, torch.Generator().manual_seed(0))
        b = reloaded(image, torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_import_of_a_foreign_checkpoint_names_the_problem(reference_dir, tmp_path):
    folder = tmp_path / "foreign"
    shutil.copytree(reference_dir, folder)
    torch.save({"conv.weight": torch.zeros(3, 3)}, folder / "model1.pth")
    with pytest.raises(CheckpointError, match="model1.pth is not a Med-NCA backbone"):
        import_reference(folder)
    (folder / "config.dt").write_text("not json")
    with pytest.raises(CheckpointError, match="config.dt"):
        import_reference(folder)


@pytest.mark.filterwarnings("error")  # format 2: weights and metadata verified, so no warning
def test_every_shipped_model_loads_offline_with_what_a_user_needs_to_know():
    from mednca.registry import DEFAULT_MODEL, list_models, load_model

    shipped = {entry.name: entry for entry in list_models() if entry.source == "shipped"}
    assert {DEFAULT_MODEL, "hippocampus_msd"} <= set(shipped)
    held_out = set()
    for name, entry in shipped.items():
        meta, tensors = file_contents(entry.path)
        assert meta["format_version"] == 2 and meta["sha256"] == model_digest(tensors, meta)
        model = load_model(name)  # verifies the weights and metadata against their recorded digest
        assert model.config.class_names == ("anterior", "posterior")
        assert sum(p.numel() for p in model.parameters()) <= 70_016
        prov = model.provenance
        assert "CC-BY-SA" in prov["licence_of_weights_data"] and prov["validation_dice_native"]["whole"] > 0.85
        held_out.add(tuple(prov["validation_cases"]))
    assert len(held_out) == 1  # both were validated on the same cases, so their scores compare
    for entry in shipped.values():  # so a user choosing between them sees how each did
        assert f"whole Dice {entry.metadata['provenance']['validation_dice_native']['whole']:.3f}" in entry.summary

