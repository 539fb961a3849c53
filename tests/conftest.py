"""Shared fixtures: tiny random checkpoints built once per session, saved locally."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

from tc_llava.configs import CONFIG_DIR

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(2)
if not torch.cuda.is_available():  # Triton kernels run on CPU tensors in Triton's interpreter; it
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is first imported

REPO = Path(__file__).resolve().parents[1]
CONFIGS = CONFIG_DIR

# Small enough that every model test runs in seconds on two cores.
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """The apps set up accelerate's process-wide state; the next test must find none."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tc_llava_cache")
    os.environ["TC_LLAVA_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(cache_dir) -> Path:
    from tc_llava.model.tiny import tiny_checkpoint

    return tiny_checkpoint(cache_dir, **TINY)


@pytest.fixture(scope="session")
def tiny_qwen2(cache_dir) -> Path:
    from tc_llava.model.tiny import tiny_checkpoint

    return tiny_checkpoint(cache_dir, text_model="qwen2", **TINY)


@pytest.fixture(scope="session")
def tiny_next(cache_dir) -> Path:
    from tc_llava.model.tiny import tiny_checkpoint

    return tiny_checkpoint(cache_dir, arch="llava_next", **TINY)


# The video families at small sizes: OneVision's SigLIP 5x5 patch grid pools to 3x3 (ceil), NeXT-Video's
# CLIP 4x4 grid to 2x2; OneVision's Qwen2 LLM at Qwen2-7B's RoPE base.
TINY_ONEVISION = dict(TINY, arch="llava_onevision", text_model="qwen2", image_size=70, rope_theta=1e6)
TINY_NEXT_VIDEO = dict(TINY, arch="llava_next_video")


@pytest.fixture(scope="session")
def tiny_onevision(cache_dir) -> Path:
    from tc_llava.model.tiny import tiny_checkpoint

    return tiny_checkpoint(cache_dir, **TINY_ONEVISION)


@pytest.fixture(scope="session")
def tiny_next_video(cache_dir) -> Path:
    from tc_llava.model.tiny import tiny_checkpoint

    return tiny_checkpoint(cache_dir, **TINY_NEXT_VIDEO)


def free_port() -> int:
    """A free TCP port on the loopback interface, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def lively(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama with its LLM matrices drawn at std 0.3 (seeded): outputs depend on the input.

    A plain random init answers every prompt with the same token, which would make
    batch/process/resume equalities of the evaluators vacuous.
    """
    out = tmp_path_factory.mktemp("lively")
    save_lively(tiny_llama, out, seed=0)
    return out


def save_lively(checkpoint: Path, out: Path, seed: int) -> None:
    """``checkpoint`` with its LLM matrices redrawn at std 0.3 from ``seed``, saved to ``out``."""
    from tc_llava.model.tc_llava import TCLlava

    model = TCLlava.from_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3, generator=generator)
    model.save_pretrained(out)


# The Qwen-VL families: a Qwen2 LLM with M-RoPE over its 8 frequency pairs, towers of patch 14 with the 2x2 merger.
TINY_QWEN2_5_VL = dict(TINY, arch="qwen2_5_vl", text_model="qwen2")
TINY_QWEN3_VL = dict(TINY, arch="qwen3_vl", text_model="qwen2")


@pytest.fixture(scope="session")
def tiny_qwen2_5_vl(cache_dir) -> Path:
    from tc_llava.model.tiny import tiny_checkpoint

    return tiny_checkpoint(cache_dir, **TINY_QWEN2_5_VL)


@pytest.fixture(scope="session")
def tiny_qwen3_vl(cache_dir) -> Path:
    from tc_llava.model.tiny import tiny_checkpoint

    return tiny_checkpoint(cache_dir, **TINY_QWEN3_VL)
