"""What a flow returned, kept in this process as well as in its Prefect state.

Prefect can hand back a flow's final state without its data (`MissingResult`: "State data
is missing"): when the engine's proposal of that state is answered with the server's own
copy (a request retried after a timeout or a 503 under load, a rejected transition), the
copy carries no result, since results are not persisted. Persisting every run's results
to result storage would only move the problem. The flows here run in the process of the
code that reads their outcome (subflows always; a CLI or Python collection run too), so
each also leaves its outcome here, keyed by its flow run id, and `outcome` falls back to
it. A served run (a deployment) is never read back, so the ledger keeps only the newest.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, TypeVar

from prefect.exceptions import MissingResult
from prefect.runtime import flow_run
from prefect.states import State

T = TypeVar("T")
KEPT_RUNS = 512  # outcomes kept for runs nobody reads back (served deployments)

_kept: OrderedDict[str, Any] = OrderedDict()
_lock = threading.Lock()
_NOTHING = object()


def keep(value: T) -> T:
    """Record `value` (a result, or a State carrying one) as the current flow run's outcome."""
    run_id = flow_run.get_id()
    if run_id is not None:
        with _lock:
            _kept[str(run_id)] = value.data if isinstance(value, State) else value
            while len(_kept) > KEPT_RUNS:
                _kept.popitem(last=False)
    return value


def outcome(state: State) -> Any:
    """The flow run's return value (or the exception it raised), as `state.result(
    raise_on_failure=False)` gives it; when Prefect's state has lost its data, the value
    the run kept here. A run that kept nothing gives what Prefect has: the MissingResult of
    a completed run, the error message of a failed one."""
    with _lock:
        kept = _kept.pop(str(state.state_details.flow_run_id), _NOTHING)
    if state.data is None and kept is not _NOTHING:
        return kept
    try:
        return state.result(raise_on_failure=False)
    except MissingResult as exc:
        return exc
