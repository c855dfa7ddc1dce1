"""What a model file or the authors' config.dt may say: absurd or mistyped values are refused with one line
naming the field before anything is built, and text a file carries cannot print fake lines or escapes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mednca.checkpoint import import_reference, load_model_file, model_digest, read_metadata, save_model
from mednca.errors import CheckpointError
from mednca.model import MedNCA, NCAConfig
from mednca.preprocess import Preprocessing


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(0)
    cfg = NCAConfig(channels=8, hidden=16, steps=(2, 2), input_size=(16, 16), output_channels=2,
                    class_names=("anterior", "posterior"))
    return save_model(MedNCA(cfg, provenance={"source": "test"}), tmp_path / "model.safetensors")


def craft(path, edit):
    """Edit the metadata of a model file and give it a matching digest, as anyone can: the schema, not the
    digest, has to stop what the edit says."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["mednca"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta)
    meta["sha256"] = model_digest(tensors, meta)
    save_file(tensors, str(path), metadata={"mednca": json.dumps(meta)})
    return path


def setter(section, field, value):
    def edit(meta):
        meta[section][field] = value
    return edit


ABSURD = [
    ("architecture", "downscale", 0, "architecture.downscale must be an integer from 2 to 16, got 0"),
    ("architecture", "steps", [0, 0], "architecture.steps must be a list of 2 integers from 1 to 1000"),
    ("architecture", "steps", [16], "architecture.steps must be a list of 2 integers"),
    ("architecture", "steps", [16.5, 16], "architecture.steps must be a list of 2 integers"),
    ("architecture", "input_size", [0, 0], "architecture.input_size must be a list of two integers from 4 to 1024"),
    ("architecture", "input_size", [30, 30], "architecture.input_size must be divisible by"),
    ("architecture", "hidden", 1e10, "architecture.hidden must be an integer from 1 to 4096, got 10000000000.0"),
    ("architecture", "hidden", "128", "architecture.hidden must be an integer"),
    ("architecture", "channels", 10**6, "architecture.channels must be an integer from 2 to 1024"),
    ("architecture", "levels", True, "architecture.levels must be an integer"),
    ("architecture", "fire_rate", 1.5, "architecture.fire_rate must be a number from 0 to below 1"),
    ("architecture", "fire_rate", "0.5", "architecture.fire_rate must be a number"),
    ("architecture", "output_channels", 3, "architecture.class_names must be a list of 3 distinct names"),
    ("architecture", "input_channels", 2, "architecture.input_channels must be an odd integer from 1 to 7"),
    ("architecture", "input_channels", 3, "architecture.input_channels is 3, but preprocessing.context 0"),
    ("architecture", "class_names", ["liver", "liver"], "architecture.class_names must be a list of 2 distinct"),
    ("architecture", "class_names", ["", "tumour"], "architecture.class_names must be"),
    ("architecture", "class_names", ["x" * 65, "tumour"], "architecture.class_names must be"),
    ("preprocessing", "axis", 3, "preprocessing.axis must be 0, 1 or 2, got 3"),
    ("preprocessing", "resize", "lanczos", "preprocessing.resize must be one of bicubic, bilinear, nearest, area"),
    ("preprocessing", "percentiles", [99.5, 0.5], "preprocessing.percentiles must be two numbers"),
    ("preprocessing", "percentiles", [0.5], "preprocessing.percentiles must be two numbers"),
    ("preprocessing", "scope", "batch", "preprocessing.scope must be one of slice, volume"),
    ("preprocessing", "orientation", "RAX", "preprocessing.orientation must be three axis codes"),
    ("preprocessing", "orientation", "RRS", "preprocessing.orientation must be three axis codes"),
    ("preprocessing", "context", -1, "preprocessing.context must be an integer from 0 to 8, got -1"),
    ("preprocessing", "context", 1, "architecture.input_channels is 1, but preprocessing.context 1 (neighbouring"),
]


@pytest.mark.parametrize(("section", "field", "value", "message"), ABSURD, ids=[f"{a[1]}={a[2]!r:.20}" for a in ABSURD])
def test_absurd_metadata_is_refused_in_one_line_naming_the_field(model_file, section, field, value, message):
    craft(model_file, setter(section, field, value))
    for read in (load_model_file, read_metadata):
        with pytest.raises(CheckpointError) as err:
            read(model_file)
        text = str(err.value)
        assert text.startswith(f"model.safetensors: {message}"), text
        assert "\n" not in text


SECTION_EDITS = [
    (lambda meta: meta["architecture"].pop("steps"), "architecture lacks steps"),
    (lambda meta: meta["preprocessing"].update(window=3), "preprocessing has unknown fields: window"),
    (lambda meta: meta.update(provenance="me"), "provenance must be an object, got 'me'"),
    (lambda meta: meta.update(architecture=[]), "architecture must be an object, got []"),
]


@pytest.mark.parametrize(("edit", "message"), SECTION_EDITS, ids=[m for _, m in SECTION_EDITS])
def test_missing_unknown_and_mistyped_sections_are_named(model_file, edit, message):
    craft(model_file, edit)
    with pytest.raises(CheckpointError) as err:
        load_model_file(model_file)
    assert str(err.value) == f"model.safetensors: {message}"


@pytest.mark.parametrize("orientation", ["LPS", "ASL", "RAS"])
def test_any_valid_orientation_is_accepted_and_kept(model_file, orientation):
    craft(model_file, setter("preprocessing", "orientation", orientation))
    assert load_model_file(model_file).preprocessing.orientation == orientation


def test_a_file_without_orientation_means_ras(model_file):
    craft(model_file, lambda meta: meta["preprocessing"].pop("orientation", None))
    assert load_model_file(model_file).preprocessing == Preprocessing(orientation="RAS")


@pytest.mark.parametrize("name", ["\x1b[31mliver\x1b[0m", "liver\nmednca: model OK", "tumour\r", "\u202eruomut"])
def test_class_names_with_control_characters_are_refused(model_file, name):
    craft(model_file, lambda meta: meta["architecture"].update(class_names=[name, "posterior"]))
    with pytest.raises(CheckpointError, match="architecture.class_names must be") as err:
        load_model_file(model_file)
    assert str(err.value).isprintable()  # the bad name is shown escaped
    with pytest.raises(ValueError, match="class_names"):  # and no model can be made with one, so none is saved
        NCAConfig(output_channels=2, class_names=(name, "posterior"))


def test_a_claimed_huge_architecture_allocates_nothing(model_file):
    craft(model_file, lambda meta: meta["architecture"].update(channels=1024, hidden=4096, levels=8,
                                                               steps=[1] * 8, downscale=2, input_size=[1024, 1024]))
    with pytest.raises(CheckpointError, match="^model.safetensors: weights do not fit the architecture"):
        load_model_file(model_file)


def test_listings_show_a_files_text_escaped_on_one_line(model_file, tmp_path, monkeypatch, capsys):
    from mednca.cli import main
    from mednca.registry import list_models

    craft(model_file, lambda meta: meta["provenance"].update(source="\x1b[2J\nmednca: all checks passed"))
    user = tmp_path / "user_models"
    user.mkdir()
    model_file.rename(user / "evil.safetensors")
    monkeypatch.setenv("MEDNCA_MODELS_DIR", str(user))
    (entry,) = [e for e in list_models() if e.source == "user"]
    assert entry.summary.isprintable() and "\\x1b[2J\\nmednca: all checks passed" in entry.summary
    for command in (["models"], ["info", "evil"]):
        assert main(command) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out and "\nmednca: all checks passed" not in out


@pytest.mark.parametrize("recorded", [{"whole": "0.99"}, {"whole": None}, "0.99", {"whole": True}])
def test_a_summary_leaves_out_a_dice_that_is_not_a_number(model_file, recorded):
    from mednca.registry import ModelEntry

    craft(model_file, lambda meta: meta["provenance"].update(validation_dice_native=recorded))
    entry = ModelEntry("m", model_file, "user", read_metadata(model_file))
    assert entry.summary == "m [user] classes: anterior, posterior; test"


# --- the authors' config.dt ---


@pytest.fixture
def authors_folder(tmp_path):
    """A small checkpoint in the authors' layout: 8 channels, 16 hidden units, 4x4 and 16x16 levels."""
    folder = tmp_path / "authors"
    folder.mkdir()
    torch.manual_seed(0)
    for level in range(2):
        torch.save({"p0.weight": torch.randn(8, 8, 3, 3), "p0.bias": torch.randn(8),
                    "p1.weight": torch.randn(8, 8, 3, 3), "p1.bias": torch.randn(8),
                    "fc0.weight": torch.randn(16, 24), "fc0.bias": torch.randn(16),
                    "fc1.weight": torch.randn(8, 16)}, folder / f"model{level}.pth")
    write_config(folder)
    return folder


def write_config(folder, **changes):
    cfg = {"channel_n": 8, "hidden_size": 16, "input_channels": 1, "output_channels": 1, "inference_steps": 4,
           "cell_fire_rate": 0.5, "input_size": [[4, 4], [16, 16]], "model_path": "anywhere", **changes}
    (folder / "config.dt").write_text(json.dumps([cfg]))


def test_a_valid_small_authors_checkpoint_imports(authors_folder):
    model = import_reference(authors_folder)
    assert model.config.steps == (4, 4) and model.config.input_size == (16, 16) and model.config.downscale == 4
    assert model.config.class_names == ("hippocampus",)


BAD_CONFIG = [
    ("channel_n", "32", "channel_n must be an integer from 2 to 1024, got '32'"),
    ("hidden_size", 1e10, "hidden_size must be an integer from 1 to 4096"),
    ("input_channels", 3, "input_channels must be 1"),
    ("output_channels", 3, "output_channels must be 1 (the authors' hippocampus model segments one class), got 3"),
    ("inference_steps", -5, "inference_steps must be an integer from 1 to 1000, got -5"),
    ("inference_steps", [16, 16], "inference_steps must be an integer"),
    ("cell_fire_rate", None, "cell_fire_rate must be a number from 0 to below 1, got None"),
    ("cell_fire_rate", 2, "cell_fire_rate must be a number from 0 to below 1, got 2"),
    ("input_size", [[4, 4], [16, 12]], "input_size must be a list of 1 to 8 [height, width] pairs"),
    ("input_size", [[0, 0], [64, 64]], "input_size must be a list"),
    ("input_size", "64x64", "input_size must be a list"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD_CONFIG, ids=[f"{b[0]}={b[1]!r}" for b in BAD_CONFIG])
def test_bad_authors_config_is_refused_in_one_line_naming_the_field(authors_folder, field, value, message):
    write_config(authors_folder, **{field: value})
    with pytest.raises(CheckpointError) as err:
        import_reference(authors_folder)
    text = str(err.value)
    assert text.startswith(f"config.dt: {message}") and "\n" not in text, text


def test_authors_weights_that_do_not_fit_their_config_are_named(authors_folder):
    write_config(authors_folder, channel_n=16)
    with pytest.raises(CheckpointError, match=r"model0.pth: p0.weight is \(8, 8, 3, 3\), but config.dt "
                                              r"\(channel_n 16, hidden_size 16\) needs a float tensor"):
        import_reference(authors_folder)
    write_config(authors_folder)
    torch.save({**torch.load(authors_folder / "model1.pth"), "fc0.bias": [0.0] * 16}, authors_folder / "model1.pth")
    with pytest.raises(CheckpointError, match="model1.pth: fc0.bias is list"):
        import_reference(authors_folder)
