"""What trains: vision tower frozen, projector trained, LLM by LoRA, fully, or frozen.

LoRA layers are injected into the HF model in place (peft), so the TC-LLaVA module tree,
its attribute paths and its forward stay the same; the returned ``PeftModel`` handle is
kept outside the module tree, only to save adapters and merge.
"""

from __future__ import annotations

from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model

from tc_llava.model.tc_llava import TCLlava

LLM_MODES = ("lora", "full", "frozen")


def lora_config(r: int, alpha: int, dropout: float, target_modules: list[str]) -> LoraConfig:
    """LoRA on the LLM's ``target_modules`` only (never the vision tower or the projector)."""
    names = "|".join(target_modules)
    return LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
        target_modules=rf".*model\.language_model\..*\.({names})",
    )


def apply_tuning(model: TCLlava, llm: str = "lora", lora: dict[str, Any] | None = None,
                 train_projector: bool = True) -> PeftModel | None:
    """Set ``requires_grad`` per part; returns the peft handle when the LLM is tuned by LoRA."""
    if llm not in LLM_MODES:
        raise ValueError(f"tuning.llm must be one of {LLM_MODES}, got {llm!r}")
    handle = None
    if llm == "lora":
        handle = get_peft_model(model.hf, lora_config(**(lora or {})))
    for name, param in model.hf.named_parameters():
        if ".vision_tower." in f".{name}":
            param.requires_grad_(False)
        elif "multi_modal_projector" in name or "image_newline" in name:
            param.requires_grad_(train_projector)
        elif llm == "lora":
            param.requires_grad_("lora_" in name)
        else:
            param.requires_grad_(llm == "full")
    return handle


def trainable_summary(model: TCLlava) -> dict[str, int]:
    """Parameter counts, for the run log."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
