"""One training step of a LLaVA-OneVision-7B-shaped model on one GPU: HF's own model vs TC-LLaVA (bf16, batch 1).

Random weights of the real shape (nothing is downloaded; scripts/bench/shapes.py): SigLIP-so400m/384
frozen, the projector and a Qwen2-7B-shaped LLM trained fully (gradients on every weight; the
optimizer step is left out, as in train_step.py, whose MFU accounting this uses). A video of 32
frames is 32 x 196 + 1 = 6,273 visual tokens, with 100 text tokens 6,373; 64 frames make 12,645.
Variants, each timed in a fresh process so that its peak memory is its own:

- ``hf``: ``LlavaOnevisionForConditionalGeneration`` itself (SDPA causal, its loss from ``labels=``),
  the reference: 0.677 s at 6,373 tokens (50.0% MFU, 80 GB) and 1.443 s at 12,645 (49.9%, 130 GB);
- ``tc_vanilla``: the same weights in TC-LLaVA, vanilla RoPE and the causal mask (``block_auto``);
- ``tc``: TC-LLaVA's rules, dual RoPE and the frame-block-causal mask, ``attn_implementation=auto``
  (``block_auto``: the exact decomposition, no mask built);
- ``tc_checkpointing``: ``tc`` with activation checkpointing, what fits when ``tc`` does not.

    python scripts/bench/onevision_step.py                 # 32 and 64 frames, all variants (about 6 minutes)
    python scripts/bench/onevision_step.py --frames 32 --variants hf tc --layers 4      # a quick look

Writes scripts/bench/results/onevision_step.json: per frame count and variant the median step time,
tokens/s, MFU, peak memory (allocated and reserved), and step time and memory relative to ``hf``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from shapes import ONEVISION_VIDEO_TOKEN_ID, attention_path, random_onevision
from timing import cuda_times_ms
from train_step import PEAK, flops
from tc_llava.model.attention import BLOCK_AUTO
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE, VanillaRoPE
from tc_llava.model.tc_llava import TCLlava

VARIANTS = ("hf", "tc_vanilla", "tc", "tc_checkpointing")
TEXT_BEFORE, TEXT_AFTER = 60, 40  # 100 text tokens around the video
REFERENCE = {"32": {"tokens": 6373, "step_s": 0.677, "mfu": 0.500, "peak_mem_gb": 80},
             "64": {"tokens": 12645, "step_s": 1.443, "mfu": 0.499, "peak_mem_gb": 130}}


def prompt(frames: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input ids around one video placeholder run (OneVision: 196 tokens per frame and a newline), labels on
    the text, and random frames."""
    g = torch.Generator().manual_seed(seed)
    before = torch.randint(100, 150000, (TEXT_BEFORE,), generator=g).tolist()
    after = torch.randint(100, 150000, (TEXT_AFTER,), generator=g).tolist()
    ids = torch.tensor([before + [ONEVISION_VIDEO_TOKEN_ID] * (frames * 196 + 1) + after]).cuda()
    labels = ids.masked_fill(ids == ONEVISION_VIDEO_TOKEN_ID, -100)
    pixels = torch.randn(1, frames, 3, 384, 384, generator=g).cuda().to(torch.bfloat16)
    return ids, labels, pixels


def step_attention(model: TCLlava, ids: torch.Tensor, frames: int) -> str:
    """What the LLM attends with in this step: the block decomposition, plain causal, or a mask of which kind."""
    if model.mask.is_causal:
        return "causal"
    return attention_path(model, model.frame_ids(ids, frames), torch.ones_like(ids))


def measure(variant: str, frames: int, layers: int, reps: int) -> dict:
    """One variant at one frame count, in this process: median step time, MFU and peak memory."""
    attn = "sdpa" if variant == "hf" else BLOCK_AUTO
    hf = random_onevision(layers, attn).train()
    hf.model.vision_tower.requires_grad_(False)
    ids, labels, pixels = prompt(frames)
    if variant == "hf":
        def step():
            hf(input_ids=ids, pixel_values_videos=pixels, labels=labels).loss.backward()
            hf.zero_grad(set_to_none=True)
        path = "sdpa causal"
    else:
        rope, mask = (VanillaRoPE(), CausalMask()) if variant == "tc_vanilla" else (TADRoPE(1.0), FrameBlockCausalMask())
        model = TCLlava(hf, rope, mask)
        if variant == "tc_checkpointing":
            enable_activation_checkpointing(hf)

        def step():
            model(ids, None, pixels, labels=labels).loss.backward()
            model.zero_grad(set_to_none=True)
        path = step_attention(model, ids, frames)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        step_s = statistics.median(cuda_times_ms(step, reps, warmup=2)) / 1e3
    except torch.cuda.OutOfMemoryError:
        return {"oom": True, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30}
    tokens = ids.shape[1]
    return {"tokens": tokens, "step_s": step_s, "tokens_per_s": tokens / step_s,
            "mfu": flops(hf, tokens, frames) / step_s / PEAK, "attention": path,
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--layers", type=int, default=28, help="LLM layers (28: Qwen2-7B)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "onevision_step.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure VARIANT:FRAMES, print JSON
    args = parser.parse_args()
    if args.one:
        variant, frames = args.one.split(":")
        print(json.dumps(measure(variant, int(frames), args.layers, args.reps)))
        return
    runs: dict[str, dict[str, dict]] = {}
    for frames in args.frames:
        rows = runs.setdefault(str(frames), {})
        for variant in args.variants:
            child = subprocess.run([sys.executable, __file__, "--one", f"{variant}:{frames}", "--layers",
                                    str(args.layers), "--reps", str(args.reps)], capture_output=True, text=True)
            if child.returncode != 0:
                rows[variant] = {"error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "failed"}
            else:
                rows[variant] = json.loads(child.stdout.strip().splitlines()[-1])
            print(frames, variant, json.dumps(rows[variant]), flush=True)
        base = rows.get("hf", {})
        for row in rows.values():
            if "step_s" in row and "step_s" in base:
                row["step_ratio_to_hf"] = row["step_s"] / base["step_s"]
                row["memory_ratio_to_hf"] = row["peak_mem_gb"] / base["peak_mem_gb"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "statistic": "median",
              "reps": args.reps, "reference_hf_h200": REFERENCE, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
