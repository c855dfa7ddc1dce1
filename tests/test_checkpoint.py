"""Model files: our safetensors format round-trips exactly, and foreign, damaged or altered files are refused
with a message naming the problem, without ever unpickling anything."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mednca.checkpoint import import_reference, load_model_file, read_metadata, save_model
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


def test_metadata_that_lies_about_the_architecture_is_refused(tmp_path, small_model):
    path = tmp_path / "m.safetensors"
    meta = {"format": "mednca", "format_version": 1, "architecture": MedNCA().config.to_dict(),
            "preprocessing": Preprocessing().to_dict(), "provenance": {}, "sha256": ""}
    tensors = {k: v.contiguous() for k, v in small_model.state_dict().items()}
    from mednca.checkpoint import weights_digest

    meta["sha256"] = weights_digest(tensors)
    save_file(tensors, str(path), metadata={"mednca": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="shape"):
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


def test_every_shipped_model_loads_offline_with_what_a_user_needs_to_know():
    from mednca.registry import DEFAULT_MODEL, list_models, load_model

    shipped = {entry.name: entry for entry in list_models() if entry.source == "shipped"}
    assert {DEFAULT_MODEL, "hippocampus_msd"} <= set(shipped)
    held_out = set()
    for name in shipped:
        model = load_model(name)  # verifies the weights against their recorded digest
        assert model.config.class_names == ("anterior", "posterior")
        assert sum(p.numel() for p in model.parameters()) <= 70_016
        prov = model.provenance
        assert "CC-BY-SA" in prov["licence_of_weights_data"] and prov["validation_dice_native"]["whole"] > 0.85
        held_out.add(tuple(prov["validation_cases"]))
    assert len(held_out) == 1  # both were validated on the same cases, so their scores compare
    for entry in shipped.values():  # so a user choosing between them sees how each did
        assert f"whole Dice {entry.metadata['provenance']['validation_dice_native']['whole']:.3f}" in entry.summary

