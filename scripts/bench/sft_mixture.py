"""SFT throughput on a realistic image/video mixture, padded against packed batches (one GPU, bf16).

Padding a batch of a one-frame image (144 visual tokens) beside a 16-frame video (2,304) to the
video's length wastes most of the image's row; packing concatenates the samples into rows
(``tc_llava.data.collate.PackingCollator``, ``sample_ids`` keeping them apart). This measures what
that buys on a mixture shaped like the corpus the project trains on.

**Corpus: VideoChat2-IT** (Li et al., MVBench / VideoChat2, arXiv 2311.17005; PLLaVA's training
data, tc_llava/configs/data/videochat2_it.yaml). Published sizes, per category:

- images (M3IT-derived): caption 706k, classification 59.9k, conversation 56.7k, reasoning 122k,
  VQA 192k (1,136.6k, 56.4% of samples);
- videos: caption 455k, classification 80k, conversation 27.2k, reasoning 117k, VQA 200k (879.2k).

Source: the dataset viewer of HawkEye-IT (https://huggingface.co/datasets/wangyueqian/HawkEye-IT,
VideoChat2-IT's image/ and video/ annotation files re-hosted beside HawkEye's own "temporal"
subset, which is left out here); together 2.02M, the "2M" of VideoChat2's data page
(https://github.com/OpenGVLab/Ask-Anything/blob/main/video_chat2/DATA.md). Samples are drawn from
the categories in proportion to these counts. **Text lengths are assumptions**: no published
per-category length statistics were found, so each category's prompt (system, instruction,
question, options) and answer lengths in tokens are drawn lognormal (sigma 0.5) around the means
in ``CATEGORIES`` (short COCO/WebVid captions and one-letter answers, long LLaVA /
VideoChatGPT conversations); they are recorded in the JSON as assumed.

Model: the 7B shape of shapes.py (CLIP ViT-L/336 frozen, PLLaVA pooling to 12x12 = 144 tokens per
frame: an image is 1 frame, a video 16; a Vicuna-7B-shaped LLM trained fully), ``attn auto``
(``block_auto``), gradient checkpointing (``--no-checkpointing`` to drop it). Each step takes
``--batch`` fresh samples; the padded side runs them as one right-padded batch (``SFTCollator``),
the packed side as ``PackingCollator(pad, max_tokens=--max-tokens)`` rows, each one fwd+bwd
without the optimizer step (as train_step.py). Reported side by side: useful (non-pad) tokens/s,
samples/s, the pad fraction, per-step times (the first steps include any compilation), peak
memory, and the summed loss and label-token count of both (they must agree to bf16 noise: the
same samples, the same targets). ``--warmup`` steps are run and left out of the throughput. Both
sides attend through the block decomposition (``attention`` in the JSON): the padded batch's rows
hold different frame counts and the packed rows several samples, so both take its variable-length
segments.

    python scripts/bench/sft_mixture.py                                          # 1 + 3 steps, about 1.5 minutes
    python scripts/bench/sft_mixture.py --device cpu --smoke --layers 1 --steps 1 --warmup 0   # CPU check

Writes scripts/bench/results/sft_mixture.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers

from shapes import IMAGE_TOKEN_ID, attention_path, random_tc_llava
from timing import memory_gb, once_s
from tc_llava.data.collate import PackingCollator, SFTCollator
from tc_llava.data.templates import IGNORE_INDEX
from tc_llava.model.attention import resolve_attention
from tc_llava.model.hf_compat import enable_activation_checkpointing

RESULTS = Path(__file__).parent / "results"
CORPUS = "VideoChat2-IT"
SOURCES = {"counts": "https://huggingface.co/datasets/wangyueqian/HawkEye-IT (dataset viewer, subset row counts)",
           "total_2M": "https://github.com/OpenGVLab/Ask-Anything/blob/main/video_chat2/DATA.md",
           "paper": "https://arxiv.org/abs/2311.17005"}
# category: (published samples, is image, assumed mean prompt tokens, assumed mean answer tokens)
CATEGORIES = {
    "image_caption": (706_000, True, 45, 15),
    "image_classification": (59_900, True, 50, 5),
    "image_conversation": (56_700, True, 120, 130),
    "image_reasoning": (122_000, True, 60, 90),
    "image_vqa": (192_000, True, 45, 5),
    "video_caption": (455_000, False, 45, 35),
    "video_classification": (80_000, False, 60, 8),
    "video_conversation": (27_200, False, 60, 140),
    "video_reasoning": (117_000, False, 70, 10),
    "video_vqa": (200_000, False, 45, 8),
}
SIGMA = 0.5
VIDEO_FRAMES = 16
PAD, BOS, EOS = 0, 1, 2


def lognormal(rng: np.random.Generator, mean: float) -> int:
    """A positive integer drawn lognormal with this mean (and SIGMA in log space)."""
    return max(1, round(rng.lognormal(np.log(mean) - SIGMA**2 / 2, SIGMA)))


def mixture_samples(rng: np.random.Generator, n: int, model, image_size: int) -> list[dict]:
    """``n`` SFT samples as SFTDataset.__getitem__ returns them: BOS, part of the prompt, the placeholder run,
    the rest of the prompt, the answer and EOS; labels on the answer and EOS only."""
    names = list(CATEGORIES)
    counts = np.array([CATEGORIES[k][0] for k in names], dtype=float)
    samples = []
    for k in rng.choice(len(names), size=n, p=counts / counts.sum()):
        _, is_image, prompt_mean, answer_mean = CATEGORIES[names[k]]
        frames = 1 if is_image else VIDEO_FRAMES
        visual = model.tokens_per_video(frames)
        prompt = rng.integers(100, 30000, lognormal(rng, prompt_mean)).tolist()
        answer = rng.integers(100, 30000, lognormal(rng, answer_mean)).tolist() + [EOS]
        head = len(prompt) // 2  # system and instruction before the media, the question after it
        ids = [BOS] + prompt[:head] + [IMAGE_TOKEN_ID] * visual + prompt[head:] + answer
        labels = [IGNORE_INDEX] * (len(ids) - len(answer)) + answer
        samples.append({"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                        "pixel_values": torch.randn(frames, 3, image_size, image_size, dtype=torch.bfloat16),
                        "num_frames": frames, "num_visual_tokens": visual, "is_image": is_image,
                        "source": names[k]})
    return samples


def model_inputs(batch: dict, device: str, dtype: torch.dtype) -> dict:
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
    inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
    inputs["num_frames"] = batch["num_frames"]  # read on the host
    sample_ids = batch.get("sample_ids")  # packed rows only
    inputs["sample_ids"] = None if sample_ids is None else sample_ids.to(device)
    return inputs


def run_side(model, batch: dict, device: str, dtype: torch.dtype) -> dict:
    """One fwd+bwd of a collated batch: its time, tokens and loss (summed over its label tokens)."""
    inputs = model_inputs(batch, device, dtype)
    label_tokens = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())

    def step():
        loss = model(**inputs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, loss = once_s(step, device)
    rows, length = inputs["input_ids"].shape
    return {"seconds": seconds, "shape": [rows, length], "useful_tokens": int(inputs["attention_mask"].sum()),
            "batch_tokens": rows * length, "label_tokens": label_tokens, "loss_sum": float(loss) * label_tokens,
            "peak_mem_gb": memory_gb(device)["peak_mem_gb"]}


def batch_attention(model, batch: dict, device: str) -> str:
    """What a training batch's LLM attends with (:func:`shapes.attention_path`)."""
    inputs = model_inputs(batch, device, model.hf.dtype)
    with torch.no_grad():
        frame_ids = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1).frame_ids
    return attention_path(model, frame_ids, inputs["attention_mask"], inputs["sample_ids"])


def summary(steps: list[dict], batch: int) -> dict:
    """Throughput and loss over the timed steps of one side."""
    seconds = sum(s["seconds"] for s in steps)
    useful, padded = sum(s["useful_tokens"] for s in steps), sum(s["batch_tokens"] for s in steps)
    loss, labels = sum(s["loss_sum"] for s in steps), sum(s["label_tokens"] for s in steps)
    peaks = [s["peak_mem_gb"] for s in steps if s["peak_mem_gb"] is not None]
    return {"seconds": seconds, "useful_tokens_per_s": useful / seconds, "samples_per_s": batch * len(steps) / seconds,
            "useful_tokens": useful, "batch_tokens": padded, "pad_fraction": 1 - useful / padded,
            "loss_sum": loss, "label_tokens": labels, "loss_per_token": loss / labels,
            "peak_mem_gb": max(peaks) if peaks else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=32, help="LLM layers of the 7B shape")
    parser.add_argument("--batch", type=int, default=16, help="samples per step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (fresh samples each)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (their losses still compared)")
    parser.add_argument("--max-tokens", type=int, default=8192, help="PackingCollator's row budget (0: None)")
    parser.add_argument("--pad-to-multiple-of", type=int, help="SFTCollator's length buckets (data config: null)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="a toy model of the same structure (CPU check)")
    parser.add_argument("--out", default=str(RESULTS / "sft_mixture.json"))
    args = parser.parse_args()

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = random_tc_llava(args.layers, resolve_attention("auto") if args.device == "cuda" else "sdpa",
                            dtype=dtype, device=args.device, smoke=args.smoke).train()
    model.hf.model.vision_tower.requires_grad_(False)
    if args.checkpointing:
        enable_activation_checkpointing(model.hf)
    collators = {"padded": SFTCollator(PAD, pad_to_multiple_of=args.pad_to_multiple_of),
                 "packed": PackingCollator(PAD, max_tokens=args.max_tokens or None, strategy="best_fit",
                                           pad_to_multiple_of=args.pad_to_multiple_of)}
    rng = np.random.default_rng(args.seed)
    image_size = model.config.vision_config.image_size
    steps: dict[str, list[dict]] = {"padded": [], "packed": []}
    drawn, last = [], {}
    for index in range(args.warmup + args.steps):
        samples = mixture_samples(rng, args.batch, model, image_size)
        drawn += samples
        for side, collate in collators.items():
            batch = last[side] = collate(samples)
            row = run_side(model, batch, args.device, dtype)
            row["warmup"] = index < args.warmup
            steps[side].append(row)
            print(f"step {index} {side}: {json.dumps(row)}", flush=True)

    sides = {}
    for side, rows in steps.items():
        timed = [r for r in rows if not r["warmup"]]
        sides[side] = {**summary(timed, args.batch), "steps": rows,
                       "attention": batch_attention(model, last[side], args.device),
                       "loss_all_steps": sum(r["loss_sum"] for r in rows),
                       "label_tokens_all_steps": sum(r["label_tokens"] for r in rows)}
    pad, pack = sides["padded"], sides["packed"]
    per_token = [s["loss_all_steps"] / s["label_tokens_all_steps"] for s in (pad, pack)]
    comparison = {"packed_over_padded_tokens_per_s": pack["useful_tokens_per_s"] / pad["useful_tokens_per_s"],
                  "label_tokens_equal": pad["label_tokens_all_steps"] == pack["label_tokens_all_steps"],
                  "loss_per_token": per_token, "loss_relative_difference": abs(per_token[1] / per_token[0] - 1)}
    images = sum(s["is_image"] for s in drawn)
    text = [len(s["input_ids"]) - s["num_visual_tokens"] for s in drawn]
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "layers": args.layers, "smoke": args.smoke,
              "attn_implementation": model.language_model.config._attn_implementation,
              "gradient_checkpointing": args.checkpointing, "pad_to_multiple_of": args.pad_to_multiple_of,
              "batch": args.batch, "steps": args.steps,
              "warmup": args.warmup, "max_tokens": args.max_tokens or None,
              "mixture": {"corpus": CORPUS, "sources": SOURCES,
                          "published_counts": {k: v[0] for k, v in CATEGORIES.items()},
                          "assumed_text_tokens": {k: {"prompt_mean": v[2], "answer_mean": v[3]}
                                                  for k, v in CATEGORIES.items()},
                          "draw": f"category in proportion to its count; prompt and answer lengths lognormal "
                                  f"(sigma {SIGMA}) with the assumed means; images 1 frame, videos {VIDEO_FRAMES}",
                          "drawn": {"samples": len(drawn), "images": images, "videos": len(drawn) - images,
                                    "mean_text_tokens": float(np.mean(text))}},
              "sides": sides, "comparison": comparison}
    print(json.dumps({"sides": {k: {m: v for m, v in s.items() if m != "steps"} for k, s in sides.items()},
                      "comparison": comparison}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
