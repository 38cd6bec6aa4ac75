"""The child process of a run that goes on without its Prefect API (flows/offline.py):
the same collection again, in this process's environment (a private embedded Prefect).
`python -m flows.rerun SPEC`, SPEC a pickle of run_collection's arguments written by the
parent (a file in a private temporary folder)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from flows.console import run_collection
from flows.preflight import quiet_logs


def rerun(spec_path: str) -> None:
    spec = pickle.loads(Path(spec_path).read_bytes())
    quiet_logs(spec["verbose"])
    run_collection(spec["inputs"], spec["model"], spec["out"], spec["config"], spec["concurrency"],
                   show_table=False)  # fmt: skip


if __name__ == "__main__":
    rerun(sys.argv[1])
