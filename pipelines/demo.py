"""The embedded demo dataset: synthetic videos whose captions need local detail and motion.

Each video shows one *target* object that acts (moves left/right/up/down, bounces, grows,
shrinks or spins) and one or two static *distractors* of other colour/shape combinations.
Its captions name the target's size, colour and shape and what it does ("a small red circle
moves to the left", "there is a tiny red ball sliding left", ...). So a captioner must find the
object that acts (motion, over time), read its attributes there (fine local detail), and not
those of the distractors: one global vector mixes all objects, which is what ASTAR's
spatiotemporal attention is meant to fix.

Frames are drawn directly at the model's input size (112 x 112) with antialiased signed-distance
shapes, ``seconds`` long at ``fps``, and encoded as real H.264 files, losslessly (RGB, x264 at
qp 0); at the pipeline's 2 fps a 9 s video gives 18 sampled frames. Everything is a function of
the seed: each video draws from its own generator ``default_rng([seed, index])``, so the same
seed gives byte-identical caption tables and decoded frames equal to the rendered ones. Lossless
because x264's lossy bytes are not a function of its input alone: about 1 video in 100 of the
default demo encoded differently from run to run (one encoder thread; measured on 3 runs of 360
videos), which changed its features and so every trained score. A lossless stream decodes to
the same pixels whatever bytes the encoder chose.

``make_demo_dataset`` writes only the raw material, a dataset folder in the generic layout
(``annotations.csv`` + ``videos/``, and ``demo.json``: what was drawn); ``prepare-dataset folder
generic`` prepares it like any other dataset, and ``score-references`` scores its reference rows.
"""

from __future__ import annotations

import csv
import io
import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from itertools import repeat
from pathlib import Path

import numpy as np

from astar.pipelines.videoio import write_video

__all__ = [
    "ACTIONS",
    "COLOURS",
    "SHAPES",
    "DemoConfig",
    "DemoError",
    "VideoSpec",
    "captions_for",
    "draw_video_spec",
    "make_demo_dataset",
    "render_frames",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (45, 190, 70),
    "blue": (60, 110, 240),
    "yellow": (235, 215, 45),
    "purple": (165, 75, 215),
}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 7.0, "big": 12.0}  # radius in pixels at 112 x 112
ACTIONS = ("left", "right", "up", "down", "bounce", "grow", "shrink", "spin")
BACKGROUND = (28, 28, 32)

# Paraphrase material. Colour words have no synonyms: the colour is the fine detail to get right.
SIZE_WORDS = {"small": ("small", "tiny", "little"), "big": ("big", "large", "huge")}
SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle",),
}
# action -> (present tense, progressive) phrasings
ACTION_WORDS: dict[str, tuple[tuple[str, str], ...]] = {
    "left": (
        ("moves to the left", "moving to the left"),
        ("slides left", "sliding left"),
        ("goes left", "going left"),
        ("travels to the left", "traveling to the left"),
    ),
    "right": (
        ("moves to the right", "moving to the right"),
        ("slides right", "sliding right"),
        ("goes right", "going right"),
        ("travels to the right", "traveling to the right"),
    ),
    "up": (
        ("moves up", "moving up"),
        ("rises", "rising"),
        ("goes up", "going up"),
        ("slides upward", "sliding upward"),
    ),
    "down": (
        ("moves down", "moving down"),
        ("falls", "falling"),
        ("goes down", "going down"),
        ("slides downward", "sliding downward"),
    ),
    "bounce": (
        ("bounces", "bouncing"),
        ("bounces up and down", "bouncing up and down"),
        ("hops", "hopping"),
        ("jumps up and down", "jumping up and down"),
    ),
    "grow": (
        ("grows", "growing"),
        ("gets bigger", "getting bigger"),
        ("expands", "expanding"),
        ("grows larger", "growing larger"),
    ),
    "shrink": (
        ("shrinks", "shrinking"),
        ("gets smaller", "getting smaller"),
        ("contracts", "contracting"),
        ("becomes smaller", "becoming smaller"),
    ),
    "spin": (
        ("spins", "spinning"),
        ("rotates", "rotating"),
        ("turns around", "turning around"),
        ("spins around", "spinning around"),
    ),
}
TEMPLATES = (
    "a {size} {colour} {shape} {present}",
    "a {size} {colour} {shape} is {progressive}",
    "the {size} {colour} {shape} {present}",
    "there is a {size} {colour} {shape} {progressive}",
)
# Distinct phrasings of the least varied target (a triangle has one shape word).
MAX_CAPTIONS = (
    len(TEMPLATES)
    * min(map(len, SIZE_WORDS.values()))
    * min(map(len, SHAPE_WORDS.values()))
    * min(map(len, ACTION_WORDS.values()))
)
TRAVEL = 0.5  # a moving target travels this fraction of the frame width
BOUNCES = 3  # bounces over the video
BOUNCE_HEIGHT = 0.27  # of the frame height
GROWTH, SHRINKAGE = 1.9, 0.45  # final scale of growing / shrinking targets
SPIN_TURNS = 1.5  # turns over the video: 30 degrees per frame sampled at 2 fps from 9 s


class DemoError(Exception):
    """The demo settings are invalid."""


@dataclass(frozen=True)
class DemoConfig:
    """What the demo dataset holds; every default fits the 15-minute CPU demo."""

    seed: int = 0  # everything is a function of it
    n_train: int = 240  # videos per split
    n_val: int = 40
    n_test: int = 80
    captions_per_video: int = 5  # distinct paraphrases per video
    size: int = 112  # frames are drawn at size x size (the model's input size)
    fps: float = 8.0  # encoded frame rate (the pipeline samples 2 fps from it)
    seconds: float = 9.0  # video length: 18 frames at 2 fps, at least C3D's 16
    max_distractors: int = 2  # static distractors per video: 1..max_distractors
    codec: str = "libx264rgb"  # astar.pipelines.videoio codec; lossless, see the module

    def __post_init__(self) -> None:
        problems = []
        if min(self.n_train, self.n_val, self.n_test) < 0 or self.n_train < 1:
            problems.append("n_train must be >= 1 and n_val, n_test >= 0")
        if not 2 <= self.captions_per_video <= MAX_CAPTIONS:
            # at least 2 for leave-one-out; at most the phrasings of the least varied target
            problems.append(f"captions_per_video must be in 2..{MAX_CAPTIONS}")
        if self.size < 64 or self.size % 2:
            problems.append("size must be even and >= 64")
        if self.fps <= 0 or self.seconds <= 0:
            problems.append("fps and seconds must be positive")
        if self.max_distractors < 1:
            problems.append("max_distractors must be >= 1")
        if problems:
            raise DemoError("invalid demo config: " + "; ".join(problems))

    @property
    def n_frames(self) -> int:
        return round(self.fps * self.seconds)


@dataclass(frozen=True)
class ObjectSpec:
    """One drawn object."""

    shape: str  # one of SHAPES
    colour: str  # a key of COLOURS
    size: str  # a key of SIZES
    x: float  # start centre, pixels
    y: float
    angle: float  # start rotation, radians


@dataclass(frozen=True)
class VideoSpec:
    """One demo video: the target, what it does, and the distractors."""

    target: ObjectSpec
    action: str  # one of ACTIONS
    distractors: tuple[ObjectSpec, ...]


# --------------------------------------------------------------------------------------------
# Motion


def _track(spec: ObjectSpec, action: str, times: np.ndarray, frame: int) -> tuple[np.ndarray, ...]:
    """Centre x, y, scale and angle of an object over ``times`` in [0, 1] (each (T,))."""
    x = np.full_like(times, spec.x)
    y = np.full_like(times, spec.y)
    scale = np.ones_like(times)
    angle = np.full_like(times, spec.angle)
    travel = TRAVEL * frame
    if action == "left":
        x = spec.x - travel * times
    elif action == "right":
        x = spec.x + travel * times
    elif action == "up":
        y = spec.y - travel * times
    elif action == "down":
        y = spec.y + travel * times
    elif action == "bounce":
        y = spec.y - BOUNCE_HEIGHT * frame * np.abs(np.sin(math.pi * BOUNCES * times))
    elif action == "grow":
        scale = 1.0 + (GROWTH - 1.0) * times
    elif action == "shrink":
        scale = 1.0 + (SHRINKAGE - 1.0) * times
    elif action == "spin":
        angle = spec.angle + 2 * math.pi * SPIN_TURNS * times
    elif action != "static":
        raise DemoError(f"unknown action {action!r}")
    return x, y, scale, angle


def _extent(
    spec: ObjectSpec, action: str, frame: int, times: np.ndarray | None = None
) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) the object covers at ``times`` (default: finely sampled)."""
    times = np.linspace(0.0, 1.0, 97) if times is None else times
    x, y, scale, _ = _track(spec, action, times, frame)  # each (T,)
    reach = SIZES[spec.size] * scale * 1.2 + 1.0  # circumradius (1.2: the triangle), antialiasing
    return (
        float((x - reach).min()),
        float((y - reach).min()),
        float((x + reach).max()),
        float((y + reach).max()),
    )


def _start_range(
    size: str, action: str, frame: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """Where the centre may start so that the object stays in the frame the whole video."""
    margin = SIZES[size] * 1.2 * (GROWTH if action == "grow" else 1.0) + 2.0
    low, high = margin, frame - margin
    travel = TRAVEL * frame
    x_range, y_range = (low, high), (low, high)
    if action == "left":
        x_range = (low + travel, high)
    elif action == "right":
        x_range = (low, high - travel)
    elif action == "up":
        y_range = (low + travel, high)
    elif action == "down":
        y_range = (low, high - travel)
    elif action == "bounce":
        y_range = (low + BOUNCE_HEIGHT * frame, high)
    return x_range, y_range


def _overlaps(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    return not (
        a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
    )


def draw_video_spec(rng: np.random.Generator, config: DemoConfig) -> VideoSpec:
    """A random target, action and non-overlapping distractors of other colour/shape pairs."""
    frame = config.size
    action = ACTIONS[rng.integers(len(ACTIONS))]
    # A spinning circle looks static: spinners are squares or triangles.
    shapes = [s for s in SHAPES if not (action == "spin" and s == "circle")]
    shape = shapes[rng.integers(len(shapes))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    (x0, x1), (y0, y1) = _start_range(size, action, frame)
    target = ObjectSpec(
        shape, colour, size, rng.uniform(x0, x1), rng.uniform(y0, y1), rng.uniform(0, 2 * math.pi)
    )
    taken = [_extent(target, action, frame)]
    used = {(shape, colour)}
    distractors: list[ObjectSpec] = []
    wanted = int(rng.integers(1, config.max_distractors + 1))
    for _ in range(200):  # rejection sampling of free places; a crowded frame gets fewer
        if len(distractors) == wanted:
            break
        pair = (SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))])
        d_size = list(SIZES)[rng.integers(len(SIZES))]
        (a0, a1), (b0, b1) = _start_range(d_size, "static", frame)
        candidate = ObjectSpec(
            *pair, d_size, rng.uniform(a0, a1), rng.uniform(b0, b1), rng.uniform(0, 2 * math.pi)
        )
        box = _extent(candidate, "static", frame)
        if pair in used or any(_overlaps(box, other, gap=3.0) for other in taken):
            continue
        distractors.append(candidate)
        taken.append(box)
        used.add(pair)
    if not distractors:
        raise DemoError(f"no room for a distractor in a {frame} x {frame} frame")
    return VideoSpec(target, action, tuple(distractors))


# --------------------------------------------------------------------------------------------
# Drawing


def _coverage(
    shape: str, dx: np.ndarray, dy: np.ndarray, radius: np.ndarray, angle: np.ndarray
) -> np.ndarray:
    """Antialiased coverage in [0, 1] from a signed distance (pixels, negative inside).

    dx: (T, 1, W) and dy: (T, H, 1) offsets of the pixel centres from the object centre;
    radius, angle: (T,). Returns (T, H, W).
    """
    radius = radius[:, None, None]  # (T, 1, 1)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]  # (T, 1, 1)
    if shape == "circle":
        distance = np.hypot(dx, dy) - radius  # (T, H, W)
    elif shape == "square":
        u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # (T, H, W) in the square's frame
        distance = np.maximum(np.abs(u), np.abs(v)) - 0.9 * radius
    elif shape == "triangle":
        # Equilateral, circumradius 1.2 r: inside all three edges at inradius 0.6 r.
        edges = []
        for k in range(3):
            normal = angle[:, None, None] + 2 * math.pi * k / 3  # (T, 1, 1)
            edges.append(np.cos(normal) * dx + np.sin(normal) * dy)  # (T, H, W)
        distance = np.max(np.stack(edges), axis=0) - 0.6 * radius
    else:
        raise DemoError(f"unknown shape {shape!r}")
    return np.clip(0.5 - distance, 0.0, 1.0)  # (T, H, W)


def render_frames(spec: VideoSpec, config: DemoConfig) -> np.ndarray:
    """(T, size, size, 3) uint8 RGB frames of one video."""
    frame, count = config.size, config.n_frames
    times = np.linspace(0.0, 1.0, count)  # (T,)
    centres = np.arange(frame, dtype=np.float32) + 0.5  # pixel centres
    image = np.empty((count, frame, frame, 3), dtype=np.float32)  # (T, H, W, 3)
    image[:] = BACKGROUND
    objects = [(d, "static") for d in spec.distractors] + [(spec.target, spec.action)]
    for obj, action in objects:  # the target last: it is drawn on top
        x, y, scale, angle = (a.astype(np.float32) for a in _track(obj, action, times, frame))
        # Only the box the object sweeps over is computed: a few times faster than whole frames.
        x0, y0, x1, y1 = _extent(obj, action, frame, times)
        cols = slice(max(0, math.floor(x0)), min(frame, math.ceil(x1) + 1))
        rows = slice(max(0, math.floor(y0)), min(frame, math.ceil(y1) + 1))
        dx = centres[None, None, cols] - x[:, None, None]  # (T, 1, w)
        dy = centres[None, rows, None] - y[:, None, None]  # (T, h, 1)
        alpha = _coverage(obj.shape, dx, dy, SIZES[obj.size] * scale, angle)  # (T, h, w)
        region = image[:, rows, cols]  # (T, h, w, 3), a view
        colour = np.asarray(COLOURS[obj.colour], dtype=np.float32)  # (3,)
        region += (colour - region) * alpha[..., None]
    return np.round(image).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Captions


def captions_for(spec: VideoSpec, count: int, rng: np.random.Generator) -> list[str]:
    """``count`` distinct paraphrases describing the target."""
    target = spec.target
    options = [
        template.format(
            size=size, colour=target.colour, shape=shape, present=present, progressive=progressive
        )
        for template in TEMPLATES
        for size in SIZE_WORDS[target.size]
        for shape in SHAPE_WORDS[target.shape]
        for present, progressive in ACTION_WORDS[spec.action]
    ]
    chosen = rng.choice(len(options), size=count, replace=False)
    return [options[i] for i in chosen]


# --------------------------------------------------------------------------------------------
# The dataset


def _splits(config: DemoConfig) -> list[str]:
    return ["train"] * config.n_train + ["val"] * config.n_val + ["test"] * config.n_test


def _make_video(config: DemoConfig, index: int, videos_dir: Path) -> tuple[list[str], VideoSpec]:
    """Draw, render and encode video ``index``; its captions and spec. Depends on nothing else,
    so videos can be made in any order or process."""
    rng = np.random.default_rng([config.seed, index])
    spec = draw_video_spec(rng, config)
    path = videos_dir / f"{_video_id(index)}.mp4"
    write_video(path, render_frames(spec, config), config.fps, config.codec)
    return captions_for(spec, config.captions_per_video, rng), spec


def _video_id(index: int) -> str:
    return f"demo{index:04d}"


def make_demo_dataset(out: str | Path, config: DemoConfig = DemoConfig(), workers: int = 1) -> Path:
    """Render the videos into ``out/videos/``, write ``out/annotations.csv`` and ``demo.json``.

    ``out`` is then a generic dataset folder (``prepare-dataset folder generic`` or
    ``read_folder("generic", out)`` reads it); nothing is prepared here. ``workers`` processes
    render and encode; the output does not depend on it. Returns the captions file.
    """
    out = Path(out)
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    splits = _splits(config)
    indices = range(len(splits))
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            made = list(pool.map(_make_video, repeat(config), indices, repeat(videos_dir)))
    else:
        made = [_make_video(config, index, videos_dir) for index in indices]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["video_id", "caption", "split"])
    specs = {}
    for index, (split, (captions, spec)) in enumerate(zip(splits, made, strict=True)):
        writer.writerows([_video_id(index), caption, split] for caption in captions)
        specs[_video_id(index)] = {"split": split, **asdict(spec)}
    (out / "annotations.csv").write_text(buffer.getvalue(), encoding="utf-8")
    (out / "demo.json").write_text(
        json.dumps({"config": asdict(config), "videos": specs}, indent=1) + "\n", encoding="utf-8"
    )
    return out / "annotations.csv"
