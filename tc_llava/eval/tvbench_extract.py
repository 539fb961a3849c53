"""``python -m tc_llava.eval.tvbench_extract ROOT``: unpack TVBench's published video archives once.

The HF release (FunAILab/TVBench) holds ``json/<task>.json`` and ``video/<task>.zip``, while
``benchmark=tvbench`` reads MVBench's layout, ``video/<task>/<file>``. Each archive is unpacked
to ``video/<task>/``: a leading ``<task>/`` or ``video/<task>/`` in its member names is
dropped, so either packing gives the same folder. An archive is unpacked into a temporary
folder that is renamed when complete, so an interrupted run leaves no half folder, and a task
whose folder exists is skipped. Member names that are absolute or climb out with ``..`` are
refused. The eval app's input check names this command when it finds archives but no folders.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

COMMAND = "python -m tc_llava.eval.tvbench_extract"


def _relative(member: str, task: str) -> PurePosixPath:
    """The member's path inside ``video/<task>/``."""
    path = PurePosixPath(member)
    if path.is_absolute() or ".." in path.parts:
        raise ValueError(f"member {member!r} is absolute or leaves the folder; refusing to extract it")
    parts = path.parts
    for prefix in (("video", task), (task,)):
        if parts[: len(prefix)] == prefix:
            return PurePosixPath(*parts[len(prefix):])
    return path


def extract_archive(archive: Path) -> Path | None:
    """Unpack ``video/<task>.zip`` to ``video/<task>/``; None when that folder already exists."""
    task = archive.stem
    target = archive.with_suffix("")
    if target.exists():
        return None
    partial = target.with_name(f".{task}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                relative = _relative(info.filename, task)
                if not relative.parts:
                    continue
                out = partial.joinpath(*relative.parts)
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, out.open("wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, ValueError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError(f"{archive}: {e}") from None
    partial.rename(target)
    return target


def extract(root: Path, video_dir: str = "video") -> list[Path]:
    """Unpack every ``{root}/{video_dir}/*.zip`` not yet unpacked; the folders made."""
    folder = root / video_dir
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; expected the TVBench download's {video_dir}/ folder")
    archives = sorted(folder.glob("*.zip"))
    if not archives:
        raise FileNotFoundError(f"{folder} holds no .zip archive; expected TVBench's {video_dir}/<task>.zip")
    return [made for made in map(extract_archive, archives) if made is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[1])
    parser.add_argument("root", type=Path, help="the TVBench directory holding json/ and video/")
    parser.add_argument("--video-dir", default="video", help="the archives' folder, relative to root")
    args = parser.parse_args(argv)
    try:
        made = extract(args.root, args.video_dir)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"extracted {len(made)} archive(s) under {args.root / args.video_dir}" +
          "".join(f"\n  {path}" for path in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
