"""A tiny random LLaVA of any supported family, with its own tokenizer and processors, built locally.

Nothing may be downloaded at run time, so the default model of every command is built
here from configs and saved as an ordinary llava-hf-style checkpoint directory. The rest
of the code then loads it with the same ``from_pretrained`` path a real checkpoint takes.
The video families (``llava_onevision``: SigLIP tower; ``llava_next_video``: CLIP tower and
spatial pooler) also get a ``<video>`` token and their HF video processor
(``video_preprocessor_config.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedConfig, PreTrainedTokenizerFast, Qwen2Config

from tc_llava.model.families import FAMILIES, Family, family_of
from tc_llava.model.families.base import clip_image_processor
from tc_llava.model.hf_compat import whole_models
from tc_llava.model.processors import VideoPreprocessor

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
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


def build_tokenizer(vocab_size: int = 1024, video_token: bool = False,
                    family_tokens: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the synthetic vocabulary (deterministic, < 1 s).

    ``video_token`` adds and declares the video families' ``<video>`` placeholder (last of the
    special tokens, so the image families' tokenizer is unchanged); ``family_tokens`` (a family's
    :attr:`~tc_llava.model.families.Family.tiny_tokens` beyond LLaVA's, e.g. Qwen-VL's ``<|video_pad|>``)
    are added after them and declared under their role (``video_token`` for ``video``)."""
    special = SPECIAL_TOKENS + [VIDEO_TOKEN] if video_token else list(SPECIAL_TOKENS)
    declared = {"image_token": IMAGE_TOKEN, **({"video_token": VIDEO_TOKEN} if video_token else {})}
    for role, token in (family_tokens or {}).items():
        special.append(token)
        declared[f"{role}_token"] = token
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
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
        extra_special_tokens=declared,
        padding_side="right",
    )


def build_image_processor(image_size: int) -> Any:
    """HF's CLIP image processor (resize, centre crop, CLIP mean/std) at the tiny tower's resolution."""
    return clip_image_processor(image_size)


def tiny_family(arch: str) -> Family:
    """The registered family a tiny model of ``arch`` (its ``model_type``) is built as."""
    if arch not in FAMILIES:
        raise ValueError(f"tiny model: arch must be one of {tuple(FAMILIES)}, got {arch!r}")
    return FAMILIES[arch]


def build_processors(config: PreTrainedConfig) -> tuple[Any, VideoPreprocessor | None]:
    """HF's image processor and (video families) video processor a checkpoint of ``config`` ships
    (the family's :meth:`~tc_llava.model.families.Family.processors`)."""
    return family_of(config.model_type).processors(config)


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
    rope_theta: float | None = None,
) -> PreTrainedConfig:
    """The HF config of a tiny model of family ``arch`` over a Llama or Qwen2 LLM.

    The tower and the family's own fields are the family's (:meth:`~tc_llava.model.families.Family.tiny_config`):
    ``llava``/``llava_next``/``llava_next_video`` use a CLIP tower read at layer -2 (CLS dropped),
    ``llava_onevision`` a SigLIP tower read at its last layer, as the llava-hf checkpoints do.
    ``rope_theta`` (default: the LLM config's own) sets the LLM's RoPE base.
    """
    family = tiny_family(arch)
    vision = family.tiny_vision_config(dict(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size or 2 * vision_hidden_size,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    ), vision_layers)
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
    if rope_theta is not None:
        text_kwargs["rope_theta"] = rope_theta
    if text_model == "llama":
        text = LlamaConfig(**text_kwargs)
    elif text_model == "qwen2":
        text = Qwen2Config(**text_kwargs, use_sliding_window=False)
    else:
        raise ValueError(f"tiny model: text_model must be 'llama' or 'qwen2', got {text_model!r}")
    tokens = {"image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), "pad": tokenizer.pad_token_id,
              "video": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)}
    tokens.update({role: tokenizer.convert_tokens_to_ids(token) for role, token in family.tiny_tokens.items()})
    grid = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    return family.tiny_config(vision, text, tokens, grid)


def build_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, **config_kwargs: Any) -> Path:
    """Write a tiny random checkpoint (model, tokenizer, image processor, video processor) to ``out_dir``."""
    out = Path(out_dir)
    family = tiny_family(config_kwargs.get("arch", "llava"))
    tokenizer = build_tokenizer(video_token=family.placeholder_kind == "video" and not family.tiny_tokens,
                                family_tokens=family.tiny_tokens)
    if family.chat_template is not None:
        tokenizer.chat_template = family.chat_template
    config = build_config(tokenizer, **config_kwargs)
    with torch.random.fork_rng(devices=[]), whole_models():  # the caller's RNG stream stays; never partitioned
        torch.manual_seed(seed)
        model = family.hf_class(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for processor in build_processors(config):
        if processor is not None:
            processor.save_pretrained(out)
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
