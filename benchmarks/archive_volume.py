"""A run of thousands: `segpipe run` on the embedded defaults (embedded Prefect, local Ray)
over an archive of small X-rays, as a hospital's first night would be.

Reports, per run: images/s end to end, the driver's peak RSS (the `segpipe` process; sampled,
with the embedded Prefect server's and Ray's processes apart), the Prefect database's size
and the failed images. Two sizes (500 and 2000 by default) show whether the driver's memory
stays flat in the number of images; `--hog` repeats the large run with the machine loaded
by busy processes, one per core, as a shared hospital server would be.

Inputs: archive.py's distinct 1024² PNGs (the Shenzhen X-rays, else synthetic chests), made
once into the benchmark cache.

Usage: python benchmarks/archive_volume.py [--quick] [--sizes 500 2000] [--hog] [--no-hog]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.archive import png_archive  # noqa: E402
from benchmarks.common import machine  # noqa: E402


class Sampler(threading.Thread):
    """Peak RSS of the driver process and, apart, of its descendants (Prefect's server,
    Ray's processes), sampled every half second, with the number of stores in `out` at
    each sample: the driver's RSS by the time n images were done is then known apart from
    the end of the run (the report, the run record, the JSON of every result)."""

    def __init__(self, pid: int, out: Path):
        super().__init__(daemon=True)
        self.pid, self.out, self.driver, self.others = pid, out, 0, 0
        self.series: list[tuple[int, int]] = []  # (stores so far, driver RSS)
        self.done = threading.Event()

    def rss_by(self, images: int) -> float:
        """The driver's peak RSS (MB) while at most `images` stores existed."""
        return max((rss for count, rss in self.series if count <= images), default=0) / 2**20

    def run(self) -> None:
        import psutil

        while not self.done.is_set():
            try:
                root = psutil.Process(self.pid)
                rss = root.memory_info().rss
                self.driver = max(self.driver, rss)
                stores = sum(1 for _ in os.scandir(self.out)) if self.out.is_dir() else 0
                self.series.append((stores, rss))
                total = 0
                for child in root.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
                self.others = max(self.others, total)
            except psutil.Error:
                pass
            self.done.wait(0.5)


def hog(cores: int) -> list[subprocess.Popen]:
    """One busy process per core (ended by PID after the run)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]


def run(images: Path, n: int, loaded: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="segpipe-volume-") as tmp:
        out, home = Path(tmp) / "out", Path(tmp) / "prefect-home"
        env = {**os.environ, "PREFECT_HOME": str(home), "PYTHONPATH": str(HERE.parent),
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db"}
        env.pop("PREFECT_API_URL", None)  # the embedded defaults
        command = [sys.executable, "-m", "flows.cli", "run", str(images), "--model", "lung-xray",
                   "--out", str(out), "--export", "none", "--json"]
        hogs = hog(os.cpu_count() or 1) if loaded else []
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            process = subprocess.Popen(command, cwd=HERE.parent, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
            sampler = Sampler(process.pid, out)
            sampler.start()
            stdout, stderr = process.communicate()
            sampler.done.set()
        finally:
            for busy in hogs:
                busy.send_signal(signal.SIGTERM)
                busy.wait()
        seconds = time.perf_counter() - start
        try:
            results = json.loads(stdout)
        except json.JSONDecodeError:
            results = []
        states: dict[str, int] = {}
        for result in results:
            states[result["state"]] = states.get(result["state"], 0) + 1
        database = sum(p.stat().st_size for p in home.glob("prefect.db*")) if home.is_dir() else 0
        return {"images": n, "loaded": loaded, "exit": process.returncode, "seconds": seconds,
                "images_per_s": n / seconds, "driver_rss_mb": sampler.driver / 2**20,
                "driver_rss_by": {k: sampler.rss_by(k) for k in sorted({min(500, n), n // 2, n})},
                "others_rss_mb": sampler.others / 2**20, "prefect_db_mb": database / 2**20,
                "states": states, "failed": n - states.get("complete", 0),
                "load": (load_before, os.getloadavg()[0]),
                "stderr_tail": stderr.strip().splitlines()[-3:] if process.returncode else []}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 and 120 images, no hog")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--hog", action=argparse.BooleanOptionalAction, default=True,
                        help="repeat a run with one busy process per core")
    parser.add_argument("--hog-size", type=int, help="images of the loaded run (default: the largest size)")
    args = parser.parse_args()
    sizes = [40, 120] if args.quick else sorted(args.sizes)
    runs = [run(png_archive(n), n, loaded=False) for n in sizes]
    if args.hog and not args.quick:
        hogged = args.hog_size or max(sizes)
        runs.append(run(png_archive(hogged), hogged, loaded=True))
    print(f"## A run of thousands: `segpipe run` over 1024² X-ray PNGs, lung-xray, --export none\n\n{machine()}\n")
    print("| images | machine | images/s | seconds | driver RSS by n images done | driver peak RSS (with the report) "
          "| Prefect + Ray peak RSS | Prefect DB | failed | exit |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in runs:
        where = f"loaded (hog, load {r['load'][1]:.1f})" if r["loaded"] else f"quiet (load {r['load'][0]:.1f})"
        by = ", ".join(f"{k}: {v:.0f} MB" for k, v in r["driver_rss_by"].items())
        print(f"| {r['images']} | {where} | {r['images_per_s']:.2f} | {r['seconds']:.0f} | {by} | "
              f"{r['driver_rss_mb']:.0f} MB | {r['others_rss_mb']:.0f} MB | {r['prefect_db_mb']:.1f} MB | "
              f"{r['failed']} | {r['exit']} |")
    for r in runs:
        if r["stderr_tail"]:
            print(f"\n{r['images']} images{' (loaded)' if r['loaded'] else ''} ended {r['exit']}: "
                  + " / ".join(r["stderr_tail"]))
    large = runs[len(sizes) - 1]["driver_rss_by"]
    first, last = min(large), max(large)
    print(f"\nIn the {last}-image run, the driver's RSS by {last} images done is {large[last] / max(large[first], 1):.2f}× "
          f"that by {first}; failed images: {sum(r['failed'] for r in runs)}.")


if __name__ == "__main__":
    main()
