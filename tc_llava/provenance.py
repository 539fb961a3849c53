"""What produced a run: the source commit, whether it had local changes, library versions, argv.

Training's ``meta.json`` and every benchmark's results record it, so a number can be traced
to the code that made it. It sits at the package top so that train and eval, which never
import each other, both use this one copy.
"""

from __future__ import annotations

import subprocess
import sys
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
