"""Long sequences on one GPU (model.tiling): the loss, the vision tower and the MLPs run in tiles, and the losses and
gradients are those of the untiled run (fp64), while no call of the tiled part sees more than one tile."""

from __future__ import annotations

import pytest
import torch

from tc_llava.model.hf_compat import enable_activation_checkpointing
from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.model.tiling import Tiling

import test_qwen_families as qwen
from test_packed import padded_batch, samples

UNTILED = Tiling(loss_tokens=None, vision_frames=None, mlp_tokens=None)


def load(path, tiling: Tiling) -> TCLlava:
    model = TCLlava.from_pretrained(path, rope=TADRoPE(), mask=FrameBlockCausalMask(), attn_implementation="sdpa",
                                    tiling=tiling)
    return model.double().train()


def llava_batch(model: TCLlava) -> dict:
    """Samples of 4, 1, 2, 4 and 1 frames, every token of each labelled (long loss runs)."""
    items = samples(model)
    for item in items:  # the family's own placeholder (OneVision: <video>)
        item["input_ids"][item["input_ids"] == model.image_token_id] = model.placeholder_token_id
        item["labels"] = item["input_ids"].clone()
    batch = padded_batch(items, model.tokenizer.pad_token_id)
    batch["labels"] = torch.where(batch["attention_mask"].bool(), batch["labels"], -100)
    size = model.config.vision_config.image_size  # frames at the family's tower size
    frames = torch.randn(len(batch["pixel_values"]), 3, size, size, generator=torch.Generator().manual_seed(0))
    return batch | {"pixel_values": frames.double()}


def qwen_batch(model: TCLlava) -> dict:
    """An image and videos of two resolutions, left-padded, with every real token labelled."""
    ids, mask, visual, _ = qwen.batch(model)
    visual = {k: v.double() if k.startswith("pixel") else v for k, v in visual.items()}
    return dict(input_ids=ids, attention_mask=mask, labels=torch.where(mask.bool(), ids, -100), **visual)


def loss_and_grads(model: TCLlava, batch: dict, watch: dict[str, tuple[torch.nn.Module, int]] | None = None):
    """The loss, every gradient, and the length along ``axis`` of each watched module's input per call (forward and
    recompute): ``watch`` maps a name to ``(module, axis)``."""
    seen = {name: [] for name in watch or {}}
    hooks = [module.register_forward_pre_hook(lambda m, args, calls=seen[name], axis=axis:
                                              calls.append(args[0].shape[axis]))
             for name, (module, axis) in (watch or {}).items()]
    try:
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    return (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}), seen


def assert_same(tiled, whole) -> None:
    (loss, grads), (ref_loss, ref_grads) = tiled, whole
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-10, atol=1e-13, msg=name)


def run(path, tiling: Tiling, make_batch, watch, checkpointing: bool = False):
    """:func:`loss_and_grads` of a fresh model with ``tiling``; ``watch`` maps a name to ``(getter, axis)``."""
    model = load(path, tiling)
    if checkpointing:
        enable_activation_checkpointing(model.hf)
    return loss_and_grads(model, make_batch(model), {n: (get(model), axis) for n, (get, axis) in watch.items()})


def test_loss_tiles_equal_the_whole_loss(tiny_llama):
    """The LM head never sees more than a tile of labelled tokens, forward or backward (its recompute)."""
    watch = {"lm_head": (lambda m: m.hf.lm_head, 0)}
    whole, seen_whole = run(tiny_llama, UNTILED, llava_batch, watch)
    tiled, seen = run(tiny_llama, Tiling(loss_tokens=7, vision_frames=None), llava_batch, watch)
    assert_same(tiled, whole)
    assert max(seen_whole["lm_head"]) > 7 and max(seen["lm_head"]) <= 7
    assert sum(seen["lm_head"]) == 2 * seen_whole["lm_head"][0]  # every tile once forward, once recomputed


@pytest.mark.parametrize("ckpt", ["tiny_llama", "tiny_onevision"])
def test_vision_chunks_equal_the_whole_tower(ckpt, request):
    path = request.getfixturevalue(ckpt)
    watch = {"tower": (lambda m: m.hf.model.vision_tower, 0)}
    whole, seen_whole = run(path, UNTILED, llava_batch, watch)
    tiled, seen = run(path, Tiling(loss_tokens=None, vision_frames=3), llava_batch, watch)
    assert_same(tiled, whole)
    assert seen_whole["tower"] == [12] and seen["tower"] == [3, 3, 3, 3]


@pytest.mark.parametrize("ckpt", qwen.FAMILIES)
def test_qwen_vision_chunks_take_whole_videos(ckpt, request):
    """A chunk of at most 3 temporal patches: the batch's 2- and 3-patch videos each go through the tower alone."""
    path = request.getfixturevalue(ckpt)
    model = load(path, UNTILED)
    get = model.hf.model.get_video_features
    grids = []
    model.hf.model.get_video_features = lambda pixels, grid, **kw: grids.append(grid.tolist()) or get(pixels, grid,
                                                                                                         **kw)
    whole, _ = loss_and_grads(model, qwen_batch(model))
    assert grids == [[[2, 4, 6], [3, 6, 4]]]
    grids.clear()
    model.tiling = Tiling(loss_tokens=None, vision_frames=3)
    assert_same(loss_and_grads(model, qwen_batch(model))[0], whole)
    assert grids == [[[2, 4, 6]], [[3, 6, 4]]]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed_layers"])
def test_mlp_tiles_equal_the_whole_mlp(tiny_llama, checkpointing):
    """Every MLP call sees at most a tile of positions, with and without the layers' own checkpointing."""
    watch = {"mlp": (lambda m: m.language_model.layers[0].mlp.down_proj, -2)}
    whole, seen_whole = run(tiny_llama, UNTILED, llava_batch, watch, checkpointing)
    tiled, seen = run(tiny_llama, Tiling(loss_tokens=None, vision_frames=None, mlp_tokens=16), llava_batch, watch,
                      checkpointing)
    assert_same(tiled, whole)
    assert max(seen_whole["mlp"]) > 16 and max(seen["mlp"]) <= 16


def test_a_tile_size_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"model.tiling.loss_tokens must be an integer >= 1, got 0"):
        Tiling(loss_tokens=0)


def test_offloaded_checkpoints_equal_the_kept_ones(tiny_llama, monkeypatch):
    """trainer.offload_checkpoints: every checkpointed layer's input hidden states go through the host-offload hooks,
    and the loss and gradients are those kept on the device."""
    from torch.autograd.graph import save_on_cpu

    from tc_llava.model import tc_llava

    packed = []

    class Recorded(save_on_cpu):
        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(tuple(t.shape)) or pack(t)

    monkeypatch.setattr(tc_llava, "save_on_cpu", Recorded)
    runs = []
    for offload in (False, True):
        model = load(tiny_llama, UNTILED)
        enable_activation_checkpointing(model.hf)
        model.offload_checkpoints = offload
        batch = llava_batch(model)
        runs.append(loss_and_grads(model, batch)[0])
    assert_same(runs[1], runs[0])
    hidden = (*batch["input_ids"].shape, model.config.text_config.hidden_size)
    assert packed.count(hidden) >= model.config.text_config.num_hidden_layers


def test_offload_needs_checkpointing():
    from omegaconf import OmegaConf

    from tc_llava.train.settings import SettingsError, check_trainer

    trainer = OmegaConf.create({"name": "cpu", "offload_checkpoints": True, "gradient_checkpointing": False})
    with pytest.raises(SettingsError, match="trainer.offload_checkpoints=true .* needs trainer.gradient_checkpointing"):
        check_trainer(trainer)
