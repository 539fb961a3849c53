"""Full TC-LLaVA training step on one GPU: MFU, tokens/s, samples/s, peak memory (bf16, batch 1).

CLIP ViT-L/336 (frozen) on 16 frames, PLLaVA pooling to 16x12x12 (2,304 visual tokens),
a 32-layer Vicuna-7B-shaped LLM trained fully (gradients on every LLM weight; the
optimizer step is left out, its cost does not depend on attention). Vanilla LLaVA (1D
RoPE, causal SDPA) is the floor, then TC-LLaVA through each attention backend
(``block_auto`` is what ``attn_implementation=auto`` picks on GPU). MFU counts the LLM's
fwd+bwd FLOPs (6 N per token plus causal attention) and the vision tower's forward (2 N per
patch) against 989.5 TFLOP/s. ``layout_fraction`` is the share of the step spent building
frame ids, rotary positions and the mask (or block layout), timed alone. ``--compile``
compiles each decoder layer (regional compilation, one graph per layer shape);
``first_step_s`` is the first step's wall time (with ``--compile``, mostly compilation).

Each variant runs in its own fresh process (``--fresh``, the default for more than one
variant), with empty compile caches: measured in one process after vanilla, compiled
``block_merge`` peaked at 35.4 GB against vanilla's 26.0 GB, and at 26.0 GB when measured
first, so a variant's peak memory (``max_memory_allocated`` / ``max_memory_reserved``) must be
its own. Ratios are to ``vanilla_sdpa`` when it was measured in the same run, else null.

    python scripts/bench/train_step.py                                   # all variants, eager
    python scripts/bench/train_step.py --compile --variants vanilla_sdpa tc_merge
    python scripts/bench/train_step.py --device cpu --smoke --layers 1 --reps 2    # a CPU check

Writes scripts/bench/results/train_step.json (train_step_compiled.json with ``--compile``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import transformers

from shapes import random_tc_llava, video_prompts
from timing import memory_gb, once_s, run_fresh, times_ms
from tc_llava.model.attention import BLOCK_AUTO, BLOCK_MERGE, llm_attention
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.rope import real_token_index
from tc_llava.train.loop import compile_layers

PEAK = 989.5e12
BASELINE = "vanilla_sdpa"
BACKENDS = {"vanilla_sdpa": ("sdpa", False), "tc_sdpa": ("sdpa", True), "tc_flex": ("flex_attention", True),
            "tc_merge": (BLOCK_MERGE, True), "tc_auto": (BLOCK_AUTO, True)}
RESULTS = Path(__file__).parent / "results"


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

    return statistics.median(times_ms(build, reps, warmup=2, device=ids.device))


def measure(name: str, args: argparse.Namespace) -> dict:
    """One variant in this process: first step, median step, MFU, peak memory."""
    attn, tc = BACKENDS[name]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = random_tc_llava(args.layers, attn, tc=tc, dtype=dtype, device=args.device, smoke=args.smoke)
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

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    first_s, _ = once_s(step, args.device)
    step_s = statistics.median(times_ms(step, args.reps, warmup=1, device=args.device)) / 1e3
    memory = memory_gb(args.device)  # the peak of the whole run so far, the first (compiling) step included
    tokens = ids.shape[1]
    layout = layout_ms(model, ids, mask, 16, args.reps) / 1e3
    row = {"tokens": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s, "samples_per_s": 1 / step_s,
           "mfu": flops(model.hf, tokens, 16) / step_s / PEAK if args.device == "cuda" else None,
           "first_step_s": first_s, "layout_s": layout, "layout_fraction": layout / step_s, **memory}
    if args.compile:
        row["compile_s"] = first_s - step_s  # the first step's excess over a compiled step
    return row


def child_args(name: str, args: argparse.Namespace) -> list[str]:
    flags = ["--variants", name, "--no-fresh", "--layers", str(args.layers), "--reps", str(args.reps),
             "--device", args.device]
    return flags + [f"--{k}" for k in ("checkpointing", "compile", "smoke") if getattr(args, k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--fresh", action=argparse.BooleanOptionalAction, default=None,
                        help="each variant in its own process (default: on for more than one variant)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="a toy model of the same structure (CPU check)")
    parser.add_argument("--out", help="default: results/train_step.json (train_step_compiled.json with --compile)")
    args = parser.parse_args()
    out = Path(args.out or RESULTS / ("train_step_compiled.json" if args.compile else "train_step.json"))
    fresh = len(args.variants) > 1 if args.fresh is None else args.fresh
    rows = {}
    for name in args.variants:
        if fresh:
            child = run_fresh(__file__, child_args(name, args))  # the child prints its row
            rows[name] = child if "error" in child else child["rows"][name]
        else:
            rows[name] = measure(name, args)
            print(name, json.dumps(rows[name]), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    base = rows.get(BASELINE, {})
    for row in rows.values():
        if "step_s" in row:
            row["ratio_to_vanilla"] = row["step_s"] / base["step_s"] if "step_s" in base else None
            row["memory_ratio_to_vanilla"] = (row["peak_mem_gb"] / base["peak_mem_gb"]
                                              if base.get("peak_mem_gb") and row.get("peak_mem_gb") else None)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "smoke": args.smoke,
              "gradient_checkpointing": args.checkpointing, "compile": args.compile,
              "fresh_processes": fresh, "statistic": "median", "reps": args.reps, "rows": rows}
    if "step_s" not in base:
        result["note"] = f"{BASELINE} was not measured in this run: ratios are null"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
