"""One training step of a Qwen2.5-VL-7B- or Qwen3-VL-8B-shaped model on one GPU: HF's own model vs TC rules (bf16).

Random weights of the real shape (nothing is downloaded): the vision tower frozen, the LLM trained fully
(gradients on every LLM weight; the optimizer step left out, as in train_step.py). One video of N frames at
448x448: Qwen2.5-VL's 14-pixel patches give 32x32 patches, merged 2x2 to 256 tokens per temporal patch of two
frames (64 frames: 8,192 visual tokens); Qwen3-VL's 16-pixel patches 196 tokens per temporal patch, each after
its timestamp's text. Variants, each timed in a fresh process so that its peak memory is its own:

- ``hf``: ``Qwen2_5_VLForConditionalGeneration``/``Qwen3VLForConditionalGeneration`` itself: its M-RoPE, causal
  SDPA, its loss from ``labels=``;
- ``tc``: TC-LLaVA's rules on the same model, ``rope=tad`` on the family's own positions and the
  frame-block-causal mask (temporal patches as blocks), ``attn_implementation=auto`` (``block_auto``: the exact
  decomposition);
- ``hf_ckpt``, ``tc_ckpt``: the same with activation checkpointing of the LLM's layers, what fits when the
  others do not.

    python scripts/bench/qwen_step.py                                   # Qwen2.5-VL-7B, 64 and 128 frames
    python scripts/bench/qwen_step.py --family qwen3_vl --out scripts/bench/results/qwen3_vl_step.json
    python scripts/bench/qwen_step.py --device cpu --smoke --frames 4 --reps 1 --out /tmp/q.json   # a CPU check

Writes scripts/bench/results/qwen2_5_vl_step.json (by default): per frame count and variant the median step
time, tokens/s, peak memory (allocated and reserved), and both relative to ``hf`` (``tc``) or ``hf_ckpt``
(``tc_ckpt``).
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
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from shapes import attention_path
from timing import cap_memory, memory_gb, times_ms
from tc_llava.model.attention import BLOCK_AUTO
from tc_llava.model.families.qwen_vl import QwenVisual
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava

VARIANTS = ("hf", "tc", "hf_ckpt", "tc_ckpt")
TEXT_BEFORE, TEXT_AFTER = 60, 40  # 100 text tokens around the video
SIZE = 448
VISION_START, VISION_END, VIDEO_PAD = 151652, 151653, 151656


def config(family: str, layers: int | None, smoke: bool = False) -> Qwen2_5_VLConfig | Qwen3VLConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct's and Qwen/Qwen3-VL-8B-Instruct's shapes (their config.json); ``smoke``: the
    same structure at toy widths, for a CPU check of this script."""
    if smoke:
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers or 2, num_attention_heads=4,
                    num_key_value_heads=2)
        if family == "qwen2_5_vl":
            cfg = config(family, layers)
            cfg.vision_config.update({**vision, "fullatt_block_indexes": [0]})
            cfg.text_config.update(text)
            cfg.text_config.rope_parameters["mrope_section"] = [2, 3, 3]
            return cfg
        cfg = config(family, layers)
        cfg.vision_config.update({**vision, "deepstack_visual_indexes": [0]})
        cfg.text_config.update({**text, "head_dim": 16})
        cfg.text_config.rope_parameters["mrope_section"] = [4, 2, 2]
        return cfg
    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                               fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
            text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                             num_hidden_layers=layers or 28, num_attention_heads=28, num_key_value_heads=4,
                             max_position_embeddings=128000,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
            tie_word_embeddings=False)
    return Qwen3VLConfig(
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=4096,
                           num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
        text_config=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=layers or 36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        tie_word_embeddings=False)


def inputs(family: str, cfg, frames: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Text around one video as the family's processor lays it out, labels on the text, random patches."""
    g = torch.Generator().manual_seed(seed)
    vision = cfg.vision_config
    side = SIZE // vision.patch_size
    t = frames // vision.temporal_patch_size
    per_patch = side * side // vision.spatial_merge_size ** 2
    text = lambda n: torch.randint(100, 150000, (n,), generator=g).tolist()  # noqa: E731
    if family == "qwen2_5_vl":
        video = [VISION_START] + [VIDEO_PAD] * (t * per_patch) + [VISION_END]
    else:  # "<12.5 seconds>" is about six tokens of text before each temporal patch
        video = sum((text(6) + [VISION_START] + [VIDEO_PAD] * per_patch + [VISION_END] for _ in range(t)), [])
    ids = torch.tensor([text(TEXT_BEFORE) + video + text(TEXT_AFTER)])
    patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    visual = {"pixel_values_videos": torch.randn(t * side * side, patch, generator=g).to(torch.bfloat16),
              "video_grid_thw": torch.tensor([[t, side, side]])}
    if family == "qwen2_5_vl":
        visual["second_per_grid_ts"] = torch.tensor([1.0])  # 2 fps sampling
    labels = ids.masked_fill((ids == VIDEO_PAD) | (ids == VISION_START) | (ids == VISION_END), -100)
    return {k: v.to(device) for k, v in {"input_ids": ids, "labels": labels, **visual}.items()}


def measure(family: str, variant: str, frames: int, layers: int | None, reps: int, device: str = "cuda",
            smoke: bool = False, memory_cap_gb: float | None = None) -> dict:
    """One variant at one frame count, in this process: median step time and peak memory."""
    cap_memory(memory_cap_gb)
    cfg = config(family, layers, smoke)
    cfg.text_config._attn_implementation = "sdpa" if variant.startswith("hf") else BLOCK_AUTO
    cfg.vision_config._attn_implementation = "sdpa"
    cls = Qwen2_5_VLForConditionalGeneration if family == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    with torch.device(device):
        hf = cls._from_config(cfg, dtype=torch.bfloat16).train()
    hf.model.visual.requires_grad_(False)
    if variant.endswith("ckpt"):
        enable_activation_checkpointing(hf)
    batch = inputs(family, cfg, frames, device)
    ids, labels = batch.pop("input_ids"), batch.pop("labels")
    if variant.startswith("hf"):
        types = (ids == VIDEO_PAD).int() * 2

        def step():
            hf(input_ids=ids, labels=labels, mm_token_type_ids=types, **batch).loss.backward()
            hf.zero_grad(set_to_none=True)
        path = "sdpa causal"
    else:
        model = TCLlava(hf, TADRoPE(1.0), FrameBlockCausalMask())
        frame_ids = model.family.frame_ids(cfg, ids, QwenVisual.of(**batch))
        path = attention_path(model, frame_ids, torch.ones_like(ids))

        def step():
            model(ids, None, labels=labels, **batch).loss.backward()
            model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        step_s = statistics.median(times_ms(step, reps, warmup=2, device=device)) / 1e3
    except torch.cuda.OutOfMemoryError:
        return {"oom": True, "tokens": ids.shape[1], **memory_gb(device)}
    tokens = ids.shape[1]
    return {"tokens": tokens, "visual_tokens": int((ids == VIDEO_PAD).sum()), "attention": path, "step_s": step_s,
            "tokens_per_s": tokens / step_s, **memory_gb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("qwen2_5_vl", "qwen3_vl"), default="qwen2_5_vl")
    parser.add_argument("--frames", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--layers", type=int, help="LLM layers (default: the real model's)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy widths of the same structure (CPU check)")
    parser.add_argument("--memory-cap-gb", type=float, help="allow each run at most this much GPU memory (GiB)")
    parser.add_argument("--out", help="default: scripts/bench/results/<family>_step.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: measure VARIANT:FRAMES, print JSON
    args = parser.parse_args()
    if args.one:
        variant, frames = args.one.split(":")
        print(json.dumps(measure(args.family, variant, int(frames), args.layers, args.reps, args.device, args.smoke,
                                 args.memory_cap_gb)))
        return
    runs: dict[str, dict[str, dict]] = {}
    for frames in args.frames:
        rows = runs.setdefault(str(frames), {})
        for variant in args.variants:
            command = [sys.executable, __file__, "--family", args.family, "--one", f"{variant}:{frames}",
                       "--reps", str(args.reps), "--device", args.device] + (["--smoke"] if args.smoke else []) \
                + (["--layers", str(args.layers)] if args.layers else []) \
                + (["--memory-cap-gb", str(args.memory_cap_gb)] if args.memory_cap_gb else [])
            child = subprocess.run(command, capture_output=True, text=True)
            if child.returncode != 0:
                rows[variant] = {"error": child.stderr.strip().splitlines()[-1] if child.stderr.strip() else "failed"}
            else:
                rows[variant] = json.loads(child.stdout.strip().splitlines()[-1])
            print(args.family, frames, variant, json.dumps(rows[variant]), flush=True)
        for variant, base in (("tc", "hf"), ("tc_ckpt", "hf_ckpt")):
            row, ref = rows.get(variant, {}), rows.get(base, {})
            if "step_s" in row and "step_s" in ref:
                row["step_ratio_to_hf"] = row["step_s"] / ref["step_s"]
                if row["peak_mem_gb"] is not None:
                    row["memory_ratio_to_hf"] = row["peak_mem_gb"] / ref["peak_mem_gb"]
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"family": args.family, "device": name, "smoke": args.smoke, "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers or "real", "statistic": "median",
              "reps": args.reps, "frame_size": SIZE, "memory_cap_gb": args.memory_cap_gb, "runs": runs}
    out = Path(args.out or Path(__file__).parent / "results" / f"{args.family}_step.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
