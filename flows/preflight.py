"""Before a command runs: the terminal's log settings, and the usage checks that fail in
seconds with one line and exit 2, before Prefect or Ray start (`segpipe run`, `serve`)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from flows.console import err_console, set_verbose, usage_error
from pipeline.errors import SegpipeError


def quiet_logs(verbose: bool) -> None:
    """Keep the terminal for the progress bars: Prefect's console logs only when verbose
    (its logs still reach its API); pipeline logs go to Prefect too. These settings are
    read when prefect and ray are first imported, so a process that already imported
    them (a test, a notebook) keeps its own."""
    set_verbose(verbose)
    if "prefect" in sys.modules:
        return
    defaults = {
        "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline,flows",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # library logs outside runs
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no network here
        # Prefect must never be the reason a run fails. On a loaded machine the embedded
        # server took over 20 s (its default) to start, and answered 503 for longer than
        # the client's 5 retries (2 + 4 + ... + 32 s = 62 s). 7 retries ride out ~4 min
        # (2 + 4 + ... + 128 s = 254 s, jitter ±20%) of 503/502/504/408/429, timeouts and
        # refused connections (ConnectError is retried once the client has connected);
        # past that the run goes on without the API (flows/offline.py), so more retries
        # would only delay it. 504: a proxy in front of a slow server.
        "PREFECT_CLIENT_MAX_RETRIES": "7",
        "PREFECT_CLIENT_RETRY_EXTRA_CODES": "504",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    }
    if not verbose:
        defaults |= {
            "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",
            # while its API is unreachable, Prefect's log and event workers print an error
            # per item they could not send: the run's one line says it (flows/offline.py)
            "PREFECT_INTERNAL_LOGGING_LEVEL": "CRITICAL",
            "RAY_LOGGER_LEVEL": "error",
            "RAY_LOG_TO_DRIVER": "0",  # tile errors are recorded anyway
        }
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    if not verbose:
        # Prefect's API log handler writes "--- Error logging to API ---" and the error to
        # stderr for each batch it could not send, unless the stdlib is told not to
        logging.raiseExceptions = False
        _show_cluster_warnings()


def _show_cluster_warnings() -> None:
    """Workers waiting for a node, or started on CPU where GPUs may come: a user must see
    that on the terminal, not only in Prefect, even with Prefect's console quiet."""
    from rich.logging import RichHandler

    handler = RichHandler(console=err_console, show_time=False, show_path=False, level=logging.WARNING)
    for name in ("pipeline.workers", "pipeline.cluster"):
        logging.getLogger(name).addHandler(handler)


def check_run(inputs: list[str], model: str, out: str, config: Any) -> str:
    """Fail fast on usage errors (exit 2), before Prefect and Ray start: the model and the
    settings its card allows, a tissue mask that opens, an output root that can take
    outputs, and that the inputs name at least one image."""
    from flows.outputs import check_writable
    from pipeline import cards
    from pipeline.io import open_image

    model_path = check_model(model)
    cards.check_settings(cards.read_card(model_path), config.mode, config.prune_level, model_path)
    if config.tissue_mask:
        open_image(config.tissue_mask, config.max_pixels, config.max_slide_pixels)  # header only
    check_writable(out)
    check_inputs(inputs, out, config)
    return model_path


def check_inputs(inputs: list[str], out: str, config: Any) -> None:
    """The inputs name at least one image, or DICOMweb sources that answer (a night with
    nothing new is no error); `check_sources` first."""
    from flows.discover import discover
    from pipeline.io import dicomweb

    local, remote = check_sources(inputs, config)
    for item in remote:
        dicomweb.probe(dicomweb.Endpoint.parse(item))
    if local or not remote:
        discover(local, out)


def check_sources(inputs: list[str], config: Any) -> tuple[list[str], list[str]]:
    """Without the network (`serve` checks this at its start, `run` before its probes): each
    DICOMweb source is a URL without credentials, and `--store dicomweb` has a DICOMweb
    source to send back to. Returns (other inputs, DICOMweb sources)."""
    from pipeline.errors import ConfigError
    from pipeline.io import dicomweb

    local, remote = dicomweb.split_inputs(inputs)
    for item in remote:
        dicomweb.Endpoint.parse(item)
    if config.store == "dicomweb" and not remote:
        raise ConfigError("--store dicomweb sends each SEG back to the DICOMweb source of its image, and no "
                          "input is one: give the endpoint, --store dicomweb+https://host/path")  # fmt: skip
    return local, remote


def check_model(model: str) -> str:
    from pipeline import cards

    path = cards.resolve(model)
    cards.read_card(path)
    return str(path)


def usage_checked(call: Any) -> Any:
    """Run `call`; a configuration error (bad setting, model or input) or a folder that
    cannot be read exits with code 2, in one line."""
    try:
        return call()
    except (SegpipeError, ValueError) as exc:
        usage_error(str(exc))
    except OSError as exc:
        usage_error(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def absolute(location: str) -> str:
    """A served deployment runs later, maybe elsewhere: local paths made absolute."""
    return location if "://" in location else str(Path(location).expanduser().resolve())
