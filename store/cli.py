"""``inspect-store STORE``: what a feature store holds, its failures, and whether it is sound."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from astar.store.errors import StoreError
from astar.store.featurestore import FeatureStore
from astar.store.location import store_argument
from astar.store.report import failures_table, summarize_store
from astar.store.schema import Weights


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def _summary_text(summary: dict[str, Any]) -> str:
    schema, videos, parts = summary["schema"], summary["videos"], summary["partitions"]
    failed = ", ".join(f"{kind} {n}" for kind, n in videos["failed"].items()) or "none"
    cap = schema["max_frames"] or "no cap"  # None (or 0) means no cap
    shapes = ", ".join(f"{name} {tuple(dims)}" for name, dims in schema["layer_shapes"].items())
    versions = ", ".join(f"{k} {v}" for k, v in schema["versions"].items())
    return "\n".join(
        [
            f"store       {summary['path']} (format {schema['format_version']})",
            f"sampling    {schema['fps']} fps, {schema['size']}x{schema['size']}, "
            f"frames {schema['min_frames']}..{cap}",
            f"backbone    {schema['backbone']}, weights {Weights.parse(schema['weights'])}, "
            f"preprocessing {schema['preprocessing']}",
            f"fc7 clips   {schema['clip_length']} frames every {schema['clip_stride']}",
            f"layers      {shapes} (without time), {schema['dtype']}",
            f"versions    {versions}",
            f"videos      {videos['ok']} ok, {sum(videos['failed'].values())} failed ({failed}), "
            f"{videos['pending']} pending, of {videos['planned']} planned",
            f"frames      {summary['frames']} fed to C3D (ok videos)",
            f"partitions  {parts['complete']} complete, {parts['pending']} pending",
            f"on disk     {_size(summary['bytes'])} in {summary['files']} files",
        ]
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("store_path", metavar="STORE", type=store_argument())
@click.option("--failures", is_flag=True, help="List the failed videos with kind and reason.")
@click.option(
    "--verify",
    is_flag=True,
    help="Read everything back, name every damaged video; exit 1 on any problem.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def main(store_path: Path, failures: bool, verify: bool, as_json: bool) -> None:
    """Summarise the feature store STORE: schema, counts, size, progress."""
    try:
        store = FeatureStore.open(store_path)
        result: dict[str, Any] = {"summary": summarize_store(store)}
        if failures:
            result["failures"] = failures_table(store).to_dict(orient="records")
        if verify:
            report = store.verify_report()
            result["verify"] = {
                "problems": report.problems,
                "warnings": report.warnings,
                "videos_checked": report.videos_checked,
                "damaged": report.damaged,
            }
    except StoreError as error:
        raise click.ClickException(str(error)) from error
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(_summary_text(result["summary"]))
        if failures:
            click.echo(f"\nfailures ({len(result['failures'])})")
            for row in result["failures"]:
                click.echo(f"  {row['id']}\t{row['status']}\t{row['reason']}")
        if verify:
            checked = result["verify"]
            click.echo(f"\nverify: {checked['videos_checked']} videos read back")
            for warning in checked["warnings"]:
                click.echo(f"  warning: {warning}")
            for problem in checked["problems"]:
                click.echo(f"  problem: {problem}")
            if checked["damaged"]:
                click.echo(
                    f"\n{len(checked['damaged'])} damaged video(s), data lost or altered "
                    "(re-extract their partitions):"
                )
            for video_id, why in checked["damaged"].items():
                click.echo(f"  {video_id}\t{why}")
            if not checked["problems"]:
                click.echo("  no problems")
    if verify and result["verify"]["problems"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
