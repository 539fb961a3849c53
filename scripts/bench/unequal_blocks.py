"""block_merge on blocks of different sizes next to blocks of one size (GPU, bf16, fwd+bwd).

One attention call of a 7B layer (32 heads of 128) at each length, batch 1, four layouts of
the same token count: 144-token frames (the equal-block path); an image of 1,196 tokens
then 144-token frames; samples of two resolutions (256- and 100-token frames) packed in the
row; and an image of 4,096 tokens then 64-token frames (the widest spread of block sizes,
which the variable-length schedule exists for). Times, side by side:
- causal SDPA (vanilla's attention), SDPA with the dense block mask (what these layouts got
  before ``block_merge`` took unequal blocks) and ``block_merge``, fwd+bwd with CUDA events;
- the in-block kernels alone, forward and backward, as GPU time (replayed CUDA graphs); for the
  equal layout also on the variable-length schedule (every size given), the cost of the schedule.
Writes scripts/bench/results/unequal_blocks.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import transformers
from torch.nn.functional import scaled_dot_product_attention as sdpa

from timing import cuda_graph_ms, cuda_times_ms

from tc_llava.model import block_triton
from tc_llava.model.block_attention import block_merge_attention, block_spans
from tc_llava.model.masks import block_causal_mask, sample_block_ids

# Each layout: (text, [frame sizes]) per sample, laid end to end; the row's tail is text.
LAYOUTS = {
    "equal_144": lambda free: [(128, [144] * (free // 144))],
    "image_1196_then_144": lambda free: [(128, [1196] + [144] * ((free - 1196) // 144))],
    "two_resolutions_packed": lambda free: [(64, [256] * (free // 2 // 256)), (64, [100] * (free // 2 // 100))],
    "image_4096_then_64": lambda free: [(128, [4096] + [64] * ((free - 4096) // 64))],
}


def layout(name: str, length: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block ids ``[1, L]`` of a layout (unique along the row) and its sample ids (None for one sample)."""
    samples = LAYOUTS[name](length - 256)
    block_ids, sample_ids, at, first = [-1] * length, [-1] * length, 0, 0
    for k, (text, sizes) in enumerate(samples):
        end = at + text + sum(sizes) + 32 if k < len(samples) - 1 else length
        sample_ids[at:end] = [k] * (end - at)
        at += text
        for n in sizes:
            block_ids[at:at + n] = [first] * n
            at, first = at + n, first + 1
        at = end
    blocks = torch.tensor([block_ids], device="cuda")
    return blocks, torch.tensor([sample_ids], device="cuda") if len(samples) > 1 else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[4864, 9472])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "unequal_blocks.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for length in args.lengths:
        q, k, v = (torch.randn(1, length, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   .requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)

        def fwd_bwd(attend):
            return statistics.median(cuda_times_ms(lambda: torch.autograd.grad(attend(), (q, k, v), grad),
                                                   args.reps, warmup=3))

        causal = fwd_bwd(lambda: sdpa(q, k, v, is_causal=True))
        out, lse = (t.detach() for t in torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False)[:2])
        dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
        for name in LAYOUTS:
            blocks, samples = layout(name, length)
            mask = torch.ones_like(blocks)
            if samples is not None:
                blocks = sample_block_ids(blocks, samples)
            spans = block_spans(blocks, mask, samples)
            dense = block_causal_mask(blocks, mask, samples)
            row = {"length": length, "layout": name, "blocks": spans.starts.numel(),
                   "block_sizes": sorted(set(spans.sizes.flatten().tolist())) if spans.sizes is not None
                   else [spans.size], "segments": spans.segments is not None, "causal_sdpa_ms": causal,
                   "dense_mask_sdpa_ms": fwd_bwd(lambda: sdpa(q, k, v, attn_mask=dense)),
                   "block_merge_ms": fwd_bwd(lambda: block_merge_attention(q, k, v, spans))}
            schedules = {"": spans.sizes} if spans.segments is None else {}  # the kernels alone, batch layout
            if spans.segments is None and spans.sizes is None:
                schedules["varlen_"] = torch.full_like(spans.starts, spans.size)
            for prefix, sizes in schedules.items():
                shape = (spans.starts, spans.size, 128 ** -0.5, sizes)
                row[f"inblock_{prefix}forward_ms"] = statistics.median(cuda_graph_ms(
                    lambda: block_triton.inblock_forward(q, k, v, out, lse, *shape), args.reps))
                row[f"inblock_{prefix}backward_ms"] = statistics.median(cuda_graph_ms(
                    lambda: block_triton.inblock_backward(grad, q, k, v, out, lse, dq, dk, dv, *shape), args.reps))
            row["block_merge_ratio_to_causal"] = row["block_merge_ms"] / causal
            rows.append(row)
            print(json.dumps(row))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "statistic": "median", "reps": args.reps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
