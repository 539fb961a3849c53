"""Conversation templates: how system, user and assistant turns become model text.

A template is plain data. One renderer turns a conversation into text segments flagged
learn / not-learn, and the generation prompt is the same rendering stopped after the
assistant's role prefix, so training text and evaluation prompts cannot drift apart.

Tokenization runs on the whole rendered text at once (what generation will see) and
labels a token as learned iff its first character lies in a learned segment. Learned
segments start right after a pre-tokenizer boundary (e.g. vicuna learns `` {answer}</s>``
including the leading space, because the prompt ends at ``ASSISTANT:``), so each answer
keeps the tokens it gets at generation time.

The single video placeholder (the tokenizer's declared video token, ``<video>`` on the video
families, else its image token) is expanded here into ``num_visual_tokens`` placeholder ids,
HF-processor style; the model checks that count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
DEFAULT_IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Template:
    """A chat format. ``{content}`` / ``{system}`` mark where text goes in each format string."""

    name: str
    system: str  # default system prompt, used when the caller passes system=None
    system_format: str  # rendered only for a non-empty system prompt
    system_in_first_user: bool  # llama_2 / mistral put the system inside the first [INST]
    user_format: str
    assistant_prefix: str  # not learned; the generation prompt ends here
    answer_format: str  # learned as a whole: the answer and its end-of-turn token
    turn_separator: str = ""  # before every user turn but the first (llama_2's "<s>")
    answer_suffix: str = ""  # not learned, after the end-of-turn (chatml's "\n")
    add_bos: bool = True  # prepend the tokenizer's BOS id (if it has one)
    keep_user_text: bool = True  # plain: a user turn keeps only its image placeholder
    placeholder_format: str = "{token}\n"  # how a user turn opens with the video (Qwen-VL: its vision span)
    checkpoint_template: bool = False  # the checkpoints' own Jinja chat template, written as data (checked against it)

    def with_video(self, token: str, text: str) -> str:
        """A user turn's text opened by the video placeholder ``token``, as this format writes it."""
        return self.placeholder_format.format(token=token) + text

    @property
    def answer_lead(self) -> str:
        """Text between the assistant prefix and the answer: where priming text goes."""
        return self.answer_format.split("{content}")[0]


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(  # LLaVA conv_vicuna_v1
            name="vicuna_v1",
            system="A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions.",
            system_format="{system} ",
            system_in_first_user=False,
            user_format="USER: {content} ",
            assistant_prefix="ASSISTANT:",
            answer_format=" {content}</s>",
        ),
        Template(  # LLaVA conv_llava_llama_2
            name="llama_2",
            system="You are a helpful language and vision assistant. You are able to understand the "
            "visual content that the user provides, and assist the user with a variety of tasks "
            "using natural language.",
            system_format="<<SYS>>\n{system}\n<</SYS>>\n\n",
            system_in_first_user=True,
            user_format="[INST] {content} [/INST]",
            assistant_prefix="",
            answer_format=" {content} </s>",
            turn_separator="<s>",
        ),
        Template(  # Mistral-Instruct's own format; a system prompt joins the first instruction
            name="mistral_instruct",
            system="",
            system_format="{system}\n\n",
            system_in_first_user=True,
            user_format="[INST] {content} [/INST]",
            assistant_prefix="",
            answer_format=" {content}</s>",
        ),
        Template(  # Qwen2 ChatML
            name="chatml",
            system="You are a helpful assistant.",
            system_format="<|im_start|>system\n{system}<|im_end|>\n",
            system_in_first_user=False,
            user_format="<|im_start|>user\n{content}<|im_end|>\n",
            assistant_prefix="<|im_start|>assistant\n",
            answer_format="{content}<|im_end|>",
            answer_suffix="\n",
            add_bos=False,
        ),
        Template(  # LLaVA-NeXT-Video's chat_template.json: vicuna roles, no system prompt of its own
            name="next_video",
            system="",
            system_format="{system} ",
            system_in_first_user=False,
            user_format="USER: {content} ",
            assistant_prefix="ASSISTANT:",
            answer_format=" {content}</s>",
        ),
        Template(  # LLaVA pretraining: the placeholder, then the caption and "\n"
            name="plain",
            system="",
            system_format="",
            system_in_first_user=False,
            user_format="{content}",
            assistant_prefix="",
            answer_format="{content}\n",
            keep_user_text=False,
        ),
    )
}
# The Qwen-VL checkpoints' own chat templates: Qwen2-VL's and Qwen2.5-VL's is ChatML with its video item rendered as
# a vision span right before the question; Qwen3-VL-Instruct's the same without a default system turn.
TEMPLATES["qwen2_vl"] = replace(TEMPLATES["chatml"], name="qwen2_vl", checkpoint_template=True,
                                placeholder_format="<|vision_start|>{token}<|vision_end|>")
TEMPLATES["qwen3_vl"] = replace(TEMPLATES["qwen2_vl"], name="qwen3_vl", system="")


def get_template(template: str | Template | None) -> Template:
    """The template of that name (or the template itself)."""
    if isinstance(template, Template):
        return template
    if template is None:
        raise ValueError(f"no chat template: set model.template (one of {sorted(TEMPLATES)}); a checkpoint "
                         "exported by tc-llava records the one it was trained with")
    if template not in TEMPLATES:
        raise ValueError(f"unknown conversation template {template!r}; expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[template]


@dataclass(frozen=True)
class Segment:
    text: str
    learn: bool


def _render(
    template: Template,
    users: Sequence[str],
    answers: Sequence[str],
    system: str | None,
    image_token: str,
    assistant_prefix: str = "",
) -> list[Segment]:
    """Segments of ``users``/``answers``; one answer short means "stop at the assistant prefix"."""
    if len(answers) not in (len(users), len(users) - 1) or not users:
        raise ValueError(
            f"a conversation needs user/assistant turns in pairs, got {len(users)} user, {len(answers)} assistant"
        )
    system = template.system if system is None else system
    segments = []
    if system and not template.system_in_first_user:
        segments.append(Segment(template.system_format.format(system=system), False))
    for k, user in enumerate(users):
        content = user if template.keep_user_text else (image_token if image_token in user else "")
        if k == 0 and system and template.system_in_first_user:
            content = template.system_format.format(system=system) + content
        head = (template.turn_separator if k else "") + template.user_format.format(content=content)
        segments.append(Segment(head + template.assistant_prefix, False))
        if k < len(answers):
            segments.append(Segment(template.answer_format.format(content=answers[k]), True))
            if template.answer_suffix:
                segments.append(Segment(template.answer_suffix, False))
        elif assistant_prefix:
            segments.append(Segment(template.answer_lead + assistant_prefix, False))
    return segments


def render(
    template: str | Template,
    turns: Sequence[tuple[str, str]],
    system: str | None = None,
    image_token: str = DEFAULT_IMAGE_TOKEN,
) -> list[Segment]:
    """Text segments of a conversation of (user, assistant) turns; only answers are learned.

    ``system=None`` uses the template's default system prompt, ``""`` none at all.
    """
    return _render(get_template(template), [u for u, _ in turns], [a for _, a in turns], system, image_token)


def build_prompt(
    template: str | Template,
    system: str | None,
    user_text: str,
    assistant_prefix: str = "",
    image_token: str = DEFAULT_IMAGE_TOKEN,
) -> str:
    """A one-turn generation prompt, ending at the assistant's role prefix plus ``assistant_prefix``.

    The video placeholder is prepended to ``user_text`` (``"<image>\\n..."``) unless already in it.
    """
    return build_chat_prompt(template, system, [], user_text, assistant_prefix, image_token)


def build_chat_prompt(
    template: str | Template,
    system: str | None,
    history: Sequence[tuple[str, str]],
    user_text: str,
    assistant_prefix: str = "",
    image_token: str = DEFAULT_IMAGE_TOKEN,
) -> str:
    """The generation prompt of a conversation's next turn: ``history`` (earlier questions and answers, as
    training renders them), then ``user_text``, ending at the assistant's role prefix.

    The video placeholder goes before the first question, once, as in training.
    """
    template = get_template(template)
    users = [q for q, _ in history] + [user_text]
    if not any(image_token in u for u in users):
        users[0] = template.with_video(image_token, users[0])
    answers = [a for _, a in history]
    return "".join(s.text for s in _render(template, users, answers, system, image_token, assistant_prefix))


def check_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | Template) -> None:
    """Refuse a template that writes prompts differently from the checkpoint's own chat template.

    A template marked ``checkpoint_template`` is that Jinja template as data (so training can label the answers
    and prompts tokenize as one text); the checkpoint's ``tokenizer.chat_template`` must render a two-turn
    video conversation, with and without a system turn, to exactly the same text.
    """
    template = get_template(template)
    jinja = getattr(tokenizer, "chat_template", None)
    if not template.checkpoint_template or not jinja:
        return
    token = image_token_of(tokenizer)
    video = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
    for system in (None, "Be brief."):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": video}, {"role": "assistant", "content": "A ball moves."},
            {"role": "user", "content": "And then?"}]
        theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ours = build_chat_prompt(template, system, [(template.with_video(token, "What happens?"), "A ball moves.")],
                                 "And then?", image_token=token)
        if theirs != ours:
            raise ValueError(f"chat template {template.name!r} does not write prompts as the checkpoint's own "
                             f"({tokenizer.name_or_path}: {theirs!r} vs {ours!r}); set model.template to the "
                             "checkpoint family's")


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, template: str | Template) -> list[int]:
    """What ends an answer: EOS plus the template's end-of-turn token (chatml's ``<|im_end|>``) when it is one token."""
    stops = {tokenizer.eos_token_id} - {None}
    end = get_template(template).answer_format.split("{content}")[1].strip()
    if end:
        token_id = tokenizer.convert_tokens_to_ids(end)
        if token_id is not None and token_id != tokenizer.unk_token_id:
            stops.add(token_id)
    return sorted(stops)


class Expansion(Protocol):
    """The ids that replace a prompt's video placeholder; with ``wrapper`` (the ids of the tokens around it, e.g.
    Qwen-VL's ``<|vision_start|>``/``<|vision_end|>``) they replace those too where the prompt has them.
    A model's frame processor gives one (Qwen-VL's ``PlaceholderIds``)."""

    ids: Sequence[int]
    wrapper: tuple[int, int] | None


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [L] long, the placeholder expanded
    labels: torch.Tensor  # [L] long, IGNORE_INDEX except learned tokens
    truncated: bool  # text tokens were dropped to fit max_txt_len


def image_token_of(tokenizer: PreTrainedTokenizerBase) -> str:
    """The checkpoint's video placeholder token: the ``tokenizer.video_token`` a video family declares
    (``<video>``), else ``tokenizer.image_token``, default ``<image>``."""
    token = getattr(tokenizer, "video_token", None) or getattr(tokenizer, "image_token", None) or DEFAULT_IMAGE_TOKEN
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no image token {token!r} in its vocabulary")
    return token


def encode_segments(
    tokenizer: PreTrainedTokenizerBase,
    segments: Sequence[Segment],
    num_visual_tokens: int | Sequence[int] | Expansion,
    add_bos: bool = True,
    max_txt_len: int | None = None,
) -> Encoded:
    """Tokenize segments as one text, label learned tokens, expand the one video placeholder.

    ``num_visual_tokens`` is how many copies of the placeholder id replace it, or the ids that replace it
    (a Qwen3-VL video's timestamps and vision spans: text that special tokens separate from the rest, so it
    tokenizes alone as it would in place), or an :class:`Expansion` that may replace the tokens around it too.

    ``max_txt_len`` caps the text tokens (BOS included, visual tokens excluded): tokens past
    it are dropped from the end, the placeholder is always kept.
    """
    if not tokenizer.is_fast:
        raise ValueError("conversation tokenization needs a fast tokenizer (for offset mappings)")
    image_token = image_token_of(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    text = "".join(s.text for s in segments)
    learn_char = np.zeros(len(text) + 1, dtype=bool)
    start = 0
    for seg in segments:
        learn_char[start : start + len(seg.text)] = seg.learn
        start += len(seg.text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    learned = [bool(learn_char[s]) and e > s for s, e in enc["offset_mapping"]]
    if add_bos and tokenizer.bos_token_id is not None:
        ids, learned = [tokenizer.bos_token_id] + ids, [False] + learned
    places = [i for i, t in enumerate(ids) if t == image_id]
    if len(places) != 1:
        raise ValueError(f"expected exactly one video placeholder {image_token!r} in the text, found {len(places)}")
    truncated = max_txt_len is not None and len(ids) - 1 > max_txt_len
    if truncated:
        text_positions = [i for i in range(len(ids)) if i != places[0]]
        keep = sorted(text_positions[:max_txt_len] + places)
        ids, learned = [ids[i] for i in keep], [learned[i] for i in keep]
    p = q = ids.index(image_id)
    expansion = num_visual_tokens if hasattr(num_visual_tokens, "ids") else None
    if isinstance(num_visual_tokens, int):
        visual = [image_id] * num_visual_tokens
    else:
        visual = list(expansion.ids if expansion else num_visual_tokens)
    if expansion and expansion.wrapper and 0 < p < len(ids) - 1 and (ids[p - 1], ids[p + 1]) == expansion.wrapper:
        p, q = p - 1, p + 1
    input_ids = ids[:p] + visual + ids[q + 1 :]
    labels = [t if lrn else IGNORE_INDEX for t, lrn in zip(ids, learned)]
    labels = labels[:p] + [IGNORE_INDEX] * len(visual) + labels[q + 1 :]
    return Encoded(torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), truncated)


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    template: str | Template,
    turns: Sequence[tuple[str, str]],
    num_visual_tokens: int | Sequence[int] | Expansion,
    system: str | None = None,
    max_txt_len: int | None = None,
) -> Encoded:
    """``input_ids``/``labels`` of a training conversation; the first user turn holds the placeholder."""
    template = get_template(template)
    segments = render(template, turns, system, image_token_of(tokenizer))
    return encode_segments(tokenizer, segments, num_visual_tokens, template.add_bos, max_txt_len)


def tokenize_prompt(
    tokenizer: PreTrainedTokenizerBase,
    template: str | Template,
    prompt: str,
    num_visual_tokens: int | Sequence[int] | Expansion,
) -> torch.Tensor:
    """``input_ids`` [L] of a ``build_prompt`` text, the placeholder expanded (never truncated)."""
    template = get_template(template)
    return encode_segments(tokenizer, [Segment(prompt, False)], num_visual_tokens, template.add_bos).input_ids
