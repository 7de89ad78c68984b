"""C3D's geometry, defined once: the layers a store holds, their time strides, the clip windows,
the frame size and minimum length, and the channel widths of each backbone.

The extractor builds its network from these facts, the store schema checks against them, the
data loader reads the layers they name and the captioner sizes its alignment from them; none of
them keeps a copy. They live in the store, the lowest layer, because a feature store is the
contract between extraction and training (ASTAR-NOTES, "Stage one").
"""

from __future__ import annotations

from dataclasses import dataclass

LAYERS = ("pool2", "pool3", "pool4", "pool5", "fc7")
POOL_LAYERS = LAYERS[:4]  # the conv taps, the paper's L = 4 layers, low to high
# Temporal reduction of each pooled tap of C3D: pool2..pool5 each halve time (pool1 does not),
# so pool_k keeps floor(n_frames / 2^(k-1)) steps, e.g. pool5 floor(N / 16).
TIME_STRIDES = {"pool2": 2, "pool3": 4, "pool4": 8, "pool5": 16}
CLIP_LENGTH = 16  # frames per fc7 clip
CLIP_STRIDE = 8  # frames between clip starts ("window of 16 and overlap of 8")
FRAME_SIZE = 112  # fc6 expects the 4 x 4 pool5 map of a 112 x 112 clip
# Height = width of each tap's map for FRAME_SIZE frames (pool1..pool4 halve them, pool5 pads).
TAP_GRID = {"pool2": 28, "pool3": 14, "pool4": 7, "pool5": 4}
# One 16-frame window: the least that gives one pool5 step and one fc7 clip; shorter videos are
# padded to it.
MIN_FRAMES = CLIP_LENGTH


@dataclass(frozen=True)
class C3DSpec:
    """Widths of a C3D network; the layer structure itself is fixed."""

    conv1: int = 64  # channels of conv1 (pool1 is spatial only and no tap)
    conv2: int = 128  # channels of conv2, i.e. of the pool2 tap
    conv3: int = 256  # channels of conv3a and conv3b (pool3 tap)
    conv4: int = 512  # channels of conv4a and conv4b (pool4 tap)
    conv5: int = 512  # channels of conv5a and conv5b (pool5 tap)
    fc: int = 4096  # width of fc6 and fc7
    classes: int = 487  # outputs of fc8 (Sports-1M classes): loaded with the weights, never used

    def tap_channels(self) -> dict[str, int]:
        """Channels of each pool tap, in POOL_LAYERS order."""
        widths = (self.conv2, self.conv3, self.conv4, self.conv5)
        return dict(zip(POOL_LAYERS, widths, strict=True))

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each stored layer's shape without time: taps (C, H, W), fc7 (fc,)."""
        taps = {
            name: (c, TAP_GRID[name], TAP_GRID[name]) for name, c in self.tap_channels().items()
        }
        return {**taps, "fc7": (self.fc,)}


BACKBONES: dict[str, C3DSpec] = {
    "c3d": C3DSpec(),
    # A quarter of the channels everywhere: about 1/16 of the multiply-adds, for CPU demos/tests.
    "c3d-small": C3DSpec(conv1=16, conv2=32, conv3=64, conv4=128, conv5=128, fc=1024),
    # An eighth: the 2-core CPU demo, whose captioner's pool2 alignment conv (C2 -> C5 channels,
    # 7^3 kernel) then costs a quarter of c3d-small's, the difference between 15 and 60 minutes.
    "c3d-tiny": C3DSpec(conv1=8, conv2=16, conv3=32, conv4=64, conv5=64, fc=512),
}


__all__ = [
    "BACKBONES",
    "CLIP_LENGTH",
    "CLIP_STRIDE",
    "FRAME_SIZE",
    "LAYERS",
    "MIN_FRAMES",
    "POOL_LAYERS",
    "TAP_GRID",
    "TIME_STRIDES",
    "C3DSpec",
]
