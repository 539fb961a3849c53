"""scripts/link_torch.py: the second venv's torch is the first one's bytes, and a complete install to pip."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

from conftest import REPO

SITE = Path("lib") / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def _fake_dist(root: Path, name: str, version: str) -> None:
    """A distribution as pip leaves it: package files, dist-info with RECORD, a console script in bin/."""
    site = root / SITE
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(f"VERSION = {version!r}\n")
    info = site / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    script = root / "bin" / f"{name}run"
    script.write_text(f"#!{root.resolve()}/bin/python\nimport {name}; print({name}.VERSION)\n")
    script.chmod(0o755)
    (info / "RECORD").write_text(
        f"{name}/__init__.py,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n../../../bin/{name}run,,\n")


def _venvs(tmp_path: Path, version: str) -> tuple[Path, Path]:
    source, target = tmp_path / "src", tmp_path / "dst"
    for root in (source, target):
        venv.create(root, with_pip=False, symlinks=True)
    _fake_dist(source, "torch", version)
    return source, target


def _link(source: Path, target: Path, pins: str) -> str:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "link_torch.py"), str(source), str(target), pins],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def test_links_the_files_and_pip_sees_the_distribution(tmp_path):
    source, target = _venvs(tmp_path, "9.9.1")
    assert "linked torch==9.9.1 and 0 libraries (4 files)" in _link(source, target, "torch==9.9.1")
    src_init, dst_init = source / SITE / "torch" / "__init__.py", target / SITE / "torch" / "__init__.py"
    assert os.stat(src_init).st_ino == os.stat(dst_init).st_ino  # one copy on disk
    version = subprocess.run([str(target / "bin" / "python"), "-c",
                              "import importlib.metadata as m; print(m.version('torch'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "9.9.1"
    script = target / "bin" / "torchrun"
    assert script.read_text().splitlines()[0] == f"#!{target.resolve()}/bin/python"
    assert os.stat(script).st_ino != os.stat(source / "bin" / "torchrun").st_ino
    assert subprocess.run([str(script)], capture_output=True, text=True, check=True).stdout.strip() == "9.9.1"


def test_other_versions_are_not_linked(tmp_path):
    source, target = _venvs(tmp_path, "9.9.0")
    assert "has torch 9.9.0, not 9.9.1: installing instead of linking" in _link(source, target, "torch==9.9.1")
    assert not (target / SITE / "torch").exists()
