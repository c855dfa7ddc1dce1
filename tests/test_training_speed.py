"""The faster training paths compute what the plain ones do: the level-1 window read from the coarse state
gives the loss and gradients of cutting it out of the whole upsampled state, bit for bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from training_support import TINY

from mednca.model import MedNCA, NCAConfig
from mednca.training import HIPPOCAMPUS, _crop, crop_forward, segmentation_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def plain_crop_forward(model, images, origins, crop, gen):
    """The training forward as it was first written: the whole state upsampled, each window cut from it."""
    cfg = model.config
    k = cfg.input_channels
    state = None
    for level, backbone in enumerate(model.backbones):
        size = cfg.level_size(level)
        img = images if size == tuple(images.shape[-2:]) else F.interpolate(
            images, size=size, mode="bilinear", align_corners=False
        )
        if state is None:
            state = img.new_zeros((img.shape[0], cfg.channels, *size))
        else:
            state = F.interpolate(state, scale_factor=cfg.downscale, mode="nearest")
        if level == cfg.levels - 1:
            state, img = plain_crop(state, origins, crop), plain_crop(img, origins, crop)
        state = state.contiguous(memory_format=torch.channels_last)
        state[:, :k] = img
        for _ in range(cfg.steps[level]):
            rand = torch.rand((img.shape[0], *img.shape[-2:]), generator=gen)
            state = backbone.step(state, rand > cfg.fire_rate, k)
    return state[:, k : k + cfg.output_channels]


def plain_crop(x, origins, size):
    return torch.stack([x[b, :, r : r + size, c : c + size] for b, (r, c) in enumerate(origins.tolist())])


def loss_and_grads(forward, model, images, labels, origins, crop, crop_labels):
    model.zero_grad(set_to_none=True)
    logits = forward(model, images, origins, crop, torch.Generator().manual_seed(5))
    logits = logits[0] if isinstance(logits, tuple) else logits
    loss = segmentation_loss(logits, crop_labels(labels, origins, crop))
    loss.backward()
    return loss.detach(), logits.detach(), [p.grad.clone() for p in model.parameters()]


def random_batch(config: NCAConfig, batch: int, crop: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    h, w = config.input_size
    images = torch.rand((batch, config.input_channels, h, w), generator=gen)
    labels = (torch.rand((batch, config.output_channels, h, w), generator=gen) > 0.6).float()
    origins = torch.stack((torch.randint(h - crop + 1, (batch,), generator=gen),
                           torch.randint(w - crop + 1, (batch,), generator=gen)), 1)
    origins[0] = torch.tensor([h - crop, w - crop])  # the corners, where the coarse cells run out
    origins[-1] = 0
    return images, labels, origins


@pytest.mark.parametrize(("config", "batch", "crop"), [
    (HIPPOCAMPUS, 8, 16), (HIPPOCAMPUS, 3, 32), (HIPPOCAMPUS, 2, 64), (HIPPOCAMPUS, 5, 13),
    (TINY, 6, 8), (TINY, 4, 5), (TINY, 3, 2), (TINY, 2, 16),
])
def test_window_from_the_coarse_state_is_bit_identical(config, batch, crop):
    model = MedNCA(config)
    with torch.no_grad():  # the defaults start with small updates: make the windows' contents matter
        for p in model.parameters():
            p.mul_(3)
    images, labels, origins = random_batch(config, batch, crop, seed=batch * 100 + crop)
    ours = loss_and_grads(crop_forward, model, images, labels, origins, crop, _crop)
    plain = loss_and_grads(plain_crop_forward, model, images, labels, origins, crop, plain_crop)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], plain[2], strict=True))
    assert all(g.abs().sum() > 0 for g in ours[2])  # every weight of both levels got a gradient
