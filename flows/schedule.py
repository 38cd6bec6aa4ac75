"""Scheduled archive runs: `segment_collection` as a Prefect deployment on a cron schedule.

`segpipe serve` builds the deployment here and serves it from this process (no work pool
needed); deploy/prefect.yaml describes the same deployment for `prefect deploy` on a
process work pool. Each scheduled run skips images already complete for the same model
and settings, so a nightly run over an archive computes only what is new.
"""

from __future__ import annotations

import signal
from dataclasses import fields
from datetime import timedelta
from typing import Any

from prefect.deployments.runner import RunnerDeployment

from flows.segment import DEFAULT_CONCURRENCY, segment_collection
from pipeline.config import RunConfig

DEFAULT_NAME = "nightly"


def build_deployment(inputs: list[str], model: str, out: str, cron: str | None,
                     config: RunConfig | None = None, name: str = DEFAULT_NAME,
                     concurrency: int = DEFAULT_CONCURRENCY,
                     interval: float | None = None) -> RunnerDeployment:  # fmt: skip
    """The deployment of segment_collection over `inputs` on the `cron` schedule (or every
    `interval` seconds); the parameters carry only the settings that differ from
    RunConfig's defaults. One run at a time: a slow night must not overlap the next (the
    same limit as deploy/prefect.yaml)."""
    parameters: dict[str, Any] = {"inputs": list(inputs), "model": model, "out": out,
                                  "concurrency": concurrency}
    changed = changed_settings(config or RunConfig())
    if changed:
        parameters["config"] = changed
    when = {"interval": timedelta(seconds=interval)} if interval else {"cron": cron}
    return segment_collection.to_deployment(
        name=name, parameters=parameters, tags=["segpipe"], concurrency_limit=1, **when,
        description=f"segment-collection of {', '.join(inputs)} into {out}, {_when_text(cron, interval)}",
    )  # fmt: skip


def _when_text(cron: str | None, interval: float | None) -> str:
    return f"every {interval:g} s" if interval else f"cron {cron!r}"


def changed_settings(config: RunConfig) -> dict[str, Any]:
    """The settings of `config` that are not RunConfig's defaults, JSON-able."""
    default, current = RunConfig().to_dict(), config.to_dict()
    return {f.name: _plain(current[f.name]) for f in fields(RunConfig)
            if current[f.name] != default[f.name]}  # fmt: skip


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def serve_until_stopped(deployment: RunnerDeployment) -> None:
    """Serve the deployment from this process until Ctrl-C or SIGTERM (what a container
    runtime or systemd sends), then return: in-flight runs are left to Prefect to mark,
    and the next start picks up what they did not finish."""
    from prefect import serve

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve(deployment, print_starting_message=False)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
