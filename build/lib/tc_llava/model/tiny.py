"""A tiny random LLaVA, with its own tokenizer and image processor, built locally.

Nothing may be downloaded at run time, so the default model of every command is built
here from configs and saved as an ordinary llava-hf-style checkpoint directory. The rest
of the code then loads it with the same ``from_pretrained`` path a real checkpoint takes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

try:  # transformers >= 5 names the PIL-backed processor explicitly; torchvision is optional.
    from transformers import CLIPImageProcessorPil as _ImageProcessor
except ImportError:  # pragma: no cover - older 5.x
    from transformers import CLIPImageProcessor as _ImageProcessor

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]

# Words the synthetic data, the chat templates and the benchmark prompts are made of:
# the tokenizer learns whole-word merges for them, everything else falls back to bytes.
_VOCAB_TEXT = """
USER: ASSISTANT: SYSTEM: [INST] [/INST] <<SYS>> <</SYS>> system user assistant
A chat between a curious user and an artificial intelligence assistant. The assistant gives
helpful, detailed, and polite answers to the user's questions.
Carefully watch the video and pay attention to the cause and sequence of events, the detail
and movement of objects, and the action and pose of persons. Based on your observations,
select the best option that accurately addresses the question.
Question: Options: Only give the best option. Best option:( (A) (B) (C) (D) (E) (F) (G)
red green blue yellow purple orange white cyan magenta pink brown gray black
circle square triangle star shape shapes object objects ball cube
left right up down moves moving move direction towards from to the a an of in on
first second third last appear appears appeared which what how many color colour
count number zero one two three four five six seven eight nine ten
changes changed change disappears stays same static video frame frames time order
before after then while during is are was were does do did it its this that there
Describe describe answer yes no because
0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' " ( ) [ ] - _ / \\ < > = + *
"""


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the synthetic vocabulary (deterministic, < 1 s)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _VOCAB_TEXT.strip().splitlines() for _ in range(4)]
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="right",
    )


def build_image_processor(image_size: int) -> Any:
    """CLIP preprocessing (resize, centre crop, CLIP mean/std) at the tiny tower's resolution."""
    return _ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def build_config(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llava",
    text_model: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vision_intermediate_size: int | None = None,
    image_size: int = 56,
    patch_size: int = 14,
    max_position_embeddings: int = 8192,
) -> LlavaConfig | LlavaNextConfig:
    """The HF config of a tiny LLaVA (``llava`` or ``llava_next``) over a Llama or Qwen2 LLM."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
        num_hidden_layers=vision_layers + 1,  # LLaVA reads layer -2: keep `vision_layers` useful ones
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    text_kwargs = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if text_model == "llama":
        text = LlamaConfig(**text_kwargs)
    elif text_model == "qwen2":
        text = Qwen2Config(**text_kwargs, use_sliding_window=False)
    else:
        raise ValueError(f"tiny model: text_model must be 'llama' or 'qwen2', got {text_model!r}")
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llava":
        return LlavaConfig(**common)
    if arch == "llava_next":
        grid = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
        return LlavaNextConfig(**common, image_grid_pinpoints=grid)
    raise ValueError(f"tiny model: arch must be 'llava' or 'llava_next', got {arch!r}")


def build_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, **config_kwargs: Any) -> Path:
    """Write a tiny random LLaVA checkpoint (model, tokenizer, image processor) to ``out_dir``."""
    out = Path(out_dir)
    tokenizer = build_tokenizer()
    config = build_config(tokenizer, **config_kwargs)
    cls = LlavaNextForConditionalGeneration if config.model_type == "llava_next" else LlavaForConditionalGeneration
    with torch.random.fork_rng(devices=[]):  # a first build must not shift the caller's RNG stream
        torch.manual_seed(seed)
        model = cls(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    build_image_processor(config.vision_config.image_size).save_pretrained(out)
    return out


def tiny_checkpoint(cache_dir: str | os.PathLike | None = None, seed: int = 0, **config_kwargs: Any) -> Path:
    """Path of the tiny checkpoint for these settings, building it once into a cache directory."""
    key = json.dumps({"seed": seed, **config_kwargs}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(cache_dir or os.environ.get("TC_LLAVA_CACHE", Path.home() / ".cache" / "tc_llava"))
    out = root / "tiny" / digest
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        build_tiny_checkpoint(tmp, seed=seed, **config_kwargs)
        (tmp / "tiny_settings.json").write_text(key)
        try:
            tmp.rename(out)
        except OSError:  # another process built it first
            pass
    return out
