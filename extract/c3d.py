"""C3D (Tran et al. 2015), the feature network of stage one.

One fully convolutional pass over all N frames of a video gives the conv taps pool2..pool5; fc7
comes from 16-frame clips with stride 8, each run through the network alone (ASTAR-NOTES,
"Stage one"). Weights are the Sports-1M state dict of the usual PyTorch port (``c3d.pickle``) or a
safetensors copy of it; without weights the network is a seeded Kaiming (fan-in) init.

Notation used in shape comments: ``B`` batch, ``C`` channels, ``T``/``N`` frames,
``H``/``W`` height/width, ``n`` clips.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.nn.utils import skip_init

from astar.extract.precision import PRECISIONS, cpu_has_fast_bf16, resolve_device
from astar.store.files import unpickler_reason
from astar.store.geometry import (
    BACKBONES,
    CLIP_LENGTH,
    CLIP_STRIDE,
    FRAME_SIZE,
    C3DSpec,
)
from astar.store.geometry import POOL_LAYERS as TAPS
from astar.store.schema import Weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Stage:
    """Convolutions followed by one max-pool (kernel = stride)."""

    pool: str  # name of the pool ending the stage (pool2..pool5 are the taps)
    convs: tuple[str, ...]  # conv layers of the stage, also their state-dict names
    kernel: tuple[int, int, int]  # pool kernel and stride (t, h, w)
    padding: tuple[int, int, int] = (0, 0, 0)  # pool padding (t, h, w)


_STAGES = (
    _Stage("pool1", ("conv1",), (1, 2, 2)),  # spatial only: keeps every frame for conv2
    _Stage("pool2", ("conv2",), (2, 2, 2)),
    _Stage("pool3", ("conv3a", "conv3b"), (2, 2, 2)),
    _Stage("pool4", ("conv4a", "conv4b"), (2, 2, 2)),
    # Spatial padding makes 7 x 7 into 4 x 4 as Caffe's ceil mode did (the PyTorch port's choice).
    _Stage("pool5", ("conv5a", "conv5b"), (2, 2, 2), (0, 1, 1)),
)
_FC_LAYERS = ("fc6", "fc7", "fc8")


def _stage_widths(spec: C3DSpec) -> dict[str, int]:
    """Output channels of every conv layer, by state-dict name."""
    return {
        "conv1": spec.conv1,
        "conv2": spec.conv2,
        "conv3a": spec.conv3,
        "conv3b": spec.conv3,
        "conv4a": spec.conv4,
        "conv4b": spec.conv4,
        "conv5a": spec.conv5,
        "conv5b": spec.conv5,
    }


def _pooled(size: int, kernel: int, padding: int) -> int:
    """Output length of a max-pool with stride = kernel (floor mode)."""
    return (size + 2 * padding - kernel) // kernel + 1


def _onednn_applies(x: Tensor) -> bool:
    """Whether a convolution of ``x`` would run in fp32 on the CPU without autograd."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.aten, "mkldnn_convolution")  # a private op: fall back if it goes
    )


def _conv3d(conv: nn.Conv3d, x: Tensor) -> Tensor:
    """``conv(x)``, sent to oneDNN on the CPU whatever the batch size.

    PyTorch's CPU dispatch picks its slow native 3-D convolution when ``B * C * T * H`` is small,
    a rule made for 2-D maps: with batch 1 (one video) that hits most C3D layers (measured:
    conv1 on 32 frames ~470 ms native against ~90 ms oneDNN, ~40 ms oneDNN channels-last).
    """
    if _onednn_applies(x):
        return torch.ops.aten.mkldnn_convolution(
            x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups
        )
    return conv(x)


class C3D(nn.Module):
    """C3D up to fc7 (fc8 is kept only so that the standard state dict loads)."""

    def __init__(self, spec: C3DSpec, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec
        widths = _stage_widths(spec)
        in_channels = 3
        # skip_init: no throw-away default init, and the global RNG is left alone.
        for name, out_channels in widths.items():
            conv = skip_init(nn.Conv3d, in_channels, out_channels, kernel_size=3, padding=1)
            setattr(self, name, conv)
            in_channels = out_channels
        # pool5 of a 16 x 112 x 112 clip is (conv5, 1, 4, 4), flattened for fc6.
        self.fc6 = skip_init(nn.Linear, spec.conv5 * 4 * 4, spec.fc)
        # The standard state dict calls this layer "fc7", the name of the method fc7() too;
        # add_module refuses a name the class already has, so it is registered directly.
        self._modules["fc7"] = skip_init(nn.Linear, spec.fc, spec.fc)
        self.fc8 = skip_init(nn.Linear, spec.fc, spec.classes)
        self.init_weights(seed)

    def layer(self, name: str) -> nn.Module:
        """A layer by its state-dict name (``self.fc7`` is the method, not the layer)."""
        return self._modules[name]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """He/Kaiming fan-in init (ReLU gain), zero biases: the signal keeps its scale layer to
        layer, so activations neither vanish nor explode through the eight convolutions."""
        generator = torch.Generator().manual_seed(seed)
        for name in (*_stage_widths(self.spec), *_FC_LAYERS):
            layer = self.layer(name)
            nn.init.kaiming_normal_(
                layer.weight, mode="fan_in", nonlinearity="relu", generator=generator
            )
            nn.init.zeros_(layer.bias)

    def tap_shapes(self, frames: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
        """(C, T, H, W) of every pool for an input of ``frames x height x width``."""
        widths = _stage_widths(self.spec)
        shapes = {}
        size = (frames, height, width)
        for stage in _STAGES:
            size = tuple(map(_pooled, size, stage.kernel, stage.padding))
            shapes[stage.pool] = (widths[stage.convs[-1]], *size)
        return shapes

    def conv_features(self, x: Tensor) -> dict[str, Tensor]:
        """One fully convolutional pass: x (B, 3, T, H, W) -> the taps pool2..pool5.

        For H = W = 112: pool2 (B, C2, T//2, 28, 28), pool3 (B, C3, T//4, 14, 14),
        pool4 (B, C4, T//8, 7, 7), pool5 (B, C5, T//16, 4, 4). A pool whose input is shorter
        than its kernel in time yields an empty time axis, so ``floor(T / 2^k)`` holds for any T.
        """
        shapes = self.tap_shapes(*x.shape[2:])
        taps = {}
        h = x  # (B, 3, T, H, W)
        for stage in _STAGES:
            if h.shape[2] < stage.kernel[0]:  # too short in time: nothing left to convolve
                h = h.new_empty((h.shape[0], *shapes[stage.pool]))  # (B, C, 0, H', W')
            else:
                for name in stage.convs:
                    h = F.relu(_conv3d(self.layer(name), h), inplace=True)  # (B, C, T', H', W')
                h = F.max_pool3d(h, stage.kernel, stage.kernel, stage.padding)
            if stage.pool in TAPS:
                taps[stage.pool] = h
        return taps

    def fc7_from_pool5(self, pool5: Tensor) -> Tensor:
        """pool5 of 16-frame 112 x 112 clips (n, C5, 1, 4, 4) -> fc7 (n, fc), after ReLU.

        No dropout: the features are those of the network in eval mode.
        """
        expected = (self.spec.conv5, 1, 4, 4)
        if tuple(pool5.shape[1:]) != expected:
            raise ValueError(
                f"fc6 needs pool5 maps of shape (n, {', '.join(map(str, expected))}), as from "
                f"{CLIP_LENGTH}-frame {FRAME_SIZE} x {FRAME_SIZE} clips; got {tuple(pool5.shape)}"
            )
        # Flatten channel-major, as the Caffe model and its PyTorch port do.
        flat = rearrange(pool5, "n c t h w -> n (c t h w)")  # (n, C5 * 16)
        fc6 = F.relu(self.fc6(flat))  # (n, fc)
        return F.relu(self.layer("fc7")(fc6))  # (n, fc)

    def fc7(self, clips: Tensor) -> Tensor:
        """clips (n, 3, 16, 112, 112) -> fc7 (n, fc), each clip on its own."""
        return self.fc7_from_pool5(self.conv_features(clips)["pool5"])


def clip_starts(n_frames: int, length: int = CLIP_LENGTH, stride: int = CLIP_STRIDE) -> list[int]:
    """First frame of every fc7 clip: every ``stride`` frames, plus one clip ending at the last
    frame when the regular grid stops short of it.

    >>> clip_starts(17)
    [0, 1]
    """
    if length < 1 or stride < 1:
        raise ValueError(f"clip length and stride must be positive, got {length}, {stride}")
    if n_frames < length:
        raise ValueError(f"{n_frames} frames are fewer than one clip of {length}")
    last = n_frames - length
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


# --------------------------------------------------------------------------------------------
# Weights


class WeightsError(Exception):
    """A weights file is missing, unreadable, unsafe, or does not fit the network."""


PICKLE_SUFFIXES = (".pickle", ".pkl", ".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
_OPTIONAL_KEYS = frozenset({"fc8.weight", "fc8.bias"})  # fc8 is never used


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files are hundreds of MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict_file(path: str | Path) -> tuple[dict[str, Tensor], Weights]:
    """Read a state dict from ``.pickle``/``.pkl``/``.pt``/``.pth`` or ``.safetensors``.

    Pickles are read with ``weights_only=True``: one that would build anything but tensors and
    plain containers is refused before any of its code runs. Returns the state dict (on the CPU)
    and the file's provenance (its SHA-256).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    suffix = path.suffix.lower()
    if suffix not in (*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX):
        raise WeightsError(
            f"{path}: unknown weights format {suffix!r}; expected one of "
            f"{', '.join((*PICKLE_SUFFIXES, SAFETENSORS_SUFFIX))}"
        )
    digest = Weights(sha256=file_sha256(path))
    if suffix == SAFETENSORS_SUFFIX:
        try:
            state = safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError) as error:
            raise WeightsError(f"{path}: not a readable safetensors file: {error}") from error
    else:
        state = _load_pickle(path)
    return state, digest


def _load_pickle(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses any global it does not know, i.e. any code the pickle would run;
        # torch's own message suggests weights_only=False, which is exactly what must not happen.
        raise WeightsError(
            f"{path}: refused: not a plain state dict that loads without running code "
            f"(a pickle that would run code, or not a pickle at all): {unpickler_reason(error)}"
        ) from error
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise WeightsError(f"{path}: not a readable torch state dict: {error}") from error
    if not isinstance(state, dict) or not all(
        isinstance(key, str) and isinstance(value, Tensor) for key, value in state.items()
    ):
        raise WeightsError(
            f"{path}: expected a flat state dict of tensors (conv1.weight, ...), "
            f"got {type(state).__name__}"
        )
    return state


def check_state_dict(state: dict[str, Tensor], model: C3D, source: str) -> None:
    """Refuse a state dict whose keys or shapes differ from the model's (fc8 may be absent)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state) - _OPTIONAL_KEYS)
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key}: file {tuple(state[key].shape)}, network {expected[key]}"
        for key in sorted(set(state) & set(expected))
        if tuple(state[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches: {'; '.join(misshaped)}")
    if problems:
        raise WeightsError(
            f"{source}: not a C3D Sports-1M state dict for this network: {' | '.join(problems)}"
        )


def build_c3d(
    backbone: str = "c3d", weights: str | Path | None = None, seed: int = 0
) -> tuple[C3D, Weights]:
    """The network in eval mode and how its weights came about: the weights file's SHA-256,
    or the seed of the random init."""
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    model = C3D(BACKBONES[backbone], seed=seed)
    if weights is None:
        return model.eval(), Weights(seed=seed)
    if backbone != "c3d":
        raise WeightsError(
            f"{weights}: Sports-1M weights fit only the full 'c3d' backbone, not {backbone!r} "
            f"(which has a quarter of the channels); drop the weights or use 'c3d'"
        )
    state, digest = load_state_dict_file(weights)
    check_state_dict(state, model, str(weights))
    model.load_state_dict(state, strict=False)  # checked above; fc8 may be absent
    return model.eval(), digest


# --------------------------------------------------------------------------------------------
# Preprocessing

# Sports-1M mean of the Caffe model, per channel in its BGR order.
SPORTS1M_MEAN_BGR = (90.25, 97.66, 101.41)
PREPROCESSING = {
    # What the Sports-1M weights were trained on.
    "caffe-bgr": "BGR, pixel range 0-255, minus the Sports-1M mean (B 90.25, G 97.66, R 101.41)",
    # For random weights: zero-centred, unit range, so the Kaiming init sees unit-scale input.
    "unit-rgb": "RGB, (pixel - 127.5) / 127.5, in [-1, 1]",
}


def preprocessing_for(weights: str | Path | None) -> str:
    """The preprocessing mode that matches the weights: Caffe's for Sports-1M, else unit scale."""
    return "unit-rgb" if weights is None else "caffe-bgr"


def preprocess(frames: np.ndarray, mode: str, device: torch.device | None = None) -> Tensor:
    """frames (N, H, W, 3) uint8 RGB -> (3, N, H, W) float32 on ``device``.

    The uint8 frames travel to the device first: a quarter of the bytes of float32.
    """
    if mode not in PREPROCESSING:
        raise ValueError(
            f"unknown preprocessing {mode!r}; choose one of {', '.join(PREPROCESSING)}"
        )
    # torch.from_numpy shares memory, so it wants a C-ordered, writable array (a copy if not).
    frames = np.require(frames, requirements=["C_CONTIGUOUS", "WRITEABLE"])
    pixels = torch.from_numpy(frames).to(device)  # (N, H, W, 3) uint8
    x = rearrange(pixels, "n h w c -> c n h w").float()  # (3, N, H, W), RGB
    if mode == "caffe-bgr":
        mean = torch.tensor(SPORTS1M_MEAN_BGR, device=x.device)  # (3,) BGR
        return x.flip(0) - rearrange(mean, "c -> c 1 1 1")  # (3, N, H, W), BGR
    return (x - 127.5) / 127.5


# --------------------------------------------------------------------------------------------
# Extraction


class FramesError(ValueError):
    """The frames handed to the extractor are not (N >= 16, 112, 112, 3) uint8."""


class C3DExtractor:
    """Frames of one video -> its pool2..pool5 maps and the fc7 of every clip.

    ``precision="bf16"`` runs the network under ``torch.autocast`` (CPU or CUDA); outputs are
    float32 either way. ``clip_batch`` clips share one forward pass for fc7.
    """

    def __init__(
        self,
        backbone: str = "c3d",
        weights: str | Path | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        clip_batch: int = 8,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of fp32, bf16")
        if clip_batch < 1:
            raise ValueError(f"clip_batch must be at least 1, got {clip_batch}")
        self.device = resolve_device(device)
        model, weights_description = build_c3d(backbone, weights, seed)
        # oneDNN convolves channels-last (N, T, H, W, C) fastest: with _conv3d, measured at
        # N = 32 on 2 CPU cores, 1.8x (c3d-small) and 1.2x (c3d) the default path's frames/s.
        # Unmeasured on CUDA, so left at the default layout there.
        self.memory_format = (
            torch.channels_last_3d if self.device.type == "cpu" else torch.contiguous_format
        )
        self.model = model.to(self.device, memory_format=self.memory_format)
        if precision == "bf16" and self.device.type == "cpu" and not cpu_has_fast_bf16():
            log.warning(
                "bf16 on this CPU has no oneDNN support and falls back to PyTorch's reference "
                "convolution, two orders of magnitude slower than fp32 (measured on AVX2); use fp32"
            )
        self.precision = precision
        self.clip_batch = clip_batch
        self.preprocessing = preprocessing_for(weights)
        self.info = {
            "backbone": backbone,
            "weights": weights_description,
            "preprocessing": self.preprocessing,
            "precision": precision,
            "device": str(self.device),
            "clip_length": CLIP_LENGTH,
            "clip_stride": CLIP_STRIDE,
        }

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per video, without the time axis: pool taps (C, H, W), fc7 (fc,)."""
        taps = self.model.tap_shapes(CLIP_LENGTH, FRAME_SIZE, FRAME_SIZE)
        shapes = {name: (taps[name][0], *taps[name][2:]) for name in TAPS}
        return {**shapes, "fc7": (self.model.spec.fc,)}

    def _check(self, frames: np.ndarray) -> None:
        if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
            kind = getattr(frames, "dtype", type(frames).__name__)
            raise FramesError(f"frames must be a uint8 numpy array, got {kind}")
        if frames.ndim != 4 or frames.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 3):
            raise FramesError(
                f"frames must be (N, {FRAME_SIZE}, {FRAME_SIZE}, 3) RGB, got {frames.shape}"
            )
        if len(frames) < CLIP_LENGTH:
            raise FramesError(
                f"{len(frames)} frames: C3D needs at least {CLIP_LENGTH} (pad short videos)"
            )

    def _clips(self, x: Tensor) -> Iterator[Tensor]:
        """x (3, N, H, W) -> batches of clips (b, 3, 16, H, W), b <= clip_batch."""
        starts = torch.tensor(clip_starts(x.shape[1]), device=x.device)  # (n,)
        index = starts[:, None] + torch.arange(CLIP_LENGTH, device=x.device)  # (n, 16)
        for batch in index.split(self.clip_batch):
            clips = rearrange(x[:, batch], "c n t h w -> n c t h w")  # (b, 3, 16, H, W)
            yield clips.contiguous(memory_format=self.memory_format)

    def __call__(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """frames (N, 112, 112, 3) uint8 RGB, N >= 16 -> float32 arrays:
        pool2 (C2, N//2, 28, 28), pool3 (C3, N//4, 14, 14), pool4 (C4, N//8, 7, 7),
        pool5 (C5, N//16, 4, 4), fc7 (n_clips, fc)."""
        self._check(frames)
        autocast = torch.autocast(
            self.device.type, dtype=PRECISIONS[self.precision], enabled=self.precision != "fp32"
        )
        with torch.inference_mode(), autocast:
            x = preprocess(frames, self.preprocessing, self.device)  # (3, N, H, W)
            video = x[None].contiguous(memory_format=self.memory_format)  # (1, 3, N, H, W)
            taps = self.model.conv_features(video)  # pool_k: (1, C, N // 2^k, H', W')
            if len(frames) == CLIP_LENGTH:  # the one clip is the whole video: reuse its pool5
                fc7 = self.model.fc7_from_pool5(taps["pool5"])  # (1, fc)
            else:
                fc7 = torch.cat([self.model.fc7(clips) for clips in self._clips(x)])  # (n, fc)
        features = {name: taps[name][0] for name in TAPS} | {"fc7": fc7}
        # Plain C-order float32 arrays whatever the layout the network computed in.
        return {name: value.float().contiguous().cpu().numpy() for name, value in features.items()}
