"""Questions/s of batched evaluation generation vs a batch-size-1 generate loop (GPU).

Same random 7B-shaped TC-LLaVA (CLIP ViT-L/336, 16 frames pooled to 16x12x12 = 2,304
visual tokens), same prompts, greedy, a fixed number of new tokens (EOS disabled, so both
sides do the same work). Checks that the batched tokens equal the batch-1 tokens. Each
``--attn`` (default: ``sdpa`` with HF's dense mask, and ``auto``, the default backend) runs
the same questions in one process. Prints and writes JSON to
scripts/bench/results/eval_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from shapes import random_tc_llava, video_prompts

from tc_llava.model.attention import resolve_attention


def timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    tic = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - tic, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--attn", nargs="+", default=["sdpa", "auto"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval_throughput.json"))
    args = parser.parse_args()

    model = random_tc_llava(args.layers, "sdpa").eval()
    ids, mask, pixels = video_prompts(model, args.questions)
    runs = {}
    for attn in args.attn:
        impl = model.language_model.config._attn_implementation = resolve_attention(attn)
        warm_up(model, ids, mask, pixels, args.batch)
        for new_tokens in args.new_tokens:
            runs[f"{impl}/new_tokens_{new_tokens}"] = compare(
                model, ids, mask, pixels, args.questions, args.batch,
                dict(max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0))
            print(impl, new_tokens, json.dumps(runs[f"{impl}/new_tokens_{new_tokens}"]))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "questions": args.questions,
              "prompt_tokens": int(mask.sum(1).float().mean()), "visual_tokens": model.tokens_per_video(16),
              "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "runs": runs}
    print(json.dumps(result, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


def warm_up(model, ids, mask, pixels, batch_sizes: list[int]) -> None:
    """One call of every path timed below, so that no Triton build or flex compilation is timed."""
    gen = dict(max_new_tokens=2, eos_token_id=[], pad_token_id=0)
    model.generate(ids[:1, mask[0].bool()], None, pixels[:1], **gen)
    for size in batch_sizes:
        model.generate(ids[:size], mask[:size], pixels[:size], **gen)


def compare(model, ids, mask, pixels, questions: int, batch_sizes: list[int], gen: dict) -> dict:
    """Batch-1 loop (unpadded prompts) vs batched left-padded generation, same greedy work."""

    def one_by_one():
        outs = []
        for b in range(questions):
            keep = mask[b].bool()
            outs.append(model.generate(ids[b:b + 1, keep], None, pixels[b:b + 1], **gen).sequences[0])
        return torch.stack(outs)

    def batched(size):
        return torch.cat([model.generate(ids[i:i + size], mask[i:i + size], pixels[i:i + size], **gen).sequences
                          for i in range(0, questions, size)])

    t1, ref = timed(one_by_one)
    rows = {"batch_1": {"seconds": t1, "questions_per_s": questions / t1}}
    for size in batch_sizes:
        tb, out = timed(lambda: batched(size))
        rows[f"batch_{size}"] = {"seconds": tb, "questions_per_s": questions / tb, "speedup_vs_1": t1 / tb,
                                 "tokens_equal_batch_1": bool(torch.equal(out, ref)),
                                 "token_agreement": (out == ref).float().mean().item()}
    return rows


if __name__ == "__main__":
    main()
