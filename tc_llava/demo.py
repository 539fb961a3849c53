"""``tc-llava-demo`` / ``python -m tc_llava.demo``: one video, two rule sets, answers side by side (gradio).

    tc-llava-demo outputs/train/demo/export                                  # the export beside itself, vanilla rules
    tc-llava-demo runs/tad/export runs/vanilla/export --port 7860            # two exports
    tc-llava-demo runs/base_lora/export --rope-b vanilla --mask-b causal     # one export under two rule sets

Upload a video, gif or image (or give a frame folder's path, or pick a synthetic clip), see the frames each model
samples with their times, and ask: both answers stream in turn, with time to first token and tokens/s. Follow-up
questions continue both conversations on the same decoded frames. The layout tab draws, for each side, the mask and
positions its last prompt got (:mod:`tc_llava.inspect`, from the model's own layout code). Needs the ``demo`` extra
(``bash scripts/setup_demo.sh``). A file that does not decode, a model that does not load or a question past the
context is a message in the page.
"""

from __future__ import annotations

import argparse
import logging
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tc_llava.chat import Chat, decode_video
from tc_llava.data.synthetic import TASKS, make_sample, render, write_mp4
from tc_llava.data.video import read_frames
from tc_llava.inspect import draw, inspect_inputs
from tc_llava.model.masks import MASK_RULES
from tc_llava.model.rope import ROPE_RULES
from tc_llava.model.settings import build_rule
from tc_llava.model.tc_llava import TCLlava

log = logging.getLogger(__name__)
AS_TRAINED = "as trained"
USER_ERRORS = (ValueError, FileNotFoundError, OSError, RuntimeError)
SIDES = ("A", "B")


@dataclass
class Side:
    """One model of the comparison and its conversation about the current video."""

    label: str
    model: TCLlava
    chat: Chat | None = None
    times: list[float] = field(default_factory=list)  # the sampled frames' times in seconds

    @property
    def rules(self) -> str:
        return f"rope={self.model.rope.name} mask={self.model.mask.name}"


def load_side(path: str, rope: str, mask: str, device: str, label: str) -> Side:
    """A model from an export or checkpoint path, under its own rules or the named ones."""
    if not path.strip():
        raise ValueError(f"model {label}: give an export or checkpoint directory")
    rules = {kind: build_rule(kind, name, {}, f"model {label} {kind}")
             for kind, name in (("rope", rope), ("mask", mask)) if name and name != AS_TRAINED}
    try:
        model = TCLlava.from_pretrained(path.strip(), **rules)
    except USER_ERRORS as e:
        raise ValueError(f"model {label} ({path}) did not load: {e}") from None
    if model.tokenizer is None or model.template is None:
        raise ValueError(f"model {label} ({path}) has no tokenizer or chat template: the demo needs an export")
    return Side(f"{label}: {Path(path).name}", model.to(device).eval())


def synthetic_clip(task: str, out_dir: Path, seed: int = 0) -> tuple[Path, str]:
    """One synthetic clip of ``task`` (written as mp4) and its question with the options."""
    sample = make_sample(task, np.random.default_rng(seed), num_frames=16, size=128)
    path = out_dir / f"{task}_{seed}.mp4"
    write_mp4(path, render(sample.scene, 128), fps=8)
    options = " ".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(sample.candidates))
    return path, f"{sample.question} Options: {options}"


def open_video(side: Side, video: str, generate_kwargs: dict[str, Any]) -> list[tuple[np.ndarray, str]]:
    """Decode ``video`` as ``side``'s model samples it; start its conversation; the thumbnails and their captions."""
    frames, indices, clip, line = decode_video(side.model, video)
    log.info("%s: %s", side.label, line)
    if clip is not None:
        rate = clip.fps
    else:  # the sampler returns indices only: read the rate (one frame) for the captions
        _, _, rate, _ = read_frames(video, lambda total, fps: [0], backend="pyav")
    side.times = [i / rate for i in indices]
    side.chat = Chat(side.model, frames, side.model.template, None, generate_kwargs, clip)
    return [(frame, f"{side.label.split(':')[0]} {k}: {t:.2f} s") for k, (frame, t) in
            enumerate(zip(frames, side.times))]


class QueueWriter:
    """The text a streamer writes, put on a queue for the page."""

    def __init__(self, q: queue.Queue) -> None:
        self.q = q

    def write(self, text: str) -> None:
        if text:
            self.q.put(text)

    def flush(self) -> None:
        pass


def check_context(side: Side, question: str) -> dict[str, Any]:
    """The next turn's inputs, refused when the prompt leaves no room in the model's context."""
    inputs = side.chat.inputs(question)
    limit = side.model.language_model.config.max_position_embeddings
    max_new = side.chat.generate_kwargs.get("max_new_tokens", 0)
    if len(inputs["input_ids"]) + max_new > limit:
        raise ValueError(f"model {side.label}: the prompt is {len(inputs['input_ids'])} tokens and up to {max_new} "
                         f"new ones would follow; the model's context is {limit}: ask a shorter question or "
                         "clear the conversation")
    return inputs


def stream_answer(side: Side, question: str) -> Iterator[tuple[str, str]]:
    """``side``'s answer as it grows, with its figures (time to first token, tokens/s) once done."""
    q: queue.Queue = queue.Queue()
    done = object()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            side.chat.ask(question, QueueWriter(q))
        except BaseException as e:  # shown in the page by the caller
            failure.append(e)
        finally:
            q.put(done)

    start = time.perf_counter()
    first = None
    text = ""
    threading.Thread(target=work, daemon=True).start()
    while (piece := q.get()) is not done:
        first = first or time.perf_counter()
        text += piece
        yield text.strip(), "generating..."
    if failure:
        raise ValueError(f"model {side.label}: generation failed: {failure[0]}")
    total = time.perf_counter() - start
    tokens = side.chat.last_tokens
    ttft = (first or time.perf_counter()) - start
    yield text.strip(), f"{side.label} ({side.rules}): first token {ttft:.2f} s, {tokens} tokens, " \
                        f"{tokens / total:.1f} tokens/s"


def picture(layout: Any, title: str) -> Any:
    """The inspector's figure as an image for the page."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    fig = draw(layout, title)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=70)
    plt.close(fig)
    return Image.open(buffer)


def build_app(models: list[str], rules: dict[str, str], device: str, max_new_tokens: int = 64) -> Any:
    """The gradio page (``models``: one or two paths; ``rules``: ``rope_a``... overrides, AS_TRAINED by default)."""
    import gradio as gr

    generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    rope_names, mask_names = [AS_TRAINED, *ROPE_RULES], [AS_TRAINED, *MASK_RULES]
    defaults = [models[0], models[1] if len(models) > 1 else models[0]]
    if len(models) == 1 and all(rules.get(f"{k}_b", AS_TRAINED) == AS_TRAINED for k in ("rope", "mask")):
        rules = {**rules, "rope_b": "vanilla", "mask_b": "causal"}  # one export: against the HF baseline rules
    clips = Path(tempfile.mkdtemp(prefix="tc_llava_demo_"))

    def load(path_a, rope_a, mask_a, path_b, rope_b, mask_b):
        try:
            sides = [load_side(path_a, rope_a, mask_a, device, "A")]
            if path_b.strip():
                sides.append(load_side(path_b, rope_b, mask_b, device, "B"))
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
        status = "\n".join(f"- **{s.label}**: {s.rules}, {s.model.family.model_type}" for s in sides)
        return sides, f"Loaded:\n{status}", [], [], None, None, "", ""

    def use_video(sides, upload, path, task):
        if not sides:
            raise gr.Error("load the models first", print_exception=False)
        question = gr.update()
        if upload:
            video = upload
        elif path and path.strip():
            video = path.strip()
        elif task:
            video, suggested = synthetic_clip(task, clips)
            question = suggested
        else:
            raise gr.Error("upload a video or image, give a path, or pick a synthetic clip", print_exception=False)
        try:
            thumbs = [thumb for side in sides for thumb in open_video(side, str(video), generate_kwargs)]
        except USER_ERRORS as e:
            raise gr.Error(f"{Path(str(video)).name}: {e}", print_exception=False) from None
        return sides, thumbs, question, [], [], None, None, "", ""

    def clear(sides):
        for side in sides:
            if side.chat is not None:
                side.chat.history.clear()
        return sides, [], [], None, None, "", ""

    def ask(sides, question, history_a, history_b):
        if not sides or sides[0].chat is None:
            raise gr.Error("load the models and a video first", print_exception=False)
        if not question or not question.strip():
            raise gr.Error("ask a question", print_exception=False)
        try:
            layouts = [inspect_inputs(side.model, check_context(side, question)) for side in sides]
        except USER_ERRORS as e:
            raise gr.Error(str(e), print_exception=False) from None
        pictures = [picture(layout, side.label) for layout, side in zip(layouts, sides)] + [None]
        turn = [{"role": "user", "content": question}]
        histories = [history_a + turn, history_b + turn if len(sides) > 1 else history_b]  # B may be absent
        stats = ["", ""]
        yield histories[0], histories[1], stats[0], stats[1], pictures[0], pictures[1]  # the layouts once, at once
        for k, side in enumerate(sides):
            try:
                for text, figures in stream_answer(side, question):
                    reply = {"role": "assistant", "content": text or "..."}
                    stats[k] = figures
                    shown = [h if j != k else h + [reply] for j, h in enumerate(histories)]
                    yield shown[0], shown[1], stats[0], stats[1], gr.skip(), gr.skip()
            except USER_ERRORS as e:
                raise gr.Error(str(e), print_exception=False) from None
            histories[k] = histories[k] + [{"role": "assistant", "content": text}]

    with gr.Blocks(title="tc-llava demo", analytics_enabled=False) as app:
        sides = gr.State([])
        gr.Markdown("# tc-llava: one video, two rule sets")
        with gr.Row():
            with gr.Column():
                path_a = gr.Textbox(defaults[0], label="Model A (export or checkpoint)", elem_id="path-a")
                rope_a = gr.Dropdown(rope_names, value=rules.get("rope_a", AS_TRAINED), label="A: rope")
                mask_a = gr.Dropdown(mask_names, value=rules.get("mask_a", AS_TRAINED), label="A: mask")
            with gr.Column():
                path_b = gr.Textbox(defaults[1], label="Model B (empty: A alone)", elem_id="path-b")
                rope_b = gr.Dropdown(rope_names, value=rules.get("rope_b", AS_TRAINED), label="B: rope")
                mask_b = gr.Dropdown(mask_names, value=rules.get("mask_b", AS_TRAINED), label="B: mask")
        load_button = gr.Button("Load models", elem_id="load")
        status = gr.Markdown(elem_id="status")
        with gr.Row():
            upload = gr.File(label="Video, gif or image", type="filepath", elem_id="upload")
            with gr.Column():
                path = gr.Textbox(label="or a path (a file or a folder of 00001.jpg frames)", elem_id="video-path")
                task = gr.Dropdown([(name, key) for key, (name, _) in TASKS.items()], value=None,
                                   label="or a synthetic clip", elem_id="task")
                video_button = gr.Button("Use this video", elem_id="use-video")
        gallery = gr.Gallery(label="Sampled frames (model: index: time)", columns=8, height=220, elem_id="frames")
        question = gr.Textbox(label="Question", elem_id="question")
        with gr.Row():
            ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
            clear_button = gr.Button("Clear conversation", elem_id="clear")
        with gr.Row():
            with gr.Column():
                chat_a = gr.Chatbot(label="A", elem_id="chat-a", height=300)
                stats_a = gr.Markdown(elem_id="stats-a")
            with gr.Column():
                chat_b = gr.Chatbot(label="B", elem_id="chat-b", height=300)
                stats_b = gr.Markdown(elem_id="stats-b")
        with gr.Accordion("Layout: the mask and positions of the last prompt", open=True):
            with gr.Row():
                layout_a = gr.Image(label="A", elem_id="layout-a", type="pil")
                layout_b = gr.Image(label="B", elem_id="layout-b", type="pil")
        resets = [chat_a, chat_b, layout_a, layout_b, stats_a, stats_b]
        load_button.click(load, [path_a, rope_a, mask_a, path_b, rope_b, mask_b], [sides, status, *resets])
        video_button.click(use_video, [sides, upload, path, task], [sides, gallery, question, *resets])
        ask_button.click(ask, [sides, question, chat_a, chat_b], [chat_a, chat_b, stats_a, stats_b, layout_a, layout_b])
        clear_button.click(clear, [sides], [sides, *resets])
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tc-llava-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="one or two exports (one: it beside itself under --rope-b/--mask-b, "
                        "by default vanilla/causal)")
    for side in ("a", "b"):
        parser.add_argument(f"--rope-{side}", default=AS_TRAINED, choices=[AS_TRAINED, *ROPE_RULES])
        parser.add_argument(f"--mask-{side}", default=AS_TRAINED, choices=[AS_TRAINED, *MASK_RULES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    if len(args.models) > 2:
        parser.error(f"one or two models, got {len(args.models)}")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit("tc-llava-demo needs the demo extra: bash scripts/setup_demo.sh (or pip install "
                         "'tc-llava[demo]')") from None
    rules = {f"{k}_{s}": getattr(args, f"{k}_{s}") for k in ("rope", "mask") for s in ("a", "b")}
    app = build_app(args.models, rules, args.device, args.max_new_tokens)
    app.queue().launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
