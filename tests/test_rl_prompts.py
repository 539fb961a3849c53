"""RL prompt sets from VideoChat2-IT and LLaVA records: the question and answer a record gives, rendered as SFT
renders its turns, with every bad record named (or skipped and counted) before the model loads."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import CONFIGS
from hydra import compose, initialize_config_dir

from tc_llava.data.datasets import DataError, RecordError
from tc_llava.data.synthetic import write_mp4
from tc_llava.data.templates import get_template
from tc_llava.rl.prompts import check_prompts, load_records
from tc_llava.rl.rewards import score


def records_cfg(tmp_path: Path, records: list, *extra: str):
    (tmp_path / "rl.json").write_text(json.dumps(records))
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("rl", overrides=["prompts=records", f"prompts.json={tmp_path / 'rl.json'}",
                                       f"prompts.media_root={tmp_path}", *extra])
    return cfg.prompts


@pytest.fixture
def media(tmp_path) -> Path:
    write_mp4(tmp_path / "a.mp4", np.zeros((8, 32, 32, 3), np.uint8), 8)
    return tmp_path


VC2 = {"video": "a.mp4", "QA": [{"i": "Watch closely.", "q": "What is shown?", "a": "A dark room."},
                                {"i": "", "q": "How many lamps are on?", "a": "<answer>3</answer>"}],
       "answer_type": "number", "start": 0.5, "end": 1.0}
LLAVA = {"id": "q7", "video": "a.mp4", "conversations": [
    {"from": "human", "value": "<video>\nWhen does the lamp turn on?"},
    {"from": "gpt", "value": "2.5 - 4 seconds"}]}


def test_a_videochat2_record_asks_its_last_question_after_its_history(media):
    (p,) = load_records(records_cfg(media, [VC2]), "<image>")
    t = get_template("vicuna_v1")
    assert (p.id, p.solution, p.answer_type, p.bound, p.media) == ("0", "3", "number", (0.5, 1.0), str(media / "a.mp4"))
    assert p.prompt == (f"{t.system} Watch closely. USER: <image>\nWhat is shown? ASSISTANT: A dark room.</s>"
                        "USER: How many lamps are on? Please provide the numerical value (e.g., 42 or 3.14) within "
                        "the <answer> </answer> tags. ASSISTANT:")


def test_a_llava_record_takes_the_sets_answer_type_and_its_own_id(media):
    cfg = records_cfg(media, [LLAVA], "prompts.type=llava", "prompts.answer_type=span",
                      "prompts.prompt.system=Be exact.")
    (p,) = load_records(cfg, "<image>")
    assert (p.id, p.solution, p.answer_type) == ("q7", "2.5 - 4 seconds", "span")
    assert p.prompt == ("Be exact. USER: <image>\nWhen does the lamp turn on? Please provide the start and end time "
                        "in seconds (e.g., 12.5 - 20.0) within the <answer> </answer> tags. ASSISTANT:")
    rewards = score(["<answer>3 - 4</answer>", "soon"], [p.solution] * 2, ["span"] * 2, {"temporal_iou": 1.0})
    assert rewards.total == [pytest.approx(1 / 1.5), 0.0] and rewards.malformed == {"temporal_iou": 1}


BAD = [
    ({**VC2, "QA": []}, RecordError, r"record 0: 'QA' must be a non-empty list"),
    ({**VC2, "answer_type": "text"}, RecordError,
     r"record 0: 'answer_type' must be one of \('mcq', 'number', 'span'\), got 'text'"),
    ({**VC2, "QA": [{"q": "How many?", "a": "three"}]}, RecordError,
     r"record 0: the last answer: numeric solution 'three': expected a number"),
    ({**VC2, "answer_type": "mcq", "QA": [{"q": "Which?", "a": "the red one"}]}, RecordError,
     r"record 0: the last answer: mcq solution 'the red one': expected the option letter A-G first"),
    ({**VC2, "video": "gone.mp4"}, FileNotFoundError, r"record 0: media .*/gone.mp4 not found"),
]


@pytest.mark.parametrize(("record", "error", "message"), BAD)
def test_a_bad_record_is_named_before_the_model_loads(media, record, error, message):
    cfg = records_cfg(media, [VC2, record][::-1])
    with pytest.raises(error, match=rf"^prompts.json={media / 'rl.json'} {message}"):
        check_prompts(cfg)


def test_skipped_records_are_counted_in_one_line(media, caplog):
    cfg = records_cfg(media, [b[0] for b in BAD] + [VC2], "prompts.on_error=skip")
    with caplog.at_level(logging.WARNING, logger="tc_llava.rl.prompts"):
        prompts = load_records(cfg, "<image>")
    assert [p.id for p in prompts] == ["5"]
    assert caplog.messages == [f"prompts.json={media / 'rl.json'}: skipped "
                               "{'malformed_record': 4, 'missing_file': 1} of 6 records (prompts.on_error=skip)"]


@pytest.mark.parametrize(("override", "error", "message"), [
    ("prompts.type=sharegpt", ValueError, r"prompts.type='sharegpt': expected one of \('videochat2', 'llava'\)"),
    ("prompts.answer_type=free", ValueError, r"prompts.answer_type='free': expected one of"),
    ("prompts.media_root=/nowhere", FileNotFoundError, r"prompts.media_root=/nowhere is not a directory"),
])
def test_bad_settings_are_named(media, override, error, message):
    with pytest.raises(error, match=f"^{message}"):
        check_prompts(records_cfg(media, [VC2], override))


def test_a_file_that_is_not_a_list_of_records_is_named(media):
    cfg = records_cfg(media, [])
    (media / "rl.json").write_text('{"video": "a.mp4"}')
    with pytest.raises(DataError, match=rf"^prompts.json: {media / 'rl.json'} must hold a JSON list of records"):
        check_prompts(cfg)
    (media / "rl.json").write_text('[{"video": "a.mp4", ')
    with pytest.raises(DataError, match=rf"^prompts.json: cannot read {media / 'rl.json'}: Expecting"):
        check_prompts(cfg)
