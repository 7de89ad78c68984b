"""Attention pictures like the paper's Figure 3: for each word, where the captioner looked.

For every generated word the picture shows the frame at the most attended location (argmax of
alpha) with the attended cell outlined and, for the multi-layer variants, a bar chart of beta
over pool2..pool5 under it (single-layer variants attend one layer: the frame alone). The first
word comes from fc7 alone (eq. 1): its panel shows the middle frame, no cell and no bars.

From a location to pixels (ASTAR-NOTES, stage one). Location ``i`` flattens pool5's grid
``(t h w)`` (T5 x 4 x 4 for 112-pixel frames); the alignment (eq. 4) puts every layer on that
grid with pool5's own windows, so the mapping of pool5 holds for every layer.

- Time. conv kernels are 3 with padding 1, so they keep a step's centre; pool1 keeps time and
  pool2..pool5 halve it (kernel = stride = 2). Pool5 step t therefore gathers the sampled frames
  [16t, 16t + 16): 2 conv5 steps, 4 pool3 steps, 8 pool2 steps, 16 frames. Its receptive-field
  centre is 16t + 7.5 (pool2 step u is centred on frame 2u + 0.5, pool3 step on 4u + 1.5, pool4
  on 8u + 3.5, pool5 on 16u + 7.5); the frame shown is 16t + 8, the middle of the window and one
  of the two frames nearest that centre. The 3x3x3 convs widen the true receptive field beyond
  the window, but the window is what the max-pools select from. A video padded to 16 frames
  (fewer frames given than the window) shows its last frame.
- Space. pool1..pool4 halve height and width (floor), so a pool4 cell q covers the pixels
  [16q, 16q + 16) of the frame C3D saw (7 cells for 112 pixels). pool5 (kernel = stride = 2,
  padding 1) then makes cell j the max over pool4 cells {2j - 1, 2j} that exist: for 112 pixels
  the rows (and columns) of the 4 x 4 grid cover [0, 16), [16, 48), [48, 80), [80, 112); the
  first cell is half as wide because its window starts in the padding. Boxes are half-open
  (y0, x0, y1, x1) pixel bounds, scaled to the frames' own size when they were not C3D's input
  size (the pipeline resizes without cropping, so a box scales with the frame).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from astar.store.geometry import TIME_STRIDES
from astar.train.decoding import DecodedCaption

POOL5_FRAMES = TIME_STRIDES["pool5"]  # sampled frames per pool5 step (pool1 keeps time)
POOL4_PIXELS = 16  # pixels per pool4 cell: pool1..pool4 each halve height and width
POOL5_PADDING = 1  # pool5's spatial padding: its first window starts one pool4 cell early
PANEL_INCHES = (1.9, 3.4)  # (width, height) of one word's column in the picture


class FigureError(ValueError):
    """Inputs that cannot make an attention picture, with the reason."""


def pool5_frame_window(step: int) -> tuple[int, int]:
    """The sampled frames [start, stop) that pool5 time step ``step`` max-pools over."""
    if step < 0:
        raise FigureError(f"pool5 step must be >= 0, got {step}")
    return POOL5_FRAMES * step, POOL5_FRAMES * (step + 1)


def pool5_cell_span(cell: int, cells: int, size: int) -> tuple[int, int]:
    """Pixels [start, stop) along one axis of a ``size``-pixel C3D input covered by pool5 cell
    ``cell`` of ``cells``: the pool4 cells {2 cell - 1, 2 cell} that exist, 16 pixels each."""
    pool4_cells = size // POOL4_PIXELS  # floor through pool1..pool4
    if pool4_cells < 1 or cells != pool4_cells // 2 + 1:  # pool5: floor((p + 2 - 2) / 2) + 1
        raise FigureError(
            f"a {size}-pixel C3D input has {pool4_cells} pool4 cells and "
            f"{pool4_cells // 2 + 1 if pool4_cells else 0} pool5 cells, not the grid's {cells}: "
            "pass the frames as C3D saw them, or their input_size"
        )
    if not 0 <= cell < cells:
        raise FigureError(f"pool5 cell {cell} is outside 0..{cells - 1}")
    first = max(2 * cell - POOL5_PADDING, 0)
    last = min(2 * cell + 1 - POOL5_PADDING, pool4_cells - 1)
    return POOL4_PIXELS * first, POOL4_PIXELS * (last + 1)


def location_to_frame(
    index: int,
    grid: tuple[int, int, int],
    n_frames: int,
    frame_size: int | tuple[int, int],
) -> tuple[int, tuple[int, int, int, int]]:
    """The frame and pixel box of attention location ``index`` (module docstring).

    Args:
        index: a location of alpha, flattened ``(t h w)`` over ``grid``
        grid: (T5, h, w) of the decoded caption
        n_frames: frames of the video (as C3D saw them, or the true count before padding)
        frame_size: (height, width) of C3D's input frames, or one size for square frames
    Returns:
        (frame index, (y0, x0, y1, x1)) with half-open pixel bounds in a C3D input frame
    """
    steps, rows, cols = grid
    if not 0 <= index < steps * rows * cols:
        raise FigureError(f"location {index} is outside the {steps}x{rows}x{cols} grid")
    height, width = (frame_size, frame_size) if isinstance(frame_size, int) else frame_size
    step, row, col = np.unravel_index(index, (steps, rows, cols))  # '(t h w)' order
    start, stop = pool5_frame_window(int(step))
    if start >= n_frames:
        raise FigureError(
            f"location {index} is pool5 step {step} (frames {start}..{stop - 1}), past the "
            f"video's {n_frames} frames"
        )
    frame = min(start + POOL5_FRAMES // 2, n_frames - 1)
    y0, y1 = pool5_cell_span(int(row), rows, height)
    x0, x1 = pool5_cell_span(int(col), cols, width)
    return frame, (y0, x0, y1, x1)


def build_attention_figure(
    frames: np.ndarray,
    words: Sequence[str],
    decoded: DecodedCaption,
    layer_names: Sequence[str],
    input_size: tuple[int, int] | None = None,
) -> Figure:
    """The picture as a matplotlib Figure (Agg canvas): one column (panel) per word.

    Args:
        frames: (N, H, W, 3) uint8 RGB, the video's sampled frames
        words: one per generated token: the caption's words, optionally followed by a word for
            end-of-sentence when the caption reached it
        decoded: the caption, with its attention
        layer_names: the attended layers, in beta's order (``config.attended_layers``)
        input_size: (height, width) C3D saw; None: the frames' own size
    """
    _check_inputs(frames, words, decoded, layer_names)
    n_frames, height, width = frames.shape[:3]
    input_height, input_width = input_size or (height, width)
    scale_y, scale_x = height / input_height, width / input_width
    show_beta = decoded.beta is not None
    n_rows = 2 if show_beta else 1
    figure = Figure(
        figsize=(PANEL_INCHES[0] * len(words), PANEL_INCHES[1] * n_rows / 2 + 0.4),
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(n_rows, len(words), squeeze=False)  # (rows, words)
    alpha = decoded.alpha.float()  # (S, I)
    for column, word in enumerate(words):
        picture = axes[0, column]
        picture.set_axis_off()
        picture.set_title(word, fontsize=11)
        if not bool(torch.isfinite(alpha[column]).all()):
            # The first word comes from fc7 alone: no location, no layer weights.
            picture.imshow(frames[n_frames // 2])
            picture.text(0.5, -0.08, "fc7 only", transform=picture.transAxes, ha="center")
            if show_beta:
                axes[1, column].set_axis_off()
            continue
        location = int(alpha[column].argmax())
        frame, (y0, x0, y1, x1) = location_to_frame(
            location, decoded.grid, n_frames, (input_height, input_width)
        )
        picture.imshow(frames[frame])
        picture.add_patch(
            Rectangle(
                (x0 * scale_x - 0.5, y0 * scale_y - 0.5),
                (x1 - x0) * scale_x,
                (y1 - y0) * scale_y,
                fill=False,
                edgecolor="red",
                linewidth=2,
            )
        )
        weight = float(alpha[column, location])
        picture.text(
            0.5, -0.08, f"frame {frame}  α {weight:.2f}", transform=picture.transAxes, ha="center"
        )
        if show_beta:
            _beta_bars(axes[1, column], decoded.beta[column].float().numpy(), layer_names)
    return figure


def attention_figure(
    frames: np.ndarray,
    words: list[str],
    decoded: DecodedCaption,
    layer_names: Sequence[str],
    path: str | Path,
    input_size: tuple[int, int] | None = None,
) -> Path:
    """Write the attention picture of one captioned video as a PNG; returns its path."""
    path = Path(path)
    figure = build_attention_figure(frames, words, decoded, layer_names, input_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=100)
    return path


def caption_words(text: str, decoded: DecodedCaption) -> list[str]:
    """The words of one panel each: the caption's, and ``<eos>`` where the model ended it."""
    return text.split() + (["<eos>"] if decoded.finished else [])


def split_figures(
    trained,
    video_paths: dict[str, str],
    captions: dict[str, DecodedCaption],
    folder: Path,
    say: Callable[[str], None],
) -> list[Path]:
    """Attention pictures of the videos of ``captions`` (in their order), their frames decoded
    again from ``video_paths`` as the features were, in the isolated decoder: a video that
    hangs or breaks the decoder costs its picture (said through ``say``), not the evaluation.

    ``trained`` is an :class:`~astar.evaluate.inference.TrainedCaptioner`. A variant that
    attends no location gets a README.txt in ``folder`` saying so.
    """
    from astar.evaluate.inference import decode_config
    from astar.extract.decode import VideoDecodeError
    from astar.extract.isolation import IsolatedDecoder

    folder.mkdir(parents=True, exist_ok=True)
    layer_names = trained.model.config.attended_layers
    if not layer_names:
        note = f"{trained.variant} attends to no location: no attention pictures"
        (folder / "README.txt").write_text(note + "\n")  # the folder exists for every variant
        say(note)
        return []
    wanted = {}
    for vid in captions:
        if video_paths.get(vid, ""):
            wanted[vid] = video_paths[vid]
        else:
            say(f"no video file for {vid}: no attention picture")
    written = []
    with IsolatedDecoder(decode_config(trained.schema)) as decoder:
        for vid, (_, video) in zip(wanted, decoder.imap(list(wanted.values())), strict=True):
            if isinstance(video, VideoDecodeError):
                say(f"{vid}: no attention picture ({video.kind}): {video}")
                continue
            caption = captions[vid]
            words = caption_words(trained.vocabulary.decode(caption.tokens), caption)
            safe = vid.replace("/", "_")
            path = folder / f"{safe}.png"
            written.append(attention_figure(video.frames, words, caption, layer_names, path))
    return written


def _beta_bars(axes, beta: np.ndarray, layer_names: Sequence[str]) -> None:
    """Beta over the layers as bars, the chosen (largest) one highlighted."""
    colours = ["tab:red" if k == int(beta.argmax()) else "tab:grey" for k in range(len(beta))]
    axes.bar(range(len(beta)), beta, color=colours)
    axes.set_xticks(range(len(beta)), list(layer_names), rotation=45, fontsize=8)
    axes.set_ylim(0.0, 1.0)
    axes.set_ylabel("β", fontsize=9)
    axes.tick_params(axis="y", labelsize=7)


def _check_inputs(
    frames: np.ndarray,
    words: Sequence[str],
    decoded: DecodedCaption,
    layer_names: Sequence[str],
) -> None:
    """Refuse inputs that cannot be drawn, saying why."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[3] != 3:
        raise FigureError(
            f"frames must be an (N, H, W, 3) array, got {getattr(frames, 'shape', type(frames))}"
        )
    if frames.dtype != np.uint8 or frames.shape[0] == 0:
        raise FigureError(f"frames must be non-empty uint8 RGB, got {frames.dtype} {frames.shape}")
    if decoded.alpha is None or decoded.grid is None:
        raise FigureError("the caption has no attention over locations (the fc7 variant)")
    steps = decoded.alpha.shape[0]
    if decoded.alpha.shape[1] != math.prod(decoded.grid):
        raise FigureError(
            f"alpha has {decoded.alpha.shape[1]} locations, the grid {decoded.grid} has "
            f"{math.prod(decoded.grid)}"
        )
    if len(words) not in (len(decoded.tokens), steps) or not words:
        raise FigureError(
            f"{len(words)} words for a caption of {len(decoded.tokens)} words and {steps} "
            "generated tokens: give one word per token (end-of-sentence optional)"
        )
    layers = 1 if decoded.beta is None else decoded.beta.shape[1]
    if len(layer_names) != layers:
        raise FigureError(f"{len(layer_names)} layer names for {layers} attended layers")
