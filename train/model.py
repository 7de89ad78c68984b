"""The ASTAR captioner: stage two of ``ASTAR-NOTES.md``, in the order the paper presents it.

Alignment of pool2..pool4 onto pool5's grid (eq. 4), spatiotemporal attention shared across the
aligned layers (eq. 5), abstraction-level attention over the layers (eq. 6) with a soft (eq. 7)
or hard (eq. 8) context, and the LSTM decoder whose first word comes from fc7 (eqs. 1-3).

The variants of the paper's tables (``fc7``, ``pool2``..``pool5``, ``soft``, ``hard``) are one
code path: the variant only decides which layers are attended (none, one or all) and whether the
layer weights are beta itself or a one-hot draw from it.

Every decoder uses the same two calls: ``prepare`` does the per-video work once (alignment, the
``W_aα â_i`` projection, the location mask, ``h_1`` from fc7) and ``step`` advances one word.
Captions of one video share its prepared ``Context`` through ``Context.index_select``.

Notation used in the shape comments and docstrings:

    B  videos in a batch            N  decoder rows (captions, captions x samples, beams)
    C  channels of a C3D layer      T  time steps of a C3D layer (padded to the batch maximum)
    L  attended layers              F  aligned feature size (pool5's channels)
    T5 pool5 time steps             I  spatiotemporal locations, T5 * 4 * 4 with 112-pixel frames
    H  LSTM units                   M  word-embedding size
    A  attention size               V  vocabulary size
    S  caption length (tokens, end-of-sentence included)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from astar.store.geometry import BACKBONES, MIN_FRAMES, POOL_LAYERS, TIME_STRIDES
from astar.train.hard import vimco_surrogate

# The C3D facts (layers, strides, widths, minimum frames) come from the one place that defines
# them; the captioner's defaults are sized for the paper's "c3d" and the CPU "c3d-small".
C3D_LAYER_CHANNELS = BACKBONES["c3d"].tap_channels()
C3D_FC_DIM = BACKBONES["c3d"].fc
C3D_SMALL_LAYER_CHANNELS = BACKBONES["c3d-small"].tap_channels()
C3D_SMALL_FC_DIM = BACKBONES["c3d-small"].fc
VARIANTS = ("fc7", *POOL_LAYERS, "soft", "hard")


def at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32 when autocast made it bf16/fp16; float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class CaptionerConfigError(ValueError):
    """A captioner configuration (or pretrained embedding) that cannot describe a model."""


class CaptionerInputError(ValueError):
    """A feature batch or caption batch that does not fit the model it is given to."""


# --------------------------------------------------------------------------------------------
# Configuration and inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionerConfig:
    """Every size and switch of the captioner; the defaults are the paper's (ASTAR-NOTES)."""

    vocab_size: int  # V: words of the vocabulary, pad (0) and end-of-sentence (1) included
    variant: str = "soft"  # one of VARIANTS: which layers are attended and how (paper Tables 1-2)
    layer_channels: dict[str, int] = field(default_factory=lambda: dict(C3D_LAYER_CHANNELS))
    # ^ channels of each stored pool layer (from the feature store's schema)
    fc_dim: int = C3D_FC_DIM  # size of a_{L+1}, the mean fc7 vector
    feature_dim: int | None = None  # F, the aligned size; None: pool5's channels (resolved)
    hidden_dim: int = 512  # H, LSTM units
    embed_dim: int = 300  # M, word-embedding size (word2vec-sized)
    attention_dim: int = 512  # A, hidden size of the attention MLPs of eqs. 5 and 6
    dropout: float = 0.5  # dropout on h_t before the output matrix V, t >= 2 (not on h_1)
    samples: int = 10  # K, layer-choice samples per caption for the hard bound (eq. 10)
    hard_inference: Literal["argmax", "sample"] = "argmax"  # hard layer choice when not training
    init_range: float = 0.01  # non-recurrent weights start U[-init_range, init_range]
    fc7_norm: Literal["standardize", "none"] = "standardize"  # a_{L+1} z-scored per dimension
    # ^ with the training set's mean and std (set_fc7_statistics); the paper is silent. Raw fc7
    #   vectors of different videos are nearly parallel, and C a_{L+1} starts too small to tell
    #   them apart: without it even the fc7 baseline learns only a language model.
    feature_norm: Literal["batch", "none"] = "batch"  # aligned channels normalised over locations
    # ^ the paper is silent; without it the alignment convs outgrow the LSTM and the attention
    #   stays uniform (see LocationNorm)
    pad_id: int = 0  # token that pads captions to a common length; never predicted
    eos_id: int = 1  # end-of-sentence token; predicted and counted in the loss (eq. 3)

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise CaptionerConfigError("invalid captioner config: " + "; ".join(problems))
        # A private copy: the caller's dict changing later must not change a frozen config.
        object.__setattr__(self, "layer_channels", dict(self.layer_channels))
        if self.feature_dim is None:
            object.__setattr__(self, "feature_dim", self.layer_channels["pool5"])

    def _problems(self) -> list[str]:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        unknown = sorted(set(self.layer_channels) - set(POOL_LAYERS))
        if unknown:
            problems.append(f"unknown layers {unknown} in layer_channels (known: {POOL_LAYERS})")
        if any(c < 1 for c in self.layer_channels.values()):
            problems.append(f"layer_channels must be positive, got {self.layer_channels}")
        if self.variant.startswith("pool") and self.variant not in self.layer_channels:
            problems.append(f"variant {self.variant} needs {self.variant} in layer_channels")
        if self.variant in ("soft", "hard") and not self.layer_channels:
            problems.append(f"variant {self.variant} needs at least one layer in layer_channels")
        if self.feature_dim is None and "pool5" not in self.layer_channels:
            problems.append("feature_dim must be given when pool5 is not in layer_channels")
        pool5 = self.layer_channels.get("pool5")
        if self.feature_dim is not None and pool5 is not None and self.feature_dim != pool5:
            problems.append(
                f"feature_dim {self.feature_dim} differs from pool5's {pool5} channels, but "
                "pool5 is aligned by identity (eq. 4)"
            )
        if self.vocab_size <= max(self.pad_id, self.eos_id) or self.pad_id == self.eos_id:
            problems.append(
                f"vocab_size {self.vocab_size} must hold distinct pad_id {self.pad_id} and "
                f"eos_id {self.eos_id}"
            )
        sizes = (self.fc_dim, self.hidden_dim, self.embed_dim, self.attention_dim)
        if min(sizes) < 1:
            problems.append(f"fc/hidden/embed/attention sizes must be positive, got {sizes}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.variant == "hard" and self.samples < 2:
            problems.append(f"hard attention needs samples K >= 2 for VIMCO, got {self.samples}")
        if self.hard_inference not in ("argmax", "sample"):
            problems.append(f"hard_inference must be 'argmax' or 'sample': {self.hard_inference!r}")
        if self.init_range <= 0:
            problems.append(f"init_range must be positive, got {self.init_range}")
        if self.fc7_norm not in ("standardize", "none"):
            problems.append(f"fc7_norm must be 'standardize' or 'none': {self.fc7_norm!r}")
        if self.feature_norm not in ("batch", "none"):
            problems.append(f"feature_norm must be 'batch' or 'none': {self.feature_norm!r}")
        return problems

    @classmethod
    def small(
        cls,
        vocab_size: int,
        variant: str = "soft",
        layer_channels: dict[str, int] | None = None,
        fc_dim: int = C3D_SMALL_FC_DIM,
        **overrides: Any,
    ) -> CaptionerConfig:
        """A CPU-sized model over the quarter-width "c3d-small" backbone (or given channels)."""
        # K stays the paper's 10: with K = 4 the demo's beta got too weak a VIMCO learning signal
        # and stayed uniform (entropy 1.33 of log 4 = 1.39 nats after 9 epochs; K = 10: 0.75).
        sizes = {"hidden_dim": 128, "embed_dim": 64, "attention_dim": 64, "samples": 10}
        channels = dict(C3D_SMALL_LAYER_CHANNELS if layer_channels is None else layer_channels)
        return cls(
            vocab_size=vocab_size,
            variant=variant,
            layer_channels=channels,
            fc_dim=fc_dim,
            **{**sizes, **overrides},
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionerConfig:
        """Rebuild from ``to_dict`` output (e.g. a checkpoint), refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise CaptionerConfigError(f"unknown captioner config keys {unknown}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def attended_layers(self) -> tuple[str, ...]:
        """The layers whose aligned features are attended, in POOL_LAYERS order (l = 1..L)."""
        if self.variant == "fc7":
            return ()
        if self.variant in ("soft", "hard"):
            return tuple(name for name in POOL_LAYERS if name in self.layer_channels)
        return (self.variant,)

    @property
    def hard(self) -> bool:
        """Whether the layer choice is a draw from beta (eq. 8) rather than beta itself (eq. 7)."""
        return self.variant == "hard"


@dataclass
class FeatureBatch:
    """The C3D features of B videos, as the loader hands them to ``Captioner.prepare``."""

    layers: dict[str, Tensor]  # "pool2".."pool5" -> (B, C, T, h, w), zero-padded in time
    n_frames: Tensor  # (B,) long: frames fed to C3D (>= 16); layer poolk has n_frames // 2^(k-1)
    fc7: Tensor  # (B, D_fc): the mean of the video's clip fc7 vectors, a_{L+1}

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> FeatureBatch:
        """Move to ``device``; ``dtype`` (optional) converts the float features only."""
        return FeatureBatch(
            layers={name: x.to(device=device, dtype=dtype) for name, x in self.layers.items()},
            n_frames=self.n_frames.to(device=device),
            fc7=self.fc7.to(device=device, dtype=dtype),
        )

    @property
    def batch_size(self) -> int:
        return self.n_frames.shape[0]


@dataclass(frozen=True)
class Context:
    """Per-video work of ``prepare``, one row per decoder row; select rows to share it."""

    initial_hidden: Tensor  # (N, H): h_1 = tanh(C a_{L+1}) (eq. 1)
    locations: Tensor | None  # (N, I, L, F): aligned features â_i; None for fc7
    projected: Tensor | None  # (N, I, A): W_aα â_i + b, the part of eq. 5 fixed over t
    mask: Tensor | None  # (N, I) bool: True where a location is inside the video
    grid: tuple[int, int, int] | None  # (T5, h, w): how the I locations unflatten ('(t h w)')

    def __len__(self) -> int:
        return self.initial_hidden.shape[0]

    def index_select(self, index: Tensor) -> Context:
        """Rows ``index`` (e.g. each caption's video): shares, never recomputes, the alignment."""

        def pick(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.index_select(0, index)

        return Context(
            initial_hidden=pick(self.initial_hidden),  # (N', H)
            locations=pick(self.locations),  # (N', I, L, F)
            projected=pick(self.projected),  # (N', I, A)
            mask=pick(self.mask),  # (N', I)
            grid=self.grid,
        )

    def at_least_float32(self) -> Context:
        """The float tensors in float32 at least (bf16 from autocast), float64 kept."""

        def widen(x: Tensor | None) -> Tensor | None:
            if x is None or not x.is_floating_point():
                return x
            return at_least_float32(x)

        return Context(
            initial_hidden=widen(self.initial_hidden),
            locations=widen(self.locations),
            projected=widen(self.projected),
            mask=self.mask,
            grid=self.grid,
        )

    def repeat_interleave(self, repeats: int) -> Context:
        """Each row ``repeats`` times in a row (samples or beams of one caption/video)."""
        rows = torch.arange(len(self), device=self.initial_hidden.device)  # (N,)
        return self.index_select(rows.repeat_interleave(repeats))  # (N * repeats, ...)


@dataclass(frozen=True)
class DecoderState:
    """The LSTM state (h_t, c_t) between two ``step`` calls."""

    hidden: Tensor  # (N, H)
    cell: Tensor  # (N, H)

    def index_select(self, index: Tensor) -> DecoderState:
        """Reorder or repeat rows (beam search)."""
        return DecoderState(self.hidden.index_select(0, index), self.cell.index_select(0, index))


@dataclass(frozen=True)
class TeacherForcing:
    """Log-probabilities of given captions under the model, step by step."""

    token_log_probs: Tensor  # (N, S): log p(y_t | y_<t, A), 0 at padding
    layer_log_probs: Tensor | None  # (N, S-1): log beta_{t, m_t} for t = 2..S (hard), 0 at padding
    layers: Tensor | None  # (N, S-1) long: the layer m_t chosen at t = 2..S (hard)
    layer_entropy: Tensor | None = None  # (): mean entropy of beta_t (nats) over the words t >= 2


@dataclass(frozen=True)
class CaptionLoss:
    """What a training step minimises, and what it logs."""

    loss: Tensor  # (): mean of per_caption
    per_caption: Tensor  # (n,): -log p(Y|A) (eq. 3); hard in training: value -L^K, VIMCO grad
    n_tokens: Tensor  # (): target tokens counted (end-of-sentence included, padding not)
    layer_entropy: Tensor | None = None  # (): mean entropy of beta_t, detached; None without beta


# --------------------------------------------------------------------------------------------
# Alignment (eq. 4)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignmentSpec:
    """How one C3D layer is brought onto pool5's grid (the table of ASTAR-NOTES, stage two)."""

    frame_stride: int  # frames per time step of the layer: valid steps = n_frames // stride
    kernel: int | None  # cubic conv3d kernel; None: identity (pool5)
    padding: int  # conv3d zero padding, same on t, h, w
    pool: int  # max-pool kernel = stride, same on t, h, w
    pool_padding: tuple[int, int, int]  # (t, h, w): makes the windows pool5's own windows


# Per layer: the cubic conv kernel and padding, and the pool padding that makes its windows
# pool5's own; time strides come from C3D's geometry, and the pool kernel is the factor that
# brings a layer's steps onto pool5's (pool2: 16 / 2 = 8).
_ALIGNMENT_CONVS = {
    "pool2": (7, 3, (0, 4, 4)),
    "pool3": (5, 2, (0, 2, 2)),
    "pool4": (3, 1, (0, 1, 1)),
    "pool5": (None, 0, (0, 0, 0)),
}
ALIGNMENT = {
    name: AlignmentSpec(
        frame_stride=TIME_STRIDES[name],
        kernel=kernel,
        padding=padding,
        pool=TIME_STRIDES["pool5"] // TIME_STRIDES[name],
        pool_padding=pool_padding,
    )
    for name, (kernel, padding, pool_padding) in _ALIGNMENT_CONVS.items()
}


class LocationNorm(nn.Module):
    """Batch normalisation of every aligned channel (l, f) over the valid locations of a batch.

    Not in the paper, which is silent on feature scales; two failures without it:

    - Adam moves every weight by about the learning rate per step whatever the fan-in, so an
      alignment conv with fan-in C * k^3 (44k for pool2 at full width) soon outputs features in
      the tens, which saturate the LSTM gates: the attention variants then learn nothing.
    - What every location of every video shares (the background's response, a channel's offset)
      dominates â_i, so W_aα â_i is nearly the same at all locations, tanh saturates on it, and
      the attention stays uniform (mean pooling). Removing each channel's mean over locations
      leaves what differs between them, which is what attention must choose by.

    Statistics come from the valid locations of the batch in training and from running averages
    (buffers, kept in checkpoints) otherwise, so batched and per-video results agree at inference.
    """

    def __init__(self, n_layers: int, feature_dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.gain = nn.Parameter(torch.ones(n_layers, feature_dim))  # (L, F)
        self.shift = nn.Parameter(torch.zeros(n_layers, feature_dim))  # (L, F)
        self.register_buffer("running_mean", torch.zeros(n_layers, feature_dim))  # (L, F)
        self.register_buffer("running_var", torch.ones(n_layers, feature_dim))  # (L, F)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.gain)
        nn.init.zeros_(self.shift)
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def forward(self, locations: Tensor, mask: Tensor) -> Tensor:
        """(B, I, L, F) features, (B, I) valid locations -> (B, I, L, F) normalised."""
        # Statistics in float32 at least (bf16 under autocast); float64 stays float64.
        locations = at_least_float32(locations)
        if self.training:
            weight = rearrange(mask, "b i -> b i 1 1").to(locations.dtype)  # (B, I, 1, 1)
            sums = torch.stack(
                [
                    (locations * weight).sum(dim=(0, 1)),  # (L, F)
                    (locations.square() * weight).sum(dim=(0, 1)),  # (L, F)
                    weight.sum().expand(locations.shape[2:]),  # (L, F): valid locations
                ]
            )  # (3, L, F)
            sums = _sum_over_ranks(sums)  # data-parallel ranks normalise as one batch
            count = sums[2]  # (L, F)
            mean = sums[0] / count  # (L, F)
            var = (sums[1] / count - mean.square()).clamp_min(0.0)  # (L, F)
            with torch.no_grad():
                unbiased = var * count / (count - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        normalised = (locations - mean) * torch.rsqrt(var + self.eps)  # (B, I, L, F)
        return normalised * self.gain + self.shift


def _sum_over_ranks(values: Tensor) -> Tensor:
    """``values`` summed over the data-parallel ranks (differentiably); as is without DDP."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(values)
    return values


def _runs_in_bf16(x: Tensor) -> bool:
    """Whether a CPU convolution of ``x`` runs in bf16 (bf16 input, or bf16 autocast)."""
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def conv3d_exact(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)``, with a correct weight gradient in CPU bf16 for inputs shorter than the kernel.

    oneDNN's CPU bf16 backward-weights kernel (PyTorch 2.13) returns wrong values (relative
    error 0.8-1.2 against fp32, sometimes inf/NaN, different from run to run) and can corrupt
    the heap ("double free or corruption") when an input dimension d satisfies 2 <= d < kernel:
    pool3 (k = 5) at T = 2..4 and pool4 (k = 3) at T = 2, shapes that videos of 16-31 frames
    produce. Forward and input gradients are right. Zero frames appended up to the kernel size
    and the output cropped back give exactly the same values (the conv's own padding is zeros
    too, and an output step only sees inputs within half a kernel of it), and the kernel is
    then right (relative error 3e-3, bf16's own). fp32 and GPU runs are left untouched.
    """
    return padded_conv3d(conv, x) if _runs_in_bf16(x) else conv(x)


def padded_conv3d(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)`` computed on ``x`` zero-padded after its end to at least the kernel size in
    every dimension, then cropped back: the same values (see ``conv3d_exact``)."""
    sizes = x.shape[2:]  # (T, h, w)
    short = [max(0, k - d) for d, k in zip(sizes, conv.kernel_size, strict=True)]
    if not any(short):
        return conv(x)
    padded = F.pad(x, (0, short[2], 0, short[1], 0, short[0]))  # zeros after the end
    return conv(padded)[:, :, : sizes[0], : sizes[1], : sizes[2]]


class FeatureAlignment(nn.Module):
    """Eq. 4: â_l = maxpool(ReLU(conv3d(a_l))) for pool2..pool4, â_L = a_L for pool5; then
    (``feature_norm="batch"``) every channel normalised over locations (LocationNorm)."""

    def __init__(
        self,
        layer_channels: dict[str, int],
        layers: tuple[str, ...],
        feature_dim: int,
        normalise: bool = True,
    ):
        super().__init__()
        self.layers = layers
        self.norm = LocationNorm(len(layers), feature_dim) if normalise else None
        self.convs = nn.ModuleDict(
            {
                name: nn.Conv3d(
                    layer_channels[name],
                    feature_dim,
                    kernel_size=ALIGNMENT[name].kernel,
                    padding=ALIGNMENT[name].padding,
                )
                for name in layers
                if ALIGNMENT[name].kernel is not None
            }
        )

    def forward(self, features: FeatureBatch) -> tuple[Tensor, Tensor, tuple[int, int, int]]:
        """Aligned features of every attended layer at every location, and the location mask.

        Notation: B videos, L attended layers, F aligned size, T5 = max(n_frames) // 16,
        I = T5 * h * w locations of pool5's grid.

        Returns:
            locations: (B, I, L, F), exactly zero at locations past a video's end
            mask: (B, I) bool, True at locations inside the video
            grid: (T5, h, w)
        """
        n_frames = features.n_frames  # (B,)
        longest = int(n_frames.max())
        steps5 = longest // ALIGNMENT["pool5"].frame_stride  # T5 of the batch
        aligned = [
            self._align(name, features.layers[name], n_frames, steps5) for name in self.layers
        ]
        shapes = {name: tuple(x.shape[2:]) for name, x in zip(self.layers, aligned, strict=True)}
        if len(set(shapes.values())) > 1:
            raise CaptionerInputError(f"aligned layers land on different grids (t, h, w): {shapes}")
        stacked = torch.stack(aligned, dim=1)  # (B, L, F, T5, h, w)
        _, _, _, t5, h, w = stacked.shape
        locations = rearrange(stacked, "b l f t h w -> b (t h w) l f")  # (B, I, L, F)
        stride5 = ALIGNMENT["pool5"].frame_stride
        inside = (
            torch.arange(t5, device=n_frames.device) < (n_frames // stride5)[:, None]
        )  # (B, T5)
        mask = repeat(inside, "b t -> b (t h w)", h=h, w=w)  # (B, I)
        if self.norm is not None:
            locations = self.norm(locations, mask)  # (B, I, L, F)
        # Past a video's end the conv still sees its bias and the last real steps; zero those
        # locations so that nothing outside the video reaches a later computation.
        locations = locations * rearrange(mask, "b i -> b i 1 1").to(locations.dtype)
        return locations, mask, (t5, h, w)

    def _align(self, name: str, layer: Tensor, n_frames: Tensor, steps5: int) -> Tensor:
        """One branch: (B, C, T, h_l, w_l) -> (B, F, T5, h, w)."""
        spec = ALIGNMENT[name]
        # Input steps past pool * T5 + padding never reach a kept pooling window.
        layer = layer[:, :, : spec.pool * steps5 + spec.padding]  # (B, C, T', h_l, w_l)
        # Zero every step past the video's own end, whatever the padding held: the conv then
        # sees exactly what it sees for the video alone (its own zero padding), so batched
        # results equal per-video results at every valid step.
        inside = (
            torch.arange(layer.shape[2], device=layer.device)
            < (n_frames // spec.frame_stride)[:, None]
        )  # (B, T')
        layer = layer * rearrange(inside, "b t -> b 1 t 1 1").to(layer.dtype)  # (B, C, T', h, w)
        if name in self.convs:
            layer = F.relu(conv3d_exact(self.convs[name], layer))  # (B, F, T', h_l, w_l)
            layer = F.max_pool3d(layer, spec.pool, spec.pool, padding=spec.pool_padding)
        return layer[:, :, :steps5]  # (B, F, T5, h, w)


# --------------------------------------------------------------------------------------------
# Attention (eqs. 5-8)
# --------------------------------------------------------------------------------------------


class SpatiotemporalAttention(nn.Module):
    """Eq. 5: one soft attention over locations i, on all L aligned layers stacked (â_i)."""

    def __init__(self, stacked_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.feature_proj = nn.Linear(stacked_dim, attention_dim)  # W_aα (its bias is the MLP's)
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim, bias=False)  # W_hα
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w_α (a bias cancels in softmax)

    def project(self, locations: Tensor) -> Tensor:
        """W_aα â_i for all locations, once per video: (B, I, L, F) -> (B, I, A)."""
        return self.feature_proj(rearrange(locations, "b i l f -> b i (l f)"))  # (B, I, A)

    def forward(self, hidden: Tensor, context: Context) -> tuple[Tensor, Tensor]:
        """Attention weights alpha_t and the per-layer summaries s_tl.

        Notation: N rows, I locations, L layers, F aligned size, H hidden, A attention size.

        Args:
            hidden: (N, H), h_{t-1}
            context: rows aligned with ``hidden``
        Returns:
            alpha: (N, I), exactly 0 at masked locations, sums to 1 over the others
            summaries: (N, L, F), s_t cut into its L blocks s_tl
        """
        energy = torch.tanh(context.projected + self.hidden_proj(hidden)[:, None])  # (N, I, A)
        scores = rearrange(self.score(energy), "n i 1 -> n i")  # (N, I): e_ti
        scores = scores.masked_fill(~context.mask, -math.inf)  # (N, I): exp(-inf) = 0 exactly
        alpha = scores.softmax(dim=-1)  # (N, I)
        summaries = torch.einsum("ni,nilf->nlf", alpha, context.locations)  # (N, L, F)
        return alpha, summaries


class AbstractionAttention(nn.Module):
    """Eq. 6: a score per layer from its summary s_tl, with one W_sβ shared by all layers."""

    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.summary_proj = nn.Linear(feature_dim, attention_dim)  # W_sβ
        self.hidden_proj = nn.Linear(hidden_dim, attention_dim, bias=False)  # W_hβ
        self.score = nn.Linear(attention_dim, 1, bias=False)  # w_β

    def forward(self, summaries: Tensor, hidden: Tensor) -> Tensor:
        """log beta_t over layers: (N, L, F), (N, H) -> (N, L)."""
        energy = torch.tanh(self.summary_proj(summaries) + self.hidden_proj(hidden)[:, None])
        scores = rearrange(self.score(energy), "n l 1 -> n l")  # (N, L): b_tl
        scores = at_least_float32(scores)  # summed over t
        return scores.log_softmax(dim=-1)  # (N, L)


# --------------------------------------------------------------------------------------------
# Captioner (eqs. 1-3, 10-14)
# --------------------------------------------------------------------------------------------


class Captioner(nn.Module):
    """ASTAR and its baselines: the variant in ``config`` switches parts on, never code paths."""

    def __init__(self, config: CaptionerConfig, word_vectors: Tensor | None = None):
        """``word_vectors``: optional (V, M) initial embedding (word2vec rows, random misses)."""
        super().__init__()
        self.config = config
        layers = config.attended_layers
        feature_dim = config.feature_dim
        # Only what the variant uses is built, so every parameter is trained (fc7: no visual
        # attention at all; a single layer: no layer attention, beta would be constant 1).
        self.alignment = (
            FeatureAlignment(
                config.layer_channels, layers, feature_dim, config.feature_norm == "batch"
            )
            if layers
            else None
        )
        self.spatiotemporal = (
            SpatiotemporalAttention(
                len(layers) * feature_dim, config.hidden_dim, config.attention_dim
            )
            if layers
            else None
        )
        self.abstraction = (
            AbstractionAttention(feature_dim, config.hidden_dim, config.attention_dim)
            if len(layers) > 1
            else None
        )
        # Training-set statistics of a_{L+1}: buffers, so checkpoints carry them to inference.
        self.register_buffer("fc7_mean", torch.zeros(config.fc_dim))  # (D,)
        self.register_buffer("fc7_std", torch.ones(config.fc_dim))  # (D,)
        self.init_hidden = nn.Linear(config.fc_dim, config.hidden_dim)  # C (eq. 1)
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)  # W_e
        context_dim = feature_dim if layers else 0
        self.lstm = nn.LSTMCell(config.embed_dim + context_dim, config.hidden_dim)  # eq. 2
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(config.hidden_dim, config.vocab_size)  # V
        self.reset_parameters()
        if word_vectors is not None:
            self.load_word_vectors(word_vectors)

    def reset_parameters(self) -> None:
        """ASTAR-NOTES: recurrent matrices orthogonal, other weights U[-r, r], biases 0."""
        r = self.config.init_range
        with torch.no_grad():
            for name, parameter in self.named_parameters():
                leaf = name.rsplit(".", 1)[-1]
                if leaf.startswith("bias"):
                    parameter.zero_()
                elif leaf == "weight_hh":
                    for gate in parameter.chunk(4, dim=0):  # (H, H) each: i, f, g, o
                        nn.init.orthogonal_(gate)
                else:
                    parameter.uniform_(-r, r)
            if self.alignment is not None and self.alignment.norm is not None:
                self.alignment.norm.reset_parameters()  # gain 1, shift 0: a plain normalisation

    def load_word_vectors(self, word_vectors: Tensor) -> None:
        expected = (self.config.vocab_size, self.config.embed_dim)
        if tuple(word_vectors.shape) != expected:
            raise CaptionerConfigError(
                f"word vectors have shape {tuple(word_vectors.shape)}, the model needs "
                f"(vocab_size, embed_dim) = {expected}"
            )
        with torch.no_grad():
            self.embedding.weight.copy_(word_vectors)

    def set_fc7_statistics(self, fc7: Tensor) -> None:
        """Standardise a_{L+1} by the mean and std of ``fc7`` (n videos, D), the training set."""
        if fc7.ndim != 2 or fc7.shape[1] != self.config.fc_dim or fc7.shape[0] < 2:
            raise CaptionerInputError(
                f"fc7 statistics need (n >= 2, {self.config.fc_dim}) vectors, "
                f"got {tuple(fc7.shape)}"
            )
        fc7 = fc7.to(device=self.fc7_mean.device, dtype=torch.float64)
        std = fc7.std(dim=0)  # (D,)
        # A dimension constant over the training set (a dead ReLU) carries nothing: keep it 0.
        floor = max(float(std.max()) * 1e-3, 1e-6)
        self.fc7_mean.copy_(fc7.mean(dim=0))
        self.fc7_std.copy_(std.clamp_min(floor))

    # ---- per-video work ---------------------------------------------------------------------

    def prepare(self, features: FeatureBatch) -> Context:
        """All per-video work, once: alignment (eq. 4), W_aα â_i (eq. 5), mask, h_1 (eq. 1).

        Notation: B videos, I locations, L attended layers, F aligned size, A attention size.
        Returns a Context with B rows; ``index_select`` it to the captions or beams.
        """
        self._check_features(features)
        fc7 = features.fc7  # (B, D): a_{L+1}
        if self.config.fc7_norm == "standardize":
            fc7 = (fc7 - self.fc7_mean) / self.fc7_std  # (B, D)
        initial_hidden = torch.tanh(self.init_hidden(fc7))  # (B, H): h_1
        if self.alignment is None:
            return Context(initial_hidden, locations=None, projected=None, mask=None, grid=None)
        locations, mask, grid = self.alignment(features)  # (B, I, L, F), (B, I)
        projected = self.spatiotemporal.project(locations)  # (B, I, A)
        return Context(initial_hidden, locations, projected, mask, grid)

    def _check_features(self, features: FeatureBatch) -> None:
        config = self.config
        if features.n_frames.ndim != 1 or features.n_frames.numel() == 0:
            raise CaptionerInputError(
                f"n_frames must be a non-empty (B,) tensor, got {tuple(features.n_frames.shape)}"
            )
        batch = features.batch_size
        shortest, longest = (int(x) for x in torch.aminmax(features.n_frames))
        if shortest < MIN_FRAMES:
            raise CaptionerInputError(
                f"a video has n_frames {shortest} < {MIN_FRAMES}: C3D input is padded to "
                f"{MIN_FRAMES} frames"
            )
        if tuple(features.fc7.shape) != (batch, config.fc_dim):
            raise CaptionerInputError(
                f"fc7 has shape {tuple(features.fc7.shape)}, expected (B, fc_dim) = "
                f"({batch}, {config.fc_dim})"
            )
        for name in config.attended_layers:
            if name not in features.layers:
                raise CaptionerInputError(
                    f"variant {config.variant} needs layer {name}; the batch has "
                    f"{sorted(features.layers)}"
                )
            layer = features.layers[name]
            needed = longest // ALIGNMENT[name].frame_stride
            channels = config.layer_channels[name]
            if layer.ndim != 5 or layer.shape[0] != batch or layer.shape[1] != channels:
                raise CaptionerInputError(
                    f"layer {name} has shape {tuple(layer.shape)}, expected (B={batch}, "
                    f"C={channels}, T, h, w)"
                )
            if layer.shape[2] < needed:
                raise CaptionerInputError(
                    f"layer {name} has {layer.shape[2]} time steps but the longest video "
                    f"(n_frames {longest}) has {needed}"
                )

    # ---- one word ---------------------------------------------------------------------------

    def step(
        self,
        word: Tensor | None,
        state: DecoderState | None,
        context: Context,
        layer: Tensor | None = None,
    ) -> tuple[Tensor, DecoderState, dict[str, Tensor]]:
        """One decoder step: log p(y_t | y_<t, A) and the state after it.

        Notation: N rows, V vocabulary, I locations, L attended layers, H hidden.

        Args:
            word: (N,) long, y_{t-1}; None (with state None) for the first word, which comes
                from h_1 = tanh(C a_{L+1}) alone (eq. 1): there is no begin-of-sentence token
            state: the state returned by the previous step; None for the first word
            context: ``prepare`` output, one row per decoder row
            layer: (N,) long, hard variant only: force m_t instead of drawing it (enumeration,
                replay). Otherwise m_t is drawn from beta_t when training or when
                ``hard_inference == "sample"``, else it is argmax_l beta_tl
        Returns:
            log_probs: (N, V)
            state: (h_t, c_t)
            extras: empty for the first word; then "alpha" (N, I), and with L > 1 "beta" (N, L);
                hard adds "layer" (N,) m_t and "layer_log_prob" (N,) log beta_{t, m_t}
        """
        if (word is None) != (state is None):
            raise CaptionerInputError("step: word and state are both None (first word) or both set")
        if layer is not None and not self.config.hard:
            raise CaptionerInputError(
                f"step: a forced layer needs the hard variant, not {self.config.variant}"
            )
        extras: dict[str, Tensor] = {}
        if state is None:
            hidden = context.initial_hidden  # (N, H): h_1
            state = DecoderState(hidden, torch.zeros_like(hidden))  # c_1 = 0
            logits = self.output(hidden)  # (N, V): p(y_1) = softmax(V h_1), no dropout (eq. 1)
        else:
            inputs = [self.embedding(word)]  # [(N, M)]: w_{t-1} = W_e y_{t-1}
            if self.spatiotemporal is not None:
                inputs.append(self._context_vector(state.hidden, context, layer, extras))  # (N, F)
            hidden, cell = self.lstm(torch.cat(inputs, dim=-1), (state.hidden, state.cell))  # eq. 2
            state = DecoderState(hidden, cell)
            logits = self.output(self.dropout(hidden))  # (N, V): softmax(V dropout(h_t)), t >= 2
        # Caption log-likelihoods are sums of many terms near -5 and feed VIMCO's exponentials:
        # under bf16/fp16 autocast they are taken in float32 (float64 stays float64).
        logits = at_least_float32(logits)  # (N, V)
        return logits.log_softmax(dim=-1), state, extras

    def _context_vector(
        self, hidden: Tensor, context: Context, layer: Tensor | None, extras: dict[str, Tensor]
    ) -> Tensor:
        """z_t from h_{t-1} (eqs. 5-8): (N, H) -> (N, F); fills ``extras``."""
        alpha, summaries = self.spatiotemporal(hidden, context)  # (N, I), (N, L, F)
        extras["alpha"] = alpha
        if self.abstraction is None:
            weights = summaries.new_ones(summaries.shape[:2])  # (N, 1): z_t = s_t
        else:
            log_beta = self.abstraction(summaries, hidden)  # (N, L)
            extras["beta"] = log_beta.exp()
            if self.config.hard:  # eq. 8: m_t ~ Mult(1, beta_t), z_t = s_{t, m_t}
                chosen = self._choose_layer(log_beta, layer)  # (N,)
                extras["layer"] = chosen
                extras["layer_log_prob"] = log_beta.gather(1, chosen[:, None])[:, 0]  # (N,)
                weights = F.one_hot(chosen, log_beta.shape[1]).to(summaries.dtype)  # (N, L)
            else:  # eq. 7: z_t = sum_l beta_tl s_tl
                weights = extras["beta"]  # (N, L)
        return torch.einsum("nl,nlf->nf", weights, summaries)  # (N, F)

    def _choose_layer(self, log_beta: Tensor, forced: Tensor | None) -> Tensor:
        """m_t: forced, drawn from beta_t, or argmax_l beta_tl. (N, L) -> (N,) long."""
        if forced is not None:
            return forced
        if self.samples_layers:
            # A diverged model's NaN beta must reach the loss (a skipped step), not stop here.
            beta = log_beta.exp().nan_to_num(nan=1.0, posinf=1.0)  # (N, L); finite: unchanged
            return torch.multinomial(beta, 1)[:, 0]  # (N,)
        return log_beta.argmax(dim=-1)  # (N,)

    @property
    def samples_layers(self) -> bool:
        """Whether hard layer choices are random now (training, or sampling inference)."""
        return self.config.hard and (self.training or self.config.hard_inference == "sample")

    # ---- whole captions ---------------------------------------------------------------------

    def teacher_force(
        self, context: Context, tokens: Tensor, layers: Tensor | None = None
    ) -> TeacherForcing:
        """Score given captions word by word through ``step`` (eqs. 1-3).

        Notation: N rows, S caption length.

        Args:
            context: one row per caption
            tokens: (N, S) long, each caption ending with eos, padded with pad_id
            layers: (N, S-1) long, hard only: forced m_2..m_S (else drawn/argmax by ``step``)
        """
        n_rows, length = tokens.shape
        inside = tokens != self.config.pad_id  # (N, S)
        token_log_probs, layer_log_probs, chosen, entropies = [], [], [], []
        word, state = None, None
        for t in range(length):
            forced = None if layers is None or t == 0 else layers[:, t - 1]  # (N,)
            log_probs, state, extras = self.step(word, state, context, layer=forced)  # (N, V)
            token_log_probs.append(log_probs.gather(1, tokens[:, t, None])[:, 0])  # (N,)
            if "beta" in extras:
                with torch.no_grad():
                    beta = extras["beta"].float()  # (N, L)
                    entropies.append(-(beta * beta.clamp_min(1e-30).log()).sum(dim=1))  # (N,)
            if "layer" in extras:
                layer_log_probs.append(extras["layer_log_prob"])  # (N,)
                chosen.append(extras["layer"])  # (N,)
            word = tokens[:, t]  # (N,)
        token_lp = torch.stack(token_log_probs, dim=1).where(inside, 0.0)  # (N, S)
        entropy = None
        if entropies:  # words t >= 2 inside their caption
            entropy = torch.stack(entropies, dim=1)[inside[:, 1:]].mean()  # ()
        if not self.config.hard:
            return TeacherForcing(token_lp, None, None, entropy)
        if length == 1:  # a caption of eos alone makes no layer choice
            empty = token_lp.new_zeros(n_rows, 0)  # (N, 0)
            return TeacherForcing(token_lp, empty, empty.long())
        layer_lp = torch.stack(layer_log_probs, dim=1).where(inside[:, 1:], 0.0)  # (N, S-1)
        return TeacherForcing(token_lp, layer_lp, torch.stack(chosen, dim=1), entropy)

    def loss(self, features: FeatureBatch, tokens: Tensor, video_index: Tensor) -> CaptionLoss:
        """Training objective of a video-major batch: prepare once per video, score each caption.

        Notation: B videos, n captions, S caption length, K samples.

        Args:
            features: B videos
            tokens: (n, S) long, pad_id 0 after each caption's eos
            video_index: (n,) long in 0..B-1, the video of each caption
        Returns:
            per caption: -log p(Y|A) (eq. 3). Hard with random layer choices: K draws of
            m^1..m^K per caption, value -L^K (eq. 10), gradient the VIMCO estimate (eqs. 12-14).
        """
        self._check_captions(tokens, video_index, features.batch_size)
        context = self.prepare(features)  # B rows
        # Reduced precision (autocast) pays off in prepare's alignment convs only: the decoder's
        # ops are small and latency-bound, and hard attention's learning signal is a difference
        # of caption log-likelihoods that bf16's rounding of every step would blur. The words
        # are scored in float32 (float64 stays float64).
        context = context.at_least_float32()
        with torch.autocast(features.fc7.device.type, enabled=False):
            return self._caption_loss(context, tokens, video_index)

    def _caption_loss(self, context: Context, tokens: Tensor, video_index: Tensor) -> CaptionLoss:
        n_tokens = (tokens != self.config.pad_id).sum()  # ()
        if not self.samples_layers:
            forced = self.teacher_force(context.index_select(video_index), tokens)  # n rows
            per_caption = -forced.token_log_probs.sum(dim=1)  # (n,)
            return CaptionLoss(per_caption.mean(), per_caption, n_tokens, forced.layer_entropy)
        k = self.config.samples
        rows = video_index.repeat_interleave(k)  # (n K,): caption-major, K samples each
        forced = self.teacher_force(context.index_select(rows), tokens.repeat_interleave(k, dim=0))
        log_likelihoods = rearrange(forced.token_log_probs.sum(dim=1), "(n k) -> n k", k=k)
        log_choice_probs = rearrange(forced.layer_log_probs.sum(dim=1), "(n k) -> n k", k=k)
        per_caption = -vimco_surrogate(log_likelihoods, log_choice_probs)  # (n,)
        return CaptionLoss(per_caption.mean(), per_caption, n_tokens, forced.layer_entropy)

    def forward(self, features: FeatureBatch, tokens: Tensor, video_index: Tensor) -> CaptionLoss:
        """``loss``, as the module's call: wrappers (DistributedDataParallel) hook ``forward``."""
        return self.loss(features, tokens, video_index)

    def _check_captions(self, tokens: Tensor, video_index: Tensor, n_videos: int) -> None:
        if tokens.ndim != 2 or tokens.dtype != torch.long or tokens.shape[1] == 0:
            raise CaptionerInputError(
                f"tokens must be a (n, S) long tensor, got {tuple(tokens.shape)} {tokens.dtype}"
            )
        if tuple(video_index.shape) != (tokens.shape[0],):
            raise CaptionerInputError(
                f"video_index has shape {tuple(video_index.shape)}, expected ({tokens.shape[0]},)"
            )
        # One device sync for all three checks; the message is worked out only on failure.
        problems = torch.stack(
            [
                ((video_index < 0) | (video_index >= n_videos)).any(),
                (tokens[:, 0] == self.config.pad_id).any(),
                ((tokens < 0) | (tokens >= self.config.vocab_size)).any(),
            ]
        ).tolist()
        messages = (
            f"video_index must lie in 0..{n_videos - 1}",
            "a caption is empty: it must hold at least its eos token",
            f"tokens must lie in 0..{self.config.vocab_size - 1}",
        )
        found = [message for message, bad in zip(messages, problems, strict=True) if bad]
        if found:
            raise CaptionerInputError("; ".join(found))
