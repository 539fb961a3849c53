"""Conversation templates: label masking, placeholder expansion, truncation, generation prompts."""

from __future__ import annotations

import pytest

from tc_llava.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    build_prompt,
    get_template,
    render,
    tokenize_conversation,
    tokenize_prompt,
)
from tc_llava.model.tiny import build_tokenizer

N_VISUAL = 12
TURNS = [
    ("<image>\nWhat color is the circle?", "red circle"),
    ("Which shape moves left?", "(B) blue square."),
    ("How many objects?", "three"),
]
# What each template learns per answer: the answer and its end-of-turn token, plus the
# space that belongs to the answer's first token when the prompt ends at a role word.
LEARNED = {
    "vicuna_v1": " {}</s>",
    "llama_2": " {} </s>",
    "mistral_instruct": " {}</s>",
    "chatml": "{}<|im_end|>",
    "next_video": " {}</s>",
    "plain": "{}\n",
    "qwen2_vl": "{}<|im_end|>",
    "qwen3_vl": "{}<|im_end|>",
}


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def learned_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for t in labels + [IGNORE_INDEX]:
        if t != IGNORE_INDEX:
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs


def test_every_template_is_covered():
    assert set(TEMPLATES) == set(LEARNED)


@pytest.mark.parametrize("name", sorted(LEARNED))
@pytest.mark.parametrize("system", [None, "", "Watch the video."])
def test_labels_are_exactly_the_answers(tok, name, system):
    enc = tokenize_conversation(tok, name, TURNS, N_VISUAL, system=system)
    labels = enc.labels.tolist()
    expected = [LEARNED[name].format(a) for _, a in TURNS]
    runs = [tok.decode(run) for run in learned_runs(labels)]
    if name == "plain":  # no text between answers: the three answers form one run
        assert runs == ["".join(expected)]
    else:
        assert runs == expected
    learned = [i for i, t in enumerate(labels) if t != IGNORE_INDEX]
    assert all(labels[i] == enc.input_ids[i] for i in learned)
    # the tokens spell the rendered text, placeholder run collapsed back to one token
    ids = enc.input_ids.tolist()
    image_id = tok.convert_tokens_to_ids("<image>")
    first = ids.index(image_id)
    collapsed = ids[: first + 1] + ids[first + N_VISUAL :]
    text = "".join(s.text for s in render(name, TURNS, system))
    assert tok.decode(collapsed).removeprefix("<s>") == text


@pytest.mark.parametrize("name", sorted(LEARNED))
@pytest.mark.parametrize("n_visual", [1, 16, 37])
def test_placeholder_expands_to_exactly_n_visual_tokens(tok, name, n_visual):
    enc = tokenize_conversation(tok, name, TURNS, n_visual)
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    image_id = tok.convert_tokens_to_ids("<image>")
    where = [i for i, t in enumerate(ids) if t == image_id]
    assert len(where) == n_visual
    assert where == list(range(where[0], where[0] + n_visual))
    assert all(labels[i] == IGNORE_INDEX for i in where)
    assert (ids[0] == tok.bos_token_id) == TEMPLATES[name].add_bos


def test_vicuna_text_is_llavas(tok):
    text = "".join(s.text for s in render("vicuna_v1", TURNS[:2], system="SYS"))
    assert text == (
        "SYS USER: <image>\nWhat color is the circle? ASSISTANT: red circle</s>"
        "USER: Which shape moves left? ASSISTANT: (B) blue square.</s>"
    )
    llama = "".join(s.text for s in render("llama_2", TURNS[:2], system="SYS"))
    assert llama == (
        "[INST] <<SYS>>\nSYS\n<</SYS>>\n\n<image>\nWhat color is the circle? [/INST] red circle </s>"
        "<s>[INST] Which shape moves left? [/INST] (B) blue square. </s>"
    )


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_truncation_keeps_every_visual_token_and_is_flagged(tok, name):
    full = tokenize_conversation(tok, name, TURNS, N_VISUAL, system="A long system prompt " * 4)
    n_text = len(full.input_ids) - N_VISUAL
    assert not full.truncated
    for cap in (3, n_text // 2, n_text - 1):
        enc = tokenize_conversation(tok, name, TURNS, N_VISUAL, system="A long system prompt " * 4, max_txt_len=cap)
        image_id = tok.convert_tokens_to_ids("<image>")
        ids = enc.input_ids.tolist()
        assert enc.truncated
        assert ids.count(image_id) == N_VISUAL
        assert len(ids) - N_VISUAL == cap
        # the kept text is a prefix of the full text (placeholder aside)
        text_full = [t for t in full.input_ids.tolist() if t != image_id]
        assert [t for t in ids if t != image_id] == text_full[:cap]
    assert not tokenize_conversation(tok, name, TURNS, N_VISUAL, max_txt_len=10_000).truncated


@pytest.mark.parametrize("name", sorted(LEARNED))
def test_generation_prompt_is_the_training_prefix(tok, name):
    """The prompt's tokens are exactly the training tokens before the first learned token."""
    q, a = get_template(name).with_video("<image>", "What color is the circle?"), TURNS[0][1]  # as SFTDataset writes it
    train = tokenize_conversation(tok, name, [(q, a)], N_VISUAL, system="Be brief.")
    first_learned = next(i for i, t in enumerate(train.labels.tolist()) if t != IGNORE_INDEX)
    prompt = build_prompt(name, "Be brief.", "What color is the circle?")
    ids = tokenize_prompt(tok, name, prompt, N_VISUAL)
    assert ids.tolist() == train.input_ids[:first_learned].tolist()


def test_primed_prompts(tok):
    prompt = build_prompt("vicuna_v1", "SYS", "Question: x", assistant_prefix="Best option:(")
    assert prompt == "SYS USER: <image>\nQuestion: x ASSISTANT: Best option:("
    prompt = build_prompt("chatml", None, "<image>Q", assistant_prefix="Best option:(")
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<image>Q<|im_end|>\n"
        "<|im_start|>assistant\nBest option:("
    )
    assert build_prompt("llama_2", "", "Q", "Best option:(") == "[INST] <image>\nQ [/INST] Best option:("
    assert build_prompt("plain", None, "Q", "A") == "<image>A"
    ids = tokenize_prompt(tok, "vicuna_v1", prompt, 5).tolist()
    assert ids.count(tok.convert_tokens_to_ids("<image>")) == 5


def test_errors(tok):
    with pytest.raises(ValueError, match="unknown conversation template 'vicuna'"):
        render("vicuna", TURNS)
    with pytest.raises(ValueError, match="exactly one video placeholder '<image>'.*found 0"):
        tokenize_conversation(tok, "vicuna_v1", [("no video", "x")], N_VISUAL)
    with pytest.raises(ValueError, match="found 2"):
        tokenize_conversation(tok, "vicuna_v1", [("<image><image>", "x")], N_VISUAL)
