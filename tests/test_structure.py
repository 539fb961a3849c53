"""The package's rooms import downwards only: stages are siblings that never import each other."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import tc_llava

PACKAGE = Path(tc_llava.__file__).parent
# room -> rooms it must never import (top-level modules such as configs, cli, provenance are shared)
FORBIDDEN = {
    "model": {"data", "train", "eval", "ablation", "lmms"},
    "data": {"model", "train", "eval", "ablation", "lmms"},
    "train": {"eval", "ablation", "lmms"},
    "eval": {"train", "ablation", "lmms"},
    "rl": {"ablation", "lmms"},  # a stage after SFT: eval's answer checks (rewards), the SFT app's run dirs and export
    "ablation": {"lmms"},  # the lmms-eval plugin sits above everything; nothing imports it
}


def imported_rooms(path: Path) -> set[str]:
    """The ``tc_llava`` subpackages/modules a file imports (absolute or relative imports)."""
    here = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("tc_llava", room, ...)
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level] if node.level else ()
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [module] + ([f"{module}.{alias.name}" for alias in node.names] if node.level else [])
        else:
            continue
        rooms |= {name.split(".")[1] for name in names if name.startswith("tc_llava.")}
    return rooms


def test_rooms_import_only_what_they_may():
    crossings = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = path.relative_to(PACKAGE).parts[0]
        for target in imported_rooms(path) & FORBIDDEN.get(room, set()):
            crossings.append(f"{path.relative_to(PACKAGE.parent)} imports tc_llava.{target}")
    assert crossings == []
    assert {"model", "data", "train", "eval"} <= {p.name for p in PACKAGE.iterdir() if p.is_dir()}


def test_the_check_sees_an_import_across_rooms(tmp_path):
    """The walker finds absolute, dotted and relative imports (or the test above could pass vacuously)."""
    fake = PACKAGE / "train" / "_probe_for_test.py"
    try:
        fake.write_text("import tc_llava.eval.runner\nfrom ..eval import mvbench\nfrom tc_llava.model import rope\n")
        assert imported_rooms(fake) == {"eval", "model"}
    finally:
        fake.unlink()


def test_public_api_resolves_lazily():
    probe = "import sys, tc_llava; assert 'torch' not in sys.modules; print(sorted(tc_llava.__all__))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "TCLlava" in out and "VideoPooling" in out
    from tc_llava import MASK_RULES, ROPE_RULES, TCLlava, VideoPooling

    assert TCLlava.__module__ == "tc_llava.model.tc_llava" and VideoPooling().name == "mlp"
    assert all(getattr(tc_llava, name) is not None for name in tc_llava.__all__)
    assert {"tad", "vanilla"} <= set(ROPE_RULES) and "frame_block_causal" in MASK_RULES


def test_a_regular_install_finds_its_configs(tmp_path):
    """``pip install .`` (a built wheel, not the source tree): the console scripts compose from the
    configs shipped in the package, from another directory."""
    repo, source = PACKAGE.parent, tmp_path / "source"  # the tracked files only: no build/ or egg-info left over
    tracked = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout
    for name in tracked.splitlines():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(tmp_path / "site"), str(source)], check=True, capture_output=True, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    script = tmp_path / "site" / "bin" / "tc-llava-train"
    shown = subprocess.run([str(script), "trainer=zero3", "--cfg", "job", "--resolve"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert f"deepspeed: {tmp_path / 'site' / 'tc_llava' / 'configs' / 'trainer' / 'zero3.deepspeed.json'}" in shown
    for app in ("tc-llava-train", "tc-llava-eval"):
        help_text = subprocess.run([str(tmp_path / "site" / "bin" / app), "--help"], env=env, cwd=tmp_path,
                                   capture_output=True, text=True, check=True).stdout
        assert ("model: llava-1.5-7b, llava-v1.6-vicuna-7b, llava_next_video_7b, llava_onevision_qwen2_7b, "
                "llava_video_qwen2_7b, pretrained, qwen2_5_vl_3b, qwen2_5_vl_7b, qwen3_vl_2b, qwen3_vl_4b, "
                "qwen3_vl_8b, tiny, tiny_next_video, tiny_onevision, tiny_qwen2_5_vl, tiny_qwen3_vl") in help_text
