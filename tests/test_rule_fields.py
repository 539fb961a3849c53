"""Every field of every registered rule can be set everywhere a rule is made: the train and eval Hydra
configs (``rope=NAME rope.FIELD=VALUE``, as plain overrides: the option's yaml lists every field), the
lmms-eval plugin's ``model_args`` (:func:`rule_parameters` routes each field, :func:`build_rule` makes the
rule), and it survives export (``config.json``) and reload unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hydra import compose, initialize_config_dir

from tc_llava.configs import CONFIG_DIR
from tc_llava.model.build import model_from_config
from tc_llava.model.settings import RULE_REGISTRIES, build_rule, rule_parameters
from tc_llava.model.tc_llava import TCLlava

# A non-default value of every rule field, valid on the tiny models (head_dim 16: 8 frequency pairs).
VALUES = {"gamma": 0.5, "mrope_section": [4, 2, 2], "delta": 0.5, "temporal_pairs": 2}
RULES = [(kind, name) for kind, registry in RULE_REGISTRIES.items() for name in registry]
OTHER = {"rope": ("mask", "frame_block_causal"), "mask": ("rope", "tad")}  # train.yaml's defaults, set beside


def _fields(kind: str, name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(RULE_REGISTRIES[kind][name])]


def test_every_field_has_a_value_here_and_a_route_in_the_plugin():
    fields = {field for kind, name in RULES for field in _fields(kind, name)}
    assert fields == set(VALUES)  # a new rule field must be added to VALUES, and so to this test
    routes = rule_parameters()
    assert {field: routes[field] for field in fields} == {
        field: kind for kind, name in RULES for field in _fields(kind, name)}


@pytest.mark.parametrize("kind, name", RULES)
def test_every_field_is_set_by_config_plugin_and_export(kind, name, tiny_llama, tmp_path):
    params = {field: VALUES[field] for field in _fields(kind, name)}
    expected = RULE_REGISTRIES[kind][name](**params)
    other_kind, other_name = OTHER[kind]
    overrides = [f"{kind}={name}", *(f"{kind}.{k}={json.dumps(v, separators=(',', ':'))}" for k, v in params.items()),
                 f"{other_kind}={other_name}", "model=pretrained", f"model.checkpoint={tiny_llama}",
                 "model.dtype=float32"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        models = {primary: model_from_config(compose(primary, overrides=overrides)) for primary in ("train", "eval")}
    for model in models.values():
        assert getattr(model, kind) == expected
    assert build_rule(kind, name, dict(params), f"model_args {kind}") == expected  # the plugin's way

    models["train"].save_pretrained(tmp_path / "export")
    recorded = json.loads((tmp_path / "export" / "config.json").read_text())["tc_llava"][kind]
    assert recorded == {"name": name, **params}
    assert getattr(TCLlava.from_pretrained(tmp_path / "export"), kind) == expected
