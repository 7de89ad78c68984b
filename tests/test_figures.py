"""Attention pictures: location -> frame and box through C3D's pooling windows; the PNG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from astar.evaluate.figures import (
    FigureError,
    attention_figure,
    build_attention_figure,
    location_to_frame,
    pool5_cell_span,
    pool5_frame_window,
)
from astar.store.geometry import TAP_GRID
from astar.train.decoding import DecodedCaption, beam_search
from astar.train.model import ALIGNMENT, Captioner, CaptionerConfig, FeatureBatch

LAYERS = ("pool2", "pool3", "pool4", "pool5")


def pooled_windows(size: int, halvings: int, pool5_padding: int) -> list[tuple[int, int]]:
    """[start, stop) of the inputs that reach each pool5 output along one axis, found by pushing
    one-hot inputs through torch's own max-pools (C3D's convs keep size and centre, so pooling
    alone decides the windows): ``halvings`` kernel = stride = 2 pools, then pool5 with padding.
    """
    one_hot = torch.eye(size)[:, None, :]  # (size inputs, 1, size)
    x = one_hot
    for _ in range(halvings):
        x = F.max_pool1d(x, 2, 2)
    x = F.max_pool1d(x, 2, 2, padding=pool5_padding)  # (size, 1, cells)
    reached = x[:, 0, :] > 0  # (size, cells): input i reaches output j
    windows = []
    for cell in range(reached.shape[1]):
        inputs = reached[:, cell].nonzero()[:, 0]
        windows.append((int(inputs.min()), int(inputs.max()) + 1))
        assert inputs.numel() == windows[-1][1] - windows[-1][0]  # contiguous
    return windows


# ---- location -> frame and box -------------------------------------------------------------


@pytest.mark.parametrize("size", [112, 160, 128])
def test_cell_spans_are_pool5_windows_over_the_frame(size: int) -> None:
    """Space: pool1..pool4 halve height and width, pool5 pads 1 (ASTAR-NOTES)."""
    windows = pooled_windows(size, halvings=4, pool5_padding=1)
    assert [pool5_cell_span(j, len(windows), size) for j in range(len(windows))] == windows


def test_known_spans_of_the_112_pixel_grid() -> None:
    spans = [pool5_cell_span(j, 4, 112) for j in range(4)]
    assert spans == [(0, 16), (16, 48), (48, 80), (80, 112)]  # first cell half: padding


def test_frame_windows_are_pool5_time_windows() -> None:
    """Time: pool1 keeps time, pool2..pool5 halve it, no temporal padding."""
    windows = pooled_windows(64, halvings=3, pool5_padding=0)  # pool2, pool3, pool4; pool5
    assert windows == [pool5_frame_window(t) for t in range(4)]
    assert pool5_frame_window(0) == (0, 16) and pool5_frame_window(2) == (32, 48)


def test_location_to_frame_known_values() -> None:
    grid = (3, 4, 4)  # 48 frames of 112 x 112
    assert location_to_frame(0, grid, 48, 112) == (8, (0, 0, 16, 16))  # first cell
    assert location_to_frame(5, grid, 48, 112) == (8, (16, 16, 48, 48))  # t 0, row 1, col 1
    assert location_to_frame(15, grid, 48, 112) == (8, (80, 80, 112, 112))
    assert location_to_frame(16 + 2, grid, 48, 112) == (24, (0, 48, 16, 80))  # t 1, row 0, col 2
    assert location_to_frame(47, grid, 48, 112) == (40, (80, 80, 112, 112))  # last cell
    # Each frame shown is the middle of its step's window, nearest the field's centre 16t + 7.5.
    for t in range(3):
        start, stop = pool5_frame_window(t)
        frame, _ = location_to_frame(16 * t, grid, 48, 112)
        assert start <= frame < stop and abs(frame - (start + 7.5)) == 0.5


def test_location_to_frame_non_square_and_short_videos() -> None:
    # 112 x 160: pool4 is 7 x 10, pool5 4 x 6.
    assert location_to_frame(5, (1, 4, 6), 16, (112, 160)) == (8, (0, 144, 16, 160))
    assert location_to_frame(23, (1, 4, 6), 16, (112, 160)) == (8, (80, 144, 112, 160))
    # A video of 5 true frames (padded to 16 for C3D) shows its last frame.
    assert location_to_frame(0, (1, 4, 4), 5, 112)[0] == 4


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ((32, (2, 4, 4), 40, 112), "outside"),  # past the grid
        ((16, (2, 4, 4), 16, 112), "past the video"),  # step 1 of a 16-frame video
        ((0, (1, 4, 4), 16, 224), "not the grid"),  # 224-pixel frames have an 8 x 8 grid
    ],
)
def test_location_to_frame_refuses_impossible_locations(arguments: tuple, message: str) -> None:
    with pytest.raises(FigureError, match=message):
        location_to_frame(*arguments)


# ---- the picture -----------------------------------------------------------------------------


def numbered_frames(n: int, size: int = 112) -> np.ndarray:
    """(n, size, size, 3) uint8 frames whose value is their index: the drawn frame shows."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, size, size, 3))


def hand_caption(
    locations: list[int], beta: bool, grid=(3, 4, 4), finished: bool = True
) -> DecodedCaption:
    """A caption whose word t (t >= 1) attends mostly to ``locations[t - 1]``."""
    steps = len(locations) + 1
    alpha = torch.full((steps, math.prod(grid)), 0.01)  # (S, I)
    alpha[0] = math.nan
    alpha[torch.arange(1, steps), torch.tensor(locations)] = 0.6
    betas = None
    if beta:
        betas = torch.softmax(torch.randn(steps, 4, generator=torch.Generator().manual_seed(0)), 1)
        betas[0] = math.nan
    words = steps - 1 if finished else steps
    return DecodedCaption(
        tokens=list(range(2, 2 + words)),
        log_prob=-3.0,
        alpha=alpha,
        beta=betas,
        grid=grid,
        token_log_probs=[-3.0 / steps] * steps,
        finished=finished,
    )


def test_figure_has_one_panel_per_word_showing_the_attended_frame_and_cell() -> None:
    frames = numbered_frames(48)
    locations = [5, 16 + 2, 47]
    caption = hand_caption(locations, beta=True)
    words = ["a", "man", "runs", "<eos>"]
    figure = build_attention_figure(frames, words, caption, LAYERS)
    assert len(figure.axes) == 2 * len(words)  # a frame and the beta bars per word
    pictures = figure.axes[: len(words)]  # top row, one per word, in order
    assert [axes.get_title() for axes in pictures] == words
    assert len(pictures[0].patches) == 0 and int(pictures[0].images[0].get_array()[0, 0, 0]) == 24
    for axes, location in zip(pictures[1:], locations, strict=True):
        frame, (y0, x0, y1, x1) = location_to_frame(location, caption.grid, 48, 112)
        assert int(axes.images[0].get_array()[0, 0, 0]) == frame
        (box,) = axes.patches
        assert box.get_xy() == (x0 - 0.5, y0 - 0.5)
        assert (box.get_width(), box.get_height()) == (x1 - x0, y1 - y0)
    bars = figure.axes[len(words) + 1]  # word 2's beta
    heights = [patch.get_height() for patch in bars.patches]
    np.testing.assert_allclose(heights, caption.beta[1].numpy(), rtol=1e-6)
    assert [label.get_text() for label in bars.get_xticklabels()] == list(LAYERS)


def test_figure_scales_boxes_to_frames_larger_than_c3d_input() -> None:
    caption = hand_caption([5], beta=False, grid=(1, 4, 4))
    figure = build_attention_figure(
        numbered_frames(16, size=224), ["dog"], caption, ["pool5"], input_size=(112, 112)
    )
    assert len(figure.axes) == 1  # one word (eos not drawn), single layer: no bars
    assert len(figure.axes[0].patches) == 0  # word 0 comes from fc7: nothing attended
    caption = hand_caption([5, 6], beta=False, grid=(1, 4, 4))
    figure = build_attention_figure(
        numbered_frames(16, size=224), ["a", "dog"], caption, ["pool5"], input_size=(112, 112)
    )
    (box,) = figure.axes[1].patches
    assert box.get_xy() == (2 * 16 - 0.5, 2 * 16 - 0.5)  # cell (1, 1): pixels 16..48, doubled
    assert (box.get_width(), box.get_height()) == (64, 64)


def test_png_of_a_decoded_caption_reads_back(tmp_path) -> None:
    """End to end: a soft model's beam-search caption of a 40-frame video, drawn and re-read."""
    torch.manual_seed(0)
    channels = {"pool2": 3, "pool3": 4, "pool4": 5, "pool5": 6}
    config = CaptionerConfig.small(
        vocab_size=12, variant="soft", layer_channels=channels, fc_dim=7, hidden_dim=16,
        embed_dim=8, attention_dim=8, init_range=0.5,
    )  # fmt: skip
    model = Captioner(config).eval()
    spatial = TAP_GRID
    layers = {
        name: torch.rand(1, c, 40 // ALIGNMENT[name].frame_stride, spatial[name], spatial[name])
        for name, c in channels.items()
    }
    (caption,) = beam_search(model, FeatureBatch(layers, torch.tensor([40]), torch.randn(1, 7)), 3)
    words = [f"w{token}" for token in caption.tokens] + (["<eos>"] if caption.finished else [])
    path = attention_figure(
        numbered_frames(40), words, caption, config.attended_layers, tmp_path / "a" / "fig.png"
    )
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    figure = build_attention_figure(numbered_frames(40), words, caption, config.attended_layers)
    assert len(figure.axes) == 2 * len(words)
    assert (width, height) == pytest.approx(tuple(figure.get_size_inches() * 100), abs=1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"words": ["a", "b", "c", "d", "e"]}, "words for a caption"),
        ({"layer_names": ("pool2", "pool5")}, "layer names"),
        ({"frames": np.zeros((48, 112, 112), np.uint8)}, r"\(N, H, W, 3\)"),
        ({"frames": np.zeros((48, 112, 112, 3), np.float32)}, "uint8"),
        ({"caption": "fc7"}, "no attention"),
    ],
)
def test_bad_figure_inputs_are_refused(change: dict, message: str) -> None:
    caption = hand_caption([5, 6, 7], beta=True)
    if change.pop("caption", None) == "fc7":
        caption = DecodedCaption([2, 3, 4], -1.0, None, None, None, [-0.25] * 4, True)
    arguments = {
        "frames": numbered_frames(48),
        "words": ["a", "b", "c"],
        "layer_names": LAYERS,
        **change,
    }
    with pytest.raises(FigureError, match=message):
        build_attention_figure(arguments["frames"], arguments["words"], caption,
                               arguments["layer_names"])  # fmt: skip
