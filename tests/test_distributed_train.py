"""Two real processes over gloo: DDP, DeepSpeed ZeRO-2 and ZeRO-3 train, save, resume, export.

Each run is ``torchrun --nproc_per_node 2 -m tc_llava.train`` on the tiny model. The
global batch (2 ranks x 4) equals the single-process batch of 8, so all trainers must
give the single-process losses (fp32, summation order aside).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from tc_llava.data.synthetic import generate
from tc_llava.train.loop import train

from conftest import REPO, TINY, free_port
from test_train import overrides as train_overrides
from test_train import train_cfg

pytestmark = pytest.mark.slow
COMMON = ("trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=5", "trainer.mixed_precision=no",
          "trainer.backend=gloo", "tuning=lora", "tuning.lora.r=4", "tuning.lora.dropout=0.0", "trainer.lr=1e-3")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate(root / "synthetic", num_train=32, num_eval_per_task=2, seed=0, num_frames=8)
    return root


@pytest.fixture(scope="module")
def single_process_losses(synthetic, tmp_path_factory, cache_dir) -> list[float]:
    run = tmp_path_factory.mktemp("single")
    result = train(train_cfg(synthetic, run, *COMMON, "data.batch_size=8", "export.enabled=false"))
    AcceleratorState._reset_state(reset_partial_state=True)
    return result["losses"]


def torchrun(data: Path, run_dir: Path, cache_dir: Path, *extra: str) -> list[float]:
    """Train on two ranks; returns the losses the run's last checkpoint holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TC_LLAVA_CACHE": str(cache_dir),
           "TORCH_EXTENSIONS_DIR": str(Path(cache_dir).parent / "torch_extensions")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "tc_llava.train", *train_overrides(data, run_dir, *COMMON, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    return json.loads((last / "trainer_state.json").read_text())["losses"]


@pytest.mark.parametrize("trainer", ["ddp", "zero2", "zero3"])
def test_two_ranks_train_save_resume(trainer, synthetic, tmp_path, cache_dir, single_process_losses):
    run = tmp_path / trainer
    losses = torchrun(synthetic, run, cache_dir, f"trainer={trainer}", "export.merge_lora=false")
    assert len(losses) == 4 and losses[-1] < losses[0]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_process_losses), rtol=1e-4, atol=0)
    if trainer != "ddp":  # DeepSpeed wrote its own sharded checkpoint
        assert (run / "checkpoints/step_4/pytorch_model").is_dir()

    # resume from step 2 on two ranks: steps 3 and 4 replay exactly
    shutil.rmtree(run / "checkpoints/step_4")
    resumed = torchrun(synthetic, run, cache_dir, f"trainer={trainer}", "resume=latest", "export.merge_lora=false")
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(losses), rtol=1e-6, atol=0)

    adapter = load_file(run / "export/adapter_model.safetensors")
    assert len(adapter) == 2 * 2 * TINY["num_layers"]  # lora_A and lora_B of q_proj and v_proj per layer
    assert all(t.numel() > 0 for t in adapter.values())
    assert max(t.abs().max() for k, t in adapter.items() if "lora_B" in k) > 0  # trained, not the zero init
    if trainer == "zero3":
        # DeepSpeed's own consolidation of the ZeRO-3 shards is the reference
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        shards = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints/step_4"))
        for key, value in adapter.items():
            ours = "hf." + key.removeprefix("base_model.model.").replace(".weight", ".default.weight")
            torch.testing.assert_close(value, shards[ours].to(value.dtype))


def test_two_ranks_packed_equal_one_rank_padded(synthetic, tmp_path, cache_dir, single_process_losses):
    """Packed batches on two DDP ranks, through block_merge's segments, give the losses of the padded batches of
    one process (the window's label tokens are counted across ranks either way)."""
    losses = torchrun(synthetic, tmp_path / "packed", cache_dir, "trainer=ddp", "export.enabled=false",
                      "data.packing=true", "model.attn_implementation=block_merge")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single_process_losses), rtol=1e-4, atol=0)


def test_two_ranks_count_the_runs_samples_and_resume_the_counts(synthetic, tmp_path, cache_dir,
                                                               single_process_losses):
    """The data counts saved and reported are the run's, summed over both ranks (4 steps x 2 ranks x 4 samples),
    and a resumed run continues them once, not once per rank (``single_process_losses`` builds the tiny model
    before two ranks race to)."""
    run = tmp_path / "ddp"
    torchrun(synthetic, run, cache_dir, "trainer=ddp", "export.enabled=false")
    data = json.loads((run / "checkpoints/step_4/trainer_state.json").read_text())["data"]
    assert data["total"]["samples"] == data["epoch"]["samples"] == 32
    assert data["total"]["media"]["frames"] == 32 * 4
    shutil.rmtree(run / "checkpoints/step_4")
    torchrun(synthetic, run, cache_dir, "trainer=ddp", "export.enabled=false", "resume=latest")
    assert json.loads((run / "checkpoints/step_4/trainer_state.json").read_text())["data"] == data
