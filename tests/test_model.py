"""TC-LLaVA model: parity with HF's unpatched model, the mask and angles that reach the
LLM's attention, KV-cache generation, pooling, save/load and input errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForImageTextToText
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from tc_llava.model.attention import check_backend
from tc_llava.model.build import ModelSettingsError, check_model_settings
from tc_llava.model.masks import CausalMask, FrameBlockCausalMask, frame_block_causal_mask
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import TADRoPE, VanillaRoPE
from tc_llava.model.tc_llava import TCLlava

T = 4


def video_batch(model: TCLlava, layouts: list[tuple[int, int]], side: str, num_frames: int = T, seed: int = 0):
    """Prompts ``[text_before, video, text_after]`` padded on ``side``; random text ids."""
    g = torch.Generator().manual_seed(seed)
    n_vis = model.tokens_per_video(num_frames)
    vocab = model.config.text_config.vocab_size
    rows = []
    for before, after in layouts:
        text = torch.randint(10, vocab, (before + after,), generator=g).tolist()
        rows.append(text[:before] + [model.image_token_id] * n_vis + text[before:])
    width = max(map(len, rows))
    pad = model.tokenizer.pad_token_id
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, sl] = torch.tensor(row)
        mask[b, sl] = 1
    pixels = torch.randn(len(rows), num_frames, 3, 56, 56, generator=g)
    return ids, mask, pixels


def load(path, rope=None, mask=None, pooling=None, impl="sdpa") -> TCLlava:
    return TCLlava.from_pretrained(path, rope=rope, mask=mask, pooling=pooling, attn_implementation=impl).eval()


# --------------------------------------------------------------------------- parity with HF
@pytest.mark.parametrize("ckpt", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("side", ["none", "left"])
def test_vanilla_causal_equals_unpatched_hf(ckpt, side, request):
    path = request.getfixturevalue(ckpt)
    ours = load(path, VanillaRoPE(), CausalMask())
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    layouts = [(5, 7), (5, 7)] if side == "none" else [(5, 7), (2, 3), (9, 1)]
    ids, mask, pixels = video_batch(ours, layouts, "left")
    kwargs = {}
    if side == "left":  # what HF's generate() feeds for left padding
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, mask, pixels).logits
        b = hf(input_ids=ids, attention_mask=mask, pixel_values=pixels.flatten(0, 1), **kwargs).logits
    real = mask.bool()
    assert (a - b)[real].abs().max().item() <= 1e-5


def test_gamma_zero_equals_vanilla(tiny_llama):
    block = FrameBlockCausalMask()
    ids, mask, pixels = video_batch(load(tiny_llama), [(3, 4), (6, 2)], "left")
    with torch.no_grad():
        a = load(tiny_llama, TADRoPE(gamma=0.0), block)(ids, mask, pixels).logits
        b = load(tiny_llama, VanillaRoPE(), block)(ids, mask, pixels).logits
        c = load(tiny_llama, TADRoPE(gamma=1.0), block)(ids, mask, pixels).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - c)[mask.bool()].abs().max() > 1e-3  # tau does change the model


# --------------------------------------------------------------------------- the mask in attention
def record_masks(monkeypatch, impl: str) -> list:
    seen = []
    if impl == "eager":
        original = modeling_llama.eager_attention_forward

        def recorder(module, q, k, v, attention_mask, **kw):
            seen.append(attention_mask)
            return original(module, q, k, v, attention_mask, **kw)

        monkeypatch.setattr(modeling_llama, "eager_attention_forward", recorder)
    else:
        original = ALL_ATTENTION_FUNCTIONS[impl]

        def recorder(module, q, k, v, attention_mask, **kw):
            if isinstance(module, modeling_llama.LlamaAttention):  # not the vision tower's layers
                seen.append(attention_mask)
            return original(module, q, k, v, attention_mask, **kw)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, impl, recorder)
    return seen


def as_bool(mask, impl: str, batch: int, length: int) -> torch.Tensor:
    if impl == "eager":
        return mask == 0
    if impl == "flex_attention":
        b, q, k = torch.meshgrid(torch.arange(batch), torch.arange(length), torch.arange(length), indexing="ij")
        return mask.mask_mod(b, torch.zeros_like(b), q, k)[:, None]
    return mask


@pytest.fixture
def static_compile():
    """Flex on CPU: inductor's dynamic-shape recompile of flex attention fails to build
    (torch 2.13, 'cur_kvSplitSize1' not declared), so each test compiles for static shapes."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


GPU_FLEX = pytest.param("flex_attention", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="flex_attention is refused on CPU (test_flex_is_refused_on_cpu)"))


@pytest.mark.parametrize("impl", ["sdpa", "eager", GPU_FLEX])
@pytest.mark.parametrize("side", ["left", "right"])
def test_mask_reaching_attention_equals_dense_reference(tiny_llama, monkeypatch, static_compile, impl, side):
    device = "cuda" if impl == "flex_attention" else "cpu"
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask(), impl=impl).to(device)
    ids, mask, pixels = (t.to(device) for t in video_batch(model, [(3, 5), (0, 2), (7, 0)], side, seed=1))
    seen = record_masks(monkeypatch, impl)
    with torch.no_grad():
        out = model(ids, mask, pixels)
    assert len(seen) == model.config.text_config.num_hidden_layers
    reference = frame_block_causal_mask(out.frame_ids, mask)
    real_q = mask.bool()[:, None, :, None].expand_as(reference)
    for got in seen:
        dense = as_bool(got, impl, *ids.shape).expand_as(reference)
        assert torch.equal(dense[real_q], reference[real_q])


# --------------------------------------------------------------------------- the rotary angles
def rotary_inside(model: TCLlava, ids, mask, pixels):
    """Run the model; return its output, the cos/sin layer 1's attention received, and the
    LLM's inverse frequencies computed from its config (not from the model's rotary module)."""
    captured = {}

    def hook(module, args, kwargs):
        captured["cos"], captured["sin"] = kwargs["position_embeddings"]

    handle = model.language_model.layers[1].self_attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        out = model(ids, mask, pixels)
    handle.remove()
    cfg = model.config.text_config
    dim = cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))
    return out, captured, inv_freq


def test_rotary_angles_inside_layers_are_dual_rope(tiny_llama):
    model = load(tiny_llama, TADRoPE(gamma=0.5), FrameBlockCausalMask())
    ids, mask, pixels = video_batch(model, [(2, 3), (5, 1)], "left")
    out, captured, inv_freq = rotary_inside(model, ids, mask, pixels)
    # p = m + gamma * tau, computed independently of the model from the frame ids
    m = (mask.cumsum(-1) - 1).clamp(min=0)
    step = torch.zeros_like(ids)
    frames = out.frame_ids
    prev = torch.cat([torch.full_like(frames[:, :1], -2), frames[:, :-1]], -1)
    step = (mask.bool() & ((frames < 0) | (frames != prev) | (torch.cat([mask[:, :1] * 0, mask[:, :-1]], -1) == 0)))
    tau = (step.long().cumsum(-1) - 1).clamp(min=0)
    p = (m + 0.5 * tau).float()
    angles = p[..., None] * inv_freq
    real = mask.bool()
    torch.testing.assert_close(captured["cos"][real], torch.cat([angles, angles], -1).cos()[real])
    torch.testing.assert_close(captured["sin"][real], torch.cat([angles, angles], -1).sin()[real])
    assert not torch.allclose(p[real], m.float()[real])


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("rope", [TADRoPE(gamma=1.0), VanillaRoPE()])
def test_batched_generation_equals_recompute_and_batch_one(tiny_llama, rope):
    model = load(tiny_llama, rope, FrameBlockCausalMask())
    layouts = [(4, 6), (1, 2), (8, 3)]
    ids, mask, pixels = video_batch(model, layouts, "left", seed=3)
    gen = model.generate(ids, mask, pixels, max_new_tokens=6, output_scores=True, eos_token_id=[])
    assert gen.sequences.shape == (3, 6)
    scores = torch.stack(gen.scores, 1)
    # full recompute: prompt + generated tokens in one forward, no cache
    full_ids = torch.cat([ids, gen.sequences[:, :-1]], -1)
    full_mask = torch.cat([mask, torch.ones_like(gen.sequences[:, :-1])], -1)
    with torch.no_grad():
        logits = model(full_ids, full_mask, pixels).logits[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-4)
    # batch size one, no padding at all
    for b in range(3):
        real = mask[b].bool()
        one = model.generate(ids[b : b + 1, real], None, pixels[b : b + 1], max_new_tokens=6,
                             output_scores=True, eos_token_id=[])
        assert torch.equal(one.sequences[0], gen.sequences[b])
        torch.testing.assert_close(torch.stack(one.scores, 1)[0], scores[b], rtol=1e-4, atol=1e-4)


def test_generation_stops_at_eos_and_pads(tiny_llama):
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask())
    ids, mask, pixels = video_batch(model, [(4, 6), (1, 2)], "left", seed=4)
    free = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=[])
    eos = int(free.sequences[0, 1])  # make sample 0's second token the EOS
    pad = model.tokenizer.pad_token_id
    gen = model.generate(ids, mask, pixels, max_new_tokens=4, eos_token_id=eos, pad_token_id=pad)
    assert gen.sequences[0, 1] == eos and (gen.sequences[0, 2:] == pad).all()
    assert torch.equal(gen.sequences[0, :2], free.sequences[0, :2])


def test_sampling_is_seeded_and_top_p_zero_is_greedy(tiny_llama):
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask())
    ids, mask, pixels = video_batch(model, [(4, 6), (1, 2)], "left", seed=5)
    runs = [
        model.generate(ids, mask, pixels, max_new_tokens=5, do_sample=True, temperature=2.0,
                       generator=torch.Generator().manual_seed(7), eos_token_id=[]).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(ids, mask, pixels, max_new_tokens=5, eos_token_id=[]).sequences
    nucleus = model.generate(ids, mask, pixels, max_new_tokens=5, do_sample=True, top_p=1e-6,
                             generator=torch.Generator().manual_seed(1), eos_token_id=[]).sequences
    assert torch.equal(greedy, nucleus)


# --------------------------------------------------------------------------- pooling projector
def test_pooling_matches_adaptive_avg_pool3d(tiny_llama):
    model = load(tiny_llama, pooling=VideoPooling([2, 2, 2]))
    assert model.tokens_per_video(T) == 2 * 2 * 2
    _, _, pixels = video_batch(model, [(1, 1), (1, 1)], "left")
    with torch.no_grad():
        got = model.encode_video(pixels)
        hidden = model.hf.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-2]
        mlp = model.hf.model.multi_modal_projector(hidden[:, 1:])  # [B*T, 16, D]
        grid = mlp.reshape(2, T, 4, 4, -1).permute(0, 4, 1, 2, 3)  # [B, D, T, H, W]
        ref = torch.nn.AdaptiveAvgPool3d((2, 2, 2))(grid).flatten(2).transpose(1, 2)
    assert got.shape == (2, 8, model.config.text_config.hidden_size)
    torch.testing.assert_close(got, ref)


def test_pooled_model_runs_forward_backward_and_generation(tiny_llama):
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask(), pooling=VideoPooling([2, 2, 2]))
    ids, mask, pixels = video_batch(model, [(3, 4), (1, 2)], "right")
    out = model(ids, mask, pixels, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    assert model.hf.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    assert out.frame_ids.max() == 1  # two pooled time steps -> frames 0 and 1
    ids, mask, pixels = video_batch(model, [(3, 4), (1, 2)], "left")
    assert model.generate(ids, mask, pixels, max_new_tokens=3, eos_token_id=[]).sequences.shape == (2, 3)


def test_llava_next_qwen2_and_eager_forward(tiny_next, tiny_qwen2):
    for path, impl in ((tiny_next, "sdpa"), (tiny_qwen2, "eager")):  # flex on the GPU: test_gpu.py
        model = load(path, TADRoPE(), FrameBlockCausalMask(), impl=impl)
        ids, mask, pixels = video_batch(model, [(3, 4), (1, 2)], "left")
        with torch.no_grad():
            got = model(ids, mask, pixels).logits
            sdpa = load(path, TADRoPE(), FrameBlockCausalMask())(ids, mask, pixels).logits
        real = mask.bool()
        assert (got - sdpa)[real].abs().max() <= 1e-4


@pytest.mark.parametrize("length", [34, 40])
def test_flex_is_refused_on_cpu(tiny_llama, length):
    """Compiled flex on CPU (torch 2.13) matched SDPA at 34 tokens and gave wrong logits or NaN at 40:
    it is refused there by name, in the forward and in the settings check, while SDPA runs."""
    ids = torch.randint(10, 500, (2, length), generator=torch.Generator().manual_seed(length))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.isfinite(load(tiny_llama, TADRoPE(), FrameBlockCausalMask())(ids, mask).logits).all()
        flex = load(tiny_llama, TADRoPE(), FrameBlockCausalMask(), impl="flex_attention")
        with pytest.raises(ValueError, match=r"^model\.attn_implementation=flex_attention is refused on CPU .*"
                                             r"use sdpa, eager or auto on CPU"):
            flex(ids, mask)
    settings = OmegaConf.create({"checkpoint": str(tiny_llama), "attn_implementation": "flex_attention"})
    if not torch.cuda.is_available():
        with pytest.raises(ModelSettingsError, match="flex_attention is refused on CPU"):
            check_model_settings(settings)


@pytest.mark.parametrize("shape, frames, problems", [
    ([8, 5, 5], 8, "its 5x5 spatial shape exceeds the 4x4 token grid of the vision tower (valid: H 1..4, W 1..4)"),
    ([8, 2, 2], 4, "its T=8 exceeds the 4 frames given (valid: T 1..4, or use at least 8 frames)"),
    ([8, 2, 5], 4, "its 2x5 spatial shape exceeds the 4x4 token grid of the vision tower (valid: H 1..4, W 1..4); "
                   "its T=8 exceeds the 4 frames given (valid: T 1..4, or use at least 8 frames)"),
], ids=["space", "time", "both"])
def test_pooling_error_names_the_axis_at_fault(tiny_llama, shape, frames, problems):
    model = load(tiny_llama, pooling=VideoPooling(shape))
    with pytest.raises(ValueError) as error:
        model.tokens_per_video(frames)
    assert str(error.value) == f"projector.pooling_shape={shape} cannot be pooled: {problems}; pooling never upsamples"


@pytest.mark.parametrize("shape", ["abc", [8, 5], [2.5, 2, 2], [True, 2, 2], [0, 2, 2], ["8", 2, 2]])
def test_pooling_shape_must_be_three_positive_ints(shape):
    message = f"projector.pooling_shape must be 3 integers >= 1 (T, H, W), got {shape!r}"
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        VideoPooling(shape)


# --------------------------------------------------------------------------- save / load
def test_save_and_load_rebuilds_the_same_model(tiny_llama, tmp_path):
    model = load(tiny_llama, TADRoPE(gamma=0.5), FrameBlockCausalMask(), pooling=VideoPooling([2, 2, 2]))
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["tc_llava"]
    assert saved == {"rope": {"name": "tad", "gamma": 0.5}, "mask": {"name": "frame_block_causal"},
                     "pooling_shape": [2, 2, 2]}
    again = TCLlava.from_pretrained(tmp_path / "ckpt").eval()
    assert again.rope == TADRoPE(gamma=0.5) and isinstance(again.mask, FrameBlockCausalMask)
    assert again.pooling.pooling_shape == (2, 2, 2) and again.tokenizer is not None
    ids, mask, pixels = video_batch(model, [(3, 4), (1, 2)], "left")
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, pixels).logits, again(ids, mask, pixels).logits)


# --------------------------------------------------------------------------- bad input
def test_clear_errors_on_bad_input(tiny_llama, tmp_path):
    model = load(tiny_llama, TADRoPE(), FrameBlockCausalMask())
    ids, mask, pixels = video_batch(model, [(3, 4), (1, 2)], "left")
    with pytest.raises(ValueError, match=r"sample 0: found 128 image tokens .* in 2 run\(s\); expected one video"):
        doubled = torch.cat([ids[:1], ids[:1]], -1)
        model(doubled, None, pixels[:1])
    with pytest.raises(ValueError, match="pixel_values must be \\[B, T, C, H, W\\]"):
        model(ids, mask, pixels.flatten(0, 1))
    with pytest.raises(ValueError, match="image tokens but no pixel_values"):
        model(ids, mask)
    with pytest.raises(ValueError, match="expected one video placeholder expanded to 32 tokens for 2 frames"):
        model(ids, mask, pixels[:, :2])
    pooled = load(tiny_llama, pooling=VideoPooling([8, 2, 2]))
    with pytest.raises(ValueError, match=r"its T=8 exceeds the 4 frames given \(valid: T 1..4, or use at least 8"):
        pooled.tokens_per_video(4)
    with pytest.raises(FileNotFoundError, match="config.json not found: expected a llava-hf checkpoint"):
        TCLlava.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no weights: expected one of model.safetensors"):
        TCLlava.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ignores custom attention masks"):
        check_backend("flash_attention_2", FrameBlockCausalMask())
    check_backend("flash_attention_2", CausalMask())
    with pytest.raises(ValueError, match="left-padded"):
        ids, mask, pixels = video_batch(model, [(3, 4), (1, 2)], "right")
        model.generate(ids, mask, pixels)
