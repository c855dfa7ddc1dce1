"""The two implementations of the Med-NCA step and the measured choice between them: both compute the same
update and the same gradients, the ``MEDNCA_STEP`` override is obeyed, and the remembered choice is per CPU,
torch version and thread count and survives a damaged cache file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mednca import step_paths
from mednca.errors import MedNCAError
from mednca.inference import torch_threads
from mednca.model import MedNCA, NCAConfig
from mednca.step_paths import CANDIDATES, PATHS, StepPathError, choose_path, label

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache file and an empty in-memory choice, with no override set."""
    path = tmp_path / "cache" / "step_paths.json"
    monkeypatch.setattr(step_paths, "cache_file", lambda: path)
    monkeypatch.setattr(step_paths, "_chosen", {})
    monkeypatch.delenv(step_paths.ENV, raising=False)
    return path


def random_level(channels=32, hidden=128, dtype=torch.float32):
    torch.manual_seed(0)
    level = MedNCA(NCAConfig(channels=channels, hidden=hidden)).backbones[1].to(dtype)
    for p in level.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return level


def state_and_fire(shape, channels, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((shape[0], channels, *shape[1:]), generator=gen, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last), torch.rand(shape, generator=gen) > 0.5


@pytest.mark.parametrize("shape, channels, hidden, keep, block", [
    ((3, 16, 16), 32, 128, 1, 1024),
    ((2, 64, 64), 32, 128, 1, 1024),
    ((2, 64, 64), 32, 128, 1, 100),  # many blocks, the last one partial
    ((2, 7, 12), 8, 16, 2, 1024),  # not square, not a power of two, two image channels
])
def test_both_paths_compute_the_same_step(shape, channels, hidden, keep, block):
    level = random_level(channels, hidden)
    x, fire = state_and_fire(shape, channels)
    with torch.no_grad():
        conv, gemm = level.step_conv(x, fire, keep), level.step_gemm(x, fire, keep, block)
    assert (conv - x).abs().max() > 0.1  # the step changed something
    assert (gemm - conv).abs().max() <= 1e-5 * conv.abs().max()
    torch.testing.assert_close(gemm[:, :keep], x[:, :keep], rtol=0, atol=0)
    resting = ~fire[:, None].expand_as(x)
    torch.testing.assert_close(gemm[resting], x[resting], rtol=0, atol=0)


def test_both_paths_have_the_same_gradients():
    """Training runs the same step under autograd (where the gemm path gathers differently): the update and
    the gradients for the state and every weight must agree."""
    level = random_level(dtype=torch.float64)
    x, fire = state_and_fire((2, 16, 16), 32, torch.float64)
    x.requires_grad_(True)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    outs, grads = {}, {}
    for path in PATHS:
        step = getattr(level, f"step_{path}")
        outs[path] = step(step(x, fire, 1), ~fire, 1)  # two steps: the gradient flows through a step too
        grads[path] = torch.autograd.grad((outs[path] * weights).square().sum(), [x, *level.parameters()])
    torch.testing.assert_close(outs["gemm"], outs["conv"], rtol=1e-9, atol=1e-9)
    for g_conv, g_gemm in zip(grads["conv"], grads["gemm"], strict=True):
        assert g_conv.abs().max() > 0
        torch.testing.assert_close(g_gemm, g_conv, rtol=1e-6, atol=1e-6 * float(g_conv.abs().max()))


def test_whole_model_gives_the_same_result_on_either_path(monkeypatch, cache):
    """32 steps with the same fire masks: the two paths' rounding differences stay far below a label change."""
    torch.manual_seed(2)
    model = MedNCA()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    image = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    logits = {}
    for path in PATHS:
        monkeypatch.setenv(step_paths.ENV, path)
        with torch.no_grad():
            logits[path] = model(image, torch.Generator().manual_seed(4))
    assert logits["conv"].abs().max() > 0.1
    assert (logits["gemm"] - logits["conv"]).abs().max() <= 1e-4 * logits["conv"].abs().max()


@pytest.mark.parametrize("path", PATHS)
def test_the_override_is_obeyed_without_measuring(path, cache, monkeypatch):
    monkeypatch.setenv(step_paths.ENV, path.upper())
    level = random_level()
    other = next(p for p in PATHS if p != path)
    monkeypatch.setattr(level, f"step_{other}", lambda *a: pytest.fail(f"step_{other} ran under the override"))
    x, fire = state_and_fire((1, 16, 16), 32)
    with torch.no_grad():
        level.step(x, fire, 1)
    assert choose_path(level, x)[0] == path
    assert not cache.exists()


@pytest.mark.parametrize("value", ["fast", "gemm,conv", "1"])
def test_an_invalid_override_is_refused_with_the_allowed_values(value, cache, monkeypatch):
    monkeypatch.setenv(step_paths.ENV, value)
    level = random_level()
    x, fire = state_and_fire((1, 16, 16), 32)
    with pytest.raises(StepPathError, match=rf"MEDNCA_STEP must be one of conv, gemm or auto, not '{value}'"):
        level.step(x, fire, 1)
    assert issubclass(StepPathError, MedNCAError)


def test_auto_measures_and_remembers_the_faster_path(cache):
    level = random_level(channels=8, hidden=16)
    x, _ = state_and_fire((1, 24, 24), 8)
    rng = torch.get_rng_state()
    with torch_threads(1):
        path = choose_path(level, x)
    torch.testing.assert_close(torch.get_rng_state(), rng, rtol=0, atol=0)  # the caller's random stream is untouched
    machines = json.loads(cache.read_text())["machines"]
    [(machine, workloads)] = machines.items()
    assert step_paths.cpu_name() in machine and torch.__version__ in machine and "1 threads" in machine
    [entry] = workloads.values()
    timings = entry["ms_per_step"]
    assert set(timings) == {label(*c) for c in CANDIDATES} and all(0 < t < math.inf for t in timings.values())
    assert label(*path) == entry["choice"] == min(timings, key=timings.get)
    assert path in CANDIDATES


def test_a_later_process_uses_the_cached_choice(cache, monkeypatch):
    level = random_level(channels=8, hidden=16)
    x, _ = state_and_fire((1, 24, 24), 8)
    with torch_threads(1):
        first = choose_path(level, x)
        monkeypatch.setattr(step_paths, "_chosen", {})  # a new process: nothing in memory
        monkeypatch.setattr(step_paths, "calibrate", lambda *a: pytest.fail("measured again"))
        assert choose_path(level, x) == first


def test_the_cache_is_per_cpu_torch_version_and_thread_count(cache, monkeypatch):
    level = random_level(channels=8, hidden=16)
    x, _ = state_and_fire((1, 24, 24), 8)
    measured = []
    calibrate = step_paths.calibrate
    monkeypatch.setattr(step_paths, "calibrate", lambda *a: measured.append(1) or calibrate(*a))

    def choose_in_new_process():
        monkeypatch.setattr(step_paths, "_chosen", {})
        return choose_path(level, x)

    with torch_threads(1):
        choose_in_new_process()
        choose_in_new_process()
        assert len(measured) == 1
        monkeypatch.setattr(step_paths, "cpu_name", lambda: "Another CPU")
        choose_in_new_process()
        assert len(measured) == 2
        monkeypatch.setattr(torch, "__version__", "9.9.9")
        choose_in_new_process()
        assert len(measured) == 3
    with torch_threads(2):
        choose_in_new_process()
    assert len(measured) == 4
    assert len(json.loads(cache.read_text())["machines"]) == 4


def damaged_entries():
    """Cache files that are not JSON, not the cache's format, or name a candidate that does not exist."""
    level = random_level(channels=8, hidden=16)
    x, _ = state_and_fire((1, 24, 24), 8)
    ours = step_paths.machine_key(1), step_paths.workload_key(level, x)
    return [
        "{not json", "[1, 2]", '{"format": 1, "machines": 3}', "",
        json.dumps({"format": 1, "machines": {ours[0]: {ours[1]: {"choice": "warp"}}}}),
        json.dumps({"format": 1, "machines": {ours[0]: {ours[1]: "gemm"}}}),
        json.dumps({"format": 1, "machines": {ours[0]: ["gemm"]}}),
    ]


@pytest.mark.parametrize("damage", damaged_entries())
def test_a_damaged_cache_file_is_ignored_and_rewritten(damage, cache):
    cache.parent.mkdir(parents=True)
    cache.write_text(damage)
    level = random_level(channels=8, hidden=16)
    x, _ = state_and_fire((1, 24, 24), 8)
    with torch_threads(1):
        choice = choose_path(level, x)
    assert choice in CANDIDATES
    entry = json.loads(cache.read_text())["machines"][step_paths.machine_key(1)][step_paths.workload_key(level, x)]
    assert entry["choice"] == label(*choice)


def test_a_cache_folder_that_cannot_be_written_still_chooses(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setattr(step_paths, "cache_file", lambda: blocker / "step_paths.json")
    monkeypatch.setattr(step_paths, "_chosen", {})
    monkeypatch.delenv(step_paths.ENV, raising=False)
    level = random_level(channels=8, hidden=16)
    x, fire = state_and_fire((1, 24, 24), 8)
    with torch.no_grad():
        out = level.step(x, fire, 1)
    assert out.shape == x.shape
