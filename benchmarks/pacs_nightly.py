"""A nightly run against a real PACS (Orthanc with its DICOMweb plugin, tests/orthanc.py):
studies per second, bytes fetched with WADO-RS and SEGs stored with STOW-RS, for a first
night over N studies, the same night again (idempotent: nothing fetched, nothing sent), and
a next night with nothing new (the watermark: the old studies are not even asked for).

The archive: N studies of one radiograph each, dated over the last N days: chest CRs
(segmented, their SEG sent back), legs (skipped by the lung model's selection, never
fetched) and CT localizers (not asked for: the rules want CR or DX), in the ratio 8:1:1.
`segpipe run` runs as the user runs it, in a process of its own, with the shipped lung
model and --store dicomweb.

Orthanc listens on every interface: run this inside a loopback-only namespace:
    sh tests/isolated.sh .venv/bin/python benchmarks/pacs_nightly.py [--studies 50] [--size 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import radiographs  # noqa: E402
from tests.orthanc import Orthanc, unavailable  # noqa: E402


def archive(count: int, size: int) -> list[tuple[str, object]]:
    """(kind, dataset) of `count` studies, one a day back from yesterday."""
    kinds = [("chest", radiographs.CHEST)] * 8 + [("leg", radiographs.LEG), ("localizer", radiographs.CT_LOCALIZER)]
    studies = []
    for i in range(count):
        name, kind = kinds[i % len(kinds)]
        day = (date.today() - timedelta(days=1 + i)).strftime("%Y%m%d")
        studies.append((name, radiographs.radiograph(kind, day, size=(size, size), seed=i)))
    return studies


def night(orthanc: Orthanc, out: Path, env: dict[str, str], *extra: str) -> dict:
    """One `segpipe run` of the PACS: its seconds, results by state, bytes fetched, SEGs sent."""
    inputs = out / ".inputs"
    before = {p.name for p in inputs.iterdir()} if inputs.is_dir() else set()
    command = [sys.executable, "-m", "flows.cli", "run", orthanc.source, "-m", "lung-xray", "-o", str(out),
               "--store", "dicomweb", "--export", "none", "--json", *extra]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"segpipe run exited {done.returncode}: {done.stderr[-3000:]}")
    results = json.loads(done.stdout)
    fetched = [p for p in inputs.iterdir() if p.name not in before] if inputs.is_dir() else []
    states: dict[str, int] = {}
    for r in results:
        key = f"{r['state']}{' (reused)' if r['reused'] else ''}"
        states[key] = states.get(key, 0) + 1
    return {
        "seconds": round(seconds, 1),
        "images": len(results),
        "states": states,
        "images_per_s": round(len(results) / seconds, 2),
        "fetched_instances": len(fetched),
        "fetched_bytes": sum(p.stat().st_size for p in fetched),
        "segs_sent": sum(r.get("stored") == "sent" for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--size", type=int, default=2048, help="radiograph side in pixels (12-bit)")
    args = parser.parse_args()
    why = unavailable()
    if why:
        raise SystemExit(why)
    work = Path(tempfile.mkdtemp(prefix="segpipe-pacs-bench-"))
    (work / "orthanc").mkdir()
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    try:
        studies = archive(args.studies, args.size)
        start = time.perf_counter()
        for _, ds in studies:
            orthanc.upload(ds)
        upload_s = time.perf_counter() - start
        env = {**os.environ, **orthanc.env(), "PYTHONPATH": str(ROOT),
               "PREFECT_HOME": str(work / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
        out = work / "out"
        figures = {
            "studies": args.studies,
            "size": args.size,
            "kinds": {k: sum(n == k for n, _ in studies) for k in ("chest", "leg", "localizer")},
            "upload_s": round(upload_s, 1),
            "first_night": night(orthanc, out, env),
            "same_night_again": night(orthanc, out, env, "--no-watermark"),
            "next_night_nothing_new": night(orthanc, out, env),
            "segs_in_pacs": len(orthanc.series(Modality="SEG")),
            "cpus": os.cpu_count(),
        }
        print(json.dumps(figures, indent=1))
    finally:
        orthanc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
