"""One GRPO step of a OneVision-7B-shaped policy on one GPU, split into rollout and training (bf16, LoRA).

Random weights of the real shape (scripts/bench/shapes.py), LoRA by ``configs/tuning/lora.yaml`` with the
vision tower frozen, one prompt of 16 frames (3,137 visual tokens) and G completions (default 4) of up to
``--max-new-tokens`` sampled tokens (random weights rarely stop early; the count is reported), as
``tc_llava.rl`` runs a step: the rollout through our generation (KV cache, left-padded rows, the rules' mask and
positions), the rollout policy's and the reference's log-probabilities by the training forward (the reference
is the same model with the adapters disabled), then the clipped policy-gradient loss (``grpo``, beta 0.04),
its backward and the AdamW step, with activation checkpointing as the GPU trainer presets (``ddp``, ``zero2``,
``zero3``) turn it on (``--no-checkpointing``: off; so, on an 80 GB H100 the training forward of 4 x 3.4k tokens ran
out of memory: ``results/grpo_step_no_checkpointing.json``). Each rule set runs in a fresh process; printed and
written per rule set: the median seconds of the rollout, the log-probabilities and the training, and the peak
memory.

    python scripts/bench/grpo_step.py                                  # TC and vanilla rules, G=4, 16 frames
    python scripts/bench/grpo_step.py --device cpu --smoke --reps 1 --max-new-tokens 4 --out /tmp/grpo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from omegaconf import OmegaConf
from transformers import LlavaOnevisionForConditionalGeneration

from long_video import LORA, config
from shapes import ONEVISION_VIDEO_TOKEN_ID
from timing import memory_gb, sync
from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE, VanillaRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiny import build_tokenizer
from tc_llava.rl.grpo import group_advantages, policy_loss
from tc_llava.rl.rollout import reference, repeat_rows, sample, token_logps
from tc_llava.train.tuning import apply_tuning

RULES = ("tc", "vanilla")
TEXT_BEFORE, TEXT_AFTER = 60, 40


def measure(rules: str, args: argparse.Namespace) -> dict:
    """``--reps`` GRPO steps under ``rules`` in this process: the medians of each part and the peak memory."""
    torch.manual_seed(0)
    with torch.device(args.device):
        hf = LlavaOnevisionForConditionalGeneration._from_config(config(args.smoke), dtype=torch.bfloat16)
    rope, mask = (TADRoPE(1.0), FrameBlockCausalMask()) if rules == "tc" else (VanillaRoPE(), CausalMask())
    model = TCLlava(hf, rope, mask).train()
    # The texts are decoded as a step decodes them, but not scored (the rewards are random): the tiny models'
    # tokenizer does, after the checks of a real checkpoint's (ids outside its vocabulary decode to nothing).
    model.tokenizer = build_tokenizer()
    handle = apply_tuning(model, **OmegaConf.to_container(OmegaConf.load(LORA)))
    if args.checkpointing:
        enable_activation_checkpointing(model.hf)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    g = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(100, 150000, (n,), generator=g).tolist()  # noqa: E731
    ids = torch.tensor([text(TEXT_BEFORE) + [ONEVISION_VIDEO_TOKEN_ID] * (args.frames * 196 + 1) + text(TEXT_AFTER)])
    prompt = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, args.frames, 3, 384, 384, generator=g).to(torch.bfloat16),
              "num_frames": torch.tensor([args.frames])}
    batch = {k: v.to(args.device) for k, v in repeat_rows(prompt, args.generations).items()}
    eos = hf.config.text_config.eos_token_id or 151645
    times: dict[str, list[float]] = {"rollout_s": [], "logps_s": [], "train_s": []}
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for rep in range(args.reps + 1):  # the first is the warm-up
        clock = time.perf_counter()
        completions = sample(model, batch, max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0,
                             seeds=[rep * args.generations + i for i in range(args.generations)], stops=[eos],
                             pad_token_id=0)
        sync(args.device)
        rolled = time.perf_counter()
        with torch.no_grad():
            old = token_logps(model, batch, completions, 1.0, ONEVISION_VIDEO_TOKEN_ID)
            with reference(handle):
                ref = token_logps(model, batch, completions, 1.0, ONEVISION_VIDEO_TOKEN_ID)
        sync(args.device)
        scored = time.perf_counter()
        rewards = torch.rand(args.generations, generator=g).to(args.device)
        logps = token_logps(model, batch, completions, 1.0, ONEVISION_VIDEO_TOKEN_ID)
        out = policy_loss(logps, group_advantages(rewards, args.generations), completions.mask.float(),
                          loss_type="grpo", old_logps=old, beta=0.04, ref_logps=ref)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args.device)
        done = time.perf_counter()
        if rep:
            times["rollout_s"].append(rolled - clock)
            times["logps_s"].append(scored - rolled)
            times["train_s"].append(done - scored)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"completion_tokens": int(completions.mask.sum()), "prompt_tokens": ids.shape[1], **medians,
            "step_s": sum(medians.values()), **memory_gb(args.device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--generations", type=int, default=4, help="G, completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="no activation checkpointing (trainer.gradient_checkpointing=false)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="toy widths of the same structure (CPU check)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "grpo_step.json"))
    parser.add_argument("--one", choices=RULES, help=argparse.SUPPRESS)  # a child: measure these rules, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return
    runs = {}
    for rules in RULES:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", rules], capture_output=True,
                               text=True)
        lines = child.stdout.strip().splitlines()
        runs[rules] = json.loads(lines[-1]) if child.returncode == 0 and lines else \
            {"error": (child.stderr.strip().splitlines() or ["failed"])[-1]}
        print(rules, json.dumps(runs[rules]), flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    result = {"device": name, "smoke": args.smoke, "torch": torch.__version__, "transformers": transformers.__version__,
              "frames": args.frames, "generations": args.generations, "max_new_tokens": args.max_new_tokens,
              "tuning": "lora (configs/tuning/lora.yaml)", "activation_checkpointing": args.checkpointing,
              "statistic": "median", "reps": args.reps, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
