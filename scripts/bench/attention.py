"""LLM step cost of TC-LLaVA's attention vs vanilla causal SDPA (GPU, bf16, batch 1, fwd+bwd).

A Vicuna-7B-shaped Llama LLM (REFERENCE.md section 7's setting): all 32 layers, or the
first 16 where 32 would not fit (9,472 tokens). For each length the prompt is 256 text
tokens around frames of 144 visual tokens; the same run times:
- ``vanilla_sdpa``: 1D RoPE, plain causal mask (SDPA's is_causal path) -- the floor;
- ``tc_sdpa``: dual RoPE + frame-block mask as a dense bool mask through SDPA;
- ``tc_flex``: dual RoPE + frame-block mask as a BlockMask through compiled flex attention;
- ``tc_merge``: dual RoPE + the ``block_merge`` backend (causal flash attention plus the
  in-frame term, merged by log-sum-exp; what ``attn_implementation=auto`` picks on GPU).
The variants run interleaved, ``--rounds`` times. ``ms_per_layer`` is the whole step
(rotary positions and mask or block layout built inside it, as the model does) over the
layer count. Reports ratios to the floor, MFU, peak memory and the layout's own time;
writes JSON to scripts/bench/results/attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaModel

from timing import cuda_times_ms

from tc_llava.model.attention import BLOCK_MERGE, llm_attention
from tc_llava.model.layout import BatchLayout
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask
from tc_llava.model.rope import RotaryPositions, TADRoPE, VanillaRoPE

PEAK_TFLOPS = 989.5


def layer_flops(length: int, hidden: int = 4096, inter: int = 11008, causal_fraction: float = 0.5) -> float:
    """fwd+bwd FLOPs of one Llama layer (3x forward), attention counted at its causal fraction."""
    dense = 2 * length * (4 * hidden * hidden + 3 * hidden * inter)
    attention = 2 * 2 * length * length * hidden * causal_fraction
    return 3 * (dense + attention)


def frame_layout(length: int, text: int = 256, per_frame: int = 144) -> torch.Tensor:
    frames = (length - text) // per_frame
    ids = [-1] * (text // 2) + [f for f in range(frames) for _ in range(per_frame)]
    ids += [-1] * (length - len(ids))
    return torch.tensor([ids], device="cuda")


def layout_fn(lm: LlamaModel, rule_rope, rule_mask, frame_ids: torch.Tensor, embeds: torch.Tensor):
    """What the step builds once for all layers: the rotary positions and the LLM call's mask arguments."""
    def build() -> tuple[torch.Tensor, dict]:
        attention_mask = torch.ones_like(frame_ids)
        positions = rule_rope.positions(frame_ids, attention_mask)
        layout = BatchLayout.of(rule_mask, frame_ids, attention_mask)
        return positions, llm_attention(lm.config, layout, embeds).kwargs()

    return build


def step_fn(lm: LlamaModel, rule_rope, rule_mask, frame_ids: torch.Tensor, embeds: torch.Tensor):
    """One fwd+bwd of the layers as TCLlava.forward drives them (layout built inside the step)."""
    layout = layout_fn(lm, rule_rope, rule_mask, frame_ids, embeds)

    def run():
        positions, mask_kwargs = layout()
        with lm.rotary_emb.use(positions):
            out = lm(inputs_embeds=embeds, **mask_kwargs).last_hidden_state
        out.float().square().mean().backward()

    return run


def time_ms(fn, reps: int) -> tuple[list[float], float]:
    """``reps`` timings (ms) of ``fn`` and the peak GiB allocated over them."""
    cuda_times_ms(fn, 0, warmup=3)
    torch.cuda.reset_peak_memory_stats()
    return cuda_times_ms(fn, reps), torch.cuda.max_memory_allocated() / 2**30


VARIANTS = {"vanilla_sdpa": ("sdpa", VanillaRoPE(), CausalMask()),
            "tc_sdpa": ("sdpa", TADRoPE(), FrameBlockCausalMask()),
            "tc_flex": ("flex_attention", TADRoPE(), FrameBlockCausalMask()),
            "tc_merge": (BLOCK_MERGE, TADRoPE(), FrameBlockCausalMask())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2560, 4864, 9472])
    parser.add_argument("--layers", type=int, nargs="+", default=[32, 32, 16],
                        help="LLM depth per length (one value: all); 32 is Vicuna-7B, 16 is what fits at 9,472 tokens")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                        help="any subset; ratios are to vanilla_sdpa when it is measured in the same run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "attention.json"))
    args = parser.parse_args()
    depths = args.layers * len(args.lengths) if len(args.layers) == 1 else args.layers
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=max(depths),
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                         max_position_embeddings=32768)
    variants = {name: VARIANTS[name] for name in args.variants}
    with torch.device("cuda"):
        lm = LlamaModel(config).to(torch.bfloat16)
    lm.rotary_emb = RotaryPositions(lm.rotary_emb)
    lm.embed_tokens = None  # inputs_embeds only
    rows = []
    for length, layers in zip(args.lengths, depths):
        lm.config.num_hidden_layers = layers  # the model runs its first ``layers`` layers
        frame_ids = frame_layout(length)
        embeds = torch.randn(1, length, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        row = {"length": length, "frames": int(frame_ids.max()) + 1, "layers": layers}
        times = {name: [] for name in variants}
        for _ in range(args.rounds):  # variants interleaved, so drift of the host or clocks hits all alike
            for name, (impl, rope, mask) in variants.items():
                lm.config._attn_implementation = impl
                step_times, peak = time_ms(step_fn(lm, rope, mask, frame_ids, embeds), args.reps)
                times[name] += step_times
                row[name] = {"peak_mem_gb": peak}
        for name, (impl, rope, mask) in variants.items():
            lm.config._attn_implementation = impl
            per_layer = statistics.median(times[name]) / layers
            row[name].update(
                ms_per_layer=per_layer,
                layout_ms=statistics.median(time_ms(layout_fn(lm, rope, mask, frame_ids, embeds), args.reps)[0]),
                mfu=layer_flops(length) / (per_layer / 1e3) / (PEAK_TFLOPS * 1e12))
        base = row.get("vanilla_sdpa")
        for name in variants:
            if base is not None and name != "vanilla_sdpa":
                row[name]["ratio_to_vanilla"] = row[name]["ms_per_layer"] / base["ms_per_layer"]
                row[name]["mem_ratio_to_vanilla"] = row[name]["peak_mem_gb"] / base["peak_mem_gb"]
        rows.append(row)
        print(json.dumps(row))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "dtype": "bfloat16",
              "batch": 1, "reps": args.reps, "rounds": args.rounds,
              "statistic": "median over rounds x reps", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
