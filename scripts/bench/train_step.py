"""Full TC-LLaVA training step on one GPU: MFU, tokens/s, samples/s (bf16, batch 1).

CLIP ViT-L/336 (frozen) on 16 frames, PLLaVA pooling to 16x12x12 (2,304 visual tokens),
a 32-layer Vicuna-7B-shaped LLM trained fully (gradients on every LLM weight; the
optimizer step is left out, its cost does not depend on attention). Vanilla LLaVA (1D
RoPE, causal SDPA) is timed in the same run as the floor, then TC-LLaVA through each
attention backend (``block_auto`` is what ``attn_implementation=auto`` picks on GPU). MFU
counts the LLM's fwd+bwd FLOPs (6 N per token plus causal attention) and the vision tower's
forward (2 N per patch) against 989.5 TFLOP/s. ``layout_fraction`` is the share of the
step spent building frame ids, rotary positions and the mask (or block layout), timed
alone. ``--compile`` compiles each decoder layer (regional compilation, one graph per
layer shape). Writes scripts/bench/results/train_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import transformers

from shapes import random_tc_llava, video_prompts
from timing import cuda_times_ms
from tc_llava.model.attention import BLOCK_AUTO, BLOCK_MERGE, llm_attention
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.rope import real_token_index
from tc_llava.train.loop import compile_layers

PEAK = 989.5e12


def flops(hf_model, tokens: int, frames: int) -> float:
    """Training FLOPs of one step of an HF LLaVA-family model: the LLM's fwd+bwd (6 N per token plus causal
    attention) and the vision tower's forward (2 N per patch)."""
    lm = sum(p.numel() for p in hf_model.model.language_model.parameters()) + hf_model.lm_head.weight.numel()
    vision = sum(p.numel() for p in hf_model.model.vision_tower.parameters())
    cfg = hf_model.config.text_config
    attention = 3 * 2 * 2 * tokens * tokens * cfg.hidden_size * cfg.num_hidden_layers * 0.5
    patches = frames * (hf_model.config.vision_config.image_size // hf_model.config.vision_config.patch_size) ** 2
    return 6 * lm * tokens + attention + 2 * vision * patches


def layout_ms(model, ids: torch.Tensor, mask: torch.Tensor, frames: int, reps: int) -> float:
    """What TCLlava.forward builds before the LLM runs: frame ids, rotary positions, the mask or layout."""
    embeds = torch.empty(*ids.shape, model.config.text_config.hidden_size, device=ids.device, dtype=model.hf.dtype)

    def build():
        frame_ids = model.frame_ids(ids, frames)
        model.rope.positions(frame_ids, mask, model.token_grid(frames))
        llm_attention(model.language_model.config, model.mask, frame_ids, mask, real_token_index(frame_ids, mask),
                      embeds)

    return statistics.median(cuda_times_ms(build, reps, warmup=2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--variants", nargs="+", default=["vanilla_sdpa", "tc_sdpa", "tc_flex", "tc_merge", "tc_auto"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()
    rows = {}
    backends = {"vanilla_sdpa": ("sdpa", False), "tc_sdpa": ("sdpa", True),
                "tc_flex": ("flex_attention", True), "tc_merge": (BLOCK_MERGE, True), "tc_auto": (BLOCK_AUTO, True)}
    for name in args.variants:
        attn, tc = backends[name]
        model = random_tc_llava(args.layers, attn, tc=tc)
        model.hf.model.vision_tower.requires_grad_(False)
        if args.checkpointing:
            enable_activation_checkpointing(model.hf)
        if args.compile:
            compile_layers(model)
        ids, mask, pixels = video_prompts(model, batch=1)
        labels = ids.masked_fill(ids == model.image_token_id, -100)

        def step():
            model(ids, mask, pixels, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        step_s = statistics.median(cuda_times_ms(step, args.reps, warmup=2)) / 1e3
        tokens = ids.shape[1]
        layout = layout_ms(model, ids, mask, 16, args.reps) / 1e3
        rows[name] = {"step_s": step_s, "tokens_per_s": tokens / step_s, "samples_per_s": 1 / step_s,
                      "mfu": flops(model.hf, tokens, 16) / step_s / PEAK, "layout_s": layout,
                      "layout_fraction": layout / step_s,
                      "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
        print(name, json.dumps(rows[name]))
        del model
        torch.cuda.empty_cache()
    for name in rows:
        rows[name]["ratio_to_vanilla"] = rows[name]["step_s"] / rows["vanilla_sdpa"]["step_s"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "tokens": tokens,
              "gradient_checkpointing": args.checkpointing, "compile": args.compile,
              "statistic": "median", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
