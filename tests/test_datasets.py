"""SFT dataset, collator and data configs on real videos written with PyAV, real decoders."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from tc_llava.configs import CONFIG_DIR
from tc_llava.data.collate import GRID_KEYS, MODEL_KEYS, DataReport, SFTCollator
from tc_llava.data.datasets import RecordError, SampleError, SFTDataset
from tc_llava.data.synthetic import generate
from tc_llava.data.templates import IGNORE_INDEX
from tc_llava.data.video import sample_frames
from tc_llava.model.tiny import build_image_processor, build_tokenizer

CONFIGS = CONFIG_DIR / "data"
T = 4
N_VISUAL = T * 16
FPS = 8


def write_video(path: Path, num_frames: int, size: int = 64, shade: int = 0) -> Path:
    rng = np.random.default_rng(shade)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": "4"}
        for i in range(num_frames):
            frame = np.full((size, size, 3), (i * 9 + shade) % 256, np.uint8)
            frame[: size // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_zero_frame_video(path: Path) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=FPS)
    stream.width = stream.height = 64
    stream.pix_fmt = "yuv420p"
    container.start_encoding()
    container.close()
    return path


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def proc():
    return build_image_processor(56)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_video(root / "a.mp4", 32, shade=10)
    write_video(root / "b.mp4", 24, shade=90)
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(root / "still.png")
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    write_zero_frame_video(root / "zero.avi")
    return root


GOOD_VC2 = [
    {"video": "a.mp4", "QA": [{"i": "Watch closely.", "q": "What color is it?", "a": "red"}]},
    {"video": "b.mp4", "QA": [{"i": "", "q": "How many?", "a": "two"}, {"q": "Then?", "a": "it moves left"}]},
    {"video": "a.mp4", "QA": [{"i": "Describe.", "q": "", "a": "a red circle"}], "start": 1.0, "end": 3.0},
    {"image": "still.png", "QA": [{"i": "", "q": "Which shape?", "a": "square"}]},
]
BAD_VIDEOS = {"missing.mp4": "missing_file", "corrupt.mp4": "unreadable_media", "zero.avi": "zero_frames"}


def write_json(path: Path, records) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def make(tmp_path, media, tok, proc, records, corpus_type="videochat2", **kwargs) -> SFTDataset:
    corpora = {"c": {"json": write_json(tmp_path / "c.json", records), "media_root": str(media), "type": corpus_type}}
    kwargs = {"num_frames": T, "train": False, "backend": "decord", **kwargs}
    return SFTDataset(corpora, tok, proc, N_VISUAL, **kwargs)


def decode_learned(tok, labels: torch.Tensor) -> str:
    return tok.decode([t for t in labels.tolist() if t != IGNORE_INDEX])


def test_sample_matches_processor_on_sampled_frames(tmp_path, media, tok, proc):
    ds = make(tmp_path, media, tok, proc, GOOD_VC2, system="")
    image_id = tok.convert_tokens_to_ids("<image>")
    for index, record in enumerate(GOOD_VC2):
        sample = ds[index]
        assert ds.source(index)[0] == "c"
        r = ds.source(index)[1]
        rec = GOOD_VC2[r]
        bound = (rec["start"], rec["end"]) if "start" in rec else None
        frames, _ = sample_frames(media / (rec.get("video") or rec["image"]), T, "middle", bound)
        expected = proc(images=list(frames), return_tensors="pt")["pixel_values"]
        assert sample["pixel_values"].shape == (T, 3, 56, 56)
        assert torch.equal(sample["pixel_values"], expected)
        assert sample["input_ids"].tolist().count(image_id) == N_VISUAL
        assert decode_learned(tok, sample["labels"]) == "".join(f" {qa['a']}</s>" for qa in rec["QA"])
        assert sample["skipped"] == [] and not sample["truncated"]


def test_videochat2_instruction_is_the_system_prompt(tmp_path, media, tok, proc):
    ds = make(tmp_path, media, tok, proc, GOOD_VC2[:1], system="")
    text = tok.decode(ds[0]["input_ids"].tolist())
    assert text.startswith("<s>Watch closely. USER: <image><image>")
    assert text.endswith("\nWhat color is it? ASSISTANT: red</s>")
    ds = make(tmp_path, media, tok, proc, GOOD_VC2[:1], system=None)
    assert tok.decode(ds[0]["input_ids"].tolist()).startswith("<s>A chat between")
    assert "questions. Watch closely. USER:" in tok.decode(ds[0]["input_ids"].tolist())


def test_llava_records_get_one_placeholder_in_the_first_turn(tmp_path, media, tok, proc):
    records = [
        {"id": "0", "video": "a.mp4", "conversations": [
            {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "a circle"},
            {"from": "human", "value": "Color?"}, {"from": "gpt", "value": "red"}]},
        {"id": "1", "image": "still.png", "conversations": [
            {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "gray"}]},
    ]
    ds = make(tmp_path, media, tok, proc, records, corpus_type="llava", template="chatml", system="")
    image_id = tok.convert_tokens_to_ids("<image>")
    by_record = {ds.source(i)[1]: ds[i] for i in range(len(ds))}
    text = tok.decode([t for t in by_record[0]["input_ids"].tolist() if t != image_id])
    assert text == (
        "<|im_start|>user\n\nWhat is it?<|im_end|>\n<|im_start|>assistant\na circle<|im_end|>\n"
        "<|im_start|>user\nColor?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    )
    assert decode_learned(tok, by_record[0]["labels"]) == "a circle<|im_end|>red<|im_end|>"
    assert by_record[1]["input_ids"].tolist().count(image_id) == N_VISUAL


def test_training_frames_are_random_but_seeded(tmp_path, media, tok, proc):
    records = [{"video": "a.mp4", "QA": [{"q": "Q", "a": "A"}]}] * 3
    ds = make(tmp_path, media, tok, proc, records, train=True, seed=3)
    again = make(tmp_path, media, tok, proc, records, train=True, seed=3)
    first = [ds[i]["pixel_values"] for i in range(3)]
    assert all(torch.equal(x, again[i]["pixel_values"]) for i, x in enumerate(first))
    assert not all(torch.equal(first[0], x) for x in first[1:])
    ds.set_epoch(1)
    assert not all(torch.equal(x, ds[i]["pixel_values"]) for i, x in enumerate(first))


def test_truncation_is_counted_and_keeps_visual_tokens(tmp_path, media, tok, proc):
    ds = make(tmp_path, media, tok, proc, GOOD_VC2, max_txt_len=6)
    batch = SFTCollator(tok.pad_token_id)([ds[i] for i in range(len(ds))])
    assert batch["num_truncated"] == len(GOOD_VC2)
    image_id = tok.convert_tokens_to_ids("<image>")
    assert ((batch["input_ids"] == image_id).sum(1) == N_VISUAL).all()
    assert (batch["attention_mask"].sum(1) == N_VISUAL + 6).all()


@pytest.mark.parametrize("bad", sorted(BAD_VIDEOS))
@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_bad_video_raise_names_file_and_record(tmp_path, media, tok, proc, bad, backend):
    records = GOOD_VC2[:2] + [{"video": bad, "QA": [{"q": "Q", "a": "A"}]}]
    ds = make(tmp_path, media, tok, proc, records, on_error="raise", backend=backend)
    index = next(i for i in range(len(ds)) if ds.source(i)[1] == 2)
    with pytest.raises(SampleError) as info:
        ds[index]
    message = str(info.value)
    assert str(media / bad) in message and "record 2 of" in message and str(tmp_path / "c.json") in message
    assert info.value.skip["reason"] == BAD_VIDEOS[bad]


MALFORMED = [
    {"video": "a.mp4"},  # no QA
    {"video": "a.mp4", "QA": "What?"},  # QA not a list
    {"video": "a.mp4", "QA": [{"q": "Q", "a": 3}]},  # a not a string
    {"QA": [{"q": "Q", "a": "A"}]},  # no media
    {"video": "a.mp4", "QA": [{"q": "Q", "a": "A"}], "start": 2.0},  # start without end
    ["not", "an", "object"],
]


@pytest.mark.parametrize("k", range(len(MALFORMED)))
def test_malformed_record_raise_names_json_and_index(tmp_path, media, tok, proc, k):
    with pytest.raises(RecordError, match=r"c\.json record 2 \(corpus 'c'\): "):
        make(tmp_path, media, tok, proc, GOOD_VC2[:2] + [MALFORMED[k]], on_error="raise")


def test_malformed_llava_records(tmp_path, media, tok, proc):
    cases = [
        {"video": "a.mp4", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]},
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "x"}]},
        {"video": "a.mp4", "conversations": [
            {"from": "human", "value": "x"}, {"from": "gpt", "value": "y"},
            {"from": "human", "value": "<image> z"}, {"from": "gpt", "value": "w"}]},
    ]
    for case in cases:
        with pytest.raises(RecordError, match=r"record 0 .*conversations"):
            make(tmp_path, media, tok, proc, [case], corpus_type="llava")


def skip_dataset(tmp_path, media, tok, proc) -> SFTDataset:
    bad = [{"video": name, "QA": [{"q": "Q", "a": "A"}]} for name in sorted(BAD_VIDEOS)]
    return make(tmp_path, media, tok, proc, GOOD_VC2 + bad + MALFORMED, on_error="skip", backend="pyav")


def test_skip_replaces_counts_and_reports(tmp_path, media, tok, proc, caplog):
    with caplog.at_level(logging.WARNING):
        ds = skip_dataset(tmp_path, media, tok, proc)
    assert ds.load_skips == {"malformed_record": len(MALFORMED)}
    assert "skipped 6 malformed of 13 records" in caplog.text
    assert len(ds) == len(GOOD_VC2) + len(BAD_VIDEOS)
    samples = [ds[i] for i in range(len(ds))]
    skipped = [s for sample in samples for s in sample["skipped"]]
    # every bad video is met at its own position; a replacement may land on a bad one again
    assert {s["file"] for s in skipped} == {str(media / name) for name in BAD_VIDEOS}
    assert all(s["record"] >= len(GOOD_VC2) and s["reason"] == BAD_VIDEOS[Path(s["file"]).name] for s in skipped)
    assert all(int(sample["source"].split(":")[1]) < len(GOOD_VC2) for sample in samples)
    assert ds.skip_counts() == dict(Counter(s["reason"] for s in skipped), malformed_record=6)
    # deterministic replacements
    again = skip_dataset(tmp_path, media, tok, proc)
    assert [again[i]["source"] for i in range(len(again))] == [s["source"] for s in samples]


def test_skip_counts_survive_dataloader_workers(tmp_path, media, tok, proc):
    ds = skip_dataset(tmp_path, media, tok, proc)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=SFTCollator(tok.pad_token_id))
    report = DataReport(ds.load_skips)
    batches = list(report.track(loader, epoch=0))
    assert sum(b["num_samples"] for b in batches) == len(ds)
    serial = skip_dataset(tmp_path, media, tok, proc)
    for i in range(len(serial)):
        serial[i]
    assert report.totals() == {"samples": len(ds), "truncated": 0, "skips": serial.skip_counts()}
    assert set(serial.skip_counts()) == {"malformed_record", "missing_file", "unreadable_media", "zero_frames"}
    assert ds.skip_counts() == {"malformed_record": 6}  # the runtime skips happened in the workers
    assert report.end_epoch(1)["samples"] == 0  # track() closed epoch 0


def test_on_error_raise_through_dataloader_workers(tmp_path, media, tok, proc):
    records = GOOD_VC2 + [{"video": "corrupt.mp4", "QA": [{"q": "Q", "a": "A"}]}]
    ds = make(tmp_path, media, tok, proc, records, on_error="raise")
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, collate_fn=SFTCollator(tok.pad_token_id))
    batches = iter(loader)
    try:
        list(batches)
    except SampleError as e:
        message = str(e)
    else:
        pytest.fail("the corrupt video did not raise")
    # After a worker exception torch leaves the iterator in a reference cycle; shutting its
    # workers down from the garbage collector waits 5 s per worker, so do it now.
    batches._shutdown_workers()
    assert re.search(r"corrupt\.mp4: .*record 4 of .*c\.json", message)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_shapes_and_padding(tmp_path, media, tok, proc, side):
    ds = make(tmp_path, media, tok, proc, GOOD_VC2)
    samples = [ds[i] for i in range(len(ds))]
    batch = SFTCollator(tok.pad_token_id, padding_side=side)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    B, L = len(samples), max(lengths)
    assert len(set(lengths)) > 1
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (B, L)
    assert batch["pixel_values"].shape == (B, T, 3, 56, 56)
    for i, s in enumerate(samples):
        n = lengths[i]
        real = slice(0, n) if side == "right" else slice(L - n, L)
        pad = slice(n, L) if side == "right" else slice(0, L - n)
        assert torch.equal(batch["input_ids"][i, real], s["input_ids"])
        assert torch.equal(batch["labels"][i, real], s["labels"])
        assert torch.equal(batch["pixel_values"][i], s["pixel_values"])
        assert (batch["attention_mask"][i, real] == 1).all() and (batch["attention_mask"][i, pad] == 0).all()
        assert (batch["input_ids"][i, pad] == tok.pad_token_id).all()
        assert (batch["labels"][i, pad] == IGNORE_INDEX).all()
    assert set(MODEL_KEYS) - {"sample_ids", *GRID_KEYS} <= set(batch)  # packed batches only; Qwen-VL's only
    assert batch["skips"] == {} and batch["num_truncated"] == 0
    with pytest.raises(ValueError, match="padding_side"):
        SFTCollator(tok.pad_token_id, padding_side="middle")


def mixture(tmp_path, tok, proc, weights, sizes, **kwargs) -> SFTDataset:
    corpora = {}
    for name, weight, size in zip("xyz", weights, sizes):
        records = [{"video": f"{name}{i}.mp4", "QA": [{"q": "Q", "a": "A"}]} for i in range(size)]
        corpora[name] = {"json": write_json(tmp_path / f"{name}.json", records), "media_root": str(tmp_path), "type": "videochat2",
                         "weight": weight}
    return SFTDataset(corpora, tok, proc, N_VISUAL, num_frames=T, **kwargs)


def test_mixture_ratios_match_weights_and_are_seeded(tmp_path, tok, proc):
    weights, sizes = [0.5, 0.3, 0.2], [7, 50, 3]
    ds = mixture(tmp_path, tok, proc, weights, sizes, epoch_size=20_000, seed=1)
    names = np.array([ds.source(i)[0] for i in range(len(ds))])
    for name, w in zip("xyz", weights):
        assert abs((names == name).mean() - w) < 0.005
        assert abs((names[:2000] == name).mean() - w) < 0.04  # spread over the epoch, not blocked
    counts = np.bincount([ds.source(i)[1] for i in range(len(ds)) if names[i] == "x"], minlength=7)
    assert counts.max() - counts.min() <= 1  # a corpus is walked in permutations
    same = mixture(tmp_path, tok, proc, weights, sizes, epoch_size=20_000, seed=1)
    assert np.array_equal(same.plan(), ds.plan())
    other = mixture(tmp_path, tok, proc, weights, sizes, epoch_size=20_000, seed=2)
    assert not np.array_equal(other.plan(), ds.plan())
    ds.set_epoch(1)
    assert not np.array_equal(same.plan(), ds.plan())
    by_size = mixture(tmp_path, tok, proc, [None, None, None], sizes)
    assert len(by_size) == sum(sizes)
    assert sorted(by_size.source(i) for i in range(len(by_size))) == sorted(
        (n, r) for n, s in zip("xyz", sizes) for r in range(s)
    )
    with pytest.raises(ValueError, match="select names corpora \\['w'\\]"):
        mixture(tmp_path, tok, proc, weights, sizes, select=["x", "w"])


def compose_data(name: str, data_dir: Path):
    with initialize_config_dir(config_dir=str(CONFIGS.parent), version_base=None):
        return compose(overrides=[f"+data={name}", f"+paths.data={data_dir}"])


def test_configs_compose_and_instantiate(tmp_path, media, tok, proc):
    generate(tmp_path / "synthetic", num_train=3, num_eval_per_task=1, num_frames=8, size=32)
    cfg = compose_data("synthetic", tmp_path)
    for key in ("num_frames", "max_txt_len", "template", "on_error", "num_workers", "decode_threads", "backend",
                "batch_size"):
        assert key in cfg.data
    ds = instantiate(cfg.data.dataset, tokenizer=tok, image_processor=proc, num_visual_tokens=cfg.data.num_frames * 16)
    collate = instantiate(cfg.data.collator, pad_token_id=tok.pad_token_id)
    batch = collate([ds[i] for i in range(len(ds))])
    assert len(ds) == 3 and batch["pixel_values"].shape == (3, cfg.data.num_frames, 3, 56, 56)
    learned = [decode_learned(tok, labels) for labels in batch["labels"]]
    assert all(text.startswith(" Best option:(") or "</s> Best option:(" in text for text in learned)

    cfg = compose_data("videochat2_it", tmp_path)
    corpora = cfg.data.corpora
    assert len(corpora) >= 30 and {"caption_textvr", "vqa_tgif_frame_qa", "conversation_videochatgpt"} <= set(corpora)
    root = f"{tmp_path}/videochat2_it"
    for name, spec in corpora.items():
        assert spec.type == "videochat2" and spec.json.startswith(root) and spec.media_root.startswith(root)
    assert cfg.data.dataset.corpora == corpora

    cfg = compose_data("llava", tmp_path)
    (spec,) = cfg.data.corpora.values()
    assert spec.type == "llava" and spec.json.startswith(str(tmp_path))


def test_images_are_one_frame_and_corpora_keep_their_frame_counts(tmp_path, media, tok, proc):
    """image_frames=1 and a corpus of 2-frame videos beside the 4-frame default: each sample has its own
    frame and visual-token count, the batch packs them, and the report counts them."""
    videos = [{"video": "a.mp4", "QA": [{"q": "Q", "a": "A"}]}]
    images = [{"image": "still.png", "QA": [{"q": "Q", "a": "A"}]}]
    corpora = {"short": {"json": write_json(tmp_path / "s.json", videos), "media_root": str(media),
                         "type": "videochat2", "num_frames": 2},
               "long": {"json": write_json(tmp_path / "l.json", videos), "media_root": str(media), "type": "videochat2"},
               "images": {"json": write_json(tmp_path / "i.json", images), "media_root": str(media),
                          "type": "videochat2"}}
    tokens = lambda frames: 16 * frames + 1  # noqa: E731 - a stand-in tokens_per_video
    ds = SFTDataset(corpora, tok, proc, tokens, num_frames=T, train=False, image_frames=1)
    by_source = {ds.source(i)[0]: ds[i] for i in range(len(ds))}
    image_id = tok.convert_tokens_to_ids("<image>")
    for name, frames in (("short", 2), ("long", T), ("images", 1)):
        sample = by_source[name]
        assert sample["pixel_values"].shape == (frames, 3, 56, 56) and sample["num_frames"] == frames
        assert sample["input_ids"].tolist().count(image_id) == sample["num_visual_tokens"] == tokens(frames)
        assert sample["is_image"] == (name == "images")
    samples = [by_source[name] for name in ("short", "long", "images")]
    batch = SFTCollator(tok.pad_token_id)(samples)
    assert batch["pixel_values"].shape == (2 + T + 1, 3, 56, 56) and batch["num_frames"].tolist() == [2, T, 1]
    assert torch.equal(batch["pixel_values"], torch.cat([s["pixel_values"] for s in samples]))
    assert batch["media"] == {"frames": 2 + T + 1, "visual_tokens": tokens(2) + tokens(T) + tokens(1), "images": 1}
    report = DataReport()
    report.update(batch)
    assert report.media_totals() == batch["media"] and report.end_epoch(0)["media"] == batch["media"]
    resumed = DataReport()
    resumed.load_state_dict(report.state_dict())
    assert resumed.media_totals() == batch["media"]
    with pytest.raises(ValueError, match=r"num_visual_tokens=64 is one count, for 4 frames, but samples will have "
                                         r"\[1, 2, 4\] frames .*pass the model's tokens_per_video"):
        SFTDataset(corpora, tok, proc, N_VISUAL, num_frames=T, image_frames=1)
    with pytest.raises(ValueError, match=r"corpus 'short': num_frames must be a positive integer or null, got 0"):
        SFTDataset({**corpora, "short": {**corpora["short"], "num_frames": 0}}, tok, proc, tokens, num_frames=T)
