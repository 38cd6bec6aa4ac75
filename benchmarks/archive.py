"""An archive of small images: `segpipe run` end to end against a bare in-process loop, in
one run, over the same N distinct images.

    bare     decode, resize to the card's 256², normalise (the card's percentiles), bf16
             forward of the shipped model (BatchNorm folded, as segpipe runs it), threshold,
             resize back, write a PNG: the least any tool must do per image
    segpipe  `python -m flows.cli run DIR --model lung-xray --out OUT --export none` in a
             fresh process, embedded defaults (Prefect's embedded server, a local Ray)

Two archives: (a) 1024² chest PNGs, (b) 2000² DICOMs (CR, MONOCHROME2, 12-bit). Both are
made from the Shenzhen X-rays (/work/shared/data/real/cxr-shenzhen-566) when present, else
synthetic, and cached (SEGPIPE_BENCH_CACHE).

segpipe's rate is given twice: over the whole command (Prefect's server and Ray start
included: seconds that a 100k-image archive does not notice) and steady: the images whose
store was created after the first tile was written (the workers are up: the mtime of the
first prob chunk), over the time from that tile to the last store completed (the mtime of
its root metadata, written last). The ratio to the bare loop is the steady one; both are
printed. The load of a shared machine swings within minutes, so the bare loop runs before
and after segpipe and the ratio takes their mean.

Wall-clock rates on a loaded machine also favour whoever runs more threads (the kernel
shares cores per thread: segpipe's driver threads and tile worker take a bigger share than
the bare loop's one), so the efficiency that load does not move is given too: CPU seconds
per image, the bare loop's own (process time) against segpipe's whole process tree
(driver, Prefect server, Ray, tile workers; sampled) over the same steady window.
Driver peak RSS is the CLI process's own (ru_maxrss at exit).

Usage: python benchmarks/archive.py [--n 120] [--dicom-n 60] [--quick]
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
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import (  # noqa: E402
    REAL_DATA,
    cache_dir,
    goal,
    in_worker_env,
    load,
    machine,
    table,
)

SHENZHEN = REAL_DATA / "cxr-shenzhen-566" / "images"
MODEL = "lung-xray"
GOAL = 0.80
# The CLI's peak RSS, written at its exit (the CLI runs in its own process, as a user runs it)
RSS_WRAPPER = (
    "import atexit, json, os, resource, runpy, sys\n"
    "def _rss():\n"
    "    with open(os.environ['SEGPIPE_BENCH_RSS'], 'w') as f:\n"
    "        json.dump(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, f)\n"
    "atexit.register(_rss)\n"
    "sys.argv = ['segpipe', *sys.argv[1:]]\n"
    "runpy.run_module('flows.cli', run_name='__main__')\n"
)


# -- the archives -------------------------------------------------------------------------


def _sources(n: int) -> list[tuple[str, np.ndarray | None]]:
    """n (name, grey uint8 image or None: synthetic) sources, each distinct."""
    files = sorted(SHENZHEN.glob("*.*")) if SHENZHEN.is_dir() else []
    return [(f"cxr-{i:05d}", None) for i in range(n)] if not files else [
        (f"cxr-{i:05d}", files[i % len(files)]) for i in range(n)]  # type: ignore[misc]


def _grey(source: Path | None, size: int, i: int) -> np.ndarray:
    """A size² grey float image in [0, 1]: the Shenzhen X-ray resized (a little noise after
    the first pass over the folder, so every image is distinct), else a synthetic chest."""
    rng = np.random.default_rng(i)
    if source is None:
        y, x = np.mgrid[0:size, 0:size] / size
        body = ((x - 0.5) / 0.45) ** 2 + ((y - 0.55) / 0.5) ** 2 < 1
        lungs = sum(((x - cx) / 0.14) ** 2 + ((y - 0.45) / 0.28) ** 2 < 1 for cx in (0.32, 0.68)) > 0
        img = 0.15 + 0.6 * body - 0.35 * lungs + rng.normal(0, 0.02, body.shape)
    else:
        import imagecodecs

        raw = imagecodecs.imread(str(source))
        raw = raw.mean(axis=-1) if raw.ndim == 3 else raw
        t = torch.from_numpy(raw.astype(np.float32))[None, None] / 255
        img = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True)[0, 0].numpy()
        if i >= 566:
            img = img + rng.normal(0, 0.01, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def png_archive(n: int, size: int = 1024) -> Path:
    import imagecodecs

    folder = cache_dir() / f"archive-png-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, source) in enumerate(_sources(n)):
        path = folder / f"{name}.png"
        if not path.exists():
            path.write_bytes(imagecodecs.png_encode((_grey(source, size, i) * 255).astype(np.uint8), level=1))
    return _subset(folder, "png", n)


def dicom_archive(n: int, size: int = 2000) -> Path:
    """CR, MONOCHROME2, 12 bits stored in 16, uncompressed; chest PA, as the card selects."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = cache_dir() / f"archive-dcm-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, source) in enumerate(_sources(n)):
        path = folder / f"{name}.dcm"
        if path.exists():
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
        ds.PatientName, ds.PatientID = f"Bench^{i}", f"B{i:05d}"
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelSpacing = [0.2, 0.2]
        ds.PixelData = (_grey(source, size, i) * 4095).astype(np.uint16).tobytes()
        ds.save_as(str(path), enforce_file_format=True)
    return _subset(folder, "dcm", n)


def _subset(folder: Path, suffix: str, n: int) -> Path:
    """A folder of links to the first n images (the cache may hold more)."""
    chosen = sorted(folder.glob(f"*.{suffix}"))[:n]
    subset = Path(tempfile.mkdtemp(prefix=f"segpipe-archive-{suffix}-"))
    for path in chosen:
        (subset / path.name).symlink_to(path)
    return subset


# -- the bare loop ------------------------------------------------------------------------


def bare(folder: Path, out: Path, device: str = "cpu") -> dict:
    """The bare loop over every image of `folder`; returns images/s (model load excluded)."""
    import imagecodecs
    import pydicom

    from pipeline import cards
    from pipeline.config import RunConfig
    from pipeline.engine.predictor import Predictor
    from pipeline.models import checkpoint

    model, card = checkpoint.load(str(cards.resolve(MODEL)))
    predictor = Predictor(model, RunConfig(), torch.device(device))  # the precision segpipe picks
    work = tuple(card.scale["size"])
    low, high = card.normalization["low"], card.normalization["high"]
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted(folder.iterdir())
    start, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        if path.suffix == ".dcm":
            pixels = pydicom.dcmread(path).pixel_array
        else:
            pixels = imagecodecs.imread(str(path))
        t = torch.from_numpy(pixels.astype(np.float32))[None, None]
        small = F.interpolate(t, size=work, mode="bilinear", antialias=True)
        lo, hi = np.percentile(small.numpy(), [low, high])
        x = ((small - lo) / max(hi - lo, 1e-6)).permute(0, 2, 3, 1).numpy()
        probs = torch.from_numpy(predictor(x)).permute(0, 3, 1, 2)  # (1, K, h, w)
        full = F.interpolate(probs.float(), size=pixels.shape[:2], mode="bilinear")[0, -1]
        mask = (full.numpy() > card.threshold).astype(np.uint8) * 255
        (out / f"{path.stem}.png").write_bytes(imagecodecs.png_encode(mask, level=1))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"images": len(paths), "seconds": seconds, "rate": len(paths) / seconds, "cpu": cpu / len(paths)}


# -- segpipe ------------------------------------------------------------------------------


def segpipe(folder: Path, out: Path) -> dict:
    """`segpipe run` in a fresh process; whole-command and steady rates, its peak RSS."""
    rss = out.parent / f"{out.name}-rss.json"
    env = {**os.environ, "SEGPIPE_BENCH_RSS": str(rss), "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-c", RSS_WRAPPER, "run", str(folder), "--model", MODEL, "--out", str(out),
            "--export", "none"]
    start = time.time()
    with open(out.parent / f"{out.name}.log", "w+") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        samples = tree_cpu(proc)
        seconds = time.time() - start
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"segpipe run exited {proc.returncode}:\n{log.read()[-3000:]}")
    record = json.loads((out / "segpipe-run.json").read_text())
    states = [r["state"] for r in record["images"]]
    stores = list(out.glob("*.zarr"))
    done = max((p / "zarr.json").stat().st_mtime for p in stores)
    first_tile = min(f.stat().st_mtime for p in stores for f in (p / "prob" / "0" / "c").rglob("*") if f.is_file())
    created = [(p / "labels" / "zarr.json").stat().st_mtime for p in stores]  # written once, at ingest
    n = len(states)
    started = sum(t > first_tile for t in created)
    steady = started / (done - first_tile)
    cpu = (cpu_at(samples, done) - cpu_at(samples, first_tile)) / max(1, started)
    return {"images": n, "complete": states.count("complete"), "seconds": seconds, "rate": n / seconds,
            "steady": steady, "first_done_s": first_tile - start,
            "rss_mb": json.loads(rss.read_text()), "cpu": cpu}


def tree_cpu(proc: subprocess.Popen, every_s: float = 0.25) -> list[tuple[float, float]]:
    """(time, CPU seconds of the process and all its descendants) until it exits: the
    driver, the Prefect server, Ray's processes and its tile workers. A process's last
    sample stands for it once it is gone (the long-lived ones live to the end)."""
    import psutil

    root, seen, samples = psutil.Process(proc.pid), {}, []
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                t = p.cpu_times()
                seen[(p.pid, p.create_time())] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass
        samples.append((time.time(), sum(seen.values())))
        time.sleep(every_s)
    proc.wait()
    return samples


def cpu_at(samples: list[tuple[float, float]], when: float) -> float:
    """The tree's CPU seconds at `when` (the last sample before it)."""
    before = [cpu for t, cpu in samples if t <= when]
    return before[-1] if before else 0.0


def measure(name: str, folder: Path, work: Path, device: str = "cpu") -> dict:
    before = bare(folder, work / f"{name}-bare", device)
    s = segpipe(folder, work / f"{name}-segpipe")
    after = bare(folder, work / f"{name}-bare", device)
    rate = (before["rate"] + after["rate"]) / 2
    cpu = (before["cpu"] + after["cpu"]) / 2
    return {"name": name, "bare": {"rate": rate, "before": before["rate"], "after": after["rate"], "cpu": cpu},
            "segpipe": s, "ratio": s["steady"] / rate, "ratio_whole": s["rate"] / rate,
            "cpu_ratio": cpu / s["cpu"], "load": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=120, help="1024² PNGs")
    parser.add_argument("--dicom-n", type=int, default=60, help="2000² DICOMs")
    parser.add_argument("--quick", action="store_true", help="24 PNGs and 12 DICOMs")
    parser.add_argument("--device", default="cpu", help="the bare loop's (benchmarks/gpu.py: cuda)")
    args = parser.parse_args()
    in_worker_env()  # the bare loop in the environment segpipe's tile workers run in (OpenMP waits passively)
    n, dicom_n = (24, 12) if args.quick else (args.n, args.dicom_n)
    print("## Archive of small images (benchmarks/archive.py)\n")
    print(f"Machine: {machine()}\n")
    work = Path(tempfile.mkdtemp(prefix="segpipe-archive-"))
    try:
        rows = [measure(f"{n} PNG 1024²", png_archive(n), work, args.device)] if n else []
        rows += [measure(f"{dicom_n} DICOM CR 2000² 12-bit", dicom_archive(dicom_n), work, args.device)] if dicom_n else []
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(["archive", "bare img/s (before, after)", "segpipe img/s (steady)", "segpipe img/s (whole command)",
                 "first tile written (s)", "ratio (steady)", "ratio (whole)", "CPU s/image bare, segpipe",
                 "CPU ratio", "complete", "driver peak RSS", "load after"],
                [[r["name"], f"{r['bare']['rate']:.2f} ({r['bare']['before']:.2f}, {r['bare']['after']:.2f})", f"{r['segpipe']['steady']:.2f}",
                  f"{r['segpipe']['rate']:.2f}", f"{r['segpipe']['first_done_s']:.1f}", f"{r['ratio']:.0%}",
                  f"{r['ratio_whole']:.0%}", f"{r['bare']['cpu']:.3f}, {r['segpipe']['cpu']:.3f}",
                  f"{r['cpu_ratio']:.0%}", f"{r['segpipe']['complete']}/{r['segpipe']['images']}",
                  f"{r['segpipe']['rss_mb']:.0f} MB", r["load"]] for r in rows]))
    print()
    for r in rows:
        print(goal(f"{r['name']}: segpipe run >= {GOAL:.0%} of the bare loop (steady)", r["ratio"] >= GOAL,
                   f"{r['ratio']:.0%}"))
        print(goal(f"{r['name']}: segpipe's CPU per image <= bare's / {GOAL:.0%} (steady)", r["cpu_ratio"] >= GOAL,
                   f"{r['cpu_ratio']:.0%}"))
    print(json.dumps([{k: v for k, v in r.items()} for r in rows]), file=sys.stderr)


if __name__ == "__main__":
    main()
