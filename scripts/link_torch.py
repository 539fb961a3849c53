"""Hard-link one venv's torch and torchvision (with triton, nvidia-* and cuda-*) into another venv.

The CUDA builds that setup.sh installs are about 5.5 GB per venv; .ci/run builds four venvs (.venv, the
oldest and newest ends of the transformers range, .venv-lmms), which no longer fit some CI disks. Linking
gives each venv its own complete installation as pip sees it (dist-info with RECORD, so `pip check`,
`pip install torch==X` and uninstall behave as after a normal install) while the bytes are stored once.
Scripts under bin/ are copied with their interpreter line rewritten, so they run with the target's Python.

    python scripts/link_torch.py SOURCE_VENV TARGET_VENV 'torch==2.14.1 torchvision==0.29.1'

Links only when the source holds exactly the requested versions and both venvs are on one filesystem;
otherwise it prints why and links nothing, and setup.sh installs as usual. Exit status 0 either way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# The distributions whose files make up the GBs: torch, torchvision and what their wheels pull in.
HEAVY = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")


def _inventory(venv: Path) -> dict:
    """The venv's site-packages and the files of its heavy distributions, read by its own interpreter."""
    probe = (
        "import importlib.metadata as m, json, re, sysconfig\n"
        f"heavy = re.compile({HEAVY.pattern!r})\n"
        "dists = {}\n"
        "for d in m.distributions():\n"
        "    name = re.sub(r'[-_.]+', '-', d.metadata['Name']).lower()\n"
        "    if heavy.match(name):\n"
        "        dists[name] = {'version': d.version, 'files': [str(f) for f in d.files or []]}\n"
        "print(json.dumps({'site': sysconfig.get_paths()['purelib'], 'dists': dists}))\n"
    )
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def _copy_script(src: Path, dst: Path, source_python: str, target_python: str) -> None:
    text = src.read_bytes()
    if text.startswith(b"#!"):
        first, _, rest = text.partition(b"\n")
        text = first.replace(source_python.encode(), target_python.encode()) + b"\n" + rest
    dst.write_bytes(text)
    shutil.copymode(src, dst)


def link(source: Path, target: Path, requested: list[str]) -> str:
    """Link the heavy distributions; returns a one-line account of what was done or why not."""
    have = _inventory(source)
    for pin in requested:
        name, _, version = pin.partition("==")
        found = have["dists"].get(name.lower(), {}).get("version")
        if found != version:
            return f"{source} has {name} {found}, not {version}: installing instead of linking"
    site_src = Path(have["site"])
    site_dst = Path(_inventory(target)["site"])
    if os.stat(site_src).st_dev != os.stat(site_dst).st_dev:
        return f"{source} and {target} are on different filesystems: installing instead of linking"
    source_python = str(source.resolve() / "bin" / "python")
    target_python = str(target.resolve() / "bin" / "python")
    count = 0
    for dist in have["dists"].values():
        for rel in dist["files"]:
            src = (site_src / rel).resolve()
            dst = Path(os.path.normpath(site_dst / rel))
            if not src.is_file() or dst.exists():
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.parent.name == "bin" and site_dst not in dst.parents:
                _copy_script(src, dst, source_python, target_python)
            else:
                os.link(src, dst)
            count += 1
    libraries = len(have["dists"]) - len(requested)
    return f"linked {' '.join(requested)} and {libraries} libraries ({count} files) from {source}"


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit("usage: link_torch.py SOURCE_VENV TARGET_VENV 'torch==X torchvision==Y'")
    source, target, requested = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split()
    print(f"link_torch: {link(source, target, requested)}")


if __name__ == "__main__":
    main()
