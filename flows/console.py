"""What the CLI shows: live progress bars fed by run events, the summary tables, and a
run with both (`run_collection`, shared by `segpipe run` and the demo)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from flows import progress, report
from flows.report import ImageResult, format_fractions
from pipeline.errors import SegpipeError

EXIT_USAGE = 2


def _console(stderr: bool = False) -> Console:
    """Off a terminal (a log file, a pipe, CI) rich would assume 80 columns and cut table
    cells short ("com…"); there a table is read whole, so it gets the width it needs."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=OFF_TERMINAL_WIDTH)


OFF_TERMINAL_WIDTH = 400  # rich tables take only the width their cells need
_verbose = False  # -v: Prefect's and the pipeline's logs on the terminal (flows/preflight.py)


def set_verbose(verbose: bool) -> None:
    global _verbose
    _verbose = verbose
out_console = _console()
err_console = _console(stderr=True)

STATE_STYLE = {"complete": "green", "partial": "yellow", "failed": "red", "reused": "cyan", "skipped": "dim",
               "pending": "yellow", "running": "yellow"}


def styled(text: str, state: str) -> Text:
    return Text(text, style=STATE_STYLE.get(state, ""))


class RateColumn(ProgressColumn):
    """Tiles per second of a bar (blank for the images bar and until measured)."""

    def render(self, task: Any) -> Text:
        if not task.fields.get("tiles") or task.speed is None:
            return Text("")
        return Text(f"{task.speed:.1f} tiles/s", style="progress.data.speed")


class RunDisplay:
    """Progress bars of a run: one for the images, one per image while it infers (tiles,
    tiles/s, ETA). Fed by `flows.progress` events from the run's threads."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )  # fmt: skip
        self._images: TaskID | None = None
        self._bars: dict[str, TaskID] = {}
        self._lock = threading.Lock()

    def __call__(self, event: progress.Event) -> None:
        with self._lock:
            handler = getattr(self, f"_on_{event.kind}")
            handler(event)

    def _on_discovered(self, event: progress.Event) -> None:
        self._images = self.progress.add_task("images", total=event.total, tiles=False)

    def _on_started(self, event: progress.Event) -> None:
        self._bars[event.image_id] = self.progress.add_task(
            f"  {event.image_id}", total=event.total, completed=event.done, tiles=True
        )

    def _on_tiles(self, event: progress.Event) -> None:
        bar = self._bars.get(event.image_id)
        if bar is not None:
            self.progress.advance(bar, event.done)

    def _on_finished(self, event: progress.Event) -> None:
        bar = self._bars.pop(event.image_id, None)
        if bar is not None:
            self.progress.remove_task(bar)
        if event.state not in ("reused", "skipped"):  # a nightly run has thousands: the table counts them
            self.progress.console.print(styled(f"{event.state:>8}", event.state), event.image_id)
        if self._images is not None:
            self.progress.advance(self._images, 1)


@contextmanager
def live_progress(console: Console) -> Iterator[None]:
    """Show a run's progress bars on `console` while the block runs."""
    display = RunDisplay(console)
    with display.progress, progress.listen(display):
        yield


TABLE_ROWS = 40  # a larger run shows its problems first and the rest by count


def results_table(results: Sequence[ImageResult], title: str = "segpipe run") -> Table:
    """The summary table: one row per image (images that are not complete first, then the
    skipped ones, at most TABLE_ROWS); outputs are <image>.zarr under the output root, and failed images'
    errors are listed below the table (report.problems)."""
    shown = sorted(results, key=lambda r: (r.ok, r.state != "skipped"))[:TABLE_ROWS]
    totals = report.totals(results)
    caption = ", ".join(f"{v} {k}" for k, v in totals.items() if v or k == "images")
    if len(shown) < len(results):
        caption += f"; {len(results) - len(shown)} complete or skipped images not listed (--json lists all)"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for name, justify in (("image", "left"), ("state", "left"), ("size", "left"), ("done", "right"),
                          ("skipped", "right"), ("failed", "right"), ("seconds", "right"),
                          ("mask fraction", "left"), ("instances", "right"), ("qc", "left")):  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=name == "image")  # type: ignore[arg-type]
    for r in shown:
        row = r.row()
        table.add_row(r.image_id, styled(r.state_text, "reused" if r.reused else r.state), row["size"], str(row["tiles done"]),
                      str(row["skipped"]), str(row["failed"]), f"{r.seconds:.1f}",
                      row["mask fraction"], row["instances"], qc_text(r.qc))  # fmt: skip
    return table


def status_table(summaries: Sequence[Mapping[str, Any]]) -> Table:
    """`segpipe status`: per image its state, tile counts and mask fraction."""
    table = Table(title="outputs", title_justify="left")
    for name, justify in (("image", "left"), ("state", "left"), ("size", "left"), ("tiles", "right"),
                          ("done", "right"), ("skipped", "right"), ("failed", "right"),
                          ("pending", "right"), ("mask fraction", "left"), ("instances", "right"),
                          ("qc", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for s in summaries:
        c = s["counts"]
        table.add_row(s["image_id"], styled(s["state"], s["state"]), "x".join(map(str, s["full_hw"])),
                      str(c["total"]), str(c["done"]), str(c["skipped"]), str(c["failed"]),
                      str(c["pending"]), format_fractions(s.get("mask_fraction")),
                      report.format_instances(s.get("instances")), qc_text(s.get("qc")))  # fmt: skip
    return table


def qc_text(verdict: Mapping[str, Any] | None) -> Text:
    """The QC column: pass in green, flag and its reasons in yellow."""
    text = report.format_qc(verdict)
    return Text(text, style="yellow" if text.startswith("flag") else "green")


def run_collection(inputs: list[str], model: str, out: str, config: Any, concurrency: int,
                   show_table: bool = True, title: str = "segpipe run") -> list[Any]:
    """Run segment_collection with live progress bars; print the summary and problems.
    The run's flow runs carry this driver's tag, and runs a dead driver left Running are
    marked Crashed first (flows.runs)."""
    import httpx
    from prefect import tags

    from flows import offline, reaper, runs
    from flows.discover import Inputs
    from flows.segment import (  # Prefect: only for commands that run
        results,
        segment_collection,
    )
    from pipeline.store import storage_refusal

    reaper.start()  # the Prefect server and local Ray this run starts end with it, even on kill -9
    unreachable = None  # why Prefect's API failed the run, if it did (flows/offline.py)
    try:
        runs.check_api()
        with live_progress(err_console), tags("segpipe", runs.driver_tag()), offline.watch_api():
            runs.mark_crashed_runs()
            done = results(segment_collection(Inputs(inputs), model, out, config, concurrency, return_state=True))
        if not report.all_complete(done) and offline.may_fall_back():
            unreachable = offline.failing_now()  # images' errors are text by now: ask the API
    except Exception as exc:
        unreachable = offline.why_unreachable(exc)
        if unreachable is None and not isinstance(exc, (SegpipeError, ValueError, OSError, httpx.HTTPError)):
            raise
        if unreachable is None:
            # the run itself could not go on: a setting, the cluster, the server or the storage
            # (OSError: unreachable, timed out, or storage refusing a write: full, read-only)
            refused = storage_refusal(exc)
            text = str(refused) if refused else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            usage_error(f"run stopped: {text}")
    if unreachable is not None:  # Prefect is never the reason a run fails
        err_console.print(f"[yellow]{escape(offline.announcement(unreachable, out))}[/]", highlight=False, soft_wrap=True)
        code, done = offline.run_without_api(inputs, model, out, config, concurrency, _verbose)
        if code:
            offline.leave(code)  # the child said why
    if show_table:
        out_console.print(results_table(done, title=title))
        for line in report.problems(done):
            err_console.print(f"[red]✗[/] {escape(line)}", highlight=False, soft_wrap=True)
        for line in report.qc_flagged(done):
            err_console.print(f"[yellow]![/] {escape(line)}", highlight=False, soft_wrap=True)
    return done


def usage_error(message: str) -> None:
    """Say what is wrong on one line and exit with the usage code (2)."""
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USAGE)


def models_table(cards: Mapping[str, Any], sizes: Mapping[str, int]) -> Table:
    """`segpipe models`: one row per shipped model card."""
    table = Table(title="shipped models", title_justify="left",
                  caption="full model cards (data, licence, training): segpipe models --json", caption_justify="left")
    for column in ("name", "arch", "params", "classes", "scale", "default mode", "validation", "size"):
        table.add_column(column, no_wrap=column == "name")
    for name, card in cards.items():
        params = card.metrics.get("params")
        table.add_row(
            name, card.arch, f"{params / 1e6:.2f}M" if isinstance(params, int) else "",
            ", ".join(card.class_names), _scale_text(card.scale), _mode_text(card.config),
            _metrics_text(card.metrics), f"{sizes[name] / 1e6:.1f} MB",
        )  # fmt: skip
    return table


def _mode_text(config: dict[str, Any]) -> str:
    mode = config.get("mode")
    if mode == "fast" and config.get("prune_level"):
        return f"fast L{config['prune_level']}"
    return mode or ""


def _metrics_text(metrics: dict[str, Any]) -> str:
    """The card's validation scores (val_dice, val_iou, ...), short."""
    scores = {k.removeprefix("val_"): v for k, v in metrics.items()
              if k.startswith("val_") and isinstance(v, int | float)}  # fmt: skip
    return ", ".join(f"{k} {v:.3f}" for k, v in scores.items())


def _scale_text(scale: dict[str, Any] | None) -> str:
    if not scale:
        return "native"
    if "size" in scale:
        return "x".join(map(str, scale["size"]))
    return f"{scale['mpp']} um/px" if "mpp" in scale else json.dumps(scale)
