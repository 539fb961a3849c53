"""``tc-llava-chat`` / ``python -m tc_llava.chat``: ask a model about your own video.

    tc-llava-chat outputs/train/demo/export clip.mp4 -q "Which colour appears first?"
    tc-llava-chat /ckpts/llava-onevision-qwen2-7b-ov-hf clip.mp4 --frames 32     # questions from stdin

The model is any directory ``TCLlava.from_pretrained`` loads: an export (its rules, chat template
and training frame count come with it) or a llava-hf checkpoint of any supported family. The
video is a file, a gif, a folder of ``00001.jpg`` frames or a still image (one frame); its
frames are sampled once, with the count and indices printed, and every turn asks about them:
the prompt is the whole conversation so far with the video once before the first question,
as in training. Answers stream token by token (greedy unless ``--temperature``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

import torch

from tc_llava.cli import one_line_errors
from tc_llava.data.collate import GRID_KEYS
from tc_llava.data.inputs import Clip, ClipEncoder, model_inputs
from tc_llava.data.templates import build_chat_prompt, image_token_of, stop_token_ids
from tc_llava.data.video import IMAGE_SUFFIXES, STRATEGIES, read_frames, sample_frames
from tc_llava.model.tc_llava import TCLlava

log = logging.getLogger(__name__)
DEFAULT_FRAMES = 16  # when the model records no training frame count


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tc-llava-chat", description="Ask a model about your own video.")
    parser.add_argument("model", help="an export or a llava-hf checkpoint directory")
    parser.add_argument("video", help="a video file, gif, folder of 00001.jpg frames, or image")
    parser.add_argument("-q", "--question", action="append", default=[],
                        help="a question; repeat for more turns (default: read questions from stdin)")
    parser.add_argument("--frames", type=int, help="frames to sample (default: what the model was trained with, "
                        f"else {DEFAULT_FRAMES}); with --sampling fps, the most")
    parser.add_argument("--sampling", choices=[s for s in STRATEGIES if s != "random"], default="middle",
                        help="segment middles (MVBench), uniform (linspace), or fps (--fps frames per second)")
    parser.add_argument("--fps", type=float, help="frames per second with --sampling fps")
    parser.add_argument("--template", help="chat template (default: the one the checkpoint records)")
    parser.add_argument("--system", help="system prompt (default: the template's)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="pyav", help="video decoder: pyav | decord | torchcodec")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="default: the checkpoint's (an export's: the dtype it was trained in)")
    parser.add_argument("--attn-implementation", default="auto")
    return parser.parse_args(argv)


class TokenStream:
    """Prints an answer as its tokens arrive: the decoded text so far, less what is already printed
    (holding back a half-decoded character), until a stop token."""

    def __init__(self, tokenizer: Any, stops: Iterable[int], out: TextIO) -> None:
        self.tokenizer, self.stops, self.out = tokenizer, set(stops), out
        self.ids: list[int] = []
        self.shown, self.stopped = "", False

    def __call__(self, tokens: torch.Tensor) -> None:
        token = int(tokens[0])
        self.stopped = self.stopped or token in self.stops
        if self.stopped:
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


class Chat:
    """A conversation about one video: its frames, decoded once, and the turns so far."""

    def __init__(self, model: TCLlava, frames: Any, template: str, system: str | None = None,
                 generate_kwargs: dict[str, Any] | None = None, clip: Clip | None = None) -> None:
        self.model, self.template, self.system = model, template, system
        self.generate_kwargs = generate_kwargs or {}
        self.frames, self.clip = frames, clip  # clip: where the frames came from (a Qwen-VL model's budget)
        self.history: list[tuple[str, str]] = []
        self.last_tokens = 0  # tokens of the last answer, stop token excluded

    def inputs(self, question: str) -> dict[str, Any]:
        """The model inputs of the next turn (:func:`~tc_llava.data.inputs.model_inputs`): the conversation so far,
        then ``question``, about the video's frames."""
        prompt = build_chat_prompt(self.template, self.system, self.history, question,
                                   image_token=image_token_of(self.model.tokenizer))
        return model_inputs(self.model.tokenizer, self.model.frame_processor, self.model.tokens_per_video,
                            self.template, self.frames, prompt, clip=self.clip)

    def ask(self, question: str, out: TextIO = sys.stdout) -> str:
        """Stream the answer to ``question`` to ``out``; the turn joins the conversation."""
        tokenizer = self.model.tokenizer
        device, dtype = next(self.model.parameters()).device, next(self.model.parameters()).dtype
        inputs = self.inputs(question)
        ids = inputs["input_ids"][None].to(device)
        visual = ({"pixel_values": inputs["pixel_values"][None].to(device, dtype)} if "pixel_values" in inputs else
                  {key: inputs[key].to(device, dtype if key.startswith("pixel_values") else None)
                   for key in GRID_KEYS if key in inputs})
        stops = stop_token_ids(tokenizer, self.template)
        stream = TokenStream(tokenizer, stops, out)
        self.model.generate(ids, None, eos_token_id=stops, streamer=stream, **visual, **self.generate_kwargs)
        out.write("\n")
        self.last_tokens = len(stream.ids)
        self.history.append((question, stream.text))
        return stream.text


def frame_count(video: str, frames: int | None, model: TCLlava) -> tuple[int, str]:
    """The frames to sample and where the count comes from (the flag, the model's training, the default)."""
    recorded = model.frame_sampling or {}
    if Path(video).suffix.lower() in IMAGE_SUFFIXES and recorded.get("image_frames", 1) is not None:
        return recorded.get("image_frames", 1), "an image"
    if frames is not None:
        if frames < 1:
            raise ValueError(f"--frames must be a positive integer, got {frames}")
        return frames, "--frames"
    if "num_frames" in recorded:
        return recorded["num_frames"], f"the model was trained with {recorded['num_frames']} " \
                                       f"({recorded.get('sampling', 'random')})"
    return DEFAULT_FRAMES, "default"


def decode_video(model: TCLlava, video: str, frames: int | None = None, sampling: str = "middle",
                 fps: float | None = None, backend: str = "pyav") -> tuple[Any, list[int], Clip | None, str]:
    """The frames of ``video`` the model is asked about, once per conversation: a Qwen-VL model's chosen by its
    frame budget (with their :class:`~tc_llava.data.inputs.Clip`), a LLaVA model's by ``sampling`` (``frames``: the
    count, else the model's training count, else the default). Returns them, the clip (or None) and one line
    saying which frames were taken and why."""
    encoder = model.frame_processor
    if isinstance(encoder, ClipEncoder):
        given = [flag for flag, value in (("--frames", frames), ("--fps", fps)) if value is not None]
        if given:
            raise ValueError(f"{' and '.join(given)} do not apply to {model.family.model_type}: its frame budget "
                             f"chooses the frames ({encoder.budget.to_json()}); the export records it")
        decoded, indices, rate, total = read_frames(video, encoder.frame_indices, backend=backend)
        return decoded, indices, Clip(indices, rate, total), (
            f"{video}: {len(decoded)} of {total} frames at {rate:g} fps, chosen by the model's frame budget "
            f"{encoder.budget.to_json()}, indices {indices}")
    count, why = frame_count(video, frames, model)
    decoded, indices = sample_frames(video, count, sampling, backend=backend, sample_fps=fps)
    rate = f" at {fps:g} per second" if sampling == "fps" else ""
    line = f"{video}: {len(decoded)} frames, {sampling} sampling{rate} ({why}), indices {indices}"
    return decoded, indices, None, line


def questions(args: argparse.Namespace, read: Callable[[], str]) -> Iterable[str]:
    """The ``-q`` questions, or lines read until an empty one or the end of input."""
    if args.question:
        yield from args.question
        return
    while True:
        try:
            line = read().strip()
        except EOFError:
            return
        if not line:
            return
        yield line


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> list[str]:
    """Load, sample the video once, answer every question; returns the answers."""
    model = TCLlava.from_pretrained(args.model, dtype=args.dtype, attn_implementation=args.attn_implementation,
                                    template=args.template)
    model.to(args.device).eval()
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: chat needs a checkpoint that includes it")
    template = model.template
    if template is None:
        raise ValueError(f"{args.model} records no chat template: pass --template ({model.family.model_type} "
                         f"checkpoints use {model.family.template}; e.g. vicuna_v1, chatml, next_video)")
    frames, _, clip, line = decode_video(model, args.video, args.frames, args.sampling, args.fps, args.backend)
    out.write(line + "\n")
    sampling = {"do_sample": args.temperature > 0, "temperature": args.temperature, "top_p": args.top_p,
                "max_new_tokens": args.max_new_tokens, "generator": torch.Generator(args.device).manual_seed(args.seed)}
    chat = Chat(model, frames, template, args.system, sampling, clip)
    answers = []
    for question in questions(args, lambda: input("> ")):
        out.write(f"Q: {question}\nA: ")
        answers.append(chat.ask(question, out))
    return answers


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    with one_line_errors(FileNotFoundError, ValueError):  # a wrong path, frame count or video: one line
        run(args)


if __name__ == "__main__":
    main()
