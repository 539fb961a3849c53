"""Shared fixtures: tiny random checkpoints built once per session, saved locally."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# Small enough that every model test runs in seconds on two cores.
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


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


def free_port() -> int:
    """A free TCP port on the loopback interface, for torchrun's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
