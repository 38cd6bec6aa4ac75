"""Every benchmark, one after another, each in its own process: `make bench` runs this.

Prints each part's tables and goal lines as they come (markdown), then the seconds each part
took, and saves the whole report (default: results.md in the benchmark cache directory,
SEGPIPE_BENCH_CACHE). Inputs and exact answers are cached there between runs.

Usage: python benchmarks/run_all.py [--quick] [--only vs_monai overhead ...] [--size 2048]
           [--slide-sizes 4096 16384 32768] [--tiles 5000] [--report PATH]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import cache_dir, goal, machine  # noqa: E402

DISPATCH_GOAL = 1000  # tiles/s through the scheduler and Ray with a no-op model


def parts(args: argparse.Namespace) -> dict[str, list[str]]:
    """Script arguments per part, in the order they run."""
    quick = ["--quick"] if args.quick else []
    size = [] if args.quick else ["--size", str(args.size)]
    return {
        "vs_monai": ["vs_monai.py", *quick, *size],
        "overhead": ["overhead.py", *quick, *size],
        "exactness": ["exactness.py", *quick],
        "memory": ["memory.py", *quick, *([] if args.quick else ["--sizes", *map(str, args.slide_sizes)])],
        "memory_xray": ["memory_xray.py", *quick],
        "tissue": ["tissue.py", *quick],
        "dispatch": ["dispatch.py", *(quick or ["--tiles", str(args.tiles)])],
        "precision": ["precision.py", *quick, *size],
        "prune_levels": ["prune_levels.py", *quick],
        "wsi_read": ["wsi_read.py", *quick],
        "slide_exports": ["slide_exports.py", *quick],
        # its DICOMweb part runs only in tests/isolated.sh's namespace (Orthanc), else says so
        "dicomweb_slide": ["dicomweb_slide.py", *quick],
        "archive": ["archive.py", *quick],
        "archive_volume": ["archive_volume.py", *quick],
        "gpu": ["gpu.py", *quick],  # says "no GPU" where torch sees no CUDA device
    }


def run(name: str, argv: list[str]) -> tuple[str, float, bool]:
    """Run one part, echoing its output as it comes; returns (output, seconds, ok)."""
    script = HERE / argv[0]
    if not script.exists():
        return f"## {name}\n\nNot measured: benchmarks/{argv[0]} is not in this tree.\n", 0.0, True
    start = time.perf_counter()
    # stderr (progress, errors) goes straight to the terminal; stdout is the report.
    proc = subprocess.Popen([sys.executable, str(script), *argv[1:]], cwd=HERE.parent, text=True,
                            stdout=subprocess.PIPE)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    ok = proc.wait() == 0
    output = "".join(lines)
    if not ok:
        failure = f"\n**{name} failed** (exit {proc.returncode}; its error is on stderr, above)\n"
        sys.stdout.write(failure)
        output += failure
    if name == "dispatch" and ok:
        output = dispatch_report(output)
    return output, time.perf_counter() - start, ok


def dispatch_report(output: str) -> str:
    """dispatch.py prints plain text: fence it, and state its goal from the no-op rates."""
    rates = [float(r) for r in re.findall(r"run_tiles \+ RayBackend, \d actor\(s\)\s+(\d+)", output)]
    lines = ["## Dispatch (benchmarks/dispatch.py)", "", "```", output.rstrip(), "```", ""]
    if rates:
        best = max(rates)
        lines.append(goal(f"dispatch >= {DISPATCH_GOAL:,} tiles/s with a no-op model", best >= DISPATCH_GOAL,
                          f"{best:,.0f} tiles/s"))
        sys.stdout.write(lines[-1] + "\n")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and models: about a minute")
    parser.add_argument("--only", nargs="+", help="run only these parts")
    parser.add_argument("--size", type=int, default=2048, help="side of the image for vs_monai, overhead, precision")
    parser.add_argument("--slide-sizes", type=int, nargs="+", default=[4096, 16384, 32768],
                        help="synthetic slide sides for the memory part")
    parser.add_argument("--tiles", type=int, default=5000, help="no-op tiles for the dispatch part")
    parser.add_argument("--report", type=Path, default=None, help="where to save the markdown report")
    args = parser.parse_args()
    todo = parts(args)
    unknown = set(args.only or ()) - set(todo)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; valid: {list(todo)}")
    command = " ".join(["python benchmarks/run_all.py", *sys.argv[1:]])
    header = f"# segpipe benchmarks\n\nCommand: `{command}`\n\nMachine: {machine()}\n"
    print(header)
    sections, timings, failed = [header], [], []
    start = time.perf_counter()
    for name, argv in todo.items():
        if args.only and name not in args.only:
            continue
        output, seconds, ok = run(name, argv)
        print()
        sections.append(output)
        timings.append(f"| {name} | {seconds:.0f} |")
        if not ok:
            failed.append(name)
    total = time.perf_counter() - start
    summary = "\n".join(["## Run time", "", "| part | seconds |", "|---|---|", *timings,
                         f"| total | {total:.0f} |", "", f"Machine at the end: {machine()}"])
    print(summary)
    report = args.report or cache_dir() / ("results-quick.md" if args.quick else "results.md")
    report.write_text("\n".join([*sections, summary]) + "\n")
    print(f"\nReport saved to {report}")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
