"""Nothing silent about which model is evaluated, and how.

A forgotten checkpoint is an error in every app (it used to build the tiny random model and
exit 0); a checkpoint missing a weight or holding an unexpected one is refused by name
(it used to load the weight randomly initialised); the frame count, sampling and dtype an
export records are what evaluation uses unless overridden, and ``results.json`` says where
each came from; every settings mistake of the eval app is one line, printed before any load.
The apps run as real subprocesses where the behaviour is about what a user sees.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from tc_llava.data.synthetic import generate
from tc_llava.eval.__main__ import run
from tc_llava.eval.settings import from_export
from tc_llava.model.tc_llava import TCLlava, WeightsError

from conftest import CONFIGS, REPO

DROPPED = "language_model.model.layers.1.mlp.up_proj.weight"   # as stored in the tiny checkpoint's file
DROPPED_LOADED = "model.language_model.layers.1.mlp.up_proj.weight"  # as transformers names it once loaded
EXTRA = "model.extra_projection.weight"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The synthetic MVBench-layout sets of the eval and ablation apps: one question per task."""
    root = tmp_path_factory.mktemp("data")
    for name in ("synthetic", "ablation"):
        generate(root / name, num_train=1, num_eval_per_task=1, seed=0, num_frames=8, size=32)
    return root


@pytest.fixture(scope="module")
def export(tiny_llama, tmp_path_factory) -> Path:
    """An export as training writes it: 4 frames drawn at random, saved in bfloat16."""
    out = tmp_path_factory.mktemp("export")
    model = TCLlava.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    model.frame_sampling = {"num_frames": 4, "image_frames": 1, "sampling": "random"}
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def broken(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama without one LLM weight and with one weight no LLaVA has."""
    out = tmp_path_factory.mktemp("broken") / "ckpt"
    shutil.copytree(tiny_llama, out)
    weights = load_file(out / "model.safetensors")
    del weights[DROPPED]
    weights[EXTRA] = torch.zeros(3, 3)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _app(module: str, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _error_lines(output: str) -> list[str]:
    """What the app printed, less the import-time notices of DeepSpeed and warnings."""
    return [line for line in output.splitlines() if line.strip() and "real_accelerator" not in line
            and "Warning" not in line and not line.startswith("  warnings.warn")]


# --------------------------------------------------------------------------- settings errors, one line each
def test_settings_errors_are_one_line_before_any_load(tmp_path, data_root):
    """A forgotten checkpoint in the train, ablation and eval apps (``???`` left, or an unset shell variable),
    and the eval app's ``???`` benchmark value, a value of the wrong type, an unknown benchmark option and an
    unknown key: exit 1 with one line."""
    data = f"paths.data={data_root}"
    cases = {
        ("tc_llava.train", "model=pretrained", "model.checkpoint="):
            "SettingsError: model.checkpoint='' is empty (an unset shell variable?)",
        ("tc_llava.ablation", "hydra.mode=RUN", "model=pretrained", "model.checkpoint=", data):
            "SettingsError: model.checkpoint='' is empty (an unset shell variable?)",
        ("tc_llava.eval", "model=pretrained", "model.checkpoint=", "benchmark=mvbench_synthetic", data):
            "EvalSettingsError: model.checkpoint='' is empty (an unset shell variable?)",
        ("tc_llava.eval", "model=pretrained", "benchmark=mvbench_synthetic", data):
            "EvalSettingsError: model.checkpoint is not set",
        ("tc_llava.eval", "benchmark=nextqa"):
            "EvalSettingsError: benchmark.root is not set (???): benchmark=nextqa needs benchmark.root=...",
        ("tc_llava.eval", "benchmark=mvbench_synthetic", "benchmark.batch_size=abc", data):
            "EvalSettingsError: benchmark.batch_size='abc': expected an integer >= 1",
        ("tc_llava.eval", "benchmark=mvbenhc"):  # Hydra's own composition errors
            "MissingConfigException: In 'eval': Could not find 'benchmark/mvbenhc'; available: mlvu, mvbench, ",
        ("tc_llava.eval", "benchmark.num_frame=8"):
            "ConfigCompositionException: Could not override 'benchmark.num_frame'; To append to your config use "
            "+benchmark.num_frame=8",
        ("tc_llava.train", "rope=nope"):
            "MissingConfigException: In 'train': Could not find 'rope/nope'; available: mrope, tad, vanilla, videorope",
        ("tc_llava.ablation", "hydra.mode=RUN", "mask=nope", data):
            "MissingConfigException: In 'train': Could not find 'mask/nope'; available: bidirectional_visual, causal, ",
    }
    procs = {case: _app(case[0], *case[1:], f"run_dir={tmp_path / str(k)}", f"paths.cache={tmp_path / 'cache'}",
                        cwd=tmp_path) for k, case in enumerate(cases)}
    for case, proc in procs.items():
        output = proc.communicate(timeout=300)[0]
        lines = _error_lines(output)
        assert proc.returncode == 1 and len(lines) == 1, (case, output[-3000:])
        assert cases[case] in lines[0], (case, lines)
    assert not (tmp_path / "cache" / "tiny").exists()  # no model was built, not even the tiny one


# --------------------------------------------------------------------------- weights that do not fit
def test_missing_and_unexpected_weights_are_refused_by_name(broken, tiny_llama):
    with pytest.raises(WeightsError) as info:
        TCLlava.from_pretrained(broken)
    message = str(info.value)
    assert f"1 missing ({DROPPED_LOADED})" in message and f"1 unexpected ({EXTRA})" in message
    assert "model.allow_missing_weights=true" in message and "\n" not in message
    assert TCLlava.from_pretrained(tiny_llama).weights_report == {"allow_missing_weights": False}


def test_allowed_missing_weights_load_and_are_recorded_in_results(broken, data_root, tmp_path):
    model = TCLlava.from_pretrained(broken, allow_missing_weights=True)
    assert model.weights_report == {"allow_missing_weights": True, "missing_keys": [DROPPED_LOADED],
                                    "unexpected_keys": [EXTRA]}
    results = _evaluate(data_root, tmp_path / "eval", f"model.checkpoint={broken}", "model.allow_missing_weights=true",
                        "model.dtype=float32", "benchmark.num_frames=8")
    assert results["settings"]["model"]["weights_loading"] == model.weights_report
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["settings"]["model"]["weights_loading"]["missing_keys"] == [DROPPED_LOADED]


def test_a_tied_lm_head_is_not_missing(tiny_llama, tmp_path):
    """transformers itself leaves a tied lm_head out of the file and out of its missing keys."""
    out = tmp_path / "tied"
    shutil.copytree(tiny_llama, out)
    config = json.loads((out / "config.json").read_text())
    config["text_config"]["tie_word_embeddings"] = config["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    weights = load_file(out / "model.safetensors")
    del weights["language_model.lm_head.weight"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    model = TCLlava.from_pretrained(out)
    assert model.weights_report == {"allow_missing_weights": False}
    assert model.hf.lm_head.weight.data_ptr() == model.language_model.embed_tokens.weight.data_ptr()


# --------------------------------------------------------------------------- what the export records
def _compose(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("eval", overrides=list(overrides))


def _evaluate(data_root: Path, run_dir: Path, *overrides: str) -> dict:
    cfg = _compose("model=pretrained", "benchmark=mvbench_synthetic", f"paths.data={data_root}", f"run_dir={run_dir}",
                   "benchmark.max_new_tokens=2", "benchmark.decode.num_workers=0", *overrides)
    return run(cfg)


def test_frames_sampling_and_dtype_come_from_the_export(export):
    """NExT-QA fixes no sampling: the export's 4 frames, its random draws evaluated at segment middles, and
    the bfloat16 it was saved in; a llava-hf checkpoint without a record gets the defaults."""
    cfg = _compose("model=pretrained", f"model.checkpoint={export}", "benchmark=nextqa", "benchmark.root=unused")
    assert from_export(cfg) == {"num_frames": {"value": 4, "source": "export"},
                                "sampling": {"value": "middle", "source": "export", "trained_with": "random"},
                                "dtype": {"value": "bfloat16", "source": "export"}}
    assert (cfg.benchmark.num_frames, cfg.benchmark.sampling, cfg.model.dtype) == (4, "middle", "bfloat16")
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"  # written by transformers


def test_eval_records_what_it_used_and_where_it_came_from(export, data_root, tmp_path):
    """The real app: MVBench's protocol keeps segment middles (config), the frame count is the export's,
    the dtype given on the command line is an override."""
    run_dir = tmp_path / "eval"
    proc = _app("tc_llava.eval", "model=pretrained", f"model.checkpoint={export}", "model.dtype=float32",
                "benchmark=mvbench_synthetic", f"paths.data={data_root}", f"run_dir={run_dir}",
                "benchmark.max_new_tokens=2", "benchmark.decode.num_workers=0", cwd=tmp_path)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["settings"]["resolved"] == {"num_frames": {"value": 4, "source": "export"},
                                               "sampling": {"value": "middle", "source": "config"},
                                               "dtype": {"value": "float32", "source": "override"}}
    assert results["settings"]["model"]["dtype"] == "float32" and results["settings"]["num_frames"] == 4
    assert results["provenance"]["frames"]["num_frames"] == 4


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_evaluation_with_one_line_saying_how_to_continue(export, tmp_path, signum):
    """Stopped once its first answers are cached (the signal to the whole process group, as a terminal's
    Ctrl-C sends it): exit 128 + signal, one line, no traceback; the same command then finishes from the cache."""
    data = tmp_path / "data"
    generate(data / "synthetic", num_train=1, num_eval_per_task=40, seed=0, num_frames=8, size=32)
    run_dir = tmp_path / "eval"
    args = ("tc_llava.eval", "model=pretrained", f"model.checkpoint={export}", "benchmark=mvbench_synthetic",
            f"paths.data={data}", f"run_dir={run_dir}", "benchmark.batch_size=1", "benchmark.max_new_tokens=2",
            "benchmark.decode.num_workers=1")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=tmp_path, env=env, text=True, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240

    def cached() -> int:
        return sum(len(p.read_text().splitlines()) for p in (run_dir / "cache").glob("*.jsonl"))

    while proc.poll() is None and time.monotonic() < deadline and not cached():
        time.sleep(0.2)
    os.killpg(proc.pid, signum)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signum, output[-3000:]
    assert "Traceback" not in output
    assert (f"stopped by {signal.Signals(signum).name}: the answers so far are cached under {run_dir / 'cache'}; "
            "rerun the same command to continue from them") in output
    assert 0 < cached() < 240 and not (run_dir / "results.json").exists()
    done = _app(*args, cwd=tmp_path).communicate(timeout=600)[0]
    assert json.loads((run_dir / "results.json").read_text())["Avg"]["total"] == 240, done[-3000:]
