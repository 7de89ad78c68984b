"""C3D of stage one: shapes, clips, weights files, init, preprocessing, precision."""

from __future__ import annotations

import functools
import hashlib
import itertools
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from einops import rearrange

from astar.extract.c3d import (
    BACKBONES,
    C3D,
    TAPS,
    C3DExtractor,
    C3DSpec,
    FramesError,
    WeightsError,
    build_c3d,
    check_state_dict,
    clip_starts,
    load_state_dict_file,
    preprocess,
)
from astar.store.schema import Weights

SMALL = "c3d-small"


def _frames(n: int, seed: int = 0) -> np.ndarray:
    """(n, 112, 112, 3) uint8: a smooth moving pattern plus noise, so frames differ."""
    rng = np.random.default_rng(seed)
    t, y, x = np.meshgrid(np.arange(n), np.arange(112), np.arange(112), indexing="ij")
    pattern = 127 + 100 * np.sin((x + 3 * t) / 9.0)[..., None] * np.cos(y / 13.0)[..., None]
    noisy = pattern + rng.normal(0, 20, (n, 112, 112, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _relative_error(actual: np.ndarray | torch.Tensor, expected: np.ndarray | torch.Tensor):
    """Relative Frobenius error ||actual - expected|| / ||expected||."""
    actual, expected = (torch.as_tensor(v, dtype=torch.float64) for v in (actual, expected))
    return float(torch.linalg.norm(actual - expected) / torch.linalg.norm(expected))


@pytest.fixture(scope="module")
def small_extractor() -> C3DExtractor:
    return C3DExtractor(SMALL, device="cpu", clip_batch=3)


# --------------------------------------------------------------------------------------------
# Clips


@pytest.mark.parametrize(
    ("n_frames", "starts"),
    [(16, [0]), (17, [0, 1]), (24, [0, 8]), (25, [0, 8, 9]), (40, [0, 8, 16, 24])],
)
def test_clip_starts_known_values(n_frames: int, starts: list[int]) -> None:
    assert clip_starts(n_frames) == starts


@pytest.mark.parametrize("n_frames", range(16, 70))
def test_clips_cover_the_video_and_end_at_its_last_frame(n_frames: int) -> None:
    starts = clip_starts(n_frames)
    assert starts[0] == 0 and starts[-1] + 16 == n_frames
    assert all(0 < later - earlier <= 8 for earlier, later in itertools.pairwise(starts))


def test_clip_starts_refuses_a_video_shorter_than_a_clip() -> None:
    with pytest.raises(ValueError, match="15 frames"):
        clip_starts(15)


# --------------------------------------------------------------------------------------------
# Shapes


def _expected_shapes(backbone: str, n_frames: int) -> dict[str, tuple[int, ...]]:
    spec = BACKBONES[backbone]
    return {
        "pool2": (spec.conv2, n_frames // 2, 28, 28),
        "pool3": (spec.conv3, n_frames // 4, 14, 14),
        "pool4": (spec.conv4, n_frames // 8, 7, 7),
        "pool5": (spec.conv5, n_frames // 16, 4, 4),
    }


@functools.cache
def _meta_model(backbone: str) -> C3D:
    """The network on the meta device: shapes without arithmetic, so full size costs nothing."""
    return C3D(BACKBONES[backbone]).to("meta")


@pytest.mark.parametrize("backbone", ["c3d", SMALL])
@pytest.mark.parametrize("n_frames", [1, 5, 16, 17, 40])
def test_conv_pass_shapes_for_any_length(backbone: str, n_frames: int) -> None:
    model = _meta_model(backbone)
    taps = model.conv_features(torch.empty(2, 3, n_frames, 112, 112, device="meta"))
    assert list(taps) == list(TAPS)
    assert {name: tuple(tap.shape) for name, tap in taps.items()} == {
        name: (2, *shape) for name, shape in _expected_shapes(backbone, n_frames).items()
    }


def test_conv_pass_on_a_single_frame_runs_and_leaves_empty_time_axes() -> None:
    model, _ = build_c3d(SMALL)
    x = preprocess(_frames(1), "unit-rgb")[None]  # (1, 3, 1, 112, 112)
    with torch.inference_mode():
        taps = model.conv_features(x)
    assert {name: tuple(tap.shape[1:]) for name, tap in taps.items()} == _expected_shapes(SMALL, 1)


def _check_extractor_shapes(extractor: C3DExtractor, backbone: str, n_frames: int) -> None:
    features = extractor(_frames(n_frames))
    spec = BACKBONES[backbone]
    expected = _expected_shapes(backbone, n_frames) | {"fc7": (len(clip_starts(n_frames)), spec.fc)}
    assert {name: value.shape for name, value in features.items()} == expected
    assert all(value.dtype == np.float32 for value in features.values())
    assert all(value.flags.c_contiguous for value in features.values())
    # layer_shapes is what the store is created with: the outputs without their time axis.
    layer_shapes = extractor.layer_shapes()
    assert layer_shapes == {
        name: value.shape[:1] + value.shape[2:] if name != "fc7" else value.shape[1:]
        for name, value in features.items()
    }
    # ReLU then max-pool: non-negative, and a live network is not all zeros.
    assert all((value >= 0).all() and (value > 0).mean() > 0.05 for value in features.values())


@pytest.mark.parametrize("n_frames", [16, 17, 40])
def test_extractor_shapes_small(small_extractor: C3DExtractor, n_frames: int) -> None:
    _check_extractor_shapes(small_extractor, SMALL, n_frames)


@pytest.mark.slow
@pytest.mark.parametrize("n_frames", [16, 17, 40])
def test_extractor_shapes_full(n_frames: int) -> None:
    _check_extractor_shapes(_full_extractor(), "c3d", n_frames)


_FULL: dict[str, C3DExtractor] = {}


def _full_extractor() -> C3DExtractor:
    """Full c3d, built once for the slow tests that need it."""
    if "c3d" not in _FULL:
        _FULL["c3d"] = C3DExtractor("c3d", device="cpu")
    return _FULL["c3d"]


def test_extractor_info(small_extractor: C3DExtractor) -> None:
    assert small_extractor.info == {
        "backbone": SMALL,
        "weights": Weights(seed=0),
        "preprocessing": "unit-rgb",
        "precision": "fp32",
        "device": "cpu",
        "clip_length": 16,
        "clip_stride": 8,
    }
    assert C3DExtractor(SMALL).info["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_backbone_widths() -> None:
    # The paper's widths, and a quarter of them everywhere (fc8 keeps the 487 Sports-1M classes).
    assert BACKBONES["c3d"] == C3DSpec(64, 128, 256, 512, 512, 4096, 487)
    assert BACKBONES[SMALL] == C3DSpec(16, 32, 64, 128, 128, 1024, 487)


@pytest.mark.parametrize(
    ("frames", "message"),
    [
        (np.zeros((15, 112, 112, 3), np.uint8), "15 frames"),
        (np.zeros((16, 112, 112, 3), np.float32), "uint8"),
        (np.zeros((16, 128, 128, 3), np.uint8), r"\(16, 128, 128, 3\)"),
        (np.zeros((16, 112, 112), np.uint8), r"\(16, 112, 112\)"),
    ],
)
def test_extractor_refuses_bad_frames(
    small_extractor: C3DExtractor, frames: np.ndarray, message: str
) -> None:
    with pytest.raises(FramesError, match=message):
        small_extractor(frames)


# --------------------------------------------------------------------------------------------
# What the extractor computes


def test_taps_are_one_conv_pass_and_fc7_rows_are_single_clips(
    small_extractor: C3DExtractor,
) -> None:
    frames = _frames(33)  # clips at 0, 8, 16, 17: batches of 3 and 1
    features = small_extractor(frames)
    # A plain model in the default layout, run without the extractor's batching and layout.
    model, _ = build_c3d(SMALL)
    x = preprocess(frames, "unit-rgb")  # (3, 33, 112, 112)
    with torch.inference_mode():
        taps = model.conv_features(x[None])
        for name in TAPS:
            np.testing.assert_allclose(features[name], taps[name][0].numpy(), rtol=1e-4, atol=1e-5)
        for row, start in enumerate(clip_starts(33)):
            clip = x[None, :, start : start + 16]  # (1, 3, 16, 112, 112)
            alone = model.fc7(clip)[0].numpy()
            np.testing.assert_allclose(features["fc7"][row], alone, rtol=1e-4, atol=1e-5)
    # The clips see different frames, so their fc7 differ.
    assert np.abs(np.diff(features["fc7"], axis=0)).max() > 1e-2


def test_a_sixteen_frame_video_reuses_its_conv_pass_for_fc7(small_extractor) -> None:
    frames = _frames(16)
    features = small_extractor(frames)
    model, _ = build_c3d(SMALL)
    with torch.inference_mode():
        alone = model.fc7(preprocess(frames, "unit-rgb")[None])  # (1, fc)
    np.testing.assert_allclose(features["fc7"], alone.numpy(), rtol=1e-4, atol=1e-5)


def test_clip_batch_does_not_change_fc7() -> None:
    frames = _frames(25)  # clips at 0, 8, 9
    one = C3DExtractor(SMALL, device="cpu", clip_batch=1)(frames)["fc7"]
    all_at_once = C3DExtractor(SMALL, device="cpu", clip_batch=8)(frames)["fc7"]
    np.testing.assert_allclose(one, all_at_once, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Random init


def test_seeded_init_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    rng_state = torch.get_rng_state()
    first, description = build_c3d(SMALL, seed=3)
    second, _ = build_c3d(SMALL, seed=3)
    other, _ = build_c3d(SMALL, seed=4)
    assert description == Weights(seed=3) and str(description) == "random(seed=3)"
    assert torch.equal(torch.get_rng_state(), rng_state)
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    weights = [key for key in first.state_dict() if key.endswith(".weight")]
    assert all(not torch.equal(first.state_dict()[k], other.state_dict()[k]) for k in weights)
    assert all(not first.state_dict()[k.replace("weight", "bias")].any() for k in weights)


def _tap_scales(backbone: str) -> dict[str, float]:
    """Std of every tap and of fc7 relative to the input's, for a random-weight network."""
    model, _ = build_c3d(backbone, seed=0)
    x = preprocess(_frames(16, seed=1), "unit-rgb")[None]  # (1, 3, 16, 112, 112)
    with torch.inference_mode():
        taps = model.conv_features(x)
        taps["fc7"] = model.fc7_from_pool5(taps["pool5"])
    return {name: float(tap.std() / x.std()) for name, tap in taps.items()}


def test_kaiming_init_keeps_activation_scale_through_the_convs_small() -> None:
    # Measured 0.9-1.8 for every tap: an init with the wrong gain drifts by ~2x per layer,
    # so after eight convolutions it would be off by orders of magnitude.
    scales = _tap_scales(SMALL)
    assert all(0.25 < scale < 4.0 for scale in scales.values()), scales


@pytest.mark.slow
def test_kaiming_init_keeps_activation_scale_through_the_convs_full() -> None:
    scales = _tap_scales("c3d")
    assert all(0.25 < scale < 4.0 for scale in scales.values()), scales


# --------------------------------------------------------------------------------------------
# Preprocessing


def test_preprocess_known_values() -> None:
    frames = np.zeros((2, 4, 5, 3), np.uint8)
    frames[1, 2, 3] = (10, 20, 30)  # R, G, B
    caffe = preprocess(frames, "caffe-bgr")
    unit = preprocess(frames, "unit-rgb")
    assert caffe.shape == unit.shape == (3, 2, 4, 5)
    assert caffe.dtype == unit.dtype == torch.float32
    # Caffe: BGR order, 0-255, minus the Sports-1M mean (B 90.25, G 97.66, R 101.41).
    torch.testing.assert_close(
        caffe[:, 1, 2, 3], torch.tensor([30 - 90.25, 20 - 97.66, 10 - 101.41])
    )
    torch.testing.assert_close(caffe[:, 0, 0, 0], torch.tensor([-90.25, -97.66, -101.41]))
    # Unit: RGB order, [-1, 1].
    torch.testing.assert_close(unit[:, 1, 2, 3], (torch.tensor([10.0, 20, 30]) - 127.5) / 127.5)
    assert float(unit[:, 0, 0, 0].max()) == -1.0


def test_preprocess_accepts_read_only_frames_without_warning() -> None:
    frames = _frames(2)
    frames.flags.writeable = False  # as decoders may hand them over
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = preprocess(frames, "unit-rgb")
    torch.testing.assert_close(x, preprocess(frames.copy(), "unit-rgb"))


def test_preprocess_refuses_an_unknown_mode() -> None:
    with pytest.raises(ValueError, match="imagenet"):
        preprocess(np.zeros((1, 4, 4, 3), np.uint8), "imagenet")


# --------------------------------------------------------------------------------------------
# Weights files


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".pickle", ".pt", ".pth", ".safetensors"])
def test_load_state_dict_file_round_trip_and_sha256(tmp_path: Path, suffix: str) -> None:
    state = {"conv1.weight": torch.randn(4, 3, 3, 3, 3), "conv1.bias": torch.randn(4)}
    path = _save(state, tmp_path / f"w{suffix}")
    loaded, digest = load_state_dict_file(path)
    assert digest == Weights(sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


class _Payload:
    """Unpickling this creates the file ``marker``: stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's, about the payload
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_pickle_that_runs_code_is_refused_without_side_effect(
    tmp_path: Path, writer: str
) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"conv1.weight": _Payload(marker)}
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    with pytest.raises(WeightsError, match=r"evil\.pt: refused: .*Unsupported"):
        load_state_dict_file(path)
    assert not marker.exists()
    # The payload is live: a plain unpickler does run it (so the test above can fail).
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("garbage.pt", b"not a pickle at all", r"garbage\.pt: refused: .*Unsupported operand"),
        ("garbage.safetensors", b"\x00" * 20, r"garbage\.safetensors: not a readable safetensors"),
        ("weights.h5", b"", r"weights\.h5: unknown weights format"),
    ],
)
def test_unreadable_weights_files_are_refused(
    tmp_path: Path, name: str, content: bytes, message: str
) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        load_state_dict_file(tmp_path / name)


def test_weights_that_are_not_a_flat_state_dict_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(WeightsError, match=r"nested\.pt: expected a flat state dict"):
        load_state_dict_file(path)
    with pytest.raises(WeightsError, match="no such weights file"):
        load_state_dict_file(tmp_path / "absent.pt")


def test_weights_are_only_for_the_full_backbone(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"w\.pt: .*only the full 'c3d' backbone.*c3d-small"):
        build_c3d(SMALL, weights=tmp_path / "w.pt")


def test_a_wrong_weights_file_names_every_problem(tmp_path: Path) -> None:
    state = {
        "conv1.weight": torch.zeros(64, 3, 3, 3, 1),  # misshaped
        "conv1.bias": torch.zeros(64),
        "conv9.weight": torch.zeros(1),  # unexpected
    }
    path = _save(state, tmp_path / "wrong.pickle")
    with pytest.raises(WeightsError) as error:
        build_c3d("c3d", weights=path)
    message = str(error.value)
    assert "wrong.pickle" in message
    assert "conv1.weight: file (64, 3, 3, 3, 1), network (64, 3, 3, 3, 3)" in message
    assert "unexpected keys: conv9.weight" in message
    assert "missing keys: conv2.bias, conv2.weight" in message and "fc7.weight" in message
    assert "conv1.bias" not in message


@pytest.fixture(scope="module")
def full_model() -> C3D:
    return C3D(BACKBONES["c3d"], seed=1)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop("conv5b.bias"), "missing keys: conv5b.bias$"),
        (lambda s: s.update({"fc9.weight": torch.zeros(1)}), "unexpected keys: fc9.weight$"),
        (
            lambda s: s.update({"fc6.weight": torch.zeros(4096, 4096)}),
            r"shape mismatches: fc6.weight: file \(4096, 4096\), network \(4096, 8192\)$",
        ),
    ],
)
def test_check_state_dict_single_problems(full_model: C3D, edit, message: str) -> None:
    state = dict(full_model.state_dict())
    check_state_dict(state, full_model, "ok.pt")  # the model's own state dict passes
    edit(state)
    with pytest.raises(WeightsError, match=r"^bad\.pt: .*" + message):
        check_state_dict(state, full_model, "bad.pt")


def test_fc8_is_optional(full_model: C3D) -> None:
    state = {k: v for k, v in full_model.state_dict().items() if not k.startswith("fc8")}
    check_state_dict(state, full_model, "no-fc8.pt")


@pytest.mark.slow
def test_sports1m_layout_loads_from_pickle_and_safetensors_alike(
    tmp_path: Path, full_model: C3D
) -> None:
    state = full_model.state_dict()  # random tensors in the standard layout, fc8 (487) included
    assert state["fc8.weight"].shape == (487, 4096)
    frames = _frames(16)
    outputs, descriptions = [], []
    for suffix in (".pickle", ".safetensors"):
        path = _save(state, tmp_path / f"c3d{suffix}")
        model, description = build_c3d("c3d", weights=path)
        assert description == Weights(sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
        extractor = C3DExtractor("c3d", weights=path, device="cpu")
        assert extractor.info["weights"] == description
        assert extractor.info["preprocessing"] == "caffe-bgr"
        outputs.append(extractor(frames))
        descriptions.append(description)
        path.unlink()
    assert descriptions[0] != descriptions[1]  # two formats, two files, two hashes
    for name in (*TAPS, "fc7"):
        np.testing.assert_array_equal(outputs[0][name], outputs[1][name])
    # And they are the given weights' features: compare with the model itself, Caffe input.
    x = preprocess(frames, "caffe-bgr")[None]
    with torch.inference_mode():
        pool5 = full_model.conv_features(x)["pool5"][0].numpy()
    assert _relative_error(outputs[0]["pool5"], pool5) < 1e-5  # layouts differ, not values


# --------------------------------------------------------------------------------------------
# Precision and device


# Relative Frobenius error of bf16 against fp32, measured on c3d-small with random weights
# (three seeds, 48 and 112 pixel frames): 3.4e-3 (pool2) to 6.1e-3 (fc7), growing slowly with
# depth. The bound is about three times the worst of those.
BF16_BOUND = 2e-2


def test_bf16_stays_close_to_fp32_conv_taps() -> None:
    model, _ = build_c3d(SMALL)
    # 48 x 48 frames keep bf16 cheap on CPUs without bf16 instructions; the taps still cover
    # all eight convolutions.
    x = preprocess(_frames(16)[:, :48, :48], "unit-rgb")[None]  # (1, 3, 16, 48, 48)
    with torch.inference_mode():
        fp32 = model.conv_features(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.conv_features(x)
            fc7_bf16 = model.fc7_from_pool5(fp32["pool5"].new_ones(1, 128, 1, 4, 4))
        fc7_fp32 = model.fc7_from_pool5(fp32["pool5"].new_ones(1, 128, 1, 4, 4))
    # CPU autocast pools in fp32, so the taps come back as fp32 holding bf16 values: the last
    # convolution did run in bf16.
    assert torch.equal(bf16["pool5"], bf16["pool5"].bfloat16().float())
    errors = {name: _relative_error(bf16[name], fp32[name]) for name in TAPS}
    errors["fc7"] = _relative_error(fc7_bf16, fc7_fp32)
    assert all(0 < error < BF16_BOUND for error in errors.values()), errors


@pytest.mark.slow
def test_bf16_extractor_stays_close_to_fp32() -> None:
    frames = _frames(16)  # one pass: bf16 is slow on CPUs without native support
    fp32 = C3DExtractor(SMALL, device="cpu")(frames)
    extractor = C3DExtractor(SMALL, device="cpu", precision="bf16")
    assert extractor.info["precision"] == "bf16"
    bf16 = extractor(frames)
    errors = {name: _relative_error(bf16[name], fp32[name]) for name in fp32}
    assert all(bf16[name].dtype == np.float32 for name in bf16)
    assert all(0 < error < BF16_BOUND for error in errors.values()), errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_matches_cpu(precision: str) -> None:
    frames = _frames(24)
    cpu = C3DExtractor(SMALL, device="cpu")(frames)
    cuda = C3DExtractor(SMALL, device="cuda", precision=precision)(frames)
    # fp32 on CUDA may use TF32 convolutions (about 1e-3 relative).
    bound = 1e-2 if precision == "fp32" else BF16_BOUND
    errors = {name: _relative_error(cuda[name], cpu[name]) for name in cpu}
    assert all(error < bound for error in errors.values()), errors


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"backbone": "c3d-huge"}, "c3d-huge"),
        ({"precision": "fp16"}, "fp16"),
        ({"clip_batch": 0}, "clip_batch"),
    ],
)
def test_extractor_refuses_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        C3DExtractor(**({"backbone": SMALL, "device": "cpu"} | kwargs))


def test_einops_layout_of_fc6_input_is_channel_major() -> None:
    # The port flattens pool5 (C, 1, 4, 4) channel by channel: fc6 input k = c * 16 + h * 4 + w.
    model, _ = build_c3d(SMALL)
    pool5 = torch.zeros(1, 128, 1, 4, 4)
    pool5[0, 5, 0, 2, 3] = 1.0
    with torch.inference_mode():
        out = model.fc7_from_pool5(pool5)
        fc6 = torch.relu(model.layer("fc6").weight[:, 5 * 16 + 2 * 4 + 3])  # bias is zero
        expected = torch.relu(model.layer("fc7").weight @ fc6)
    torch.testing.assert_close(out[0], expected)
    assert rearrange(pool5, "n c t h w -> n (c t h w)")[0].argmax() == 5 * 16 + 11


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_the_geometry_layer_shapes_are_the_networks(backbone: str) -> None:
    """store/geometry.py states each layer's shape; the network computes it: they agree."""
    extractor = C3DExtractor(backbone, device="cpu")
    assert extractor.layer_shapes() == BACKBONES[backbone].layer_shapes()
