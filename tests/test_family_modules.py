"""A family is one module: every registered family builds its tiny model and survives save/load, and no
code outside ``tc_llava/model/families/`` branches on ``model_type`` (it asks the family)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import tc_llava
from tc_llava.model.families import FAMILIES, Family, family_of
from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.processors import VIDEO_PREPROCESSOR_FILE
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiny import tiny_checkpoint

from conftest import CONFIGS, REPO, TINY

PACKAGE = Path(tc_llava.__file__).parent
FAMILIES_DIR = PACKAGE / "model" / "families"
FRAMES = 2


def video_prompt(model: TCLlava, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One prompt ``[text, the video's placeholder run, text]`` and its frames."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, 500, (7,), generator=g).tolist()
    ids = torch.tensor([text[:3] + [model.placeholder_token_id] * model.tokens_per_video(frames) + text[3:]])
    size = model.config.vision_config.image_size
    return ids, torch.randn(1, frames, 3, size, size, generator=g)


@pytest.mark.parametrize("model_type", sorted(t for t, f in FAMILIES.items() if not f.multimodal_rope))
def test_every_family_builds_its_tiny_model_and_round_trips(model_type, cache_dir, tmp_path):
    family = FAMILIES[model_type]
    path = tiny_checkpoint(cache_dir, arch=model_type, **TINY)
    model = TCLlava.from_pretrained(path, rope=TADRoPE(), mask=FrameBlockCausalMask(), attn_implementation="sdpa")
    assert type(model.hf) is family.hf_class and model.family is family and model.config.model_type == model_type
    assert (model.video_preprocessor is None) == (family.video_processor_type is None)
    assert model.tokenizer.convert_ids_to_tokens(model.placeholder_token_id) == f"<{family.placeholder_kind}>"
    ids, pixels = video_prompt(model.eval(), FRAMES)
    with torch.no_grad():
        out = model(ids, pixel_values=pixels)
    assert int((out.frame_ids >= 0).sum()) == FRAMES * model.tokens_per_frame(FRAMES)  # every frame's tokens placed

    model.save_pretrained(tmp_path)
    reloaded = TCLlava.from_pretrained(tmp_path, attn_implementation="sdpa").eval()  # the rules from the export
    assert (reloaded.rope.name, reloaded.mask.name) == ("tad", "frame_block_causal")
    with torch.no_grad():
        again = reloaded(ids, pixel_values=pixels)
    assert torch.equal(again.logits, out.logits)
    if family.video_processor_type is not None:
        assert (tmp_path / VIDEO_PREPROCESSOR_FILE).read_bytes() == (path / VIDEO_PREPROCESSOR_FILE).read_bytes()


def test_an_unknown_model_type_names_the_families():
    with pytest.raises(ValueError, match=r"config.json: model_type 'qwen9_vl' is not one of \('llava', "):
        family_of("qwen9_vl", "config.json: model_type")


def test_each_tiny_model_option_uses_its_familys_chat_template():
    options = sorted(p.stem for p in (CONFIGS / "model").glob("tiny*.yaml"))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        chosen = {o: compose("train", overrides=[f"model={o}"]).model for o in options}
    assert {o: m.template for o, m in chosen.items()} == {o: FAMILIES[m.tiny.arch].template for o, m in chosen.items()}
    assert len(options) == 5  # tiny, tiny_next_video, tiny_onevision, tiny_qwen2_5_vl, tiny_qwen3_vl


@pytest.mark.parametrize("ckpt", ["tiny_llama", "tiny_onevision"])
def test_the_chat_command_suggests_the_familys_template(ckpt, request, tmp_path):
    from tc_llava import chat

    path, family = request.getfixturevalue(ckpt), {"tiny_llama": "llava", "tiny_onevision": "llava_onevision"}[ckpt]
    args = chat.parse_args([str(path), str(tmp_path / "clip.mp4"), "-q", "What?"])  # refused before decoding
    with pytest.raises(ValueError, match=rf"records no chat template: pass --template \({family} checkpoints use "
                                         rf"{FAMILIES[family].template};"):
        chat.run(args)


def model_type_branches(source: str) -> list[int]:
    """Lines of ``source`` that branch on a ``model_type``: a comparison or a match on it, or a lookup keyed by it."""
    def mentions(node: ast.AST) -> bool:
        return any((isinstance(n, ast.Attribute) and n.attr == "model_type")
                   or (isinstance(n, ast.Name) and n.id == "model_type")
                   or (isinstance(n, ast.Constant) and n.value == "model_type") for n in ast.walk(node))

    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and mentions(node):
            lines.append(node.lineno)
        elif isinstance(node, ast.Match) and mentions(node.subject):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and mentions(node.slice):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_module_outside_the_families_branches_on_model_type():
    files = [p for p in [*PACKAGE.rglob("*.py"), *(REPO / "scripts").rglob("*.py")] if FAMILIES_DIR not in p.parents]
    found = [f"{p.relative_to(REPO)}:{line}" for p in files for line in model_type_branches(p.read_text())]
    assert found == []
    assert len(files) > 50 and PACKAGE / "model" / "tiny.py" in files  # the scan saw the package


def test_the_branch_check_sees_a_branch():
    """The walker finds the forms a branch takes (or the test above could pass vacuously), and not a question
    put to the family."""
    source = """
if config.model_type == "llava_onevision":
    pass
elif model_type in ("llava", "llava_next"):
    pass
model = ARCHES[config.model_type](config)
kind = config.get("model_type") != "llava"
match hf.config.model_type:
    case "llava":
        pass
family = family_of(config.model_type)
name = family.model_type
"""
    assert model_type_branches(source) == [2, 4, 6, 7, 8]


def test_a_family_states_only_its_difference():
    """Every family module holds one Family subclass; what it does not override is the base's."""
    shared = ("__init__", "base", "qwen_vl", "qwen_vl_inputs")  # the registry, the bases, Qwen-VL's preprocessing
    modules = sorted(p.stem for p in FAMILIES_DIR.glob("*.py") if p.stem not in shared)
    assert modules == sorted(FAMILIES) and all(isinstance(f, Family) for f in FAMILIES.values())
    assert {t: type(f).__module__.rsplit(".", 1)[-1] for t, f in FAMILIES.items()} == {t: t for t in FAMILIES}
    assert "frame_features" not in vars(type(FAMILIES["llava"]))
    assert "frame_grid" not in vars(type(FAMILIES["llava_next"]))
