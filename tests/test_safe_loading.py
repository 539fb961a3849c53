"""Loading a checkpoint never runs code that comes with it.

Each test writes a hostile file into a copy of a tiny checkpoint: a rule naming a callable
(``builtins.print``, ``os.system``, ``pathlib.Path.touch``, a pickle load calling ``Path.write_text``),
an ``auto_map`` to a local module, a pickle payload as ``pytorch_model.bin``, a peft adapter
config naming a module. A payload that runs creates ``sentinel`` (or prints); the tests show
that none does and that loading stops with an error naming the file and the field, instead
of falling back to vanilla RoPE and the causal mask.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import dynamic_module_utils

from tc_llava.model.masks import BidirectionalVisualMask, CausalMask, FrameBlockCausalMask
from tc_llava.model.rope import MRoPE, TADRoPE, VanillaRoPE, VideoRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.train.tuning import lora_config

ROPE_NAMES = "known: vanilla, tad, mrope, videorope"


class WriteSentinel:
    """Unpickling this calls ``Path.write_text(sentinel, ...)``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self):
        return pathlib.Path.write_text, (self.sentinel, "pickle ran")


def copy_checkpoint(source: Path, dest: Path, tc_llava: object = None) -> Path:
    """``source`` copied to ``dest``; ``tc_llava`` (unless None) replaces config.json's entry."""
    shutil.copytree(source, dest)
    if tc_llava is not None:
        config = json.loads((dest / "config.json").read_text())
        config["tc_llava"] = tc_llava
        (dest / "config.json").write_text(json.dumps(config))
    return dest


def edit_json(path: Path, **entries: object) -> None:
    data = json.loads(path.read_text())
    data.update(entries)
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- rules naming callables
def hostile_ropes(ckpt: Path, sentinel: Path) -> dict[str, dict]:
    """Rope entries that call something; the previous loader ran print, touch, the pickle and our own builder
    (Hydra 1.3.8's blocklist stopped os.system), then loaded vanilla RoPE."""
    pickled = ckpt / "payload.pkl"  # a file shipped with the checkpoint
    pickled.write_bytes(pickle.dumps(WriteSentinel(sentinel)))
    return {
        "print": {"_target_": "builtins.print", "_args_": [f"PRINTED {sentinel}"]},
        "os.system": {"_target_": "os.system", "_args_": [f"touch {sentinel}"]},
        "Path.touch": {"_target_": "pathlib.Path.touch", "_args_": [str(sentinel)]},
        "pickle load": {"_target_": "numpy.load", "file": str(pickled), "allow_pickle": True},
        "partial": {"_target_": "pathlib.Path.touch", "_partial_": True, "self": str(sentinel)},
        "own function": {"_target_": "tc_llava.model.tiny.tiny_checkpoint", "cache_dir": str(sentinel)},
    }


@pytest.mark.parametrize("payload", ["print", "os.system", "Path.touch", "pickle load", "partial", "own function"])
def test_rule_naming_a_callable_never_runs(tiny_llama, tmp_path, capfd, payload):
    sentinel = tmp_path / "sentinel"
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "ckpt")
    rope = hostile_ropes(ckpt, sentinel)[payload]
    edit_json(ckpt / "config.json", tc_llava={"rope": rope, "mask": {"name": "causal"}})
    expect = re.escape(f"{ckpt / 'config.json'}: tc_llava.rope._target_={rope['_target_']!r} is not")
    with pytest.raises(ValueError, match=expect + r".*" + ROPE_NAMES):
        TCLlava.from_pretrained(ckpt)
    assert not sentinel.exists() and "PRINTED" not in capfd.readouterr().out


def test_nested_callable_inside_one_of_our_rules_never_runs(tiny_llama, tmp_path):
    sentinel = tmp_path / "sentinel"
    rope = {"_target_": "tc_llava.model.rope.TADRoPE", "name": "tad",
            "gamma": {"_target_": "pathlib.Path.touch", "_args_": [str(sentinel)]}}
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "ckpt", {"rope": rope})
    expect = re.escape(f"{ckpt / 'config.json'}: tc_llava.rope.gamma must be a finite number >= 0, got {{'_target_'")
    with pytest.raises(ValueError, match=expect):
        TCLlava.from_pretrained(ckpt)
    assert not sentinel.exists()


# --------------------------------------------------------------------------- malformed settings
NAN = float("nan")


@pytest.mark.parametrize("settings, field, message", [
    ({"rope": {"name": "tad2"}}, "rope.name", "='tad2' is not a rope rule; " + ROPE_NAMES),
    ({"rope": {"gamma": 1.0}}, "rope.name", "=None is not a rope rule; " + ROPE_NAMES),
    ({"mask": {"name": "full"}}, "mask.name", "='full' is not a mask rule; known: causal, frame_block_causal, "
                                              "bidirectional_visual"),
    ({"rope": {"name": "tad", "beta": 2.0}}, "rope.beta", " is not a parameter of rope=tad (its parameters: gamma)"),
    ({"mask": {"name": "causal", "is_causal": False}}, "mask.is_causal",
     " is not a parameter of mask=causal (its parameters: none)"),
    ({"rope": {"name": "tad", "gamma": "abc"}}, "rope.gamma", " must be a finite number >= 0, got 'abc'"),
    ({"rope": {"name": "tad", "gamma": NAN}}, "rope.gamma", " must be a finite number >= 0, got nan"),
    ({"rope": {"name": "tad", "gamma": -0.5}}, "rope.gamma", " must be a finite number >= 0, got -0.5"),
    ({"rope": {"name": "videorope", "delta": NAN}}, "rope.delta", " must be a finite number >= 0, got nan"),
    ({"rope": {"name": "videorope", "temporal_pairs": 1.5}}, "rope.temporal_pairs", " must be an integer >= 0"),
    ({"rope": {"name": "mrope", "mrope_section": ["16", 24, 24]}}, "rope.mrope_section",
     " must be 3 integers >= 0 (t, h, w), got ['16', 24, 24]"),
    ({"rope": ["tad"]}, "rope", " must be an object {\"name\": ..., parameters}, got ['tad']"),
    ({"pooling_shape": [8, 0, 2]}, "pooling_shape", " must be 3 integers >= 1 (T, H, W), got [8, 0, 2]"),
    ({"pooling": [8, 2, 2]}, "pooling", " is not a TC-LLaVA setting (known: rope, mask, pooling_shape, template)"),
    ({"rope": {"_target_": "tc_llava.model.rope.TADRoPE", "name": "vanilla", "gamma": 1.0}}, "rope.name",
     "='vanilla' contradicts _target_='tc_llava.model.rope.TADRoPE'"),
    ({"mask": {"_target_": "tc_llava.model.masks.FrameBlockCausalMask", "name": "frame_block_causal",
               "is_causal": True}}, "mask.is_causal",
     "=True contradicts _target_='tc_llava.model.masks.FrameBlockCausalMask'"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_malformed_settings_are_refused_naming_file_and_field(tiny_llama, tmp_path, settings, field, message):
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "ckpt", settings)
    with pytest.raises(ValueError, match="^" + re.escape(f"{ckpt / 'config.json'}: tc_llava.{field}{message}")):
        TCLlava.from_pretrained(ckpt)


# --------------------------------------------------------------------------- the saved form and the previous one
@pytest.mark.parametrize("rope, mask", [
    (VanillaRoPE(), CausalMask()),
    (TADRoPE(gamma=0.5), FrameBlockCausalMask()),
    (MRoPE(mrope_section=(2, 3, 3)), BidirectionalVisualMask()),
    (VideoRoPE(delta=0.5, temporal_pairs=2), FrameBlockCausalMask()),
], ids=["vanilla", "tad", "mrope", "videorope"])
def test_previous_format_loads_the_same_rules(tiny_llama, tmp_path, rope, mask):
    """Checkpoints written before rules were saved by name: ``_target_`` = our class's dotted path."""

    def previous(rule: object, **constants: object) -> dict:
        cls = type(rule)
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(rule).items()}
        return {"_target_": f"{cls.__module__}.{cls.__qualname__}", **fields, "name": rule.name, **constants}

    settings = {"rope": previous(rope), "mask": previous(mask, is_causal=mask.is_causal), "pooling_shape": None}
    again = TCLlava.from_pretrained(copy_checkpoint(tiny_llama, tmp_path / "ckpt", settings))
    assert again.rope == rope and type(again.rope) is type(rope) and type(again.mask) is type(mask)


def test_saved_rules_round_trip_by_name(tiny_llama, tmp_path):
    for i, rope in enumerate((VanillaRoPE(), TADRoPE(gamma=0.0), MRoPE(), VideoRoPE(delta=0.0, temporal_pairs=4))):
        model = TCLlava.from_pretrained(tiny_llama, rope=rope, mask=BidirectionalVisualMask())
        model.save_pretrained(tmp_path / str(i))
        saved = json.loads((tmp_path / str(i) / "config.json").read_text())["tc_llava"]
        assert saved["rope"]["name"] == rope.name and "_target_" not in saved["rope"]
        again = TCLlava.from_pretrained(tmp_path / str(i))
        assert again.rope == rope and type(again.rope) is type(rope) and isinstance(again.mask, BidirectionalVisualMask)


# --------------------------------------------------------------------------- transformers and peft files
EVIL_MODULE = """\
open({sentinel!r}, "a").write(__name__)
from transformers import LlavaForConditionalGeneration as EvilModel, LlavaConfig as EvilConfig
from transformers import PreTrainedTokenizerFast as EvilTokenizer, CLIPImageProcessor as EvilProcessor
"""


def auto_map_checkpoint(source: Path, tmp_path: Path, sentinel: Path) -> Path:
    """A checkpoint whose config, tokenizer and image processor point at a local module, plus a custom generate()."""
    ckpt = copy_checkpoint(source, tmp_path / "ckpt")
    (ckpt / "evil.py").write_text(EVIL_MODULE.format(sentinel=str(sentinel)))
    (ckpt / "custom_generate").mkdir()
    (ckpt / "custom_generate" / "generate.py").write_text(EVIL_MODULE.format(sentinel=str(sentinel)))
    edit_json(ckpt / "config.json", auto_map={"AutoConfig": "evil.EvilConfig",
                                              "AutoModelForImageTextToText": "evil.EvilModel"})
    edit_json(ckpt / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})
    edit_json(ckpt / "preprocessor_config.json", auto_map={"AutoImageProcessor": "evil.EvilProcessor"})
    return ckpt


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Where transformers would copy a checkpoint's modules to import them: kept inside the test."""
    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(tmp_path / "modules"))


def test_auto_map_and_custom_generate_are_never_imported(tiny_llama, tmp_path, modules_cache, monkeypatch):
    sentinel = tmp_path / "sentinel"
    ckpt = auto_map_checkpoint(tiny_llama, tmp_path, sentinel)
    monkeypatch.setattr("builtins.input", lambda *a: "y")  # a user who says yes to any prompt
    model = TCLlava.from_pretrained(ckpt)
    assert not sentinel.exists()
    for part in (model.hf, model.tokenizer, model.image_processor):
        assert type(part).__module__.startswith("transformers."), type(part)


def test_remote_code_cannot_be_opted_into(tiny_llama, tmp_path, modules_cache):
    sentinel = tmp_path / "sentinel"
    ckpt = auto_map_checkpoint(tiny_llama, tmp_path, sentinel)
    with pytest.raises(TypeError, match="multiple values for keyword argument 'trust_remote_code'"):
        TCLlava.from_pretrained(ckpt, trust_remote_code=True)
    assert not sentinel.exists()


@pytest.mark.parametrize("opt_out", [{}, {"weights_only": False}], ids=["default", "weights_only=False"])
def test_pickled_weights_never_run(tiny_llama, tmp_path, opt_out):
    sentinel = tmp_path / "sentinel"
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    torch.save({"payload": WriteSentinel(sentinel)}, ckpt / "pytorch_model.bin")
    if opt_out:
        with pytest.raises(TypeError, match="multiple values for keyword argument 'weights_only'"):
            TCLlava.from_pretrained(ckpt, **opt_out)
    else:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            TCLlava.from_pretrained(ckpt)
    assert not sentinel.exists()


@pytest.mark.parametrize("entries, message", [
    ({"megatron_config": {"num_layers": 2}, "megatron_core": "megatron.core"},
     "megatron_config must be null (peft would import the module megatron_core='megatron.core' names)"),
    ({"peft_type": "BOFT"}, "peft_type must be 'LORA' (a LoRA adapter, as exports write), got 'BOFT'"),
], ids=["megatron_core", "peft_type"])
def test_adapter_config_naming_a_module_is_refused(tiny_llama, tmp_path, monkeypatch, entries, message):
    sentinel = tmp_path / "sentinel"
    package = tmp_path / "site" / "megatron" / "core"  # what a checkpoint shipped in the working directory could be
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text(f"open({str(sentinel)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    ckpt = copy_checkpoint(tiny_llama, tmp_path / "ckpt")
    model = TCLlava.from_pretrained(tiny_llama)
    lora = get_peft_model(model.hf, lora_config(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(ckpt)  # adapter_config.json + adapter_model.safetensors, as an export writes them
    edit_json(ckpt / "adapter_config.json", **entries)
    with pytest.raises(ValueError, match="^" + re.escape(f"{ckpt / 'adapter_config.json'}: {message}")):
        TCLlava.from_pretrained(ckpt)
    assert not sentinel.exists()

