"""Scheduled archive runs: `segment_collection` as a Prefect deployment on a cron schedule.

`segpipe serve` builds the deployment here and serves it from this process (no work pool
needed); deploy/prefect.yaml describes the same deployment for `prefect deploy` on a
process work pool. Each scheduled run skips images already complete for the same model
and settings, so a nightly run over an archive computes only what is new.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from prefect.deployments.runner import RunnerDeployment

from flows.segment import DEFAULT_CONCURRENCY, segment_collection
from pipeline.config import RunConfig

DEFAULT_NAME = "nightly"


def build_deployment(inputs: list[str], model: str, out: str, cron: str,
                     config: RunConfig | None = None, name: str = DEFAULT_NAME,
                     concurrency: int = DEFAULT_CONCURRENCY) -> RunnerDeployment:
    """The deployment of segment_collection over `inputs` on the `cron` schedule; the
    parameters carry only the settings that differ from RunConfig's defaults."""
    parameters: dict[str, Any] = {"inputs": list(inputs), "model": model, "out": out,
                                  "concurrency": concurrency}
    changed = changed_settings(config or RunConfig())
    if changed:
        parameters["config"] = changed
    return segment_collection.to_deployment(
        name=name, cron=cron, parameters=parameters, tags=["segpipe"],
        description=f"segment-collection of {', '.join(inputs)} into {out}, cron {cron!r}",
    )  # fmt: skip


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
