""":class:`LocalJudge`: a Hugging Face causal LM run in-process, greedily."""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Any

from tc_llava.eval.judge.base import Judge
from tc_llava.eval.judge.breaker import JudgeError
from tc_llava.provenance import model_hash


def _hub_snapshot(path: Path) -> str | None:
    """The commit of a Hugging Face cache snapshot directory (``.../snapshots/<commit>``), else None."""
    return path.name if path.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", path.name) else None


class LocalJudge(Judge):
    """Judge with a local Hugging Face causal LM, greedy decoding, one item at a time.

    The tokenizer's chat template is used when it has one; otherwise the prompt is
    ``"system: {system}\\nuser: {user}\\nassistant:"``. Greedy decoding repeats itself,
    so re-asking is pointless and ``max_retries`` defaults to 0. Building it only checks
    the path: the eval app builds the judge before generating to find a wrong path early,
    and the weights load on first use (a fully cached re-score never loads them).
    """

    def __init__(
        self,
        model_path: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 64,
        max_retries: int = 0,
        model_id: str | None = None,
        revision: str | None = None,
        max_consecutive_failures: int = 5,
    ):
        if not (Path(model_path) / "config.json").is_file():
            raise JudgeError(
                f"judge.model_path={model_path}: no config.json there; expected a local "
                "Hugging Face model directory (config, weights and tokenizer)"
            )
        self.model_path = str(model_path)
        self.model = Path(model_path).resolve().name
        self.model_id, self.revision = model_id, revision
        snapshot = _hub_snapshot(Path(model_path).resolve())
        if revision and snapshot and snapshot != revision:
            raise JudgeError(f"judge.revision={revision}: judge.model_path={model_path} is the hub snapshot {snapshot}; "
                             "download the pinned revision or set judge.revision to the one you judge with")
        self.device = device
        self.dtype = dtype
        self.max_new_tokens = int(max_new_tokens)
        self.max_retries = int(max_retries)
        self.max_consecutive_failures = int(max_consecutive_failures)
        self.concurrency = 1

    @cached_property
    def tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=False)  # a download is data, never code

    @cached_property
    def lm(self) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype),
                                                  trust_remote_code=False)
        return lm.to(self.device).eval()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "local",
            "model": self.model,
            "model_path": self.model_path,
            "base_url": None,
            "temperature": 0.0,
            "max_new_tokens": self.max_new_tokens,
        }

    @cached_property
    def weights_sha256(self) -> str | None:
        """SHA-256 over the judge's config and weight files (read once per process; 15 GB at 7B)."""
        return model_hash(self.model_path)["sha256"]

    def provenance(self) -> dict[str, Any]:
        return {"model": self.model_id or self.model, "revision": self.revision,
                "weights_sha256": self.weights_sha256, "endpoint": "local-transformers", "model_path": self.model_path}

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def complete(self, messages: list[dict[str, str]]) -> str:
        import torch

        has_template = bool(getattr(self.tokenizer, "chat_template", None))
        enc = self.tokenizer(
            self.prompt_text(messages), return_tensors="pt", add_special_tokens=not has_template
        )
        enc = {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}
        pad_id = self.tokenizer.pad_token_id
        with torch.inference_mode():
            out = self.lm.generate(
                **enc,
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=pad_id if pad_id is not None else self.tokenizer.eos_token_id,
            )
        return self.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
