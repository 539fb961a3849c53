"""The training settings, checked in full before anything is loaded.

A typo in a number (``trainer.lr=abc``), a frame count of 0, a corpus path that does not
exist or a DeepSpeed preset started without a launcher would otherwise surface minutes
later, after a 7B model has loaded, as an error that names neither the setting nor the fix.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tc_llava.configs import CONFIG_DIR
from tc_llava.data.collate import PACKING_STRATEGIES
from tc_llava.data.datasets import ON_ERROR, check_sources
from tc_llava.model.build import check_model_settings, check_sequence_parallel_settings
from tc_llava.model.masks import MASK_RULES
from tc_llava.model.pooling import mlp_projector
from tc_llava.model.rope import ROPE_RULES
from tc_llava.runtime import check_numerics

MIXED_PRECISION = ("no", "bf16", "fp16")
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")  # what torchrun/accelerate set


class SettingsError(ValueError):
    """A setting of the wrong type or out of range, named by its full key."""


_RULE_NAMES = {f"{cls.__module__}.{cls.__qualname__}": name for name, cls in {**ROPE_RULES, **MASK_RULES}.items()}
_MLP = f"{mlp_projector.__module__}.{mlp_projector.__qualname__}"  # train.yaml's projector, unnamed in run dirs


def rule_name(target: str | None) -> str:
    """The registered name of the rule a ``rope``/``mask`` config builds (``tad``); ``saved`` when the
    group is null (the checkpoint's rule); else the callable's own name (``pllava_projector``)."""
    if target is None:
        return "saved"
    return _RULE_NAMES.get(target, target.rsplit(".", 1)[-1])


def _defaults(target: str | None) -> dict[str, object]:
    """The keyword defaults of the callable a config group builds; none known when it cannot be imported
    (``check_train_config`` reports that target in one line, after the run dir's name was resolved)."""
    module, _, attr = (target or "").rpartition(".")
    try:
        built = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        return {}
    return {name: p.default for name, p in inspect.signature(built).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _same(value: object, default: object) -> bool:
    """Equal as settings: ``1 == 1.0`` and a list equals a tuple of the same items, but ``true`` is not ``1``."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
        return len(value) == len(default) and all(_same(a, b) for a, b in zip(value, default))
    return value == default


def param_word(value: object) -> str:
    """A parameter value as a filesystem-safe word, the same for equal settings: numbers in their shortest
    round-trip form without a trailing ``.0`` (``0.5``, ``0.50`` and ``5e-1`` give ``0.5``; ``1`` and ``1.0``
    give ``1``), lists joined by ``x`` (``[4, 6, 6]`` gives ``4x6x6``), ``null``/``true``/``false``, and strings
    with every character outside ``[A-Za-z0-9._+]`` replaced by ``_`` (``-`` separates the rules)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        return "x".join(param_word(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._+]", "_", str(value))


def rule_label(node: DictConfig | None) -> str:
    """A rule and every parameter that differs from its default, sorted by name: ``tad`` (``gamma=1.0``, the
    default), ``tad-gamma0.5``, ``videorope-delta1-temporal_pairs8``; ``saved`` for a null group."""
    if node is None:
        return "saved"
    target = node.get("_target_")
    params = {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if not k.startswith("_")}
    defaults = _defaults(target)
    changed = sorted(k for k, v in params.items() if k not in defaults or not _same(v, defaults[k]))
    return "-".join([rule_name(target), *(f"{k}{param_word(params[k])}" for k in changed)])


def rule_labels(rope: DictConfig | None, mask: DictConfig | None, projector: DictConfig | None) -> dict[str, str]:
    """``{"rope": ..., "mask": ...}`` labels, plus ``"projector"`` unless it is the checkpoint's MLP (the
    default, left out so that the default run keeps its name) or null (the checkpoint's own)."""
    labels = {"rope": rule_label(rope), "mask": rule_label(mask)}
    if projector is not None:
        label = rule_label(projector)
        if not (projector.get("_target_") == _MLP and label == rule_name(_MLP)):
            labels["projector"] = label
    return labels


def run_name(rope: DictConfig | None, mask: DictConfig | None, projector: DictConfig | None) -> str:
    """Resolver ``${run_name:rope,mask,projector}`` (the group nodes): the rules part of a run dir, so that runs
    differing in any rule or rule parameter never share one: ``tad-frame_block_causal`` (every default),
    ``tad-gamma0.5-frame_block_causal``, ``vanilla-causal-pllava_projector-pooling_shape4x6x6``."""
    return "-".join(rule_labels(rope, mask, projector).values())


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


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
    offload_checkpoints: bool = False
    compile: bool = False
    sp_size: int = 1
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
    if t.offload_checkpoints and not t.gradient_checkpointing:
        raise SettingsError("trainer.offload_checkpoints=true offloads the checkpointed hidden states: it needs "
                            "trainer.gradient_checkpointing=true (without it every activation would go to the host)")
    check_parallelism(t)
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


# What `accelerate launch` exports from an accelerate config's parallelism_config: its own context parallelism
# (torch's, which forces is_causal=True) and sequence parallelism (DeepSpeed's Ulysses, which sets 4D masks to None).
ACCELERATE_PARALLELISM = ("PARALLELISM_CONFIG_CP_SIZE", "PARALLELISM_CONFIG_SP_SIZE", "PARALLELISM_CONFIG_TP_SIZE")


def check_parallelism(t: TrainerSettings) -> None:
    """``trainer.sp_size`` against the launch: a whole number of SP groups, and no other sequence or context
    parallelism (Accelerate's, DeepSpeed's), each of which would make the mask causal without a word."""
    _require(t.sp_size >= 1, "trainer.sp_size", t.sp_size, "an integer >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % t.sp_size:
        raise SettingsError(f"trainer.sp_size={t.sp_size}: {world} process(es) do not split into sequence-parallel "
                            f"groups of {t.sp_size}; launch a multiple of {t.sp_size} (dp x sp processes)")
    if os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "false").lower() == "true":
        sizes = {key: int(os.environ.get(key, "1")) for key in ACCELERATE_PARALLELISM}
        if any(size > 1 for size in sizes.values()):
            named = ", ".join(f"{key.removeprefix('PARALLELISM_CONFIG_').lower()}={size}"
                              for key, size in sizes.items() if size > 1)
            raise SettingsError(f"the accelerate config's parallelism_config ({named}) replaces the attention mask "
                                "with a causal one (context parallelism forces is_causal, DeepSpeed's Ulysses drops 4D "
                                "masks); remove it and set trainer.sp_size instead (the mask stays exact)")
    if t.deepspeed and Path(t.deepspeed).is_file():
        size = json.loads(Path(t.deepspeed).read_text()).get("sequence_parallel_size", 1)
        if size != 1:
            raise SettingsError(f"trainer.deepspeed={t.deepspeed}: sequence_parallel_size={size} is DeepSpeed's "
                                "Ulysses, which drops the attention mask; remove it and set trainer.sp_size instead")


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
    """Loader numbers, the error policy, the decode deadline, packing, the frame count and the corpora's files
    (no JSON is parsed yet)."""
    for key, low in (("batch_size", 1), ("num_workers", 0)):
        value = data.get(key)
        _require(_is_int(value, low), f"data.{key}", value, f"an integer >= {low}")
    _require(data.get("on_error") in ON_ERROR, "data.on_error", data.get("on_error"), f"one of {ON_ERROR}")
    timeout = data.get("decode_timeout")
    _require(timeout is None or (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                 and math.isfinite(timeout) and timeout > 0),
             "data.decode_timeout", timeout, "a number of seconds > 0, or null (no deadline)")
    check_packing(data)
    dataset = data.dataset
    corpora = OmegaConf.to_container(dataset.corpora, resolve=True)
    select = dataset.get("select")
    try:
        check_sources(corpora, dataset.num_frames, None if select is None else list(select))
    except (ValueError, FileNotFoundError) as e:
        raise SettingsError(str(e)) from None


def check_run_settings(cfg: DictConfig) -> None:
    """What every training app (SFT, RL) checks first: the run-dir switch, threads and determinism, the model
    group and ``resume_allow_changes``."""
    _require(isinstance(cfg.get("overwrite", False), bool), "overwrite", cfg.get("overwrite"), "true or false")
    try:
        check_numerics(cfg.threads, cfg.deterministic)
        check_model_settings(cfg.model)
    except ValueError as e:
        raise SettingsError(str(e)) from None
    allowed = cfg.get("resume_allow_changes", OmegaConf.create([]))
    _require(OmegaConf.is_list(allowed) and all(isinstance(key, str) for key in allowed), "resume_allow_changes",
             allowed, "a list of setting keys, e.g. [trainer.lr,trainer.max_steps]")


def check_rules(cfg: DictConfig) -> None:
    """The rope and mask groups, built once: each rule checks its own parameters."""
    for group in ("rope", "mask"):
        if cfg.get(group) is not None:
            try:
                instantiate(cfg[group])
            except InstantiationException as e:
                raise SettingsError(str(e.__cause__ or e)) from None


def check_train_config(cfg: DictConfig) -> None:
    """Every check above, plus the run-dir switch and the rules; call before any model or data loads."""
    check_run_settings(cfg)
    check_trainer(cfg.trainer)
    check_data(cfg.data)
    sp_size = cfg.trainer.get("sp_size", 1)
    if sp_size > 1:
        try:
            check_sequence_parallel_settings(cfg.model, sp_size)
        except ValueError as e:
            raise SettingsError(str(e)) from None
        multiple = cfg.data.collator.pad_to_multiple_of
        _require(multiple is not None and multiple % sp_size == 0, "data.collator.pad_to_multiple_of", multiple,
                 f"a multiple of trainer.sp_size={sp_size} (every row splits into equal shares)")
    check_rules(cfg)
