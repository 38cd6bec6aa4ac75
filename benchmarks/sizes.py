"""The command line of a benchmark over image sizes that measures each size in a fresh
process (peak RSS is per process): the parent parses --sizes/--quick, and re-runs the
script with --one SIZE (or --make SIZE to prepare an input) for each. Kept free of torch
and pipeline imports, so a child's baseline memory is only what it loads itself."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

QUICK_SIZES = [1024, 4096]


def parent_args(doc: str | None, default_sizes: list[int], one: Callable[[int, Path], dict[str, Any]],
                make: Callable[[int], Path] | None = None) -> argparse.Namespace | None:  # fmt: skip
    """The parent's arguments (with .sizes set, QUICK_SIZES under --quick); in a child,
    run `one(size, workdir)` or `make(size)`, print its JSON and return None."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--sizes", type=int, nargs="+", default=default_sizes)
    parser.add_argument("--quick", action="store_true", help=f"sizes {' and '.join(map(str, QUICK_SIZES))}")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make and make is not None:
        print(json.dumps({"path": str(make(args.make))}))
        return None
    if args.one:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(one(args.one, Path(tmp))))
        return None
    if args.quick:
        args.sizes = QUICK_SIZES
    return args
