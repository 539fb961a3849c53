"""GPU check of the patched model: flex vs sdpa on the same inputs in bf16, and flex backward.

A random LLaVA of real shapes (CLIP ViT-L/336, 7B-shaped Llama layers, 16 frames pooled to
16x12x12) runs with the frame-block mask and dual RoPE through sdpa (dense bool mask) and
through compiled flex attention (BlockMask); both are compared with an fp32 sdpa reference.
Prints and writes JSON to scripts/bench/results/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import transformers

from shapes import random_tc_llava, video_prompts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu_check.json"))
    args = parser.parse_args()

    model = random_tc_llava(args.layers, "sdpa").eval()
    ids, mask, pixels = video_prompts(model, args.batch)
    real = mask.bool()
    with torch.no_grad():
        sdpa = model(ids, mask, pixels).logits.float()
        model.language_model.config._attn_implementation = "flex_attention"
        flex = model(ids, mask, pixels).logits.float()
        model.float()
        model.language_model.config._attn_implementation = "sdpa"
        ref = model(ids, mask, pixels.float()).logits
    model.to(torch.bfloat16).train()
    model.language_model.config._attn_implementation = "flex_attention"
    labels = ids.masked_fill(~real, -100).masked_fill(ids == model.image_token_id, -100)
    loss = model(ids, mask, pixels, labels=labels).loss
    loss.backward()
    grads = [p.grad for p in model.language_model.parameters() if p.grad is not None]
    result = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "layers": args.layers, "batch": args.batch,
        "seq_len": ids.shape[1], "visual_tokens": model.tokens_per_video(16),
        "max_abs_diff_flex_vs_sdpa_bf16": (flex - sdpa)[real].abs().max().item(),
        "max_abs_diff_sdpa_bf16_vs_fp32": (sdpa - ref)[real].abs().max().item(),
        "max_abs_diff_flex_bf16_vs_fp32": (flex - ref)[real].abs().max().item(),
        "logit_abs_max_fp32": ref[real].abs().max().item(),
        "flex_backward": {"loss": loss.item(), "params_with_grad": len(grads),
                          "all_finite": all(bool(torch.isfinite(g).all()) for g in grads),
                          "grad_norm": torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item()},
    }
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
