"""Decode throughput of the frame-sampling backends: clips/s for one single-threaded worker.

A DataLoader worker decodes one clip at a time with one decoder thread (the setting
``sample_frames`` defaults to), so per-worker clips/s times the worker count bounds the
loader. The clips are generated here (10 s H.264 at 30 fps, x264 defaults: 250-frame GOP),
with a panned textured background and moving blocks so that decoding costs what it costs
on camera footage rather than on flat colour.

    python scripts/bench/decode.py            # writes scripts/bench/results/decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import av
import numpy as np
from PIL import Image

from tc_llava.data.video import sample_frames

RESOLUTIONS = {"360p": (640, 360), "720p": (1280, 720)}
FRAME_COUNTS = (8, 16, 32)
BACKENDS = ("decord", "pyav", "torchcodec")


def write_clip(path: Path, width: int, height: int, seconds: float, fps: int, seed: int = 0) -> None:
    """A panned smooth texture with fine grain and two moving blocks, encoded with libx264."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(coarse).resize((2 * width, 2 * height), Image.BICUBIC)).astype(np.int16)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for t in range(int(seconds * fps)):
            x, y = (3 * t) % width, (2 * t) % height
            frame = texture[y : y + height, x : x + width] + rng.integers(-6, 7, (height, width, 3), dtype=np.int16)
            for k, color in enumerate(((240, 40, 40), (40, 40, 240))):
                bx = int((0.5 + 0.4 * np.sin(0.05 * t + 2 * k)) * (width - width // 6))
                by = int((0.5 + 0.4 * np.cos(0.07 * t + k)) * (height - height // 6))
                frame[by : by + height // 6, bx : bx + width // 6] = color
            image = av.VideoFrame.from_ndarray(frame.clip(0, 255).astype(np.uint8), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())


def backend_status(backend: str, clip: Path) -> str | None:
    """None if the backend decodes here, else why it is skipped."""
    try:
        sample_frames(clip, 2, backend=backend)
    except ImportError as e:
        return str(e)
    return None


def time_backend(clip: Path, backend: str, num_frames: int, min_seconds: float, min_reps: int) -> dict:
    """Wall and process-CPU time per clip over >= ``min_reps`` calls and ``min_seconds``.

    CPU time (all threads of the process) is what a worker with a core to itself pays,
    and it stays meaningful when other jobs share the machine; wall time does not.
    """
    sample_frames(clip, num_frames, backend=backend)
    reps, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        frames, _ = sample_frames(clip, num_frames, backend=backend)
        reps += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert frames.shape[0] == num_frames
    return {
        "clips_per_cpu_s": reps / cpu,
        "cpu_ms_per_clip": 1000 * cpu / reps,
        "clips_per_wall_s": reps / wall,
        "wall_ms_per_clip": 1000 * wall / reps,
        "reps": reps,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.processor())


def machine_info() -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("decord", "av", "torchcodec", "torch", "numpy")},
        "pyav_ffmpeg": {k: ".".join(map(str, v)) for k, v in av.library_versions.items()},
        "decord_ffmpeg": "4.1 (bundled in the decord 0.6.0 wheel)",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def print_table(results: list[dict], backends: list[str]) -> None:
    """clips per CPU-second (CPU ms per clip) and wall clips/s, per backend."""
    header = f"{'clip':>6} {'frames':>6} " + " ".join(f"{b + ' clips/s (cpu ms) wall/s':>32}" for b in backends)
    print(header)
    print("-" * len(header))
    for res in RESOLUTIONS:
        for n in FRAME_COUNTS:
            cells = []
            for b in backends:
                row = next((r for r in results if (r["resolution"], r["num_frames"], r["backend"]) == (res, n, b)), None)
                cells.append(
                    f"{row['clips_per_cpu_s']:6.2f} ({row['cpu_ms_per_clip']:4.0f} ms) {row['clips_per_wall_s']:6.2f}"
                    if row
                    else "-"
                )
            print(f"{res:>6} {n:>6} " + " ".join(f"{c:>32}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_cpu.json")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timing window per cell")
    parser.add_argument("--min-reps", type=int, default=3)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--note", default="", help="free text stored with the results")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()
    results, skipped, clips = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for res, (width, height) in RESOLUTIONS.items():
            clips[res] = Path(tmp) / f"{res}.mp4"
            start = time.perf_counter()
            write_clip(clips[res], width, height, args.seconds, args.fps)
            print(f"encoded {res} clip in {time.perf_counter() - start:.1f} s ({clips[res].stat().st_size / 1e6:.1f} MB)")
        backends = []
        for backend in args.backends:
            reason = backend_status(backend, clips["360p"])
            if reason:
                skipped[backend] = reason
                print(f"skipping {backend}: {reason}")
            else:
                backends.append(backend)
        for res, clip in clips.items():
            for n in FRAME_COUNTS:
                for backend in backends:
                    row = time_backend(clip, backend, n, args.min_seconds, args.min_reps)
                    results.append({"backend": backend, "resolution": res, "num_frames": n, **row})
        clip_info = {res: {"bytes": clip.stat().st_size} for res, clip in clips.items()}

    print_table(results, backends)
    report = {
        "what": "clips per CPU-second and per wall-second of sample_frames(strategy='middle', num_threads=1), one process",
        "clip": {"seconds": args.seconds, "fps": args.fps, "codec": "h264 crf 23 veryfast, x264 default GOP", **clip_info},
        "machine": machine_info(),
        "loadavg_start_end": [load_start, os.getloadavg()],  # other work on the box skews timings
        "results": results,
        "skipped": skipped,
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
