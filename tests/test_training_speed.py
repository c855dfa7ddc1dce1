"""The faster training paths compute what the plain ones do: the level-1 window read from the coarse state
gives the loss and gradients of cutting it out of the whole upsampled state, bit for bit; processes sharing
a batch get the whole batch's loss and gradient, train as one process does, and resume from checkpoints."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from training_support import TINY, toy_case

from mednca.data_parallel import WORKER_NAME, BatchShare
from mednca.errors import MedNCAError
from mednca.model import MedNCA, NCAConfig
from mednca.preprocess import Preprocessing
from mednca.progress import run_to_end
from mednca.training import (
    HIPPOCAMPUS,
    Recipe,
    crop_forward,
    crop_windows,
    new_model,
    segmentation_loss,
    train_iter,
)

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
    ours = loss_and_grads(crop_forward, model, images, labels, origins, crop, crop_windows)
    plain = loss_and_grads(plain_crop_forward, model, images, labels, origins, crop, plain_crop)
    assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])
    assert all(torch.equal(a, b) for a, b in zip(ours[2], plain[2], strict=True))
    assert all(g.abs().sum() > 0 for g in ours[2])  # every weight of both levels got a gradient


# --------------------------------------------------------------------------------------- data-parallel


def shared_batch_grads(model, images, labels, origins, crop, share=None, whole=0.0):
    """Loss and summed gradients of one batch, computed by this process's share of it (all of it without
    ``share``), the way a training step does."""
    model.zero_grad(set_to_none=True)
    part = slice(None) if share is None else share.part(len(images))
    logits, _ = crop_forward(model, images, origins, crop, torch.Generator().manual_seed(7), part)
    loss = segmentation_loss(logits, crop_windows(labels[part], origins[part], crop), share, whole)
    loss.backward()
    if share is not None:
        share.sum_gradients(model.parameters())
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def in_threads(size, fn):
    """``fn(share)`` on ``size`` ranks of one gloo group, each in a thread of this process."""
    store = dist.HashStore()
    results = [None] * size

    def run(rank):
        group = dist.ProcessGroupGloo(store, rank, size, timedelta(seconds=60))
        results[rank] = fn(BatchShare(group, rank, size))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def relative_error(a, b):
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("size", "batch", "whole"), [(2, 6, 0.0), (2, 5, 0.0), (3, 7, 0.0), (2, 6, 2.5)])
def test_shares_of_a_batch_add_up_to_the_whole_batch_gradient(size, batch, whole):
    """In float64 the processes' summed shares are the whole batch's gradient (to 1e-12). In float32 they are
    as close to it as one process's float32 gradient is: 32 automaton steps amplify float32 rounding to
    between 1e-7 and about 1e-4 of the gradient, depending on the weights and the batch, for one process and
    several alike (measured over 12 initialisations: the shares' error at most 1.31 times one process's)."""
    model = new_model(HIPPOCAMPUS, Preprocessing(), seed=batch)
    images, labels, origins = random_batch(HIPPOCAMPUS, batch, 16, seed=batch)
    exact_loss, exact = shared_batch_grads(copy.deepcopy(model).double(), images.double(), labels.double(),
                                           origins, 16, whole=whole)
    one_loss, one = shared_batch_grads(copy.deepcopy(model), images, labels, origins, 16, whole=whole)
    own = relative_error(one, exact)  # one process's float32 rounding
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 2 * own + 1e-6)):
        shares = in_threads(size, lambda share, dtype=dtype: shared_batch_grads(
            copy.deepcopy(model).to(dtype), images.to(dtype), labels.to(dtype), origins, 16, share, whole))
        for loss, grads in shares:  # every process holds the whole batch's loss and gradient
            assert loss.item() == pytest.approx(exact_loss.item(), rel=max(tolerance, 1e-5))
            assert relative_error(grads, exact) < tolerance
        assert all(torch.equal(a, b) for a, b in zip(shares[0][1], shares[-1][1], strict=True))
    assert one_loss.item() == pytest.approx(exact_loss.item(), rel=1e-5)


@pytest.fixture(scope="module")
def toy():
    return [toy_case(s) for s in range(6)]


def run(toy, **kw):
    args = dict(config=TINY, recipe=Recipe(lr=1e-2, warmup=3, crop=8), iterations=8, batch_size=5,
                val_fraction=0.34, eval_every=4, log_every=1, eval_slices=None)
    return train_iter(toy, **{**args, **kw})


def finish(gen):
    events = []
    result = run_to_end(gen, events.append)
    return events, result


@pytest.fixture(scope="module")
def two_worker_run(toy):
    return finish(run(toy, workers=2))


def workers_alive() -> list:
    return [p for p in mp.active_children() if p.name.startswith(WORKER_NAME)]


def test_two_processes_train_as_one(toy, two_worker_run):
    events, model = two_worker_run
    one_events, one = finish(run(toy))
    losses = [e.loss for e in events if e.kind == "step"]
    assert losses == pytest.approx([e.loss for e in one_events if e.kind == "step"], rel=1e-4)
    for a, b in zip(model.parameters(), one.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert not workers_alive()  # the worker ended with the run


def until_checkpoint(toy, ckpt):
    """A 2-worker run saving its state every 3 iterations, stopped at its first checkpoint event: the open
    generator and that event."""
    gen = run(toy, workers=2, checkpoint_path=ckpt, checkpoint_every=3)
    for event in gen:
        if event.kind == "checkpoint":
            return gen, event
    raise AssertionError("the run saved no checkpoint")


def test_a_data_parallel_run_resumes_from_its_checkpoint(toy, two_worker_run, tmp_path):
    ckpt = tmp_path / "state.safetensors"
    gen, event = until_checkpoint(toy, ckpt)
    gen.close()  # cancelled: the worker is ended, not left waiting
    assert event.iteration == 3 and not workers_alive()
    events, resumed = finish(run(toy, workers=2, checkpoint_path=ckpt, checkpoint_every=3, resume=True))
    assert events[0].iteration == 4
    straight = two_worker_run[1]
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), straight.parameters(), strict=True))


def test_worker_count_is_checked(toy):
    for workers in (0, 6):
        with pytest.raises(MedNCAError, match="worker processes"):
            next(run(toy, workers=workers))


def test_a_killed_worker_stops_the_run_with_an_error_and_the_checkpoint_resumes(toy, two_worker_run, tmp_path):
    ckpt = tmp_path / "state.safetensors"
    gen, _ = until_checkpoint(toy, ckpt)
    (worker,) = workers_alive()
    os.kill(worker.pid, signal.SIGKILL)
    with pytest.raises(MedNCAError, match="another training process ended"):
        for _ in gen:
            pass
    _, resumed = finish(run(toy, workers=2, checkpoint_path=ckpt, checkpoint_every=3, resume=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), two_worker_run[1].parameters(), strict=True))


KILLED_RUN = """
import sys
import torch.multiprocessing as mp
from training_support import TINY, toy_case
from mednca.data_parallel import WORKER_NAME
from mednca.training import Recipe, train_iter
run = train_iter([toy_case(s) for s in range(6)], config=TINY, recipe=Recipe(crop=8), iterations=10**9,
                 batch_size=4, val_fraction=0.34, eval_every=10**9, log_every=1, workers=2)
next(run)
print(*[p.pid for p in mp.active_children() if p.name.startswith(WORKER_NAME)], flush=True)
for _ in run:
    pass
"""


def test_a_worker_whose_first_process_is_killed_ends_with_one_line(tmp_path):
    """The first process of a 2-process run (the one the user started) is killed: the other ends at once,
    saying why in one line, without a traceback."""
    tests = os.path.dirname(__file__)
    run = subprocess.Popen([sys.executable, "-c", KILLED_RUN], cwd=tests, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
                           env={**os.environ, "PYTHONPATH": tests})
    assert int(run.stdout.readline()) > 0  # the worker started
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    err = run.stderr.read()  # reaches its end when the worker, which shares the pipe, has ended
    assert "mednca training process 1: stopped: another training process ended" in err
    assert "Traceback" not in err and "pair.cc" not in err  # gloo's source location is no help to a user
