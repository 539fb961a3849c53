"""The training settings, checked in full before anything is loaded.

A typo in a number (``trainer.lr=abc``), a frame count of 0, a corpus path that does not
exist or a DeepSpeed preset started without a launcher would otherwise surface minutes
later, after a 7B model has loaded, as an error that names neither the setting nor the fix.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tc_llava.configs import CONFIG_DIR
from tc_llava.data.collate import PACKING_STRATEGIES
from tc_llava.data.datasets import check_sources
from tc_llava.model.masks import MASK_RULES
from tc_llava.model.rope import ROPE_RULES

MIXED_PRECISION = ("no", "bf16", "fp16")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")  # what torchrun/accelerate set


class SettingsError(ValueError):
    """A setting of the wrong type or out of range, named by its full key."""


_RULE_NAMES = {f"{cls.__module__}.{cls.__qualname__}": name for name, cls in {**ROPE_RULES, **MASK_RULES}.items()}


def rule_name(target: str | None) -> str:
    """The registered name of the rule a ``rope``/``mask`` config builds (``tad``); ``saved`` when the
    group is null (the checkpoint's rule). Resolver ``${rule_name:...}``: run directories are named by it."""
    if target is None:
        return "saved"
    return _RULE_NAMES.get(target, target.rsplit(".", 1)[-1])


OmegaConf.register_new_resolver("rule_name", rule_name, replace=True)


@dataclass
class TrainerSettings:
    """The schema of ``configs/trainer/*.yaml``: types are enforced by OmegaConf, ranges below."""

    name: str
    backend: str | None = None
    mixed_precision: str = "no"
    deepspeed: str | None = None
    max_steps: int | None = None
    epochs: int = 1
    grad_accum: int = 1
    lr: float = 2e-5
    projector_lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    compile: bool = False
    save_every: int = 50
    keep_last: int = 2


def _typed_trainer(trainer: DictConfig) -> TrainerSettings:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainerSettings), OmegaConf.to_container(trainer, resolve=True))
    except OmegaConfBaseException as e:
        value = f"={e.value!r}" if getattr(e, "value", None) is not None else ""
        raise SettingsError(f"trainer.{e.full_key}{value}: {e.msg.splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def _require(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{key}={value!r}: expected {expected}")


def check_trainer(trainer: DictConfig) -> None:
    """``cfg.trainer``'s types and ranges."""
    t = _typed_trainer(trainer)
    positive = {"lr": t.lr, "max_grad_norm": t.max_grad_norm}
    if t.projector_lr is not None:
        positive["projector_lr"] = t.projector_lr
    for key, value in positive.items():
        _require(math.isfinite(value) and value > 0, f"trainer.{key}", value, "a finite number > 0")
    for key in ("warmup_ratio", "min_lr_ratio"):
        value = getattr(t, key)
        _require(0 <= value <= 1, f"trainer.{key}", value, "a fraction in [0, 1]")
    _require(math.isfinite(t.weight_decay) and t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay,
             "a finite number >= 0")
    _require(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "trainer.betas", t.betas,
             "two numbers in [0, 1)")
    _require(t.mixed_precision in MIXED_PRECISION, "trainer.mixed_precision", t.mixed_precision,
             f"one of {MIXED_PRECISION}")
    for key in ("epochs", "grad_accum", "save_every"):
        _require(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), "an integer >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, "trainer.max_steps", t.max_steps, "null or an integer >= 1")
    _require(t.keep_last >= 0, "trainer.keep_last", t.keep_last, "an integer >= 0 (0 keeps every checkpoint)")
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") == "true"
    if launched and not t.deepspeed:
        raise SettingsError(f"launched with a DeepSpeed accelerate config but trainer={t.name} runs no DeepSpeed; "
                            "use trainer=zero2|zero3|zero3_offload")
    if t.deepspeed:
        path = Path(t.deepspeed)
        _require(path.is_file(), "trainer.deepspeed", t.deepspeed, "an existing DeepSpeed JSON file")
        named = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if launched and named and Path(named).resolve() != path.resolve():
            raise SettingsError(f"the accelerate config names DeepSpeed file {named} but trainer={t.name} uses {path}; "
                                f"launch with --config_file {CONFIG_DIR / 'trainer' / (t.name + '.accelerate.json')}")
        if not all(key in os.environ for key in LAUNCHER_ENV):  # else DeepSpeed looks for its ranks through MPI
            raise SettingsError(
                f"trainer={t.name} runs DeepSpeed, which needs a launcher: accelerate launch --config_file "
                f"tc_llava/configs/trainer/{t.name}.accelerate.json -m tc_llava.train trainer={t.name} ... (or torchrun); "
                "without one, use trainer=cpu or trainer=ddp")


def _is_int(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_packing(data: DictConfig) -> None:
    """``data.packing`` and ``data.pack``; the row size is checked against the samples' visual tokens once the
    model has counted them (``make_collator``), here against the text alone."""
    _require(isinstance(data.packing, bool), "data.packing", data.packing, "true or false")
    max_tokens, max_txt_len = data.pack.max_tokens, data.max_txt_len
    _require(max_tokens is None or _is_int(max_tokens, 1), "data.pack.max_tokens", max_tokens,
             "null or an integer >= 1")
    _require(data.pack.strategy in PACKING_STRATEGIES, "data.pack.strategy", data.pack.strategy,
             f"one of {PACKING_STRATEGIES}")
    if data.packing:
        _require(data.collator.padding_side == "right", "data.collator.padding_side", data.collator.padding_side,
                 "right with data.packing=true (packed rows are right-padded)")
        if max_tokens is not None and max_txt_len is not None:
            _require(max_tokens > max_txt_len, "data.pack.max_tokens", max_tokens, f"more than data.max_txt_len="
                     f"{max_txt_len}: a sample holds up to that many text tokens besides its visual ones")


def check_data(data: DictConfig) -> None:
    """Loader numbers, packing, the frame count and the corpora's files (no JSON is parsed yet)."""
    for key, low in (("batch_size", 1), ("num_workers", 0)):
        value = data.get(key)
        _require(_is_int(value, low), f"data.{key}", value, f"an integer >= {low}")
    check_packing(data)
    dataset = data.dataset
    corpora = OmegaConf.to_container(dataset.corpora, resolve=True)
    select = dataset.get("select")
    try:
        check_sources(corpora, dataset.num_frames, None if select is None else list(select))
    except (ValueError, FileNotFoundError) as e:
        raise SettingsError(str(e)) from None


def check_train_config(cfg: DictConfig) -> None:
    """Every check above, plus the run-dir switch and the rules; call before any model or data loads."""
    _require(isinstance(cfg.get("overwrite", False), bool), "overwrite", cfg.get("overwrite"), "true or false")
    allowed = cfg.get("resume_allow_changes", OmegaConf.create([]))
    _require(OmegaConf.is_list(allowed) and all(isinstance(key, str) for key in allowed), "resume_allow_changes",
             allowed, "a list of setting keys, e.g. [trainer.lr,trainer.max_steps]")
    check_trainer(cfg.trainer)
    check_data(cfg.data)
    for group in ("rope", "mask"):  # the rules check their own parameters when built
        if cfg.get(group) is not None:
            try:
                instantiate(cfg[group])
            except InstantiationException as e:
                raise SettingsError(str(e.__cause__ or e)) from None
