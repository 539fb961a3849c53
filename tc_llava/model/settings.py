"""The TC-LLaVA settings a checkpoint records, written and read by rule name.

``config.json`` holds ``"tc_llava": {"rope": {"name": "tad", "gamma": 1.0}, "mask": {"name":
"frame_block_causal"}, "pooling_shape": [16, 12, 12] | null, "template": "vicuna_v1"}``. Reading resolves each name
in the project's own registries (``ROPE_RULES``, ``MASK_RULES``) and hands the other entries
to the rule as parameters, which the rule checks. Nothing read from a checkpoint is ever
imported or called: a downloaded checkpoint is data. Anything else is an error naming the
file and the field, never a silent fallback to vanilla RoPE and the causal mask.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tc_llava.model.masks import MASK_RULES, MaskRule
from tc_llava.model.params import ParamError
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import ROPE_RULES, RopeRule

SETTINGS = ("rope", "mask", "pooling_shape", "template")
# Beside ``tc_llava`` (how the model attends), ``config.json`` may record how the model was trained to see
# videos, for the apps that ask it about a video: {"num_frames": 32, "image_frames": 1, "sampling": "random",
# "system": ""} (system: the system text its training prompts began with, before each record's instruction).
FRAMES_KEY = "tc_llava_frames"
BUDGET_KEY = "tc_llava_frame_budget"  # a Qwen-VL export's frame budget (FrameBudget.to_json())
FRAME_SAMPLING = {"num_frames": "a positive integer", "image_frames": "a positive integer or null",
                  "sampling": "a frame sampling strategy's name", "system": "a string (the training's system text)"}

# The previous format stored a rule as ``{"_target_": dotted class path, "name": ..., **fields}``
# (and masks their ``is_causal``). These exact strings, and no other ``_target_``, still load,
# as the names they map to; nothing is imported.
PREVIOUS_TARGETS = {
    "tc_llava.model.rope.VanillaRoPE": "vanilla",
    "tc_llava.model.rope.TADRoPE": "tad",
    "tc_llava.model.rope.MRoPE": "mrope",
    "tc_llava.model.rope.VideoRoPE": "videorope",
    "tc_llava.model.masks.CausalMask": "causal",
    "tc_llava.model.masks.FrameBlockCausalMask": "frame_block_causal",
    "tc_llava.model.masks.BidirectionalVisualMask": "bidirectional_visual",
}


def rule_settings(rule: RopeRule | MaskRule) -> dict[str, Any]:
    """A rule as its checkpoint entry: its registered name and its parameters."""
    return {"name": rule.name, **dataclasses.asdict(rule)}


def read_settings(config: dict[str, Any], config_file: Path) -> tuple[
        RopeRule | None, MaskRule | None, VideoPooling, str | None]:
    """The rope rule, mask rule (None where not recorded), pooling and chat template a checkpoint's config records."""
    saved = config.get("tc_llava", {})
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file}: tc_llava must be an object with {', '.join(SETTINGS)}, got {saved!r}")
    for key in saved:
        if key not in SETTINGS:
            raise ValueError(f"{config_file}: tc_llava.{key} is not a TC-LLaVA setting (known: {', '.join(SETTINGS)})")
    rope = _rule(saved["rope"], "rope", ROPE_RULES, config_file) if "rope" in saved else None
    mask = _rule(saved["mask"], "mask", MASK_RULES, config_file) if "mask" in saved else None
    try:
        pooling = VideoPooling(saved.get("pooling_shape"))
    except ParamError as e:
        raise ValueError(e.at(f"{config_file}: tc_llava.pooling_shape")) from None
    template = saved.get("template")
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config_file}: tc_llava.template must be a chat template's name, got {template!r}")
    return rope, mask, pooling, template


def read_frame_sampling(config: dict[str, Any], config_file: Path) -> dict[str, Any] | None:
    """The frame sampling a checkpoint records under ``tc_llava_frames`` (None if it records none), checked."""
    saved = config.get(FRAMES_KEY)
    if saved is None:
        return None
    if not isinstance(saved, dict):
        raise ValueError(f"{config_file}: {FRAMES_KEY} must be an object with {', '.join(FRAME_SAMPLING)}, got {saved!r}")
    for key, value in saved.items():
        positive = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        ok = {"num_frames": positive, "image_frames": value is None or positive,
              "sampling": isinstance(value, str), "system": isinstance(value, str)}.get(key)
        if ok is None:
            raise ValueError(f"{config_file}: {FRAMES_KEY}.{key} is not recorded frame sampling "
                             f"(known: {', '.join(FRAME_SAMPLING)})")
        if not ok:
            raise ValueError(f"{config_file}: {FRAMES_KEY}.{key} must be {FRAME_SAMPLING[key]}, got {value!r}")
    return dict(saved)


# The dtype a checkpoint without a TC-LLaVA record loads in (a llava-hf download: the dtype to fine-tune a 7B in).
DEFAULT_DTYPE = "bfloat16"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_dtype(config: dict[str, Any]) -> tuple[str, str]:
    """The dtype to load a checkpoint in when none is asked for, and where it comes from.

    An export (its config records ``tc_llava``) was saved in the dtype it was trained in, which
    transformers' ``save_pretrained`` writes as ``dtype``: ``(that, "export")``. Any other checkpoint
    records the dtype it was published in (float16 for llava-1.5): ``(DEFAULT_DTYPE, "default")``.
    """
    saved = config.get("dtype") or config.get("torch_dtype")
    if "tc_llava" in config and saved in FLOAT_DTYPES:
        return saved, "export"
    return DEFAULT_DTYPE, "default"


def _rule(entry: Any, key: str, registry: dict[str, type], config_file: Path) -> RopeRule | MaskRule:
    where = f"{config_file}: tc_llava.{key}"
    if not isinstance(entry, dict):
        raise ValueError(f'{where} must be an object {{"name": ..., parameters}}, got {entry!r}')
    fields = _from_previous_format(entry, key, where, registry) if "_target_" in entry else dict(entry)
    return build_rule(key, fields.pop("name", None), fields, where)


# Each kind of rule and its registry: what a checkpoint, a config or the lmms-eval plugin names a rule from.
RULE_REGISTRIES: dict[str, dict[str, type]] = {"rope": ROPE_RULES, "mask": MASK_RULES}


def build_rule(kind: str, name: Any, params: dict[str, Any], where: str) -> RopeRule | MaskRule:
    """The ``kind`` rule registered as ``name``, made with ``params``: the one way a rule is made from names.

    An unknown name, a parameter the rule does not take, or a value it refuses is a ValueError
    naming its place as ``{where}.name``, ``{where}.FIELD`` (``where``: e.g. ``.../config.json:
    tc_llava.rope``).
    """
    registry = RULE_REGISTRIES[kind]
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"{where}.name={name!r} is not a {kind} rule; known: {', '.join(registry)}")
    rule = registry[name]
    accepted = [f.name for f in dataclasses.fields(rule)]
    for field in params:
        if field not in accepted:
            raise ValueError(f"{where}.{field} is not a parameter of {kind}={name} "
                             f"(its parameters: {', '.join(accepted) or 'none'})")
    try:
        return rule(**params)
    except ParamError as e:  # e.field is "rope.gamma": the rule's own name for its field
        raise ValueError(e.at(f"{where}.{e.field.split('.', 1)[-1]}")) from None


def rule_parameters() -> dict[str, str]:
    """Every parameter of every registered rule -> its kind (``{"gamma": "rope", ...}``).

    For callers that take rule parameters by bare name beside the rules' names (the lmms-eval
    plugin's ``model_args``); a name two kinds share could not be routed and is an error here.
    """
    kinds: dict[str, str] = {}
    for kind, registry in RULE_REGISTRIES.items():
        for rule in registry.values():
            for field in dataclasses.fields(rule):
                if kinds.setdefault(field.name, kind) != kind:
                    raise ValueError(f"rule parameter {field.name!r} belongs to both {kinds[field.name]} and {kind} "
                                     "rules: rename one")
    return kinds


def _from_previous_format(entry: dict[str, Any], key: str, where: str, registry: dict[str, type]) -> dict[str, Any]:
    """The previous ``{"_target_": "tc_llava.model.rope.TADRoPE", "name": "tad", "gamma": 1.0}`` as a new entry."""
    fields = dict(entry)
    target = fields.pop("_target_")
    name = PREVIOUS_TARGETS.get(target) if isinstance(target, str) else None
    if name not in registry:
        raise ValueError(f"{where}._target_={target!r} is not a {key} rule of this project (a checkpoint names "
                         f"its rule by tc_llava.{key}.name; known: {', '.join(registry)})")
    for constant in ("name", "is_causal"):  # fields in the previous format, class constants now
        if constant in fields and fields.pop(constant) != getattr(registry[name], constant, None):
            raise ValueError(f"{where}.{constant}={entry[constant]!r} contradicts _target_={target!r}")
    return {"name": name, **fields}


def check_adapter_config(adapter_file: Path) -> None:
    """Refuse a peft adapter config that would make peft import a module; exports write plain LoRA.

    peft imports the module ``megatron_core`` names whenever ``megatron_config`` is set,
    and transformers loads an adapter found beside the weights by itself, so this runs
    before any loading.
    """
    adapter = json.loads(adapter_file.read_text())
    peft_type = adapter.get("peft_type") if isinstance(adapter, dict) else None
    if peft_type != "LORA":
        raise ValueError(
            f"{adapter_file}: peft_type must be 'LORA' (a LoRA adapter, as exports write), got {peft_type!r}"
        )
    if adapter.get("megatron_config") is not None:
        raise ValueError(f"{adapter_file}: megatron_config must be null (peft would import the module "
                         f"megatron_core={adapter.get('megatron_core')!r} names)")
