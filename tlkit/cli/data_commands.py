"""`tlkit check-data`, `precompute-features`, `cache`, `augment-preview` and `bench-input`:
the data and what is computed from it before training."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from tlkit.cli.app import JSON_OPTION, TlkitGroup, cli, verbosity
from tlkit.cli.options import (
    MAX_PIXELS_OPTION,
    MIXED_PRECISION_OPTION,
    STRATEGY_OPTION,
    audit_options,
    augment_config,
    augment_options,
    freeze_option,
    freeze_request,
    model_options,
    option,
    recipe_option,
)

if TYPE_CHECKING:
    from tlkit.features.cache import FeatureCache

CACHE_DIR_OPTION = option("cache_dir", type=click.Path(file_okay=False))


@cli.command("check-data")
@recipe_option
@click.argument("data", default="data", type=click.Path())
@option("backbone")
@option("val_fraction")
@MAX_PIXELS_OPTION
@option("workers")
@click.option(
    "-o",
    "--output",
    default="data_report.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Where the full JSON report goes.",
)
@click.option("--overwrite", is_flag=True, help="Replace an output file that is not a report.")
@JSON_OPTION
def check_data(data: str, output: str, overwrite: bool, as_json: bool, **options: Any) -> None:
    """Decode every image of DATA once and report what is wrong; exit 3 if any file is unusable.

    finetune and precompute-features run the same check first. Results are remembered per file
    (size, modification time, inode, ctime), so checking unchanged data again is instant.
    """
    from tlkit.core.errors import DataError
    from tlkit.data.audit import check_data as run_check
    from tlkit.data.audit import check_report_path, write_report

    check_report_path(output, overwrite)  # before the work, not after it
    report = run_check(data, **options)
    summary = report.as_dict()
    path = write_report(summary, output, overwrite)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_report(summary, path)
    if summary["bad"]:
        raise DataError(
            f"{len(summary['bad'])} of {summary['totals']['files']} files cannot be "
            f"used (listed in {path}); fix or remove them, or train with "
            "--on-bad-image skip"
        )


def _print_report(summary: dict[str, Any], path: Any) -> None:
    from tlkit.data.audit import summary_lines

    classes = summary["classes"]
    width = max(len(c) for c in classes) + 2
    splits = list(summary["splits"])
    click.echo(
        f"{summary['root']} ({summary['layout']} layout, validation: "
        f"{summary['val_source']}), {len(classes)} classes"
    )
    click.echo(f"{'class':<{width}}" + "".join(f"{s:>12}" for s in splits))
    for c in classes:
        cells = []
        for s in splits:
            n = summary["splits"][s]["classes"].get(c, {"ok": 0, "bad": 0})
            cells.append(f"{n['ok']}" + (f" (+{n['bad']} bad)" if n["bad"] else ""))
        click.echo(f"{c:<{width}}" + "".join(f"{cell:>12}" for cell in cells))
    imbalance = ", ".join(
        f"{s} {i['imbalance']:g}:1" for s, i in summary["splits"].items() if i["imbalance"]
    )
    click.echo(f"imbalance (largest / smallest class): {imbalance}")
    click.echo(
        "formats: "
        + ", ".join(f"{k} {v}" for k, v in summary["formats"].items())
        + "; colour modes: "
        + ", ".join(f"{k} {v}" for k, v in summary["modes"].items())
    )
    for line in summary_lines(summary):
        click.echo(line)
    sections = [
        ("unusable files", [f"{b['path']}: {b['problem']}" for b in summary["bad"]]),
        ("warnings", [f"{w['path']}: {w['warning']}" for w in summary["warnings"]]),
        (
            "duplicates",
            [
                f"{g['kind']}: " + ", ".join(f["path"] for f in g["files"])
                for g in summary["duplicates"]
            ],
        ),
        ("ignored (hidden or system files)", summary["ignored"]),
    ]
    for title, lines in sections:
        if lines:
            click.echo(f"{title} ({len(lines)}):")
            for line in lines[:20]:
                click.echo(f"  {line}")
            if len(lines) > 20:
                click.echo(f"  ... {len(lines) - 20} more in {path}")
    click.echo(f"report: {path}")


@cli.command("precompute-features")
@recipe_option
@model_options(freeze_default="all")
@option("views")
@augment_options
@option("seed")
@option("dtype")
@CACHE_DIR_OPTION
@option("batch_size")
@option("workers")
@option("val_fraction")
@option("dry_run")
@MIXED_PRECISION_OPTION
@audit_options
@STRATEGY_OPTION
@option("num_shards", metavar="N")
@option("shard_index", metavar="I")
@JSON_OPTION
def precompute_features(
    data: str,
    freeze: str | None,
    freeze_to: str | None,
    freeze_blocks: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Run the frozen trunk once over DATA and cache its activations for finetune."""
    from tlkit.features.precompute import PrecomputeConfig
    from tlkit.features.precompute import precompute_features as run_precompute

    augment = augment_config(options)
    freeze = freeze_request(click.get_current_context(), "all")
    config = PrecomputeConfig.of(data=data, augment=augment, freeze=freeze, **options)
    ctx = click.get_current_context()
    result = run_precompute(config, verbose=verbosity(ctx))
    if as_json:
        click.echo(
            json.dumps(result if isinstance(result, dict) else _cache_json(result), indent=2)
        )
    elif isinstance(result, dict) and "missing_shards" in result:
        click.echo(
            f"shard {result['shard']} of {result['num_shards']}: {result['part']}; "
            f"waiting for shard(s) {', '.join(map(str, result['missing_shards']))}"
        )
    elif isinstance(result, dict):
        _echo_dry_run(result)
    else:
        click.echo(f"cache: {result.path}")


def _cache_json(cache: FeatureCache) -> dict[str, Any]:
    splits = cache.manifest["splits"].items()
    return {
        "key": cache.key,
        "path": str(cache.path),
        "splits": {s: {k: v[k] for k in ("count", "views", "shape")} for s, v in splits},
    }


def _echo_dry_run(result: dict[str, Any]) -> None:
    fits = result["bytes"] <= result["free_bytes"]
    if result["weights_missing"]:
        click.echo(
            "dry run without the weights (sizes and time measured on the "
            "architecture; the cache key names the weights, so it waits for them): "
            f"{result['weights_missing']}"
        )
    else:
        click.echo(
            f"dry run: cache {result['key']} "
            f"({'exists' if result['exists'] else 'new'}) at {result['path']}"
        )
    click.echo(
        f"  {result['images']} images -> {result['bytes'] / 1e6:.1f} MB "
        f"({result['shape']} {result['dtype']} each), about "
        f"{result['estimated_seconds']:.0f} s; {result['free_bytes'] / 1e9:.1f} GB "
        f"free{'' if fits else ' - NOT ENOUGH ROOM'}"
    )


@cli.group(cls=TlkitGroup)
def cache() -> None:
    """Feature caches made by precompute-features."""


@cache.command("ls")
@CACHE_DIR_OPTION
def cache_ls(cache_dir: str | None) -> None:
    """List caches: key, backbone, freeze, views, size, last use; and resized-image stores."""
    from tlkit.features.cache import cache_root, list_caches, list_foreign, list_unfinished

    root = cache_root(cache_dir)
    click.echo(f"{'key':<22}{'backbone':<22}{'freeze':>7}{'views':>6}{'MB':>10}  last used")
    for r in list_caches(root):
        click.echo(
            f"{r['key']:<22}{r['backbone']:<22}{r['freeze']:>7}{r['views']:>6}"
            f"{r['size_mb']:>10.1f}  {r['last_used']}"
        )
    for r in list_unfinished(root):
        then = (
            "`tlkit cache rm` leaves it alone while it runs"
            if r["live"]
            else f"the same precompute-features resumes it; `tlkit cache rm {r['key']}` removes it"
        )
        click.echo(
            f"unfinished: {r['folder']} ({r['kind']}, {r['size_mb']:.1f} MB, last written "
            f"{r['last_written']}): {then}"
        )
    for f in list_foreign(root):
        click.echo(f"not a tlkit cache: {f.name} ({f.why}); `tlkit cache rm` leaves it alone")
    from tlkit.data.store import list_stores

    for r in list_stores(root):
        click.echo(
            f"resized-image store {r['key']}: {r['images']} images, {r['size_mb']:.1f} MB "
            f"(--resized-cache; `tlkit cache rm {r['key']}` removes it)"
        )


@cache.command("rm")
@click.argument("key", required=False)
@click.option("--all", "all_", is_flag=True, help="Remove every cache.")
@CACHE_DIR_OPTION
def cache_rm(key: str | None, all_: bool, cache_dir: str | None) -> None:
    """Remove cache or resized-image store KEY, or all with --all."""
    from tlkit.core.errors import ConfigError
    from tlkit.features.cache import cache_root, remove_caches

    if bool(key) == all_:
        raise ConfigError("give one cache KEY or --all")
    root = cache_root(cache_dir)
    result = remove_caches(root, None if all_ else key)
    for name in result.removed:
        click.echo(f"removed {name}")
    for name, why in result.left:
        click.echo(f"left alone: {name} ({why})")
    if not result.removed and not result.left:
        click.echo(f"{root}: nothing to remove")


@cache.command("merge")
@click.argument("key", required=False)
@CACHE_DIR_OPTION
def cache_merge(key: str | None, cache_dir: str | None) -> None:
    """Check the shards of cache KEY (default: every cache with shards) and publish it."""
    from tlkit.features.cache import cache_root, merge_parts, pending_parts

    root = cache_root(cache_dir)
    keys = [key] if key else pending_parts(root)
    if not keys:
        from tlkit.core.errors import CacheError

        raise CacheError(f"{root}: no shards to merge")
    for k in keys:
        click.echo(f"cache: {merge_parts(root, k).path}")


@cli.command("augment-preview")
@recipe_option
@click.argument("data", default="data", type=click.Path())
@option("count")
@option("draws")
@click.option("-o", "--output", default="preview.png", show_default=True, type=click.Path())
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@option("backbone")
@option("input_size")
@option("seed")
@augment_options
def augment_preview(data: str, **options: Any) -> None:
    """Save a grid: each training image's eval crop, then augmented draws (epochs 0, 1, ...)."""
    from tlkit.data.preview import PreviewConfig
    from tlkit.data.preview import augment_preview as run_preview

    augment = augment_config(options)
    path = run_preview(PreviewConfig(data, augment, **options))
    click.echo(f"wrote {path}")


@cli.command("bench-input")
@recipe_option
@click.argument("data", default="data", type=click.Path())
@option("backbone")
@option("input_size")
@option("freeze", callback=freeze_option, default="0", show_default=True)
@option("batch_size")
@option("max_workers")
@option("batches")
@JSON_OPTION
@augment_options
def bench_input(data: str, freeze: str, as_json: bool, **options: Any) -> None:
    """Does the augmentation pipeline keep up with training on this machine? Measures both,
    and the pipeline fed from the resized-image store."""
    from tlkit.data.datasets import load_dataset
    from tlkit.data.pipeline import build_train_transform
    from tlkit.models.backbones import get_backbone
    from tlkit.models.freezing import FreezeRequest
    from tlkit.training.throughput import plan_input

    backbone, batch_size = options.pop("backbone"), options.pop("batch_size")
    spec = get_backbone(backbone)
    size = spec.resolve_input_size(options.pop("input_size"))
    train = load_dataset(data).splits["train"]
    transform = build_train_transform(augment_config(options), train, size, spec.crop_fraction)
    request = FreezeRequest(count=freeze)
    plan = plan_input(train, transform, backbone, request, batch_size, **options)
    if as_json:
        click.echo(json.dumps(plan, indent=2))
        return
    images = plan["images"]
    formats = ", ".join(f"{n} {fmt}" for fmt, n in images["formats"].items())
    reduced = images["jpeg_reduction"]
    click.echo(
        f"images sampled: {formats}; median {images['median_megapixels']:g} megapixels"
        + (f"; JPEGs decoded at 1/{reduced}" if reduced and reduced > 1 else "")
    )
    click.echo(f"input pipeline ({size} px, --augment {transform.config.preset}):")
    for row in plan["pipeline"]:
        click.echo(f"  {row['workers']:>3} worker(s) {row['images_per_s']:>9.1f} images/s")
    store = plan["store"]
    click.echo(
        f"  {store['workers']:>3} worker(s) {store['images_per_s']:>9.1f} images/s from the "
        f"resized-image store (--resized-cache; made once at {store['build_images_per_s']:.1f} "
        f"images/s, {store['bytes_per_image'] / 1e3:.0f} kB an image)"
    )
    click.echo(
        f"model training ({backbone}, --freeze {freeze}, batch {batch_size}): "
        f"{plan['model_images_per_s']:.1f} images/s"
    )
    click.echo(f"headroom {plan['headroom']:.2f}x: {plan['verdict']}")
