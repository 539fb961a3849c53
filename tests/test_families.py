"""The video families (LLaVA-OneVision, LLaVA-NeXT-Video) on tiny random checkpoints: parity with HF's
unpatched classes, mixed batches (an image beside videos of other frame counts) against dense and
literal references, KV-cache generation, export/reload with its processors, the training loss of a
mixed batch, and the errors that name what is wrong."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.video_processing_auto import get_video_processor_config
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2

from tc_llava.data.collate import MODEL_KEYS, SFTCollator
from tc_llava.data.datasets import SFTDataset
from tc_llava.data.video import sample_frames
from tc_llava.model.masks import BidirectionalVisualMask, CausalMask, FrameBlockCausalMask
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.processors import VIDEO_PREPROCESSOR_FILE
from tc_llava.model.rope import MRoPE, TADRoPE, VanillaRoPE, VideoRoPE
from tc_llava.model.tc_llava import TCLlava

from test_datasets import write_video
from test_rope_masks import dense_reference, reference_positions

FAMILIES = ["tiny_onevision", "tiny_next_video"]
# What each tiny family puts in the prompt per frame, known from the architecture rather than the code:
# OneVision's 5x5 SigLIP grid bilinear-pooled to ceil(5/2)^2 = 9 and one newline after the video;
# NeXT-Video's 4x4 CLIP grid (CLS dropped) average-pooled with stride 2 to 4, nothing after.
PER_FRAME = {"llava_onevision": 9, "llava_next_video": 4}
NEWLINE = {"llava_onevision": 1, "llava_next_video": 0}
MIXED = [(3, 1, 4), (2, 2, 1), (5, 4, 2)]  # (text before, frames, text after): an image, 2 and 4 frames


def load(path, rope=None, mask=None, pooling=None, impl="sdpa") -> TCLlava:
    return TCLlava.from_pretrained(path, rope=rope, mask=mask, pooling=pooling, attn_implementation=impl).eval()


def prompts(model: TCLlava, layouts, side: str, seed: int = 0, pooled_frames=None):
    """Prompts ``[text, placeholder run, text]``, the frame ids expected of them (built from the layout alone),
    every sample's frames ``[N, C, H, W]`` and their counts."""
    g = torch.Generator().manual_seed(seed)
    family = model.config.model_type
    rows, expected = [], []
    for before, frames, after in layouts:
        shown = frames if pooled_frames is None else pooled_frames(frames)
        per_frame = PER_FRAME[family] if pooled_frames is None else 4  # pooled to 2x2 in space
        layout = [-1] * before + [f for f in range(shown) for _ in range(per_frame)] + [-1] * NEWLINE[family]
        n_visual = len(layout) - before
        text = torch.randint(10, 500, (before + after,), generator=g).tolist()
        rows.append(text[:before] + [model.placeholder_token_id] * n_visual + text[before:])
        expected.append(layout + [-1] * after)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), model.tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    frame_ids = torch.full((len(rows), width), -1)
    for b, (row, layout) in enumerate(zip(rows, expected)):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, sl], mask[b, sl], frame_ids[b, sl] = torch.tensor(row), 1, torch.tensor(layout)
    size = model.config.vision_config.image_size
    counts = [frames for _, frames, _ in layouts]
    pixels = torch.randn(sum(counts), 3, size, size, generator=g)
    return ids, mask, pixels, torch.tensor(counts), frame_ids


# --------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("ckpt", FAMILIES)
def test_vanilla_causal_equals_unpatched_hf_on_video(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ours = load(path, VanillaRoPE(), CausalMask())
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    ids, mask, pixels, counts, _ = prompts(ours, [(5, 3, 7), (2, 3, 3), (9, 3, 1)], "left")
    videos = pixels.unflatten(0, (3, 3))
    with torch.no_grad():
        a = ours(ids, mask, videos).logits
        b = hf(input_ids=ids, attention_mask=mask, pixel_values_videos=videos,
               position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
        packed = ours(ids, mask, pixels, num_frames=counts).logits  # the same batch as [N, C, H, W] + counts
    real = mask.bool()
    assert (a - b)[real].abs().max().item() <= 1e-5
    assert torch.equal(a, packed)


# --------------------------------------------------------------------------- mixed batches
def record_masks(monkeypatch, impl: str) -> list:
    seen = []
    llm_attention = (modeling_llama.LlamaAttention, modeling_qwen2.Qwen2Attention)
    if impl == "eager":
        for module in (modeling_llama, modeling_qwen2):
            original = module.eager_attention_forward
            monkeypatch.setattr(module, "eager_attention_forward",
                                lambda m, q, k, v, a, _o=original, **kw: (seen.append(a == 0), _o(m, q, k, v, a, **kw))[1])
    else:
        original = ALL_ATTENTION_FUNCTIONS[impl]

        def recorder(module, q, k, v, attention_mask, **kw):
            if isinstance(module, llm_attention):  # not the vision tower's layers
                seen.append(attention_mask)
            return original(module, q, k, v, attention_mask, **kw)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, impl, recorder)
    return seen


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("ckpt", FAMILIES)
def test_mixed_batch_layout_mask_and_angles_equal_the_references(ckpt, impl, request, monkeypatch):
    """An image (one frame) beside 2- and 4-frame videos, right-padded: the frame ids, the mask every
    LLM layer receives and the rotary angles inside the layers follow each sample's own frames."""
    model = load(request.getfixturevalue(ckpt), TADRoPE(gamma=0.5), FrameBlockCausalMask(), impl=impl)
    ids, mask, pixels, counts, expected = prompts(model, MIXED, "right", seed=1)
    seen = record_masks(monkeypatch, impl)
    captured = {}
    layer = model.language_model.layers[1].self_attn
    handle = layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(zip(("cos", "sin"), kwargs["position_embeddings"])),
        with_kwargs=True)
    with torch.no_grad():
        out = model(ids, mask, pixels, num_frames=counts)
    handle.remove()
    assert torch.equal(out.frame_ids, expected)
    assert len(seen) == model.config.text_config.num_hidden_layers
    real = mask.bool()
    cfg = model.config.text_config
    dim = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    for b in range(len(MIXED)):
        frames, keep = expected[b][real[b]].tolist(), real[b]
        reference = dense_reference(expected[b].tolist(), mask[b].tolist())
        for got in seen:
            assert torch.equal(got[b, 0].expand_as(reference)[keep], reference[keep])
        angles = torch.tensor(reference_positions(frames, 0.5))[:, None] * inv_freq
        torch.testing.assert_close(captured["cos"][b][keep], torch.cat([angles, angles], -1).cos())
        torch.testing.assert_close(captured["sin"][b][keep], torch.cat([angles, angles], -1).sin())


RULES = {"tad": (TADRoPE(), FrameBlockCausalMask()), "mrope": (MRoPE(), BidirectionalVisualMask()),
         "videorope": (VideoRoPE(), FrameBlockCausalMask())}


@pytest.mark.parametrize("rules", sorted(RULES))
@pytest.mark.parametrize("pooled", [False, True], ids=["mlp", "pllava_pool"])
@pytest.mark.parametrize("ckpt", FAMILIES)
def test_mixed_batch_equals_each_sample_alone(ckpt, pooled, rules, request):
    """Positions, mask and pooling follow each sample's frame count, and no sample leaks into another, under
    every rope family. Pooled to (2, 2, 2): the image keeps its one frame, 2 and 4 frames pool to 2."""
    pooling = VideoPooling([2, 2, 2]) if pooled else None
    model = load(request.getfixturevalue(ckpt), *RULES[rules], pooling)
    pooled_frames = (lambda n: min(n, 2)) if pooled else None
    ids, mask, pixels, counts, expected = prompts(model, MIXED, "right", seed=2, pooled_frames=pooled_frames)
    with torch.no_grad():
        out = model(ids, mask, pixels, num_frames=counts)
        assert torch.equal(out.frame_ids, expected)
        for b, frames in enumerate(pixels.split(counts.tolist())):
            real = mask[b].bool()
            alone = model(ids[b:b + 1, real], pixel_values=frames[None]).logits[0]
            torch.testing.assert_close(out.logits[b, real], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_block_merge_equals_sdpa(ckpt, request, monkeypatch):
    """The block decomposition, on rows of equal frame counts and (through its variable-length segments) on a
    mixed image/video batch, gives SDPA's loss and gradients with the families' layouts (OneVision's newline
    after the last frame)."""
    from tc_llava.model import attention

    calls = []
    merge = attention.block_merge_attention
    monkeypatch.setattr(attention, "block_merge_attention", lambda *a: calls.append(1) or merge(*a))
    path = request.getfixturevalue(ckpt)
    for layouts in ([(3, 3, 4), (1, 3, 6)], MIXED):
        calls.clear()
        losses, grads = {}, {}
        for impl in ("sdpa", "block_merge"):
            model = load(path, TADRoPE(), FrameBlockCausalMask(), impl=impl).train()
            ids, mask, pixels, counts, _ = prompts(model, layouts, "right", seed=4)
            losses[impl] = model(ids, mask, pixels, labels=ids.masked_fill(mask == 0, -100), num_frames=counts).loss
            losses[impl].backward()
            grads[impl] = model.language_model.layers[0].self_attn.q_proj.weight.grad
        assert len(calls) == 2  # one call per layer: the decomposition applies
        torch.testing.assert_close(losses["block_merge"], losses["sdpa"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads["block_merge"], grads["sdpa"], rtol=1e-4, atol=1e-6)


def test_qwen2_rope_base_and_scaling_are_respected(tiny_onevision):
    """Positions go through the LLM's own rotary module: with linear scaling (factor 4) the angles inside the
    layers are the dual-RoPE positions times Qwen2's inverse frequencies over 4, and vanilla is still HF."""
    from transformers import AutoConfig, LlavaOnevisionForConditionalGeneration

    config = AutoConfig.from_pretrained(tiny_onevision)
    config.text_config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
    config.text_config._attn_implementation = config.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration(config).eval()
    tokenizer = load(tiny_onevision).tokenizer
    ids, mask, pixels, counts, expected = prompts(load(tiny_onevision), [(2, 2, 3)], "left")
    with torch.no_grad():
        reference = hf(input_ids=ids, pixel_values_videos=pixels[None]).logits
        model = TCLlava(hf, tokenizer=tokenizer)
        torch.testing.assert_close(model(ids, mask, pixels[None]).logits, reference, rtol=0, atol=1e-5)
    model.rope = TADRoPE(gamma=0.5)
    captured = {}
    handle = model.language_model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(cos=kwargs["position_embeddings"][0]), with_kwargs=True)
    with torch.no_grad():
        model(ids, mask, pixels[None])
    handle.remove()
    dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, dim, 2).float() / dim)) / 4.0
    angles = torch.tensor(reference_positions(expected[0].tolist(), 0.5))[:, None] * inv_freq
    torch.testing.assert_close(captured["cos"][0], torch.cat([angles, angles], -1).cos())


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_generation_with_mixed_frames_equals_recompute_and_batch_one(ckpt, request):
    model = load(request.getfixturevalue(ckpt), TADRoPE(), FrameBlockCausalMask())
    ids, mask, pixels, counts, _ = prompts(model, MIXED, "left", seed=3)
    gen = model.generate(ids, mask, pixels, num_frames=counts, max_new_tokens=5, output_scores=True, eos_token_id=[])
    scores = torch.stack(gen.scores, 1)
    full_ids = torch.cat([ids, gen.sequences[:, :-1]], -1)
    full_mask = torch.cat([mask, torch.ones_like(gen.sequences[:, :-1])], -1)
    with torch.no_grad():
        logits = model(full_ids, full_mask, pixels, num_frames=counts).logits[:, ids.shape[1] - 1:]
    torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-4)
    for b, frames in enumerate(pixels.split(counts.tolist())):
        one = model.generate(ids[b:b + 1, mask[b].bool()], None, frames[None], max_new_tokens=5, output_scores=True,
                             eos_token_id=[])
        assert torch.equal(one.sequences[0], gen.sequences[b])
        torch.testing.assert_close(torch.stack(one.scores, 1)[0], scores[b], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- export and reload
@pytest.mark.parametrize("ckpt", FAMILIES)
def test_export_reloads_with_identical_logits_and_preprocessing(ckpt, request, tmp_path):
    source = request.getfixturevalue(ckpt)
    model = load(source, TADRoPE(gamma=0.5), FrameBlockCausalMask(), VideoPooling([2, 2, 2]))
    model.frame_sampling = {"num_frames": 4, "image_frames": 1, "sampling": "random"}
    model.save_pretrained(tmp_path / "export")
    again = TCLlava.from_pretrained(tmp_path / "export").eval()
    assert again.rope == TADRoPE(gamma=0.5) and again.pooling.pooling_shape == (2, 2, 2)
    assert again.frame_sampling == model.frame_sampling and again.tokenizer.video_token == "<video>"
    saved = json.loads((tmp_path / "export" / VIDEO_PREPROCESSOR_FILE).read_text())
    assert saved == json.loads((source / VIDEO_PREPROCESSOR_FILE).read_text())
    assert get_video_processor_config(str(tmp_path / "export")) == saved  # what AutoVideoProcessor reads
    video = write_video(tmp_path / "clip.mp4", 24, size=90)
    frames, _ = sample_frames(video, 4, "middle", backend="pyav")
    pixels = model.frame_processor(images=list(frames), return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, again.frame_processor(images=list(frames), return_tensors="pt")["pixel_values"])
    size = model.config.vision_config.image_size
    assert pixels.shape == (4, 3, size, size)
    ids, mask, _, _, _ = prompts(model, [(3, 4, 2), (1, 4, 5)], "left", pooled_frames=lambda n: 2)
    with torch.no_grad():
        videos = pixels[None].expand(2, -1, -1, -1, -1)
        torch.testing.assert_close(model(ids, mask, videos).logits, again(ids, mask, videos).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------- training on a mixed batch
@pytest.fixture(scope="module")
def mixed_corpora(tmp_path_factory):
    """An image corpus and two video corpora of 2 and 4 frames per video."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    write_video(root / "a.mp4", 20, shade=10)
    write_video(root / "b.mp4", 30, shade=90)
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "still.png")
    corpora = {}
    for name, media, frames in (("images", "still.png", None), ("short", "a.mp4", 2), ("long", "b.mp4", 4)):
        key = "image" if media.endswith("png") else "video"
        records = [{key: media, "QA": [{"i": "", "q": f"What is {name}?", "a": f"It is {name} {k}."}]}
                   for k in range(2)]
        (root / f"{name}.json").write_text(json.dumps(records))
        corpora[name] = {"json": str(root / f"{name}.json"), "media_root": str(root), "type": "videochat2",
                         "weight": 1.0, "num_frames": frames}
    return corpora


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_training_step_on_a_mixed_batch_equals_the_per_sample_losses(ckpt, request, mixed_corpora):
    """A step on [image, 2-frame, 4-frame] samples: the loss is the per-sample losses weighted by their label
    tokens, and so are the gradients (no sample leaks into another)."""
    model = TCLlava.from_pretrained(request.getfixturevalue(ckpt), rope=TADRoPE(), mask=FrameBlockCausalMask(),
                                    attn_implementation="sdpa", template="chatml")
    dataset = SFTDataset(mixed_corpora, model.tokenizer, model.frame_processor, model.tokens_per_video, num_frames=8,
                         template="chatml", train=False, backend="pyav", image_frames=1, epoch_size=6)
    samples = [dataset[i] for i in range(6)]
    samples = [next(s for s in samples if s["num_frames"] == n) for n in (1, 2, 4)]
    assert [s["is_image"] for s in samples] == [True, False, False]
    collate = SFTCollator(model.tokenizer.pad_token_id)
    batch = collate(samples)
    assert batch["pixel_values"].shape[0] == 7 and batch["num_frames"].tolist() == [1, 2, 4]
    assert batch["media"] == {"frames": 7, "visual_tokens": sum(model.tokens_per_video(n) for n in (1, 2, 4)),
                              "images": 1}

    def loss_and_grads(b):
        model.zero_grad()
        loss = model(**{k: b[k] for k in MODEL_KEYS if k in b}).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, int((b["labels"][:, 1:] != -100).sum())

    whole, whole_grads, total = loss_and_grads(batch)
    parts = [loss_and_grads(collate([s])) for s in samples]
    assert sum(n for _, _, n in parts) == total
    torch.testing.assert_close(whole, sum(loss * n for loss, _, n in parts) / total, rtol=1e-5, atol=1e-6)
    assert "hf.model.multi_modal_projector.linear_1.weight" in whole_grads
    for name, grad in whole_grads.items():
        expect = sum(g[name] * n for _, g, n in parts) / total
        torch.testing.assert_close(grad, expect, rtol=1e-4, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("ckpt", FAMILIES)
def test_a_placeholder_count_that_does_not_match_the_frames_names_the_sample(ckpt, request):
    model = load(request.getfixturevalue(ckpt), TADRoPE(), FrameBlockCausalMask())
    ids, mask, pixels, counts, _ = prompts(model, MIXED, "right")
    expected = model.tokens_per_video(2)
    with pytest.raises(ValueError, match=rf"sample 1: found {expected} video tokens \(id {model.placeholder_token_id}\) "
                                         rf"in 1 run\(s\); expected one video placeholder expanded to "
                                         rf"{model.tokens_per_video(3)} tokens for 3 frames"):
        model(ids, mask, pixels, num_frames=[1, 3, 3])
    with pytest.raises(ValueError, match=r"num_frames \[1, 2, 3\] must be positive counts summing to the 7 frames"):
        model(ids, mask, pixels, num_frames=[1, 2, 3])
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, T, C, H, W\] .* or every sample's frames"):
        model(ids, mask, pixels)


def test_family_and_processor_mismatches_are_refused(tiny_onevision, tiny_next_video, tiny_llama, tmp_path):
    wrong_tokenizer = shutil.copytree(tiny_onevision, tmp_path / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, wrong_tokenizer / name)
    with pytest.raises(ValueError, match=r"family/processor mismatch: the tokenizer's video placeholder is '<image>' "
                                         r"\(id 4\), but llava_onevision prompts hold its video_token_id 7"):
        TCLlava.from_pretrained(wrong_tokenizer)
    wrong_video = shutil.copytree(tiny_onevision, tmp_path / "video")
    shutil.copy(tiny_next_video / VIDEO_PREPROCESSOR_FILE, wrong_video / VIDEO_PREPROCESSOR_FILE)
    with pytest.raises(ValueError, match=re.escape("video_processor_type 'LlavaNextVideoVideoProcessor' does not "
                                                   "preprocess llava_onevision frames")):
        TCLlava.from_pretrained(wrong_video)
    config = json.loads((tiny_onevision / VIDEO_PREPROCESSOR_FILE).read_text())
    (wrong_video / VIDEO_PREPROCESSOR_FILE).write_text(json.dumps({**config, "size": {"height": 56, "width": 56}}))
    with pytest.raises(ValueError, match=re.escape("the video processor gives (56, 56) frames, the llava_onevision "
                                                   "vision tower takes (70, 70)")):
        TCLlava.from_pretrained(wrong_video)
    (wrong_video / VIDEO_PREPROCESSOR_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{VIDEO_PREPROCESSOR_FILE} not found: llava_onevision preprocesses"):
        TCLlava.from_pretrained(wrong_video)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_a_frame_count_the_pooling_cannot_take_is_refused(ckpt, request):
    model = load(request.getfixturevalue(ckpt), pooling=VideoPooling([4, 2, 2]))
    assert model.tokens_per_video(1) == 4 + NEWLINE[model.config.model_type]  # an image: pooled in space only
    with pytest.raises(ValueError, match=re.escape("projector.pooling_shape=[4, 2, 2] cannot be pooled: its T=4 exceeds "
                                                   "the 2 frames given (valid: T 1..2, or use at least 4 frames)")):
        model.tokens_per_video(2)
    too_wide = load(request.getfixturevalue(ckpt), pooling=VideoPooling([1, 4, 4]))
    side = model.grid[0]
    with pytest.raises(ValueError, match=re.escape(f"its 4x4 spatial shape exceeds the {side}x{side} token grid")):
        too_wide.tokens_per_video(4)


# --------------------------------------------------------------------------- the apps, unchanged
@pytest.mark.parametrize("option", ["tiny_onevision", "tiny_next_video"])
def test_an_ablation_job_trains_exports_and_scores_a_video_family(option, tmp_path):
    """``python -m tc_llava.ablation model=tiny_onevision``'s job: train (the family's <video> placeholder and
    video processor), export (with the processors and the frame sampling), then the MVBench protocol on it."""
    from hydra import compose, initialize_config_dir

    from tc_llava.ablation.job import evaluate_run
    from tc_llava.data.synthetic import generate
    from tc_llava.train.loop import train

    from conftest import CONFIGS, TINY

    data = tmp_path / "data"
    generate(data / "ablation", num_train=8, num_eval_per_task=1, seed=0, num_frames=8)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=ablation", f"model={option}", "rope=tad", "mask=frame_block_causal", f"paths.data={data}",
            f"run_dir={tmp_path / 'run'}", *[f"model.tiny.{k}={v}" for k, v in TINY.items()], "data.num_workers=0",
            "data.batch_size=4", "trainer.max_steps=2", "ablation.benchmark.decode.num_workers=0",
        ])
    result = train(cfg)
    export = TCLlava.from_pretrained(result["export"])
    assert result["media"] == {"frames": 2 * 4 * 4, "visual_tokens": 2 * 4 * export.tokens_per_video(4), "images": 0}
    assert export.config.model_type == option.replace("tiny_", "llava_") and export.template == cfg.model.template
    assert export.frame_sampling == {"num_frames": 4, "image_frames": 1, "sampling": "random", "system": ""}
    assert (tmp_path / "run" / "export" / VIDEO_PREPROCESSOR_FILE).is_file()
    summary = evaluate_run(cfg, result, train_seconds=1.0)
    assert sum(task["total"] for task in summary["tasks"].values()) == 6


def test_a_tiny_checkpoint_first_built_inside_a_zero3_run_is_whole(tmp_path):
    """A ZeRO-3 run (transformers' DeepSpeed config set) that builds the tiny model on first use must write
    real weights, not the empty partitions transformers would build there."""
    from safetensors.torch import load_file
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from tc_llava.model.tiny import build_tiny_checkpoint

    from conftest import TINY_NEXT_VIDEO

    zero3 = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    out = build_tiny_checkpoint(tmp_path / "tiny", **TINY_NEXT_VIDEO)
    del zero3
    weights = load_file(out / "model.safetensors")
    assert len(weights) > 20 and all(t.numel() > 0 for t in weights.values())
