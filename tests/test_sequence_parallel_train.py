"""``trainer.sp_size``: refused early where the mask could not stay exact, and trained over real processes.

The end-to-end reference is one process training the same batches without sequence
parallelism (itself checked against DDP, ZeRO and HF in tests/test_distributed_train.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from tc_llava.data.synthetic import generate
from tc_llava.model.masks import BidirectionalVisualMask, FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE
from tc_llava.model.sequence_parallel import SequenceParallel
from tc_llava.train.loop import train
from tc_llava.train.settings import SettingsError, check_train_config

from conftest import REPO, free_port
from test_model import load
from test_train import overrides, train_cfg

# The same batches either way: 8 samples per step, packed, every row padded to a multiple of 2 (the shares).
RUN = ("trainer.backend=gloo", "trainer.gradient_checkpointing=false", "trainer.mixed_precision=no",
       "trainer.max_steps=3", "trainer.save_every=3", "data.batch_size=8", "data.packing=true", "data.collator.pad_to_multiple_of=2",
       "model.attn_implementation=block_merge", "export.enabled=false", "trainer.warmup_ratio=0")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate(root / "synthetic", num_train=24, num_eval_per_task=2, seed=0, num_frames=8)
    return root


# --------------------------------------------------------------------------- refusals, before anything loads
def refusal(synthetic: Path, tmp_path: Path, monkeypatch, env: dict[str, str], *extra: str) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError) as caught:
        check_train_config(train_cfg(synthetic, tmp_path / "run", "trainer=ddp", *RUN, *extra))
    return str(caught.value)


def test_sp_degrees_that_do_not_divide_the_heads_are_refused(synthetic, tmp_path, monkeypatch):
    """The tiny model's 4 heads refuse 3; a checkpoint of Qwen2-7B's 28 heads (read from its config.json) refuses
    8, naming the degrees that work."""
    message = refusal(synthetic, tmp_path, monkeypatch, {"WORLD_SIZE": "6"}, "trainer.sp_size=3")
    assert message == ("trainer.sp_size=3 does not divide the LLM's 4 attention heads (each rank attends with "
                       "heads / sp_size of them): use one of [1, 2, 4]")
    checkpoint = tmp_path / "qwen2_7b"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(
        {"model_type": "llava_onevision", "text_config": {"num_attention_heads": 28, "num_key_value_heads": 4}}))
    message = refusal(synthetic, tmp_path, monkeypatch, {"WORLD_SIZE": "8"}, "trainer.sp_size=8",
                      f"model.checkpoint={checkpoint}")
    assert "trainer.sp_size=8 does not divide the LLM's 28 attention heads" in message
    assert message.endswith("use one of [1, 2, 4, 7, 14, 28]")


def test_sp_refuses_what_would_make_the_mask_causal(synthetic, tmp_path, monkeypatch):
    """A backend that would attend within its share or drop the mask (sdpa; auto, which is sdpa on CPU; flash),
    and Accelerate's own context or sequence parallelism, each refused naming the setting and what to use."""
    for impl in ("sdpa", "auto", "flash_attention_2"):
        message = refusal(synthetic, tmp_path, monkeypatch, {"WORLD_SIZE": "2"}, "trainer.sp_size=2",
                          f"model.attn_implementation={impl}")
        assert message.startswith("trainer.sp_size=2 attends through the exact block decomposition")
        assert "model.attn_implementation=block_merge" in message, message
    message = refusal(synthetic, tmp_path, monkeypatch, {"WORLD_SIZE": "2", "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
                                                          "PARALLELISM_CONFIG_CP_SIZE": "2"}, "trainer.sp_size=1")
    assert message.startswith("the accelerate config's parallelism_config (cp_size=2) replaces the attention mask")
    assert "set trainer.sp_size instead" in message
    monkeypatch.delenv("ACCELERATE_USE_PARALLELISM_CONFIG")
    ulysses = tmp_path / "ulysses.json"
    ulysses.write_text(json.dumps({"zero_optimization": {"stage": 2}, "sequence_parallel_size": 2}))
    message = refusal(synthetic, tmp_path, monkeypatch, {"WORLD_SIZE": "2"}, f"trainer.deepspeed={ulysses}")
    assert message == (f"trainer.deepspeed={ulysses}: sequence_parallel_size=2 is DeepSpeed's Ulysses, which drops "
                       "the attention mask; remove it and set trainer.sp_size instead")


def test_sp_refuses_a_launch_or_padding_that_does_not_split(synthetic, tmp_path, monkeypatch):
    message = refusal(synthetic, tmp_path, monkeypatch, {"WORLD_SIZE": "3"}, "trainer.sp_size=2")
    assert message == ("trainer.sp_size=2: 3 process(es) do not split into sequence-parallel groups of 2; launch a "
                       "multiple of 2 (dp x sp processes)")
    message = refusal(synthetic, tmp_path, monkeypatch, {"WORLD_SIZE": "2"}, "trainer.sp_size=2",
                      "data.collator.pad_to_multiple_of=3")
    assert message.startswith("data.collator.pad_to_multiple_of=3: expected a multiple of trainer.sp_size=2")


def test_the_model_refuses_sp_it_cannot_run_exactly(tiny_llama):
    """Without the settings check (a script building the model itself): the same refusals from the model, and an
    SP forward without labels (evaluation) refused rather than run on one share."""
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask(), impl="sdpa")
    with pytest.raises(ValueError, match=r"model.attn_implementation='sdpa' would see one share or drop the mask: "
                                         r"use model.attn_implementation=block_merge"):
        model.shard_sequence(SequenceParallel(None, 0, 2))
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask(), impl="block_merge")
    with pytest.raises(ValueError, match=r"trainer.sp_size=3 does not divide the LLM's 4 attention heads .* "
                                         r"use one of \[1, 2, 4\]"):
        model.shard_sequence(SequenceParallel(None, 0, 3))
    model.shard_sequence(SequenceParallel(None, 0, 2))
    with pytest.raises(ValueError, match="runs training forwards, with labels"):
        model(torch.ones(1, 4, dtype=torch.long))


def test_sp_refuses_blocks_it_cannot_keep_exact(tiny_qwen2_5_vl):
    """bidirectional_visual over a Qwen-VL sample holding an image, text, then a video: its one block comes back after
    a gap, which the decomposition cannot lay out; under SP that is refused (SP=1 falls back to a dense mask)."""
    import test_qwen_families as qwen

    model = load(tiny_qwen2_5_vl, TADRoPE(), BidirectionalVisualMask(), impl="block_merge")
    ids, mask, visual, _ = qwen.batch(model)
    model.shard_sequence(SequenceParallel(None, 0, 2))
    with pytest.raises(ValueError, match="a block id comes back after a gap .* train such data with "
                                         "trainer.sp_size=1"):
        model(ids, mask, labels=ids, **visual)


# --------------------------------------------------------------------------- training over real processes
def torchrun(data: Path, run_dir: Path, cache_dir: Path, processes: int, trainer: str, *extra: str) -> dict:
    """Train on ``processes`` ranks with ``trainer``; returns the last checkpoint's trainer state."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TC_LLAVA_CACHE": str(cache_dir),
           "TORCH_EXTENSIONS_DIR": str(Path(cache_dir).parent / "torch_extensions")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "tc_llava.train",
           *overrides(data, run_dir, f"trainer={trainer}", *RUN, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "checkpoints/step_3/trainer_state.json").read_text())


@pytest.fixture(scope="module")
def whole(synthetic, tmp_path_factory) -> Path:
    """One process training the batches of 8 samples whole: its run dir."""
    run = tmp_path_factory.mktemp("whole")
    train(train_cfg(synthetic, run, "trainer=cpu", *RUN))
    AcceleratorState._reset_state(reset_partial_state=True)
    return run


@pytest.mark.slow
@pytest.mark.parametrize("trainer,processes,batch,checkpointing", [
    ("ddp", 2, 8, False), ("ddp", 4, 4, False), ("zero2", 2, 8, False), ("zero3", 2, 8, True)],
    ids=["sp2", "dp2xsp2", "zero2_sp2", "zero3_sp2_checkpointing"])
def test_sp_ranks_train_as_one_process(synthetic, whole, tmp_path, cache_dir, trainer, processes, batch,
                                       checkpointing):
    """Three optimizer steps (full fine-tuning, AdamW, packed batches) with each sequence split over two processes
    (trainer.sp_size=2, launched by torchrun): alone (each step the batch of 8), as two data-parallel replicas
    (each step two batches of 4, the same 8 samples), under ZeRO-2, and under ZeRO-3 with activation checkpointing
    (the all-to-alls run again in the recomputation). The losses and the trained weights are those of one process
    training the 8 samples whole (fp32, summation order aside), and the data counts are the run's once, not once
    per share."""
    state = torchrun(synthetic, tmp_path / "sp", cache_dir, processes, trainer, "trainer.sp_size=2",
                     f"data.batch_size={batch}", f"trainer.gradient_checkpointing={str(checkpointing).lower()}")
    expected = json.loads((whole / "checkpoints/step_3/trainer_state.json").read_text())
    torch.testing.assert_close(torch.tensor(state["losses"]), torch.tensor(expected["losses"]), rtol=1e-5, atol=0)
    assert state["data"]["total"]["samples"] == 24 and state["world_size"] == processes // 2
    trained = load_file(whole / "checkpoints/step_3/model.safetensors")
    if trainer == "ddp":
        shared = load_file(tmp_path / "sp/checkpoints/step_3/model.safetensors")
    else:  # DeepSpeed's own consolidation of its ZeRO shards
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        shared = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "sp/checkpoints/step_3"))
    assert trained.keys() <= shared.keys()
    for key, value in trained.items():
        torch.testing.assert_close(shared[key], value, rtol=0, atol=1e-5, msg=key)
