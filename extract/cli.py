"""``extract-features VIDEOS... --out STORE``: decode, run C3D, write the feature store."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from astar.extract.decode import DecodeConfig
from astar.extract.runner import ExtractConfig, InputError, extract_features
from astar.store.files import no_space_report
from astar.store.geometry import BACKBONES, MIN_FRAMES
from astar.store.location import store_argument


def _user_errors() -> tuple[type[Exception], ...]:
    from astar.extract.c3d import WeightsError
    from astar.store import StoreError

    return InputError, WeightsError, StoreError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("videos", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--out",
    "-o",
    required=True,
    type=store_argument(),
    help="Store: a directory or an fsspec URL (s3://bucket/store; credentials from fsspec's "
    "configuration or the environment).",
)
@click.option("--fps", default=2.0, show_default=True, help="Frames sampled per second of video.")
@click.option(
    "--min-frames", default=MIN_FRAMES, show_default=True, help="Pad shorter videos to this."
)
@click.option(
    "--max-frames", default=128, show_default=True, help="Subsample longer videos; 0 = no cap."
)
@click.option(
    "--backbone",
    type=click.Choice(sorted(BACKBONES)),
    default="c3d",
    show_default=True,
    help="c3d: the paper's network; c3d-small / c3d-tiny: a quarter / an eighth of the "
    "channels, for CPU demos and tests.",
)
@click.option(
    "--weights",
    default="random",
    show_default=True,
    help="Sports-1M C3D state dict (.pickle/.pt or .safetensors), or 'random': a seeded init.",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random init.")
@click.option("--device", default=None, help="cpu or cuda[:N]; default: cuda when available.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--clip-batch", default=8, show_default=True, help="fc7 clips per C3D forward.")
@click.option(
    "--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True
)
@click.option("--partition-size", default=64, show_default=True, help="Videos per partition.")
@click.option(
    "--compression",
    type=click.Choice(["auto", "zstd", "none"]),
    default="auto",
    show_default=True,
    help="Of the stored arrays: zstd stores about 1.6x fewer bytes, none reads 4-6x faster "
    "(benchmarks/bench_store_read.py); auto: none on a local disk, zstd at a URL.",
)
@click.option(
    "--ids",
    type=click.Choice(["stem", "name"]),
    default="stem",
    show_default=True,
    help="Video ids of files: the name without its extension (stem) or with it (name); "
    "sub-folders below a given directory are kept. CSV lists give their own ids.",
)
@click.option("--workers", default=1, show_default=True, help="Local worker processes.")
@click.option(
    "--dask",
    "dask_address",
    default=None,
    help="Run partitions as Dask tasks: a scheduler address, or 'local' for a local cluster "
    "of --workers processes. The store must be on storage every worker can reach.",
)
@click.option(
    "--timeout", default=120.0, show_default=True, help="Seconds allowed to decode one video."
)
@click.option(
    "--resume-or-restart",
    is_flag=True,
    help="For pipelines that rerun a step only when something changed (dvc repro): resume a "
    "store left unfinished with the same settings, otherwise delete the store at OUT and "
    "extract again from scratch.",
)
@click.option("--strict", is_flag=True, help="Exit non-zero when any video fails.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--verbose", "-v", is_flag=True, help="Log details.")
def main(
    videos: tuple[Path, ...],
    out: Path,
    fps: float,
    min_frames: int,
    max_frames: int,
    backbone: str,
    weights: str,
    seed: int,
    device: str | None,
    precision: str,
    clip_batch: int,
    dtype: str,
    partition_size: int,
    compression: str,
    ids: str,
    workers: int,
    dask_address: str | None,
    timeout: float,
    resume_or_restart: bool,
    strict: bool,
    quiet: bool,
    verbose: bool,
) -> None:
    """Extract C3D pool2..pool5 and fc7 features of VIDEOS into the feature store OUT.

    VIDEOS are directories (searched recursively), video files, or CSV files with columns
    id,path. Rerunning the same command resumes an interrupted run and redoes nothing complete.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    if fps <= 0 or min_frames < MIN_FRAMES or max_frames < 0 or partition_size < 1:
        raise click.UsageError(
            f"need --fps > 0, --min-frames >= {MIN_FRAMES}, --max-frames >= 0, "
            "--partition-size >= 1"
        )
    if max_frames and max_frames < min_frames:
        raise click.UsageError(f"--max-frames {max_frames} is below --min-frames {min_frames}")
    weights_path = None if weights == "random" else Path(weights)
    if weights_path is not None and not weights_path.is_file():
        raise click.BadParameter(f"{weights}: no such file", param_hint="--weights")
    config = ExtractConfig(
        decode=DecodeConfig(
            fps=fps,
            min_frames=min_frames,
            max_frames=max_frames or None,
            timeout_s=timeout,
        ),
        backbone=backbone,
        weights=weights_path,
        seed=seed,
        device=device,
        precision=precision,
        clip_batch=clip_batch,
        dtype=dtype,
        partition_size=partition_size,
        compression=compression,
        ids=ids,
        workers=workers,
        dask=dask_address,
    )
    try:
        summary, store = extract_features(
            videos, out, config, progress=not quiet, restart_changed=resume_or_restart
        )
    except _user_errors() as error:
        raise click.ClickException(str(error)) from error
    except Exception as error:  # a full disk surfaces from zarr, numpy or a worker process
        message = no_space_report(
            error,
            out,
            f"The store {out} is intact: every finished video is kept, and rerunning the same "
            "command once space is freed resumes where it stopped.",
        )
        if message is None:
            raise
        raise click.ClickException(message) from error
    except KeyboardInterrupt:
        click.echo(
            "\ninterrupted: finished videos are kept; rerun the same command to resume", err=True
        )
        raise SystemExit(130) from None

    if summary.restarted:
        click.echo(f"{out}: {summary.restarted}: extracted again from scratch", err=True)
    click.echo(f"{out}: {summary.describe()}")
    failures = store.manifest
    failures = failures[failures["status"] != "ok"]
    for row in failures.head(10).itertuples():
        click.echo(f"  failed {row.id} [{row.status}]: {row.reason}", err=True)
    if len(failures) > 10:
        click.echo(f"  ... {len(failures) - 10} more: inspect-store {out} --failures", err=True)
    succeeded = summary.ok + summary.skipped - summary.skipped_failed
    if succeeded == 0:
        raise click.ClickException("no video was extracted successfully")
    if strict and (summary.n_failed or summary.skipped_failed):
        raise click.ClickException(
            f"--strict: {summary.n_failed + summary.skipped_failed} video(s) failed"
        )


if __name__ == "__main__":
    main()
