"""The ablation variants: M-RoPE, VideoRoPE and the bidirectional-visual mask against literal
references on hand-made layouts, their frequency split, KV-cache generation, and the
ablation collector on fixed inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from tc_llava.data.synthetic import TASKS, VOCABULARY, generate, make_sample
from tc_llava.ablation.collect import load_runs, summarize, write_report
from tc_llava.model.masks import BidirectionalVisualMask, block_causal_mask
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import MRoPE, RotaryPositions, TADRoPE, VanillaRoPE, VideoRoPE, scaled_section
from tc_llava.model.tc_llava import TCLlava
from tc_llava.ablation.job import evaluate_run
from tc_llava.train.loop import train

from conftest import CONFIGS, TINY
from test_model import rotary_inside, video_batch


# --------------------------------------------------------------------------- literal references
def walk_reference(frames: list[int], grid: tuple[int, int], rule: str, delta: float = 2.0) -> list[tuple]:
    """Qwen2-VL / VideoRoPE ``get_rope_index`` written as one walk over a single sample."""
    height, width = grid
    out, next_text, start, k, last_max = [], 0, None, 0, None
    for f in frames:
        if f < 0:
            if start is not None and last_max is not None:  # first text token after the video
                next_text, last_max = last_max + 1, None
            out.append((next_text,) * 3)
            next_text += 1
            continue
        if start is None:
            start = next_text
        r, c = (k % (height * width)) // width, k % width
        k += 1
        if rule == "mrope":
            pos = (start + f, start + r, start + c)
            last_max = max(pos) if last_max is None else max(last_max, *pos)
        else:
            t = start + delta * f
            pos = (t, t + r - (height - 1) // 2, t + c - (width - 1) // 2)
            last_max = t
        out.append(pos)
    return out


def as_axes(rows: list[tuple]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).T  # [3, L]


LAYOUT = [-1, -1] + [0] * 6 + [1] * 6 + [-1] * 3  # two text, 2 frames of a 2x3 grid, three text


@pytest.mark.parametrize("rule", [MRoPE(), VideoRoPE(delta=2.0), VideoRoPE(delta=0.5)])
def test_multi_axis_positions_match_the_walk(rule):
    got = rule.positions(torch.tensor([LAYOUT]), None, (2, 3))
    expect = as_axes(walk_reference(LAYOUT, (2, 3), rule.name, getattr(rule, "delta", 0.0)))
    torch.testing.assert_close(got[:, 0], expect, rtol=0, atol=0)


def test_mrope_hand_values():
    got = MRoPE().positions(torch.tensor([LAYOUT]), None, (2, 3))[:, 0]
    # t: 0 1 | 2 x6, 3 x6 | 5 6 7 (after the video: s + max(T-1, H-1, W-1) + 1 = 2 + 2 + 1)
    assert got[0].tolist() == [0, 1] + [2] * 6 + [3] * 6 + [5, 6, 7]
    assert got[1].tolist() == [0, 1] + [2, 2, 2, 3, 3, 3] * 2 + [5, 6, 7]  # rows
    assert got[2].tolist() == [0, 1] + [2, 3, 4] * 4 + [5, 6, 7]  # columns


def test_videorope_hand_values_and_delta_zero():
    got = VideoRoPE(delta=2.0).positions(torch.tensor([LAYOUT]), None, (2, 3))[:, 0]
    # frame 0 at t = 2, frame 1 at t = 4; rows centred by (2-1)//2 = 0, columns by (3-1)//2 = 1
    assert got[0].tolist() == [0, 1] + [2] * 6 + [4] * 6 + [5, 6, 7]
    assert got[1].tolist() == [0, 1] + [2, 2, 2, 3, 3, 3] + [4, 4, 4, 5, 5, 5] + [5, 6, 7]
    assert got[2].tolist() == [0, 1] + [1, 2, 3] * 2 + [3, 4, 5] * 2 + [5, 6, 7]
    flat = VideoRoPE(delta=0.0).positions(torch.tensor([LAYOUT]), None, (2, 3))[:, 0]
    assert flat[0].tolist() == [0, 1] + [2] * 12 + [3, 4, 5]  # every frame at one temporal index
    with pytest.raises(ValueError, match="rope.delta must be a finite number >= 0"):
        VideoRoPE(delta=-1.0)


@pytest.mark.parametrize("rule", [MRoPE(), VideoRoPE()])
def test_padding_counts_real_tokens_only(rule):
    frames = torch.tensor([[-1, -1] + LAYOUT, LAYOUT + [-1, -1]])
    mask = torch.tensor([[0, 0] + [1] * len(LAYOUT), [1] * len(LAYOUT) + [0, 0]])
    got = rule.positions(frames, mask, (2, 3))
    expect = as_axes(walk_reference(LAYOUT, (2, 3), rule.name, getattr(rule, "delta", 0.0)))
    torch.testing.assert_close(got[:, 0, 2:], expect, rtol=0, atol=0)
    torch.testing.assert_close(got[:, 1, :-2], expect, rtol=0, atol=0)
    assert not got[:, 0, :2].any() and not got[:, 1, -2:].any()


def test_text_only_and_continuation():
    text = torch.full((1, 5), -1)
    for rule in (MRoPE(), VideoRoPE()):
        got = rule.positions(text, None, (2, 3))
        assert got.tolist() == [[[0, 1, 2, 3, 4]]] * 3
        last = rule.positions(torch.tensor([LAYOUT]), None, (2, 3))[..., -1:]
        assert rule.next_positions(last).flatten().tolist() == [8.0] * 3
    # a prompt ending on a visual token continues where text after the video would start
    video_last = torch.tensor([LAYOUT[:14]])
    mrope_last = MRoPE().positions(video_last, None, (2, 3))[..., -1:]
    assert MRoPE().next_positions(mrope_last).flatten().tolist() == [5.0] * 3
    video_last_vr = VideoRoPE().positions(video_last, None, (2, 3))[..., -1:]
    assert VideoRoPE().next_positions(video_last_vr).flatten().tolist() == [5.0] * 3
    assert TADRoPE(gamma=0.5).next_positions(torch.tensor([[3.0]])).item() == 4.5
    assert VanillaRoPE().next_positions(torch.tensor([[3.0]])).item() == 4.0


def test_layout_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="needs the per-frame grid"):
        MRoPE().positions(torch.tensor([LAYOUT]))
    with pytest.raises(ValueError, match=r"frames are 2x2 = 4 tokens each"):
        MRoPE().positions(torch.tensor([LAYOUT]), None, (2, 2))


def test_frequency_pair_axes():
    assert scaled_section(64) == (16, 24, 24) and scaled_section(16) == (4, 6, 6) and sum(scaled_section(10)) == 10
    assert MRoPE().pair_axes(16).tolist() == [0] * 4 + [1] * 6 + [2] * 6  # t on the highest frequencies
    assert MRoPE(mrope_section=[2, 3, 3]).pair_axes(8).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="summing to the model's 16 frequency pairs"):
        MRoPE(mrope_section=[16, 24, 24]).pair_axes(16)
    video = VideoRoPE().pair_axes(64)
    assert video[:48].tolist() == [1, 2] * 24 and video[48:].tolist() == [0] * 16  # t on the lowest
    assert VideoRoPE(temporal_pairs=2).pair_axes(8).tolist() == [1, 2, 1, 2, 1, 2, 0, 0]


def test_multi_axis_rotary_equals_hf_on_equal_axes(tiny_llama):
    model = TCLlava.from_pretrained(tiny_llama).eval()
    rotary: RotaryPositions = model.language_model.rotary_emb
    pos = torch.tensor([[0.0, 1.5, 7.0, 30.0]])
    x = torch.zeros(1, 4, 8)
    with rotary.use(pos):
        expect = rotary(x, None)
    with rotary.use(pos.expand(3, -1, -1), MRoPE().pair_axes(rotary.num_pairs)):
        got = rotary(x, None)
    for a, b in zip(got, expect):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="need pair_axes exactly when"):
        rotary.use(pos.expand(3, -1, -1))


# --------------------------------------------------------------------------- in the model
def test_rotary_angles_inside_layers_follow_the_axes(tiny_llama):
    model = TCLlava.from_pretrained(tiny_llama, rope=VideoRoPE(delta=2.0)).eval()
    ids, mask, pixels = video_batch(model, [(2, 3), (5, 1)], "left")
    out, captured, inv_freq = rotary_inside(model, ids, mask, pixels)
    dim = 2 * inv_freq.numel()
    axes = VideoRoPE().pair_axes(dim // 2)
    real = mask.bool()
    for b in range(2):
        frames = out.frame_ids[b][real[b]].tolist()
        pos = as_axes(walk_reference(frames, model.grid, "videorope", 2.0))  # [3, L_real]
        angles = torch.stack([pos[axes[k]] * inv_freq[k] for k in range(dim // 2)], -1)
        torch.testing.assert_close(captured["cos"][b][real[b]], torch.cat([angles, angles], -1).cos())
        torch.testing.assert_close(captured["sin"][b][real[b]], torch.cat([angles, angles], -1).sin())


@pytest.mark.parametrize("rope", [MRoPE(), VideoRoPE(delta=2.0), VideoRoPE(delta=0.0)], ids=["mrope", "videorope", "delta0"])
@pytest.mark.parametrize("pooled", [False, True], ids=["mlp", "pooled"])
def test_generation_equals_full_recompute(tiny_llama, rope, pooled):
    pooling = VideoPooling([2, 2, 2]) if pooled else None
    model = TCLlava.from_pretrained(tiny_llama, rope=rope, mask=BidirectionalVisualMask(), pooling=pooling).eval()
    ids, mask, pixels = video_batch(model, [(4, 6), (1, 2), (8, 3)], "left", seed=3)
    gen = model.generate(ids, mask, pixels, max_new_tokens=5, output_scores=True, eos_token_id=[])
    scores = torch.stack(gen.scores, 1)
    full_ids = torch.cat([ids, gen.sequences[:, :-1]], -1)
    full_mask = torch.cat([mask, torch.ones_like(gen.sequences[:, :-1])], -1)
    with torch.no_grad():
        logits = model(full_ids, full_mask, pixels).logits[:, ids.shape[1] - 1:]
    torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-4)
    one = model.generate(ids[1:2, mask[1].bool()], None, pixels[1:2], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(one.sequences[0], gen.sequences[1])


def test_multi_axis_rules_change_the_model_but_not_text_only(tiny_llama):
    ids, mask, pixels = video_batch(TCLlava.from_pretrained(tiny_llama), [(3, 4), (6, 2)], "left")
    text = torch.randint(10, 500, (2, 6), generator=torch.Generator().manual_seed(0))
    logits = {}
    with torch.no_grad():
        for rope in (VanillaRoPE(), MRoPE(), VideoRoPE()):
            model = TCLlava.from_pretrained(tiny_llama, rope=rope).eval()
            logits[rope.name] = (model(ids, mask, pixels).logits, model(text).logits)
    real = mask.bool()
    for name in ("mrope", "videorope"):
        assert (logits[name][0] - logits["vanilla"][0])[real].abs().max() > 1e-3
        torch.testing.assert_close(logits[name][1], logits["vanilla"][1], rtol=0, atol=1e-6)


def pairwise_bidirectional(frames: list[int], real: list[int]) -> torch.Tensor:
    """The bidirectional-visual rule, one (i, j) pair at a time."""
    n = len(frames)
    out = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            out[i, j] = (j <= i or (frames[i] >= 0 and frames[j] >= 0)) and bool(real[j])
    return out


def test_bidirectional_visual_block_ids_and_dense_mask():
    frames = [[-1, -1, 0, 0, 1, 1, -1, -1], [-1, 0, 0, 0, 1, 1, 1, -1]]
    real = [[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 0]]
    rule = BidirectionalVisualMask()
    assert rule.block_ids(torch.tensor(frames))[1].tolist() == [-1, 0, 0, 0, 0, 0, 0, -1]
    dense = block_causal_mask(rule.block_ids(torch.tensor(frames)), torch.tensor(real))
    for b in range(2):
        assert torch.equal(dense[b, 0], pairwise_bidirectional(frames[b], real[b]))
    assert dense[1, 0, 1, 6] and not dense[1, 0, 6, 7]  # frame 0 sees frame 1; text never sees ahead


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_bidirectional_mask_reaching_attention(tiny_llama, monkeypatch, impl):
    model = TCLlava.from_pretrained(tiny_llama, rope=MRoPE(), mask=BidirectionalVisualMask(),
                                    attn_implementation=impl).eval()
    ids, mask, pixels = video_batch(model, [(3, 5), (0, 2)], "left", seed=1)
    seen = []
    if impl == "eager":
        original = modeling_llama.eager_attention_forward
        monkeypatch.setattr(modeling_llama, "eager_attention_forward",
                            lambda m, q, k, v, a, **kw: (seen.append(a == 0), original(m, q, k, v, a, **kw))[1])
    else:
        original = ALL_ATTENTION_FUNCTIONS[impl]

        def recorder(module, q, k, v, attention_mask, **kw):
            if isinstance(module, modeling_llama.LlamaAttention):
                seen.append(attention_mask)
            return original(module, q, k, v, attention_mask, **kw)

        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, impl, recorder)
    with torch.no_grad():
        out = model(ids, mask, pixels)
    assert len(seen) == model.config.text_config.num_hidden_layers
    real = mask.bool()
    for b in range(2):
        reference = pairwise_bidirectional(out.frame_ids[b].tolist(), mask[b].tolist())
        for got in seen:
            assert torch.equal(got[b, 0].expand_as(reference)[real[b]], reference[real[b]])


def test_rules_survive_save_and_load(tiny_llama, tmp_path):
    model = TCLlava.from_pretrained(tiny_llama, rope=MRoPE(mrope_section=[2, 3, 3]), mask=BidirectionalVisualMask())
    model.save_pretrained(tmp_path / "ckpt")
    again = TCLlava.from_pretrained(tmp_path / "ckpt")
    assert again.rope == MRoPE(mrope_section=(2, 3, 3)) and again.mask == BidirectionalVisualMask()


# --------------------------------------------------------------------------- the collector
FAMILIES = {"Order": "temporal", "Count": "temporal", "Color": "static"}
CHANCE = {"Order": 100 / 3, "Count": 25.0, "Color": 25.0}


def fake_job(root, num: int, rope: str, mask: str, seed: int, acc: dict[str, float]) -> None:
    """One multirun job directory as the ablation hook leaves it."""
    job = root / str(num)
    job.mkdir(parents=True)
    tasks = {t: {"family": FAMILIES[t], "accuracy": a, "chance": CHANCE[t], "total": 100} for t, a in acc.items()}
    (job / "ablation.json").write_text(json.dumps({
        "rope": rope, "mask": mask, "seed": seed, "train_seconds": 10.0, "eval_seconds": 5.0, "tasks": tasks,
    }))


def test_collector_on_fixed_inputs(tmp_path):
    root = tmp_path / "multirun"
    fake_job(root, 0, "vanilla", "causal", 0, {"Order": 30.0, "Count": 40.0, "Color": 80.0})
    fake_job(root, 1, "tad", "causal", 0, {"Order": 60.0, "Count": 70.0, "Color": 80.0})
    fake_job(root, 2, "vanilla", "causal", 1, {"Order": 50.0, "Count": 40.0, "Color": 90.0})
    (root / "multirun.yaml").write_text("not a job\n")
    runs = load_runs(root)
    assert [(r["rope"], r["seed"]) for r in runs] == [("vanilla", 0), ("tad", 0), ("vanilla", 1)]
    rows = {(r["rope"], r["mask"]): r for r in summarize(runs)}
    van, tad = rows[("vanilla", "causal")], rows[("tad", "causal")]
    # per seed, temporal = mean of its tasks: (30+40)/2 = 35 and (50+40)/2 = 45 -> 40 +- 7.07 (sample std)
    assert van["seeds"] == 2 and van["temporal_mean"] == pytest.approx(40.0)
    assert van["temporal_std"] == pytest.approx(50 ** 0.5)
    assert van["static_mean"] == pytest.approx(85.0) and van["overall_mean"] == pytest.approx(55.0)
    assert van["Order_mean"] == pytest.approx(40.0) and van["train_seconds"] == pytest.approx(10.0)
    assert tad["seeds"] == 1 and tad["temporal_std"] == 0.0 and tad["overall_mean"] == pytest.approx(70.0)
    assert list(rows) == [("vanilla", "causal"), ("tad", "causal")]  # first-seen order
    paths = write_report(summarize(runs), runs, root)
    md = paths["md"].read_text()
    assert "| vanilla | causal | 2 | 40.0 ± 7.1 | 85.0 ± 7.1 | 55.0 ± 7.1 |" in md
    assert "| chance | | | 29.2 | 25.0 | 27.8 |" in md
    csv = paths["csv"].read_text().splitlines()
    assert csv[0].startswith("rope,mask,seeds,temporal_mean,temporal_std,static_mean,static_std,overall_mean")
    assert csv[1].startswith("vanilla,causal,2,40.0,7.07")
    assert paths["png"].stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="no ablation.json under"):
        load_runs(tmp_path / "empty")


# --------------------------------------------------------------------------- the benchmark and one ablation job
def test_options_in_vocabulary_order_keep_the_scenes():
    for task in TASKS:
        for seed in range(5):
            canonical = make_sample(task, np.random.default_rng(seed), 8, 64)
            shuffled = make_sample(task, np.random.default_rng(seed), 8, 64, option_order="shuffled")
            assert canonical.scene == shuffled.scene and canonical.answer == shuffled.answer
            assert sorted(canonical.candidates) == sorted(shuffled.candidates)
            assert list(canonical.candidates) == sorted(canonical.candidates, key=VOCABULARY.index)
    with pytest.raises(ValueError, match="option_order must be one of"):
        generate("unused", 1, 1, option_order="alphabetical")


def test_one_ablation_job_trains_evaluates_and_collects(tmp_path):
    data = tmp_path / "data"
    generate(data / "ablation", num_train=16, num_eval_per_task=2, seed=0, num_frames=8)
    tiny = [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=ablation", "rope=videorope", "mask=bidirectional_visual", "seed=1", f"paths.data={data}",
            f"run_dir={tmp_path / 'runs' / '0_job'}", *tiny, "data.num_workers=0", "data.batch_size=4",
            "trainer.max_steps=2", "ablation.benchmark.decode.num_workers=0",
        ])
    assert cfg.data.num_frames == cfg.ablation.benchmark.num_frames == 4 and cfg.model.tiny.seed == 1
    result = train(cfg)
    summary = evaluate_run(cfg, result, train_seconds=1.0)
    assert (summary["rope"], summary["mask"], summary["seed"]) == ("videorope", "bidirectional_visual", 1)
    assert {t["family"] for t in summary["tasks"].values()} == {"temporal", "static"}
    assert summary["tasks"]["Appearance Order"]["chance"] == pytest.approx(100 / 3)
    assert json.loads((tmp_path / "runs/0_job/ablation.json").read_text())["tasks"] == summary["tasks"]
    rows = summarize(load_runs(tmp_path / "runs"))
    assert rows[0]["seeds"] == 1 and 0 <= rows[0]["temporal_mean"] <= 100
