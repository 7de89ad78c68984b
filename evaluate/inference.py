"""From a checkpoint to captions: of videos in a feature store, or of raw video files.

Raw files go through exactly the extraction code and settings that made the training store (the
schema recorded in the checkpoint), so inference cannot drift from training: same sampling,
size, padding, backbone, weights, preprocessing, and the same storage rounding (fp16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from astar.extract.precision import resolve_device
from astar.pipelines.vocab import Vocabulary
from astar.store import FeatureStore, StoreSchema, VideoFeatures
from astar.train.checkpoint import CheckpointError, load_checkpoint
from astar.train.data import FeatureSource, collate_features
from astar.train.decoding import DecodedCaption, beam_search, greedy_decode
from astar.train.model import Captioner, CaptionerConfig, FeatureBatch

if TYPE_CHECKING:
    from astar.extract.decode import DecodeConfig


class InferenceError(Exception):
    """A checkpoint, store or video that cannot be captioned, with the reason."""


@dataclass
class TrainedCaptioner:
    """A captioner restored from its checkpoint, with what it was trained on."""

    model: Captioner  # in eval mode
    vocabulary: Vocabulary
    schema: StoreSchema  # how the training features were extracted
    checkpoint: Path
    payload: dict[str, Any]  # the raw checkpoint (state, train config, ...)

    @property
    def variant(self) -> str:
        return self.model.config.variant

    def check_store(self, store: FeatureStore) -> None:
        """Refuse a store whose features differ from the training store's, saying how."""
        differences = self.schema.differences(store.schema, "in training", "in the store")
        if differences:
            raise InferenceError(
                f"{store.path} does not match the features {self.checkpoint} was trained on:\n  "
                + "\n  ".join(differences)
            )

    def decode(
        self,
        features: FeatureBatch,
        beam_size: int = 5,
        max_length: int = 30,
        length_penalty: float = 0.0,
    ) -> list[DecodedCaption]:
        """Captions of a batch of videos: greedy for beam size 1, else batched beam search."""
        device = next(self.model.parameters()).device
        features = features.to(device)
        if beam_size <= 1:
            return greedy_decode(self.model, features, max_length)
        return beam_search(self.model, features, beam_size, max_length, length_penalty)


def load_trained(path: str | Path, device: str | None = None) -> TrainedCaptioner:
    path = Path(path)
    target = resolve_device(device)
    payload = load_checkpoint(path, map_location=target)
    missing = [
        k for k in ("model_config", "vocabulary", "store_schema", "model") if k not in payload
    ]
    if missing:
        raise CheckpointError(f"{path}: not a captioner checkpoint (missing {', '.join(missing)})")
    model = Captioner(CaptionerConfig.from_dict(payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.to(target).eval()
    return TrainedCaptioner(
        model=model,
        vocabulary=Vocabulary.from_dict(payload["vocabulary"], origin=str(path)),
        schema=StoreSchema.from_dict(payload["store_schema"]),
        checkpoint=path,
        payload=payload,
    )


def caption_store(
    trained: TrainedCaptioner,
    store: FeatureStore,
    video_ids: Sequence[str],
    beam_size: int = 5,
    max_length: int = 30,
    length_penalty: float = 0.0,
    batch_videos: int = 32,
    progress: bool = False,
    on_corrupt: str = "error",
    corrupt: dict[str, str] | None = None,
) -> dict[str, DecodedCaption]:
    """Decode ``video_ids`` of ``store`` in batches; the next batch is read while one decodes.

    A video whose stored data fails its checksum raises :class:`~astar.store.CorruptVideo`,
    or with ``on_corrupt="skip"`` is left out of the result and recorded in ``corrupt``
    (id -> what is wrong) when a dict is given.
    """
    from tqdm import tqdm

    trained.check_store(store)
    source = FeatureSource(store, trained.model.config.attended_layers, on_corrupt=on_corrupt)
    # Videos of similar length share a batch, so little alignment work goes into time padding.
    lengths = store.manifest.set_index("id")["n_frames"]
    video_ids = sorted(video_ids, key=lambda vid: (int(lengths[vid]), vid))
    chunks = [video_ids[i : i + batch_videos] for i in range(0, len(video_ids), batch_videos)]
    results: dict[str, DecodedCaption] = {}
    with tqdm(total=len(video_ids), unit="video", disable=not progress) as bar:
        for chunk in chunks:
            read = [(v, r) for v, r in zip(chunk, source.read(chunk), strict=True) if r is not None]
            if read:
                features = collate_features([record for _, record in read], source.layers)
                decoded = trained.decode(features, beam_size, max_length, length_penalty)
                results.update(zip([vid for vid, _ in read], decoded, strict=True))
            bar.update(len(chunk))
    if corrupt is not None:
        corrupt.update(source.corrupt)
    return results


def _stored(array: np.ndarray, dtype: str) -> np.ndarray:
    """The values as the store would have held them (fp16 rounding), back in float32."""
    return np.asarray(array).astype(dtype).astype(np.float32)


def decode_config(schema: StoreSchema) -> DecodeConfig:
    """How the videos of a store were decoded: its fps, size and frame limits."""
    from astar.extract.decode import DecodeConfig

    return DecodeConfig(
        fps=schema.fps, size=schema.size, min_frames=schema.min_frames, max_frames=schema.max_frames
    )


def extract_like_training(
    trained: TrainedCaptioner,
    paths: Sequence[str | Path],
    weights: str | Path | None = None,
    device: str | None = None,
) -> tuple[list[tuple[Path, Any]], list[tuple[Path, Exception]]]:
    """Decode and run C3D on raw files with the checkpoint's recorded extraction settings.

    Returns ([(path, (DecodedVideo, features))], [(path, error)]). Weights: a checkpoint trained
    on real C3D weights needs the same file (its SHA-256 is checked); one trained on a random
    init rebuilds it from the recorded seed.
    """
    from astar.extract.c3d import C3DExtractor, file_sha256
    from astar.extract.decode import VideoDecodeError
    from astar.extract.isolation import IsolatedDecoder

    schema = trained.schema
    if schema.weights.is_random:
        if weights is not None:
            raise InferenceError(
                f"{trained.checkpoint} was trained on features of a random C3D "
                f"({schema.weights}); --weights {weights} would give other features"
            )
        seed = schema.weights.seed
    else:
        if weights is None:
            raise InferenceError(
                f"{trained.checkpoint} was trained on C3D weights {schema.weights}: "
                "pass the same file with --weights"
            )
        if file_sha256(Path(weights)) != schema.weights.sha256:
            raise InferenceError(
                f"{weights} is not the C3D weights file the training features came from "
                f"({schema.weights})"
            )
        seed = 0
    extractor = C3DExtractor(
        backbone=schema.backbone, weights=weights, seed=seed, device=device, precision="fp32"
    )
    if extractor.info["preprocessing"] != schema.preprocessing:
        raise InferenceError(
            f"preprocessing {extractor.info['preprocessing']} differs from training's "
            f"{schema.preprocessing}"
        )
    decode = decode_config(schema)
    done, failed = [], []
    with IsolatedDecoder(decode) as decoder:
        for path, decoded in decoder.imap([Path(p) for p in paths]):
            if isinstance(decoded, VideoDecodeError):
                failed.append((Path(path), decoded))
                continue
            features = {k: _stored(v, schema.dtype) for k, v in extractor(decoded.frames).items()}
            done.append((Path(path), (decoded, features)))
    return done, failed


def features_to_batch(
    features: Sequence[dict[str, np.ndarray]], n_frames: Sequence[int]
) -> FeatureBatch:
    """Per-video C3D outputs (as extracted) -> a FeatureBatch, through the training collation."""
    records = [
        VideoFeatures(id=str(k), layers=layers, info={"n_frames": n})
        for k, (layers, n) in enumerate(zip(features, n_frames, strict=True))
    ]
    return collate_features(records, tuple(features[0]))
