"""Evaluation generation throughput on one GPU: a realistic MVBench-like stream (default), or warmed batches (--warm).

**Realistic** (default): what a benchmark run costs from its first batch on, causal mask against
the frame-block-causal mask, both with the tad rope and ``attn_implementation=auto``
(``block_auto`` on the GPU: a left-padded bf16 prefill under the block mask takes the block
decomposition's variable-length segments, an fp32 one SDPA with the dense block mask; the
causal mask runs SDPA with the padding mask; ``prefill_attention`` in the JSON says which).
A stream of ``--batches`` left-padded batches of ``--batch`` questions, generated through
``TCLlava.generate`` exactly as ``tc_llava.eval.runner`` calls it (frames ``[B, T, C, H, W]``
moved to the GPU per batch, ``num_frames``, greedy, EOS disabled so both masks do the same
work: ``--new-tokens`` each, MVBench's answers being a few tokens after ``Best option:(``).
Each question is one video's visual tokens plus 30-120 text tokens: each batch stands for an
MVBench task, its questions' text lengths drawn around a batch centre (uniform in 30-120, each
question within +-15 of it, seeded), so that batches have distinct padded widths. Nothing is
warmed, not even the first batch: its time (CUDA and cuBLAS start-up, flex compilation) is
reported apart as well as inside the total. Every (shape, mask) runs in its own fresh process
with empty compile caches, so one configuration's compilation never warms another's. Shapes:

- ``27M``: docs/ablation.md's one-GPU recipe model (8-layer 512-wide Llama, 4-layer 256-wide CLIP
  tower at 112 px: 64 tokens per frame, 27.1M parameters), 8 frames, float32 as the ablation job
  evaluates its export (tc_llava/ablation/job.py);
- ``7B``: the Vicuna-7B-shaped LLaVA of shapes.py (CLIP ViT-L/336, 16 frames pooled to 16x12x12,
  2,304 visual tokens), bf16, ``--layers`` LLM layers (32).

Writes scripts/bench/results/eval_prefill.json: per shape and mask the total time, questions/s,
first batch, the rest, per-batch times and widths, peak memory; per shape block/causal ratios.

**Warm** (``--warm``, the earlier benchmark): questions/s of batched generation against a batch-1
loop on the 7B shape, every path warmed first, each ``--attn`` in one process; checks that
batched tokens equal batch-1 tokens. Writes scripts/bench/results/eval_throughput.json.

    python scripts/bench/eval_throughput.py                          # realistic, 27M and 7B (about 3 minutes)
    python scripts/bench/eval_throughput.py --shapes 7B --layers 8   # a shorter look
    python scripts/bench/eval_throughput.py --device cpu --smoke     # a CPU check (toy shapes)
    python scripts/bench/eval_throughput.py --warm
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import LlavaForConditionalGeneration

from shapes import IMAGE_TOKEN_ID, attention_path, left_padded, random_tc_llava, video_prompts
from timing import memory_gb, once_s, run_fresh
from tc_llava.model.attention import resolve_attention
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiny import build_config, build_tokenizer

RESULTS = Path(__file__).parent / "results"
MASKS = {"causal": CausalMask, "frame_block_causal": FrameBlockCausalMask}
RECIPE_27M = dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376,
                  vision_hidden_size=256, vision_layers=4, image_size=112)  # docs/ablation.md, one GPU
SMOKE_27M = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vision_hidden_size=32, vision_layers=2, image_size=56)
FRAMES = {"27M": 8, "7B": 16}
TEXT_RANGE, TEXT_SPREAD = (30, 120), 15


# ----------------------------------------------------------------------------- realistic
def build_model(shape: str, mask: str, args: argparse.Namespace) -> tuple[TCLlava, int, int]:
    """The shape's random model under ``mask`` (tad rope, ``auto`` attention), its placeholder id and vocabulary."""
    attn = resolve_attention("auto") if args.device == "cuda" else "sdpa"
    if shape == "7B":
        dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
        base = random_tc_llava(args.layers, attn, tc=True, dtype=dtype, device=args.device, smoke=args.smoke)
        model = TCLlava(base.hf, TADRoPE(1.0), MASKS[mask](), base.pooling)
        return model, IMAGE_TOKEN_ID, model.config.text_config.vocab_size
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, **(SMOKE_27M if args.smoke else RECIPE_27M))
    config.text_config._attn_implementation = attn
    config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = LlavaForConditionalGeneration(config).to(torch.float32)
    return TCLlava(hf, TADRoPE(1.0), MASKS[mask](), VideoPooling(None)), config.image_token_id, len(tokenizer)


def question_batches(n_batches: int, batch: int, visual: int, placeholder: int, vocab: int,
                     seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Left-padded ``(input_ids, attention_mask)`` per batch: BOS, a third of the text, the video's placeholder
    run, the rest of the text; text lengths around a per-batch centre (the module docstring)."""
    rng = np.random.default_rng(seed)
    low, high = TEXT_RANGE
    out = []
    for _ in range(n_batches):
        centre = rng.integers(low, high + 1)
        lengths = np.clip(centre + rng.integers(-TEXT_SPREAD, TEXT_SPREAD + 1, batch), low, high)
        rows = []
        for n in lengths:
            text = rng.integers(16, min(vocab, 30000), n).tolist()  # ids above the special tokens
            rows.append([1] + text[: n // 3] + [placeholder] * visual + text[n // 3:])
        out.append(left_padded(rows))
    return out


def prefill_attention(model: TCLlava, ids: torch.Tensor, mask: torch.Tensor, frames: int) -> str:
    """What a prefill of this batch attends with: plain causal, the block decomposition, or a mask of which kind."""
    if model.mask.is_causal:
        return f"causal ({model.language_model.config._attn_implementation})"
    return attention_path(model, model.frame_ids(ids, [frames] * ids.shape[0]), mask)


@torch.no_grad()
def measure_stream(shape: str, mask: str, args: argparse.Namespace) -> dict:
    """One (shape, mask) in this process: the whole stream timed from its first batch, nothing warmed."""
    model, placeholder, vocab = build_model(shape, mask, args)
    model.eval()
    frames, batch, device, dtype = FRAMES[shape], args.batch[0], args.device, model.hf.dtype
    batches = question_batches(args.batches, batch, model.tokens_per_video(frames), placeholder, vocab, args.seed)
    size = model.config.vision_config.image_size
    pixels = torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(args.seed))
    num_frames = torch.full((batch,), frames)
    gen = dict(max_new_tokens=args.new_tokens[0], eos_token_id=[], pad_token_id=0, num_frames=num_frames)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for ids, attention_mask in batches:  # what the runner does per batch: to the device, generate
        seconds, _ = once_s(lambda: model.generate(ids.to(device), attention_mask.to(device),
                                                   pixels.to(device, dtype), **gen), device)
        times.append(seconds)
        print(f"{shape} {mask}: width {ids.shape[1]}, {seconds:.3f} s", flush=True)
    total, questions = sum(times), batch * len(times)
    rest = times[1:]
    ids, attention_mask = batches[0]
    return {"shape": shape, "mask": mask, "rope": "tad", "attn_implementation":
            model.language_model.config._attn_implementation, "dtype": str(dtype).removeprefix("torch."),
            "llm_parameters": sum(p.numel() for p in model.hf.model.language_model.parameters()),
            "parameters": sum(p.numel() for p in model.hf.parameters()), "frames": frames,
            "visual_tokens": model.tokens_per_video(frames), "questions": questions, "batch": batch,
            "new_tokens": args.new_tokens[0], "total_s": total, "questions_per_s": questions / total,
            "first_batch_s": times[0], "rest_s": sum(rest),
            "rest_questions_per_s": batch * len(rest) / sum(rest) if rest else None,
            "rest_median_batch_s": statistics.median(rest) if rest else None,
            "batch_s": times, "widths": [ids.shape[1] for ids, _ in batches],
            "distinct_widths": len({ids.shape[1] for ids, _ in batches}),
            "prefill_attention": prefill_attention(model, ids.to(device), attention_mask.to(device), frames),
            **memory_gb(device)}


def realistic(args: argparse.Namespace) -> None:
    runs: dict[str, dict[str, dict]] = {}
    for shape in args.shapes:
        rows = runs.setdefault(shape, {})
        for mask in args.masks:
            flags = ["--one", f"{shape}:{mask}", "--layers", str(args.layers), "--batches", str(args.batches),
                     "--batch", str(args.batch[0]), "--new-tokens", str(args.new_tokens[0]),
                     "--seed", str(args.seed), "--device", args.device] + (["--smoke"] if args.smoke else [])
            rows[mask] = run_fresh(__file__, flags)
            print(shape, mask, json.dumps({k: v for k, v in rows[mask].items() if k not in ("batch_s", "widths")}),
                  flush=True)
        causal, block = rows.get("causal", {}), rows.get("frame_block_causal", {})
        if "total_s" in causal and "total_s" in block:
            rows["block_over_causal"] = {
                "total": block["total_s"] / causal["total_s"],
                "first_batch": block["first_batch_s"] / causal["first_batch_s"],
                "rest": block["rest_s"] / causal["rest_s"] if causal["rest_s"] else None}
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__, "smoke": args.smoke,
              "protocol": {"batches": args.batches, "batch": args.batch[0], "new_tokens": args.new_tokens[0],
                           "text_tokens": f"{TEXT_RANGE[0]}-{TEXT_RANGE[1]}, per batch a centre uniform in the "
                                          f"range and each question within +-{TEXT_SPREAD} of it", "seed": args.seed,
                           "warm_up": "none: the first batch's cost (start-up, compilation) is in the total",
                           "isolation": "one fresh process per (shape, mask), empty TorchInductor/Triton caches"},
              "runs": runs}
    out = Path(args.out or RESULTS / "eval_prefill.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


# ----------------------------------------------------------------------------- warm (the earlier benchmark)
def warm(args: argparse.Namespace) -> None:
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = random_tc_llava(args.layers, "sdpa", dtype=dtype, device=args.device, smoke=args.smoke).eval()
    ids, mask, pixels = video_prompts(model, args.questions)
    runs = {}
    for attn in args.attn:
        impl = model.language_model.config._attn_implementation = resolve_attention(attn)
        warm_up(model, ids, mask, pixels, args.batch)
        for new_tokens in args.new_tokens:
            runs[f"{impl}/new_tokens_{new_tokens}"] = compare(
                model, ids, mask, pixels, args.questions, args.batch,
                dict(max_new_tokens=new_tokens, eos_token_id=[], pad_token_id=0), args.device)
            print(impl, new_tokens, json.dumps(runs[f"{impl}/new_tokens_{new_tokens}"]))
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "questions": args.questions,
              "prompt_tokens": int(mask.sum(1).float().mean()), "visual_tokens": model.tokens_per_video(16),
              **memory_gb(args.device), "runs": runs}
    print(json.dumps(result, indent=1))
    out = Path(args.out or RESULTS / "eval_throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def warm_up(model, ids, mask, pixels, batch_sizes: list[int]) -> None:
    """One call of every path timed below, so that no Triton build or flex compilation is timed."""
    gen = dict(max_new_tokens=2, eos_token_id=[], pad_token_id=0)
    model.generate(ids[:1, mask[0].bool()], None, pixels[:1], **gen)
    for size in batch_sizes:
        model.generate(ids[:size], mask[:size], pixels[:size], **gen)


def compare(model, ids, mask, pixels, questions: int, batch_sizes: list[int], gen: dict, device: str) -> dict:
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

    t1, ref = once_s(one_by_one, device)
    rows = {"batch_1": {"seconds": t1, "questions_per_s": questions / t1}}
    for size in batch_sizes:
        tb, out = once_s(lambda: batched(size), device)
        rows[f"batch_{size}"] = {"seconds": tb, "questions_per_s": questions / tb, "speedup_vs_1": t1 / tb,
                                 "tokens_equal_batch_1": bool(torch.equal(out, ref)),
                                 "token_agreement": (out == ref).float().mean().item()}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warm", action="store_true", help="the warmed batch-1 vs batched comparison")
    parser.add_argument("--layers", type=int, default=32, help="LLM layers of the 7B shape")
    parser.add_argument("--batch", type=int, nargs="+", help="realistic: questions per batch (16); warm: sizes (8 16)")
    parser.add_argument("--new-tokens", type=int, nargs="+", help="realistic: 8; warm: 8 32")
    parser.add_argument("--shapes", nargs="+", choices=list(FRAMES), default=list(FRAMES))
    parser.add_argument("--masks", nargs="+", choices=list(MASKS), default=list(MASKS))
    parser.add_argument("--batches", type=int, default=5, help="realistic: batches in the stream")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", type=int, default=32, help="warm: questions")
    parser.add_argument("--attn", nargs="+", default=["sdpa", "auto"], help="warm: attention backends")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="toy models of the same structure (CPU check)")
    parser.add_argument("--out")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: measure SHAPE:MASK, write JSON to --out
    args = parser.parse_args()
    args.batch = args.batch or ([8, 16] if args.warm else [16])
    args.new_tokens = args.new_tokens or ([8, 32] if args.warm else [8])
    if args.one:
        shape, mask = args.one.split(":")
        Path(args.out).write_text(json.dumps(measure_stream(shape, mask, args)))
    elif args.warm:
        warm(args)
    else:
        realistic(args)


if __name__ == "__main__":
    main()
