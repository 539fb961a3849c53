"""Packed SFT batches: rows within capacity, samples whole and apart, frames in row order, counts as padded,
the same rows on resume, and ``data.packing=true`` as the one override that turns packing on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import skip_first_batches
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from tc_llava.configs import CONFIG_DIR
from tc_llava.data.collate import DataReport, PackingCollator, SFTCollator, pack
from tc_llava.data.datasets import DataError, SFTDataset
from tc_llava.data.synthetic import generate
from tc_llava.data.templates import IGNORE_INDEX
from tc_llava.model.tiny import build_image_processor, build_tokenizer
from tc_llava.train.checkpoint import STATE_FILE
from tc_llava.train.loop import make_collator, train
from tc_llava.train.settings import SettingsError, check_train_config

from test_train import train_cfg

PAD = 0
LENGTHS = (5, 3, 8, 2, 7, 1, 4)


def sample(k: int, length: int, frames: int = 2) -> dict:
    """Sample ``k``: tokens ``100k + 1, ...`` (each its own), every label learned, frames filled with ``k``."""
    ids = torch.arange(length) + 100 * k + 1
    return {"input_ids": ids, "labels": ids.clone(), "pixel_values": torch.full((frames, 3, 4, 4), float(k)),
            "num_visual_tokens": frames, "truncated": k % 3 == 0, "is_image": frames == 1, "source": f"c:{k}",
            "skipped": [{"reason": "missing_file", "record": k}] if k % 2 else []}


def pool(lengths=LENGTHS, frames=None) -> list[dict]:
    return [sample(k, n, frames[k] if frames else 2) for k, n in enumerate(lengths)]


def runs(batch) -> list[list[int]]:
    """Per row, the pool index of each sample in it, left to right, read back from the tokens."""
    return [[int(batch["input_ids"][r, sample_ids == j][0]) // 100 for j in range(int(sample_ids.max()) + 1)]
            for r, sample_ids in enumerate(batch["sample_ids"])]


def test_pack_strategies():
    assert pack(LENGTHS[:6], 10) == [[2, 3], [1, 4], [0, 5]]  # 8+2, 7+3, 5+1: longest first, into the fullest row
    assert pack(LENGTHS[:6], 10, "greedy") == [[0, 1, 3], [2, 5], [4]]  # first fit in pool order
    assert pack(LENGTHS, None) == [list(range(len(LENGTHS)))]
    with pytest.raises(ValueError, match="data.pack.strategy"):
        PackingCollator(PAD, 10, strategy="worst")


@pytest.mark.parametrize("strategy", ["best_fit", "greedy"])
def test_samples_are_packed_whole_apart_and_in_row_order(strategy):
    samples = pool(frames=[1, 2, 2, 3, 2, 1, 2])  # unequal frame counts: frames go out as one [N, C, H, W]
    batch = PackingCollator(PAD, max_tokens=10, strategy=strategy)(samples)
    again = PackingCollator(PAD, max_tokens=10, strategy=strategy)(samples)
    assert batch.keys() == again.keys()
    for key, value in batch.items():
        assert torch.equal(value, again[key]) if torch.is_tensor(value) else value == again[key], key
    rows = runs(batch)
    assert rows == pack(LENGTHS, 10, strategy) and len(rows) == {"best_fit": 3, "greedy": 4}[strategy]
    order = [k for row in rows for k in row]
    assert sorted(order) == list(range(len(samples)))
    R, L = batch["input_ids"].shape
    assert batch["labels"].shape == batch["attention_mask"].shape == batch["sample_ids"].shape == (R, L)
    assert L == max(sum(LENGTHS[k] for k in row) for row in rows) and (batch["attention_mask"].sum(1) <= 10).all()
    for r, row in enumerate(rows):
        start = 0
        for j, k in enumerate(row):
            span = slice(start, start + LENGTHS[k])
            assert (batch["sample_ids"][r, span] == j).all()
            assert torch.equal(batch["input_ids"][r, span], samples[k]["input_ids"])
            assert batch["labels"][r, start] == IGNORE_INDEX  # no sample predicts the next one's first token
            assert torch.equal(batch["labels"][r, start + 1 : span.stop], samples[k]["labels"][1:])
            start = span.stop
        pad = slice(start, L)
        assert (batch["sample_ids"][r, pad] == -1).all() and (batch["attention_mask"][r, pad] == 0).all()
        assert (batch["input_ids"][r, pad] == PAD).all() and (batch["labels"][r, pad] == IGNORE_INDEX).all()
        assert (batch["attention_mask"][r, :start] == 1).all()
    frames = [samples[k]["pixel_values"].shape[0] for k in order]
    assert batch["num_frames"].tolist() == frames
    owners = torch.repeat_interleave(torch.tensor(order), torch.tensor(frames)).float()
    assert torch.equal(batch["pixel_values"].flatten(1).amax(1), owners)
    assert batch["sources"] == [f"c:{k}" for k in order]
    assert batch["packing"] == {"rows": R, "tokens": sum(LENGTHS), "capacity": R * L, "samples": len(samples)}


def test_equal_frame_counts_stack_in_row_order():
    samples = pool()
    batch = PackingCollator(PAD, max_tokens=10)(samples)
    order = [k for row in runs(batch) for k in row]
    assert batch["pixel_values"].shape == (len(samples), 2, 3, 4, 4)
    assert batch["pixel_values"][:, :, 0, 0, 0].tolist() == [[float(k)] * 2 for k in order]


def test_counts_are_the_padding_collators():
    samples = pool(frames=[1, 2, 2, 3, 2, 1, 2])
    packed, padded = PackingCollator(PAD, max_tokens=10)(samples), SFTCollator(PAD)(samples)
    for key in ("num_samples", "num_truncated", "skips", "media"):
        assert packed[key] == padded[key], key
    assert sorted(packed["sources"]) == sorted(padded["sources"])
    assert sorted(s["record"] for s in packed["skipped"]) == sorted(s["record"] for s in padded["skipped"])
    assert packed["attention_mask"].sum() == padded["attention_mask"].sum()
    assert (packed["labels"] != IGNORE_INDEX).sum() == (padded["labels"] != IGNORE_INDEX).sum() - len(samples)
    report = DataReport()
    report.update(packed)
    report.update(packed)
    assert report.state_dict()["total"]["packing"] == {key: 2 * v for key, v in packed["packing"].items()}
    resumed = DataReport()
    resumed.load_state_dict(report.state_dict())
    assert resumed.state_dict() == report.state_dict()


def test_one_row_and_length_buckets():
    samples = pool()
    whole = PackingCollator(PAD)(samples)
    assert whole["input_ids"].shape == (1, sum(LENGTHS)) and runs(whole) == [list(range(len(samples)))]
    bucketed = PackingCollator(PAD, max_tokens=10, pad_to_multiple_of=8)(samples)
    assert bucketed["input_ids"].shape == (3, 16) and bucketed["packing"]["capacity"] == 48
    assert (bucketed["sample_ids"][:, 10:] == -1).all() and (bucketed["labels"][:, 10:] == IGNORE_INDEX).all()


def test_a_sample_longer_than_a_row_is_refused():
    with pytest.raises(DataError, match=r"sample c:2 has 8 tokens, .*\(data\.pack\.max_tokens=7\)"):
        PackingCollator(PAD, max_tokens=7)(pool())
    with pytest.raises(ValueError, match="data.pack.max_tokens must be a positive integer or null, got 0"):
        PackingCollator(PAD, max_tokens=0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    generate(root / "synthetic", num_train=12, num_eval_per_task=1, seed=0, num_frames=8, size=32)
    return root


def test_resume_gets_the_same_packed_batches(synthetic):
    """Skipping the first k batches of a fresh loader, as accelerate does on resume, gives the packed batches
    an uninterrupted run got from batch k on."""

    def loader():
        corpora = {"synthetic": {"json": str(synthetic / "synthetic/train.json"),
                                 "media_root": str(synthetic / "synthetic"), "type": "videochat2"}}
        dataset = SFTDataset(corpora, build_tokenizer(), build_image_processor(56), lambda n: 4 * n, num_frames=4,
                             backend="pyav", train=True, seed=3)
        longest = max(len(dataset[i]["input_ids"]) for i in range(len(dataset)))
        collate = PackingCollator(PAD, max_tokens=2 * longest, pad_to_multiple_of=8)
        return torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, drop_last=True, collate_fn=collate,
                                           generator=torch.Generator().manual_seed(0))

    run = list(loader())
    assert len(run) == 3 and all(b["packing"]["rows"] < b["num_samples"] for b in run)  # rows hold several samples
    assert run[0]["sources"] != run[1]["sources"]
    resumed = list(skip_first_batches(loader(), 1))
    assert len(resumed) == 2
    for a, b in zip(run[1:], resumed):
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]) if torch.is_tensor(value) else value == b[key], key


def compose_train(synthetic: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.data={synthetic}", *overrides])


def test_data_packing_true_is_the_one_override(synthetic):
    assert type(make_collator(compose_train(synthetic).data, PAD)) is SFTCollator
    cfg = compose_train(synthetic, "data.packing=true", "data.collator.pad_to_multiple_of=64")
    check_train_config(cfg)
    collate = make_collator(cfg.data, PAD, longest=10_000)
    assert isinstance(collate, PackingCollator) and collate.max_tokens is None and collate.strategy == "best_fit"
    assert collate.pad_to_multiple_of == 64
    cfg = compose_train(synthetic, "data.packing=true", "data.pack.max_tokens=600", "data.pack.strategy=greedy")
    check_train_config(cfg)
    collate = make_collator(cfg.data, PAD, longest=600)
    assert (collate.max_tokens, collate.strategy) == (600, "greedy")
    with pytest.raises(SettingsError, match=r"data\.pack\.max_tokens=600: expected >= 601, the most tokens"):
        make_collator(cfg.data, PAD, longest=601)


@pytest.mark.parametrize("override,message", [
    ("data.packing=maybe", r"data\.packing='maybe': expected true or false"),
    ("data.pack.strategy=worst", r"data\.pack\.strategy='worst': expected one of \('best_fit', 'greedy'\)"),
    ("data.pack.max_tokens=0", r"data\.pack\.max_tokens=0: expected null or an integer >= 1"),
    ("data.pack.max_tokens=512", r"data\.pack\.max_tokens=512: expected more than data\.max_txt_len=512"),
    ("data.collator.padding_side=left", r"data\.collator\.padding_side='left': expected right with data\.packing"),
])
def test_bad_packing_settings_are_refused_before_the_model(synthetic, override, message):
    with pytest.raises(SettingsError, match=message):
        check_train_config(compose_train(synthetic, "data.packing=true", override))


def test_the_metrics_report_the_padding(synthetic, tmp_path):
    """The step's row carries the share of padded slots (the fill of packed rows is 1 minus it)."""
    train(train_cfg(synthetic, tmp_path / "run", "trainer.max_steps=1", "export.enabled=false"))
    (row,) = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert 0 < row["pad_fraction"] < 1


@pytest.mark.parametrize("mask", ["frame_block_causal", "causal"])
def test_packed_training_equals_padded_training(synthetic, tmp_path, mask):
    """Three optimizer steps on the same batches, packed two rows deep or padded one sample per row, under the
    block_merge decomposition: the same losses and the same weights (AdamW, lr 1e-3; fp32 summation order is
    the only difference)."""
    common = ("trainer.max_steps=3", "export.enabled=false", f"mask={mask}", "model.attn_implementation=block_merge")
    padded = train(train_cfg(synthetic, tmp_path / "padded", *common))
    packed = train(train_cfg(synthetic, tmp_path / "packed", *common, "data.packing=true", "data.pack.max_tokens=700"))
    state = json.loads((tmp_path / "packed/checkpoints/step_3" / STATE_FILE).read_text())
    packing = state["data"]["total"]["packing"]
    assert packing["samples"] == 12 and packing["rows"] == 4  # three samples per row
    torch.testing.assert_close(torch.tensor(packed["losses"]), torch.tensor(padded["losses"]), rtol=0, atol=1e-5)
    a = load_file(tmp_path / "padded/checkpoints/step_3/model.safetensors")
    b = load_file(tmp_path / "packed/checkpoints/step_3/model.safetensors")
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=1e-5, msg=key)
