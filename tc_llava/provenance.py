"""What produced a run: the source commit, whether it had local changes, library versions, argv;
and for an evaluation, what it ran on (annotation hashes, missing media) and which model export.

Training's ``meta.json`` and every benchmark's results record it, so a number can be traced
to the code, the data and the weights that made it. It sits at the package top so that train
and eval, which never import each other, both use this one copy.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers

REPO = Path(__file__).resolve().parents[1]


def git_state() -> dict[str, Any]:
    """``{"commit", "dirty"}`` of this source tree: HEAD and whether it had uncommitted changes (None outside git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def run_meta() -> dict[str, Any]:
    """Training's ``meta.json``: git commit and dirty flag, torch and transformers versions, the command line."""
    git = git_state()
    return {"git_commit": git["commit"], "git_dirty": git["dirty"], "torch": torch.__version__,
            "transformers": transformers.__version__, "argv": sys.argv}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks (annotation files, weights)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(annotations: Iterable[str | Path], root: str | Path, items: int,
                     missing: Sequence[str], failed: Sequence[str]) -> dict[str, Any]:
    """What a benchmark ran on: a hash per annotation file, one hash over them all, the item count,
    and the media that were missing or could not be decoded.

    Paths are recorded relative to ``root`` where they lie under it, so that two copies of the
    same benchmark in different places fingerprint alike.
    """
    root = Path(root)
    hashes = {}
    for path in sorted({Path(p) for p in annotations}):
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = str(path)
        hashes[name] = file_sha256(path)
    overall = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:16]
    return {"fingerprint": overall, "annotations": hashes, "items": items,
            "missing_media": {"count": len(missing), "files": sorted(missing)},
            "failed_media": {"count": len(failed), "files": sorted(failed)}}


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_hash(checkpoint: str | Path, memo: str | Path | None = None) -> dict[str, Any]:
    """SHA-256 over a checkpoint directory's ``config.json`` and weight files' contents.

    At 7B this reads ~15 GB, so the result is kept in ``memo`` (a JSON file) under the files'
    names, sizes and modification times: a resumed run reads it back, a re-exported model is
    hashed again. A checkpoint that is not a local directory (a hub id) has no hash (None).
    """
    root = Path(checkpoint)
    if not root.is_dir():
        return {"checkpoint": str(checkpoint), "sha256": None}
    files = sorted(p for p in root.iterdir() if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)
    stats = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo_path = Path(memo) if memo else None
    if memo_path is not None and memo_path.is_file():
        saved = json.loads(memo_path.read_text())
        if saved.get("checkpoint") == str(root) and saved.get("stats") == stats:
            return {"checkpoint": str(root), "sha256": saved["sha256"]}
    digest = hashlib.sha256()
    for p in files:
        digest.update(f"{p.name}\0{file_sha256(p)}\n".encode())
    value = digest.hexdigest()
    if memo_path is not None:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        memo_path.write_text(json.dumps({"checkpoint": str(root), "stats": stats, "sha256": value}) + "\n")
    return {"checkpoint": str(root), "sha256": value}


def results_provenance(data: dict[str, Any], model: dict[str, Any], frames: dict[str, Any]) -> dict[str, Any]:
    """The ``provenance`` block of a ``results.json``: data fingerprint, model hash, frame settings, git state."""
    return {"data": data, "model": model, "frames": frames, "git": git_state()}
