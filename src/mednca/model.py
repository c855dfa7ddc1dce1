"""The Med-NCA network: one small local update rule per level, run for many stochastic steps.

The state is kept channels-first ``[B, C, H, W]`` throughout. Channel 0..input_channels-1 hold the image
and are never updated; the next ``output_channels`` channels are the logits. Each step:

    perception = concat(state, conv3x3_a(state), conv3x3_b(state))    # reflect padding, 3*C channels
    update     = fc1(relu(fc0(perception)))                           # per pixel, hidden units
    state     += update * fire_mask                                   # a random subset of cells fires

The two perception convolutions are stored as one 3x3 convolution with 2*C outputs, and the per-pixel
layers as 1x1 convolutions. A step is run either as that convolution followed by matrix products on the
firing cells, or with the (linear) perception folded into fc0, as one matrix product on the firing cells'
3x3 neighbourhoods; ``step_paths`` measures which is faster on the computer at hand. Both are the paper's
function. Randomness comes only from the ``torch.Generator`` handed in, so a seed fixes the result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .model_schema import check_architecture, check_inputs
from .preprocess import Preprocessing
from .step_paths import GEMM_ROWS, choose_path


@dataclass(frozen=True)
class NCAConfig:
    """Architecture of a Med-NCA model. The defaults are the paper's hippocampus model (70,016 parameters)."""

    channels: int = 32
    hidden: int = 128
    input_channels: int = 1
    output_channels: int = 1
    levels: int = 2
    steps: tuple[int, ...] = (16, 16)
    fire_rate: float = 0.5
    downscale: int = 4
    input_size: tuple[int, int] = (64, 64)
    class_names: tuple[str, ...] = field(default=("foreground",))

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        check_architecture(self.to_dict())  # the rules a model file is held to: every config can be saved

    def level_size(self, level: int) -> tuple[int, int]:
        """Slice size processed by ``level`` (0 is the coarsest)."""
        factor = self.downscale ** (self.levels - 1 - level)
        return (self.input_size[0] // factor, self.input_size[1] // factor)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> NCAConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown architecture fields: {sorted(unknown)}")
        return cls(**d)


class NCALevel(nn.Module):
    """One backbone: the local rule of one level (35,008 parameters with the defaults).

    The state is a ``[B, C, H, W]`` tensor in channels-last memory, so that its ``[B*H*W, C]`` view is
    free and the per-pixel layers are plain matrix products. Only the cells that fire change, so the
    per-pixel layers run only on them: about half the cells at the paper's fire rate, which saves a
    quarter of the arithmetic without changing the result.
    """

    def __init__(self, channels: int = 32, hidden: int = 128):
        super().__init__()
        self.channels = channels
        # p0 and p1 of the paper, stacked: outputs [0, C) are p0, [C, 2C) are p1.
        self.perceive = nn.Conv2d(channels, 2 * channels, kernel_size=3, bias=True)
        self.fc0 = nn.Conv2d(3 * channels, hidden, kernel_size=1, bias=True)
        self.fc1 = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def step(self, x: torch.Tensor, fire: torch.Tensor, keep: int) -> torch.Tensor:
        """One stochastic step. ``fire`` is a ``[B, H, W]`` bool mask of the cells that update;
        the first ``keep`` channels (the image) never change. Runs the implementation measured fastest on
        this computer for this shape (``step_paths``); they all compute the same function."""
        path, rows = choose_path(self, x)
        if path == "conv":
            return self.step_conv(x, fire, keep)
        return self.step_gemm(x, fire, keep, rows * torch.get_num_threads())

    def step_conv(self, x: torch.Tensor, fire: torch.Tensor, keep: int) -> torch.Tensor:
        """The step with the perception as one 3x3 convolution over every cell (oneDNN), then fc0 and fc1 on
        the firing cells: 2*9*C*C multiply-adds per cell plus (3C*hidden + hidden*C) per firing cell."""
        c = self.channels
        y = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.perceive.weight, self.perceive.bias)
        cells = to_rows(x)
        idx = fire.reshape(-1).nonzero().squeeze(1)
        w0 = self.fc0.weight[:, :, 0, 0]
        # fc0 on concat(state, perception), split in two products so no 96-channel copy is made.
        h = torch.addmm(self.fc0.bias, cells.index_select(0, idx), w0[:, :c].t())
        h = h.addmm_(to_rows(y).index_select(0, idx), w0[:, c:].t()).relu_()
        dx = h @ self.fc1.weight[:, :, 0, 0].t()
        dx[:, :keep] = 0
        out = x.clone(memory_format=torch.channels_last)
        to_rows(out).index_add_(0, idx, dx)
        return out

    def step_gemm(self, x: torch.Tensor, fire: torch.Tensor, keep: int, block: int | None = None) -> torch.Tensor:
        """The step as matrix products on the firing cells only: the perception is linear, so it folds into
        fc0 (``folded_fc0``), and each firing cell's reflect-padded 3x3 neighbourhood, gathered as one row of
        9*C values, goes through one product with the folded weight: (9C*hidden + hidden*C) multiply-adds
        per firing cell, none for resting ones (23% fewer than ``step_conv`` at fire rate 0.5 with the
        defaults). Without autograd it works in blocks of ``block`` firing cells (default ``GEMM_ROWS`` per
        thread), so that the gathered rows stay in the CPU caches: the best size depends on their sizes (on
        one host 1024 per thread took 15% less time than 4096). Under autograd it gathers once, which keeps
        its backward pass as fast as ``step_conv``'s."""
        c = self.channels
        h, w = x.shape[-2:]
        w0, b0 = self.folded_fc0()
        w1t = F.pad(self.fc1.weight[keep:, :, 0, 0].t(), (keep, 0))  # zero columns: the image stays as it is
        padded = to_rows(F.pad(x, (1, 1, 1, 1), mode="reflect"))
        idx = fire.reshape(-1).nonzero().squeeze(1)
        # the row of each firing cell's top-left neighbour in the padded state: 2 more per row above it,
        # 2 * (w + 2) more per image before it
        corner = idx.add(idx.div(w, rounding_mode="floor"), alpha=2)
        corner.add_(idx.div(h * w, rounding_mode="floor"), alpha=2 * (w + 2))
        if torch.is_grad_enabled():
            # one gather of the 9 neighbours' rows: the gradient of a gather allocates its source's size
            # at every call, and the gradient of overlapping rows is slow
            parts, block = 9, idx.numel() or 1
            offsets = (torch.arange(3)[:, None] * (w + 2) + torch.arange(3)).reshape(-1)
        else:
            # overlapping rows of 3 horizontal neighbours (3C contiguous values in the channels-last padded
            # state): a third of the index, longer copies
            parts, offsets = 3, torch.arange(3) * (w + 2)
            padded = padded.reshape(-1).as_strided((padded.shape[0] - 2, 3 * c), (c, 1))
            block = block or GEMM_ROWS * torch.get_num_threads()
        windows = corner[:, None].add(offsets.to(x.device)).reshape(-1)
        out = x.clone(memory_format=torch.channels_last)
        cells = to_rows(out)
        for start in range(0, idx.numel(), block):
            rows = padded.index_select(0, windows[parts * start : parts * (start + block)]).view(-1, 9 * c)
            hidden = torch.addmm(b0, rows, w0.t()).relu_()
            # the cell's new state: its old state (the centre of its window) plus fc1's update
            cells.index_copy_(0, idx[start : start + block], torch.addmm(rows[:, 4 * c : 5 * c], hidden, w1t))
        return out

    def folded_fc0(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fc0 applied to concat(state, perception) as one ``[hidden, 9*C]`` weight on a cell's 3x3
        neighbourhood (rows of the window top to bottom, left to right, C channels each) and a bias: the
        state's own weight sits at the centre, the perception's weight is multiplied through the 3x3
        kernels, and the perception's bias goes into fc0's bias. Differentiable in the parameters."""
        c = self.channels
        w0 = self.fc0.weight[:, :, 0, 0]
        folded = torch.einsum("ho,ocij->hijc", w0[:, c:], self.perceive.weight)
        centre = F.pad(w0[:, None, None, :c], (0, 0, 1, 1, 1, 1))  # [hidden, 3, 3, C], zero off the centre
        return (folded + centre).reshape(w0.shape[0], 9 * c), torch.addmv(self.fc0.bias, w0[:, c:], self.perceive.bias)


def to_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` channels-last tensor -> its ``[B*H*W, C]`` view (one row per cell)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class MedNCA(nn.Module):
    """Multi-level Med-NCA: the coarse level runs on the downscaled image, its state is upsampled and
    handed to the next level together with the image at that level's resolution."""

    def __init__(
        self,
        config: NCAConfig | None = None,
        preprocessing: Preprocessing | None = None,
        provenance: dict | None = None,
        **overrides,
    ):
        super().__init__()
        if config is None:
            config = NCAConfig(**overrides)
        elif overrides:
            config = NCAConfig(**{**config.to_dict(), **overrides})
        self.config = config
        # How inputs must be prepared and where the weights came from travel with the weights; without a
        # preprocessing, the defaults with as many neighbouring slices as the input channels hold.
        self.preprocessing = preprocessing or Preprocessing(context=(config.input_channels - 1) // 2)
        check_inputs(config.input_channels, self.preprocessing.context)
        self.provenance = dict(provenance or {})
        self.backbones = nn.ModuleList(NCALevel(config.channels, config.hidden) for _ in range(config.levels))

    @property
    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _image_pyramid(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The image at every level's size, coarsest first (bilinear, as the authors downscale)."""
        cfg = self.config
        return [
            image if cfg.level_size(lv) == tuple(image.shape[-2:])
            else F.interpolate(image, size=cfg.level_size(lv), mode="bilinear", align_corners=False)
            for lv in range(cfg.levels)
        ]

    def iter_states(
        self,
        image: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        steps: tuple[int, ...] | None = None,
        fire_rate: float | None = None,
    ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Run the automaton, yielding ``(level, step, state)`` after every step.

        ``image`` is ``[B, input_channels, H, W]`` at ``config.input_size``. The yielded state is the live
        tensor: copy what you keep. Stopping the iteration early stops the computation.
        ``generator`` may be one generator per batch item: each item's fire masks then depend on its own
        generator alone, so a slice gives the same result whatever else is in the batch.
        """
        cfg = self.config
        steps = cfg.steps if steps is None else tuple(steps)
        fire_rate = cfg.fire_rate if fire_rate is None else float(fire_rate)
        if image.ndim != 4 or image.shape[1] != cfg.input_channels:
            raise ValueError(f"image must be [B, {cfg.input_channels}, H, W], got {tuple(image.shape)}")
        if tuple(image.shape[-2:]) != cfg.input_size:
            raise ValueError(f"image slices must be {cfg.input_size}, got {tuple(image.shape[-2:])}")
        k = cfg.input_channels
        pyramid = self._image_pyramid(image)
        state = None
        for level, (backbone, n_steps) in enumerate(zip(self.backbones, steps, strict=True)):
            img = pyramid[level]
            if state is None:
                state = img.new_zeros((img.shape[0], cfg.channels, *img.shape[-2:]))
            else:
                state = F.interpolate(state, scale_factor=cfg.downscale, mode="nearest")
            state = state.contiguous(memory_format=torch.channels_last)
            state[:, :k] = img
            for step in range(n_steps):
                # a cell fires where its draw exceeds the fire rate, as in the authors' code
                rand = _uniform((img.shape[0], *img.shape[-2:]), generator, img.device)
                state = backbone.step(state, rand > fire_rate, k)
                yield level, step, state

    def forward(
        self,
        image: torch.Tensor,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        steps: tuple[int, ...] | None = None,
        fire_rate: float | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, output_channels, H, W]`` after all levels."""
        for _, _, state in self.iter_states(image, generator, steps, fire_rate):  # noqa: B007 (the last one)
            pass
        k = self.config.input_channels
        return state[:, k : k + self.config.output_channels]


def _uniform(shape: tuple[int, ...], generator, device) -> torch.Tensor:
    """Uniform draws for a batch, from one generator or from one generator per batch item."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.rand(shape[1:], generator=g, device=device) for g in generator])
