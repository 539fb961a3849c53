"""One step turns frames and a prompt into model inputs: the eval runner, the chat command, the lmms-eval
plugin and the training dataset give the same inputs for the same video and question.

The plugin's module imports lmms-eval, so its step is checked as it calls it: ``model_inputs`` on the
prompt its ``_prompt`` renders (``build_prompt`` with the export's system text, the checkpoint's placeholder).
"""

from __future__ import annotations

import json

import pytest
import torch

from tc_llava.chat import Chat
from tc_llava.data.datasets import SFTDataset
from tc_llava.data.inputs import encode_prompt, model_inputs
from tc_llava.data.templates import IGNORE_INDEX, build_prompt, image_token_of
from tc_llava.data.video import sample_frames
from tc_llava.eval.runner import GenerationSettings, Item, _ItemFrames, _LeftPad
from tc_llava.model.tc_llava import TCLlava

from test_datasets import write_video

FRAMES, QUESTION, ANSWER = 4, "Which colour comes first?", "Red, then blue."


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("inputs") / "clip.mp4", 24, size=64)


@pytest.mark.parametrize("checkpoint, template", [("tiny_llama", "vicuna_v1"), ("tiny_onevision", "chatml")])
def test_four_paths_give_one_set_of_inputs(checkpoint, template, video, tmp_path, request):
    model = TCLlava.from_pretrained(request.getfixturevalue(checkpoint), template=template).eval()
    tokenizer, processor = model.tokenizer, model.frame_processor
    token = image_token_of(tokenizer)
    frames, _ = sample_frames(video, FRAMES, "middle", backend="pyav")
    prompt = build_prompt(template, None, QUESTION, image_token=token)

    # the runner: an item of that prompt, decoded and batched as generate_predictions does
    settings = GenerationSettings(num_frames=FRAMES, template=template, backend="pyav", num_workers=0)
    item = _ItemFrames([Item("q", str(video), prompt)], settings, tokenizer, processor,
                       model.tokens_per_video(FRAMES), None)[0]
    runner = _LeftPad(tokenizer.pad_token_id)([item])
    # the chat command's first turn about the same frames
    chat = Chat(model, frames, template).inputs(QUESTION)
    # the lmms-eval plugin: its prompt (the task's context after the export's system text) through model_inputs
    plugin = model_inputs(tokenizer, processor, model.tokens_per_video, template, frames,
                          build_prompt(template, None, QUESTION, "", token))
    # the training dataset: the same question with its answer, its frames at segment middles (train=False)
    record = {"video": video.name, "conversations": [{"from": "human", "value": f"{token}\n{QUESTION}"},
                                                     {"from": "gpt", "value": ANSWER}]}
    (tmp_path / "c.json").write_text(json.dumps([record]))
    corpora = {"c": {"json": str(tmp_path / "c.json"), "media_root": str(video.parent), "type": "llava"}}
    sample = SFTDataset(corpora, tokenizer, processor, model.tokens_per_video, FRAMES, template=template,
                        train=False, backend="pyav")[0]

    ids = runner["input_ids"][0]
    expected_pixels = processor(images=list(frames), return_tensors="pt")["pixel_values"]
    assert int((ids == model.placeholder_token_id).sum()) == model.tokens_per_video(FRAMES)
    assert torch.equal(runner["attention_mask"][0], torch.ones_like(ids))
    assert runner["num_frames"].tolist() == [FRAMES]
    for inputs in (chat, plugin):
        assert torch.equal(inputs["input_ids"], ids) and torch.equal(inputs["attention_mask"], torch.ones_like(ids))
        assert inputs["num_frames"] == FRAMES and (inputs["labels"] == IGNORE_INDEX).all()
    for pixels in (runner["pixel_values"][0], chat["pixel_values"], plugin["pixel_values"], sample["pixel_values"]):
        assert torch.equal(pixels, expected_pixels)
    # training's text is the generation prompt, then the learned answer
    assert torch.equal(sample["input_ids"][: len(ids)], ids) and (sample["labels"][: len(ids)] == IGNORE_INDEX).all()
    answer = sample["labels"][len(ids):]
    assert tokenizer.decode(answer[answer != IGNORE_INDEX]).strip().startswith(ANSWER)
    # and the model takes them as they are
    logits = model(runner["input_ids"], runner["attention_mask"], runner["pixel_values"]).logits
    assert logits.shape[:2] == (1, len(ids))


def test_a_rendered_prompt_is_not_re_rendered(tiny_llama):
    model = TCLlava.from_pretrained(tiny_llama)
    prompt = build_prompt("vicuna_v1", None, QUESTION)
    with pytest.raises(ValueError, match="a rendered prompt holds its system text and is never truncated"):
        encode_prompt(model.tokenizer, "vicuna_v1", prompt, 4, system="")
