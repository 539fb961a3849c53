"""Qwen2.5-VL and Qwen3-VL on HF's own classes: the family's own positions with the causal mask are HF's unpatched
model (logits and greedy generation), and the TC rules follow their definitions in docs/families.md.

Batches mix an image and videos of two resolutions with left padding; Qwen3-VL prompts carry a timestamp before
every temporal patch, as its processor writes them."""

from __future__ import annotations

import pytest
import torch

from tc_llava.model.attention import BLOCK_MERGE
from tc_llava.model.masks import BidirectionalVisualMask, CausalMask, FrameBlockCausalMask, block_causal_mask
from tc_llava.model.rope import MRoPE, TADRoPE, VanillaRoPE, VideoRoPE
from tc_llava.model.tc_llava import TCLlava

FAMILIES = ["tiny_qwen2_5_vl", "tiny_qwen3_vl"]
# (kind, [t, h, w]) items per sample: grids in patches (h, w even: the 2x2 merger); t temporal patches
BATCH = [[("video", [2, 4, 6])], [("image", [1, 4, 4]), ("video", [3, 6, 4])]]


def load(path, rope=None, mask=None, impl="sdpa") -> TCLlava:
    return TCLlava.from_pretrained(path, rope=rope, mask=mask, attn_implementation=impl).eval()


def tokens(model: TCLlava, name: str) -> int:
    return model.tokenizer.convert_tokens_to_ids(name)


def sample_ids(model: TCLlava, items, words: list[int]) -> tuple[list[int], list[int]]:
    """A prompt's ids and the frame id of every token, written by hand from the family's layout: Qwen2.5-VL puts
    one vision span per item; Qwen3-VL one per temporal patch of a video, each after a timestamp's text."""
    start, end = tokens(model, "<|vision_start|>"), tokens(model, "<|vision_end|>")
    ids, frames, frame = list(words[:2]), [-1, -1], 0
    per_patch = model.family.model_type == "qwen3_vl"
    for kind, (t, h, w) in items:
        pad = tokens(model, f"<|{kind}_pad|>")
        n = h * w // 4
        spans = [[f] * n for f in range(frame, frame + t)]
        if not per_patch or kind == "image":
            spans = [sum(spans, [])]
        for span in spans:
            stamp = words[2:4] if per_patch and kind == "video" else []
            ids += stamp + [start] + [pad] * len(span) + [end]
            frames += [-1] * len(stamp) + [-1] + span + [-1]
        frame += t
    return ids + words[4:], frames + [-1] * len(words[4:])


def batch(model: TCLlava, seed: int = 0):
    """Left-padded ``input_ids``, ``attention_mask``, the visual inputs and the expected frame ids."""
    gen = torch.Generator().manual_seed(seed)
    vision = model.config.vision_config
    patch = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    rows = [sample_ids(model, items, torch.randint(20, 200, (8,), generator=gen).tolist()) for items in BATCH]
    width = max(len(ids) for ids, _ in rows)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r, _ in rows])
    frames = torch.tensor([[-1] * (width - len(f)) + f for _, f in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r, _ in rows])
    grids = {kind: torch.tensor([g for items in BATCH for k, g in items if k == kind]) for kind in ("image", "video")}
    visual = {"pixel_values": torch.randn(int(grids["image"].prod(-1).sum()), patch, generator=gen),
              "image_grid_thw": grids["image"],
              "pixel_values_videos": torch.randn(int(grids["video"].prod(-1).sum()), patch, generator=gen),
              "video_grid_thw": grids["video"]}
    if model.family.model_type == "qwen2_5_vl":
        visual["second_per_grid_ts"] = torch.tensor([1.0, 0.5])
    return ids, mask, visual, frames


def hf_inputs(model: TCLlava, ids, mask, visual) -> dict:
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=model.family.token_types(model.config, ids),
                **visual)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_own_positions_and_causal_mask_are_hfs_model(ckpt, request):
    model = load(request.getfixturevalue(ckpt), VanillaRoPE(), CausalMask())
    ids, mask, visual, frames = batch(model)
    with torch.no_grad():
        reference = model.hf(**hf_inputs(model, ids, mask, visual)).logits
        out = model(ids, mask, **visual)
    real = mask.bool()
    assert torch.equal(out.frame_ids, frames)
    torch.testing.assert_close(out.logits[real], reference[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_greedy_generation_equals_hfs(ckpt, request):
    model = load(request.getfixturevalue(ckpt), VanillaRoPE(), CausalMask())
    ids, mask, visual, _ = batch(model, seed=1)
    ours = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[], **visual).sequences
    with torch.no_grad():
        theirs = model.hf.generate(**hf_inputs(model, ids, mask, visual), max_new_tokens=6, do_sample=False,
                                   min_new_tokens=6, pad_token_id=model.tokenizer.pad_token_id)
    assert torch.equal(ours, theirs[:, ids.shape[1]:])


def walk_tau(frames: list[int]) -> list[int]:
    """``tau`` by the definition's walk: each text token and each new frame take the counter and advance it."""
    tau, counter, previous = [], -1, None
    for f in frames:
        if f < 0 or f != previous:
            counter += 1
        tau.append(counter)
        previous = f
    return tau


@pytest.mark.parametrize("mask_rule", [CausalMask(), FrameBlockCausalMask(), BidirectionalVisualMask()],
                         ids=lambda m: m.name)
@pytest.mark.parametrize("ckpt", FAMILIES)
def test_rules_reach_the_layers_as_defined(ckpt, mask_rule, request, monkeypatch):
    """The mask every LLM layer receives is the dense reference of the rule with temporal patches as frames, and
    the rotary angles inside a layer are the family's own positions plus ``gamma * tau`` on every axis."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    path = request.getfixturevalue(ckpt)
    own = load(path, VanillaRoPE(), CausalMask())
    model = load(path, TADRoPE(gamma=0.5), mask_rule)
    ids, mask, visual, frames = batch(model, seed=2)
    seen, original = [], ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recorder(module, q, k, v, attention_mask, **kw):
        if hasattr(module, "q_proj") and module.q_proj.in_features == model.config.text_config.hidden_size:
            seen.append(attention_mask)
        return original(module, q, k, v, attention_mask, **kw)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", recorder)
    captured = {}
    handle = model.language_model.layers[1].self_attn.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(cos=kwargs["position_embeddings"][0]), with_kwargs=True)
    with torch.no_grad():
        out = model(ids, mask, **visual)
    handle.remove()
    layers_saw = list(seen)
    assert len(layers_saw) == model.config.text_config.num_hidden_layers
    real = mask.bool()
    for b in range(ids.shape[0]):
        keep = real[b]
        blocks = mask_rule.block_ids(frames[b:b + 1])
        reference = (torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril() if blocks is None
                     else block_causal_mask(blocks, mask[b:b + 1])[0, 0])
        for got in layers_saw:
            if got is None:  # SDPA's own causal kernel
                assert blocks is None
                continue
            assert torch.equal(got[b, 0].expand_as(reference)[keep][:, keep], reference[keep][:, keep])
        tau = torch.tensor(walk_tau(frames[b][keep].tolist()), dtype=torch.float32)
        with torch.no_grad():
            own_positions = own(ids[b:b + 1, keep], None, **single(visual, b)).rope_positions[:, 0]
        assert torch.equal(out.rope_positions[:, b, keep], own_positions + 0.5 * tau)
        angles = out.rope_positions[:, b, keep][pair_axes(model)].T * inv_freq(model)  # [L, pairs]
        torch.testing.assert_close(captured["cos"][b, keep], torch.cat([angles, angles], -1).cos())


def inv_freq(model: TCLlava) -> torch.Tensor:
    text = model.config.text_config
    dim = text.hidden_size // text.num_attention_heads
    return 1.0 / (text.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2).float() / dim))


def pair_axes(model: TCLlava) -> torch.Tensor:
    """The axis (t 0, h 1, w 2) each frequency pair rotates by (docs/families.md): Qwen2.5-VL's sections in a row,
    Qwen3-VL's interleaved ``t h w t h w ...`` over the first ``3 * section`` pairs."""
    section = model.config.text_config.rope_parameters["mrope_section"]
    if model.family.model_type == "qwen2_5_vl":
        return torch.repeat_interleave(torch.arange(3), torch.tensor(section))
    k = torch.arange(sum(section))
    return torch.where((k % 3 == 1) & (k < 3 * section[1]), 1, torch.where((k % 3 == 2) & (k < 3 * section[2]), 2, 0))


def single(visual: dict, b: int) -> dict:
    """Sample ``b``'s own visual inputs out of the batch's."""
    per_sample = [[k for k, _ in items] for items in BATCH]
    out = {}
    for kind, pixels, grid in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        grids = visual[grid]
        owners = [s for s, kinds in enumerate(per_sample) for k in kinds if k == kind]
        sizes = grids.prod(-1).tolist()
        chunks = visual[pixels].split(sizes)
        mine = [i for i, s in enumerate(owners) if s == b]
        if mine:
            out[pixels] = torch.cat([chunks[i] for i in mine])
            out[grid] = grids[mine]
            if kind == "video" and "second_per_grid_ts" in visual:
                out["second_per_grid_ts"] = visual["second_per_grid_ts"][mine]
    return out


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_gamma_zero_is_the_familys_own_model(ckpt, request):
    path = request.getfixturevalue(ckpt)
    ids, mask, visual, _ = batch(load(path), seed=3)
    with torch.no_grad():
        own = load(path, VanillaRoPE(), FrameBlockCausalMask())(ids, mask, **visual).logits
        tad0 = load(path, TADRoPE(gamma=0.0), FrameBlockCausalMask())(ids, mask, **visual).logits
    real = mask.bool()
    assert torch.equal(own[real], tad0[real])


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_tc_generation_equals_recompute(ckpt, request):
    """Decoding continues the rule's positions (one past the family's largest, plus a temporal step per token)."""
    model = load(request.getfixturevalue(ckpt), TADRoPE(gamma=0.5), FrameBlockCausalMask())
    ids, mask, visual, _ = batch(model, seed=4)
    gen = model.generate(ids, mask, max_new_tokens=4, output_scores=True, eos_token_id=[], **visual)
    full_ids = torch.cat([ids, gen.sequences[:, :-1]], -1)
    full_mask = torch.cat([mask, torch.ones_like(gen.sequences[:, :-1])], -1)
    with torch.no_grad():
        out = model(full_ids, full_mask, **visual)
    assert not bool((out.rope_positions[:, :, ids.shape[1]:] - out.rope_positions[:, :, ids.shape[1] - 1:-1]
                     - 1.5).abs().gt(0).any())
    torch.testing.assert_close(torch.stack(gen.scores, 1), out.logits[:, ids.shape[1] - 1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_block_merge_decomposition_equals_sdpa_on_temporal_patches(ckpt, request, monkeypatch):
    """Blocks of different sizes (an image, videos of two resolutions) take the decomposition, no dense mask."""
    import tc_llava.model.attention as attention

    calls = []
    original = attention.block_merge_attention
    monkeypatch.setattr(attention, "block_merge_attention", lambda q, k, v, spans, scaling: (
        calls.append(spans.sizes is not None), original(q, k, v, spans, scaling))[1])
    path = request.getfixturevalue(ckpt)
    ids, mask, visual, _ = batch(load(path), seed=5)
    ref_model = load(path, TADRoPE(), FrameBlockCausalMask(), impl="sdpa").double()
    model = load(path, TADRoPE(), FrameBlockCausalMask(), impl=BLOCK_MERGE).double()
    visual = {k: v.double() if v.is_floating_point() else v for k, v in visual.items()}
    with torch.no_grad():
        reference = ref_model(ids, mask, **visual).logits
        got = model(ids, mask, **visual).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], reference[real], rtol=1e-9, atol=1e-9)
    assert calls == [True] * model.config.text_config.num_hidden_layers  # every layer, with per-block sizes


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_packed_rows_give_each_sample_its_own_positions_and_mask(ckpt, request):
    """Both samples packed into one row: every token's logits and positions are the ones it has alone."""
    model = load(request.getfixturevalue(ckpt), TADRoPE(gamma=0.5), FrameBlockCausalMask())
    ids, mask, visual, _ = batch(model, seed=6)
    real = mask.bool()
    row = ids[real][None]
    sample_ids = torch.cat([torch.full((int(n),), k) for k, n in enumerate(real.sum(-1).tolist())])[None]
    with torch.no_grad():
        alone = model(ids, mask, **visual)
        packed = model(row, None, sample_ids=sample_ids, **visual)
    torch.testing.assert_close(packed.logits[0], alone.logits[real], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed.rope_positions[:, 0], alone.rope_positions[:, real])


@pytest.mark.parametrize("rope", [MRoPE(), VideoRoPE()], ids=lambda r: r.name)
def test_rules_not_defined_on_own_positions_are_refused(rope, tiny_qwen2_5_vl):
    with pytest.raises(ValueError, match=f"rope={rope.name} is not defined on qwen2_5_vl"):
        load(tiny_qwen2_5_vl, rope)


def test_placeholder_count_that_does_not_match_the_grid_is_refused(tiny_qwen2_5_vl):
    model = load(tiny_qwen2_5_vl)
    ids, mask, visual, _ = batch(model)
    visual["video_grid_thw"] = visual["video_grid_thw"].clone()
    visual["video_grid_thw"][0, 0] = 3
    with pytest.raises(ValueError, match=r"input_ids hold 30 video placeholder tokens .* gives 36"):
        model(ids, mask, **visual)


@pytest.mark.parametrize("ckpt", FAMILIES)
def test_export_and_reload_give_identical_logits_and_rules(ckpt, request, tmp_path):
    model = load(request.getfixturevalue(ckpt), TADRoPE(gamma=0.5), FrameBlockCausalMask())
    ids, mask, visual, _ = batch(model, seed=7)
    model.save_pretrained(tmp_path)
    reloaded = TCLlava.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert (reloaded.rope, reloaded.mask.name) == (TADRoPE(gamma=0.5), "frame_block_causal")
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask, **visual).logits, model(ids, mask, **visual).logits)
