"""Our calls into the installed transformers use its current names: none of them is deprecated.

CI runs this module (with the rest of the transformers-touching tests) at the oldest supported
release and the newest one; a rename in a new release shows up here as a deprecation first.
"""

from __future__ import annotations

import inspect
import logging
import warnings

import pytest
import torch
import transformers
from transformers import LlamaModel, Qwen2Model
from transformers.utils import logging as hf_logging

from tc_llava.model.hf_compat import CACHE_ARG, enable_activation_checkpointing
from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava

from test_families import MIXED, prompts
from test_model import video_batch

# Deprecations that third-party code raises on its own (not through a call of ours).
THIRD_PARTY = ("`is_gradient_checkpointing` is deprecated",)  # peft's get_peft_model reads the old property


def test_cache_keyword_is_the_installed_release_s():
    for model in (LlamaModel, Qwen2Model):
        params = inspect.signature(model.forward).parameters
        assert CACHE_ARG in params
        assert ("cache" in params) == (CACHE_ARG == "cache")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def deprecations(run) -> list[str]:
    """The deprecation warnings and log messages transformers gives while ``run()`` runs, less third parties'."""
    hf_logging.warning_once.cache_clear()  # warn-once messages from earlier tests must show again
    handler = _Records()
    root = hf_logging.get_logger("transformers")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        root.removeHandler(handler)
    messages = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    messages += [m for m in handler.messages if "deprecat" in m.lower()]
    return [m for m in messages if not m.startswith(THIRD_PARTY)]


@pytest.mark.parametrize("ckpt", ["tiny_onevision", "tiny_next_video"])
def test_the_video_families_warn_of_nothing_deprecated(ckpt, request, tmp_path):
    """A mixed-frame generation, save, load (processors included) and a checkpointed training step."""
    def run():
        model = TCLlava.from_pretrained(request.getfixturevalue(ckpt), rope=TADRoPE(1.0), mask=FrameBlockCausalMask())
        ids, mask, pixels, counts, _ = prompts(model, MIXED, "left")
        model.eval().generate(ids, mask, pixels, num_frames=counts, max_new_tokens=3)
        model.save_pretrained(tmp_path / "saved")
        model = TCLlava.from_pretrained(tmp_path / "saved").train()
        enable_activation_checkpointing(model.hf)
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        model(ids, mask, pixels, labels=labels, num_frames=counts).loss.backward()

    ours = deprecations(run)
    assert ours == [], f"transformers {transformers.__version__}: {ours}"


def test_forward_generate_save_load_and_checkpointed_training_warn_of_nothing_deprecated(tiny_llama, tmp_path):
    def run():
        model = TCLlava.from_pretrained(tiny_llama, rope=TADRoPE(1.0), mask=FrameBlockCausalMask())
        ids, mask, pixels = video_batch(model, [(3, 2), (1, 1)], "left", num_frames=2)
        model.eval().generate(ids, mask, pixels, max_new_tokens=3)
        model.save_pretrained(tmp_path / "saved")
        model = TCLlava.from_pretrained(tmp_path / "saved").train()
        enable_activation_checkpointing(model.hf)
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        model(ids, mask, pixels, labels=labels).loss.backward()

    ours = deprecations(run)
    assert ours == [], f"transformers {transformers.__version__}: {ours}"
