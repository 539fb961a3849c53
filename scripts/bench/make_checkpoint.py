"""Write a random-weight llava-hf checkpoint of real shapes, with the tiny tokenizer and a
CLIP image processor at the tower's resolution, for multi-GPU runs without downloads.

Presets: ``1b`` (CLIP ViT-L/336 + a 2048-wide 16-layer Llama, ~1.1B LLM parameters) and
``7b`` (CLIP ViT-L/336 + a Vicuna-7B-shaped Llama). The LLM vocabulary is the tiny
tokenizer's (712 tokens), so the LM head is small.
"""

from __future__ import annotations

import argparse

from tc_llava.model.tiny import build_tiny_checkpoint

CLIP_L_336 = dict(vision_hidden_size=1024, vision_layers=23, vision_heads=16, vision_intermediate_size=4096, image_size=336, patch_size=14)
PRESETS = {
    "1b": dict(hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=16, intermediate_size=5632),
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008),
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1b")
    args = parser.parse_args()
    print(build_tiny_checkpoint(args.out, **PRESETS[args.preset], **CLIP_L_336))
