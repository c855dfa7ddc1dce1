"""The Med-NCA network itself: its size, its randomness, and the fast update against the plain one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mednca.model import MedNCA, NCAConfig


def plain_step(level, x, fire, keep):
    """The authors' update written out: concatenation, dense layers on every cell, then the fire mask."""
    c = level.channels
    p0, p1 = level.perceive.weight[:c], level.perceive.weight[c:]
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    y = torch.cat([x, F.conv2d(xp, p0, level.perceive.bias[:c]), F.conv2d(xp, p1, level.perceive.bias[c:])], 1)
    dx = F.conv2d(F.relu(F.conv2d(y, level.fc0.weight, level.fc0.bias)), level.fc1.weight)
    dx = dx * fire[:, None].float()
    out = x + dx
    out[:, :keep] = x[:, :keep]
    return out


def test_default_model_has_the_papers_size():
    model = MedNCA()
    assert model.n_parameters == 70_016
    assert all(sum(p.numel() for p in b.parameters()) == 35_008 for b in model.backbones)


def test_fast_step_equals_the_plain_step():
    torch.manual_seed(0)
    level = MedNCA().backbones[1]
    for p in level.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    fire = torch.rand(3, 16, 16) > 0.5
    with torch.no_grad():
        torch.testing.assert_close(level.step(x, fire, 1), plain_step(level, x, fire, 1), rtol=1e-5, atol=1e-5)


def test_image_channel_is_never_updated_and_resting_cells_stay():
    torch.manual_seed(0)
    model = MedNCA()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    level = model.backbones[0]
    x = torch.randn(2, 32, 16, 16).contiguous(memory_format=torch.channels_last)
    fire = torch.rand(2, 16, 16) > 0.5
    with torch.no_grad():
        out = level.step(x, fire, 1)
    torch.testing.assert_close(out[:, 0], x[:, 0])
    torch.testing.assert_close(out.permute(0, 2, 3, 1)[~fire], x.permute(0, 2, 3, 1)[~fire])
    assert not torch.allclose(out.permute(0, 2, 3, 1)[fire], x.permute(0, 2, 3, 1)[fire])


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(1)
    model = MedNCA()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def test_same_seed_same_output_different_seed_differs(random_model):
    image = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = random_model(image, torch.Generator().manual_seed(3))
        b = random_model(image, torch.Generator().manual_seed(3))
        c = random_model(image, torch.Generator().manual_seed(4))
    assert a.shape == (2, 1, 64, 64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_per_item_generators_make_items_independent_of_the_batch(random_model):
    image = torch.rand(3, 1, 64, 64)
    seeded = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12)]  # noqa: E731
    with torch.no_grad():
        batch = random_model(image, seeded())
        alone = random_model(image[1:2], seeded()[1:2])
    torch.testing.assert_close(batch[1:2], alone, rtol=1e-5, atol=1e-5)


def test_iter_states_yields_every_step_of_every_level_and_can_stop_early(random_model):
    image = torch.rand(1, 1, 64, 64)
    seen = [(lv, st, tuple(s.shape[-2:])) for lv, st, s in random_model.iter_states(image)]
    assert seen == [(0, i, (16, 16)) for i in range(16)] + [(1, i, (64, 64)) for i in range(16)]
    states = random_model.iter_states(image)
    assert next(states)[:2] == (0, 0)
    states.close()


def test_configurable_architecture():
    cfg = NCAConfig(channels=16, hidden=32, levels=3, steps=(4, 4, 4), downscale=2, output_channels=2,
                    class_names=("a", "b"), input_size=(32, 32))
    model = MedNCA(cfg)
    with torch.no_grad():
        out = model(torch.rand(2, 1, 32, 32), torch.Generator().manual_seed(0))
    assert out.shape == (2, 2, 32, 32)
    assert [cfg.level_size(i) for i in range(3)] == [(8, 8), (16, 16), (32, 32)]


@pytest.mark.parametrize("bad", [dict(steps=(16,)), dict(output_channels=2), dict(input_size=(30, 30)),
                                 dict(fire_rate=1.5)])
def test_inconsistent_configs_are_refused(bad):
    with pytest.raises(ValueError):
        NCAConfig(**bad)
