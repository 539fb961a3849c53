"""Cost of block_merge's in-block term next to the causal attention it completes (GPU, bf16, fwd+bwd).

One attention call of a Vicuna-7B layer (32 heads of 128) over 144-token frames, as in
``attention.py``. Times, side by side:
- causal SDPA (vanilla's attention) and ``block_merge`` (causal + in-block term), fwd+bwd
  with CUDA events, launches included;
- the fused in-block kernels alone, forward and backward, at each tile size, warp count
  and pipeline depth, as GPU time (replayed CUDA graphs, launches left out);
  ``tc_llava/model/block_triton.py`` uses the fastest.
Writes scripts/bench/results/inblock.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import torch
import transformers
from torch.nn.functional import scaled_dot_product_attention as sdpa

from timing import cuda_graph_ms, cuda_times_ms

from tc_llava.model import block_triton
from tc_llava.model.block_attention import block_merge_attention, block_spans
from attention import frame_layout


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2560, 4864, 9472])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inblock.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for length in args.lengths:
        frame_ids = frame_layout(length)
        spans = block_spans(frame_ids, torch.ones_like(frame_ids))
        # token-major storage, as the model's projections lay q, k, v out
        q, k, v = (torch.randn(1, length, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   .requires_grad_() for _ in range(3))
        grad = torch.randn_like(q)

        def fwd_bwd(attend):
            return lambda: statistics.median(cuda_times_ms(lambda: torch.autograd.grad(attend(), (q, k, v), grad),
                                                           args.reps, warmup=3))

        row = {"length": length, "frames": int(frame_ids.max()) + 1,
               "causal_sdpa_ms": fwd_bwd(lambda: sdpa(q, k, v, is_causal=True))(),
               "block_merge_ms": fwd_bwd(lambda: block_merge_attention(q, k, v, spans))()}
        out, lse = (t.detach() for t in torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True, False)[:2])
        dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
        scale = 128 ** -0.5
        for tile, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 2, 3)):
            layout = (spans.starts, spans.size, scale, spans.sizes, tile, warps, stages)
            try:
                fwd = cuda_graph_ms(lambda: block_triton.inblock_forward(q, k, v, out, lse, *layout), args.reps)
                bwd = cuda_graph_ms(lambda: block_triton.inblock_backward(grad, q, k, v, out, lse, dq, dk, dv, *layout),
                                    args.reps)
            except Exception as error:  # a tile the GPU cannot hold (shared memory): recorded, not fatal
                row[f"inblock_tile{tile}_warps{warps}_stages{stages}"] = {"error": type(error).__name__}
                continue
            row[f"inblock_tile{tile}_warps{warps}_stages{stages}"] = {
                "forward_ms": statistics.median(fwd), "backward_ms": statistics.median(bwd)}
        row["block_merge_ratio_to_causal"] = row["block_merge_ms"] / row["causal_sdpa_ms"]
        rows.append(row)
        print(json.dumps(row))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "default_tile": block_triton.TILE,
              "default_warps": block_triton.WARPS, "default_stages": [block_triton.FORWARD_STAGES,
                                                                      block_triton.BACKWARD_STAGES],
              "statistic": "median", "reps": args.reps, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
