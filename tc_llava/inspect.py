"""``python -m tc_llava.inspect``: what the LLM of a model receives for one prompt, as a picture.

    python -m tc_llava.inspect outputs/train/demo/export --frames 8 --out layout.png
    python -m tc_llava.inspect outputs/train/demo/export --video clip.mp4 -q "Which colour comes first?"
    python -m tc_llava.inspect /ckpts/Qwen2.5-VL-7B-Instruct --video clip.mp4 --rope tad --mask frame_block_causal
    python -m tc_llava.inspect outputs/train/demo/export --frames 4 8 --pack --out packed.png   # one packed row

Three panels from the model's own layout code (``TCLlava.batch_layout``, the object its forward builds):

- the attention mask of the rule (white: may attend), each frame's block outlined;
- the rotary positions along the sequence: ``m`` (the real-token index), ``tau`` (TC-LLaVA's temporal index) and what
  the rotary module rotates by (``p``, or the ``t``/``h``/``w`` axes of M-RoPE);
- the token spans: text, each frame, newline tokens, timestamps, padding.

Besides ``--out`` it writes ``STEM.mask.png`` (the mask alone, one pixel per query/key pair) and ``STEM.spans.md``
(the whole span table). ``--frames N`` lays out N frames of a blank video; ``--video`` decodes one as
``tc-llava-chat`` does, with the question (default: a short one) as the first turn. Several counts or videos make
a batch through the real collators: left-padded rows as evaluation batches them, or one packed row (``--pack``)
as training packs them; ``--row`` picks the row drawn.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tc_llava.chat import Chat, decode_video
from tc_llava.cli import one_line_errors
from tc_llava.data.collate import PackingCollator, SFTCollator
from tc_llava.data.inputs import Clip, ClipEncoder
from tc_llava.model.families.qwen_vl import VISUAL_KEYS, QwenVisual
from tc_llava.model.layout import PackedSamples
from tc_llava.model.masks import block_causal_mask
from tc_llava.model.rope import temporal_index
from tc_llava.model.settings import build_rule, rule_parameters
from tc_llava.model.tc_llava import TCLlava

DEFAULT_QUESTION = "Describe the video."
TIMESTAMP = re.compile(r"<[\d.]+ seconds>")  # Qwen3-VL writes "<1.5 seconds>" before a patch
TABLE_ROWS = 24  # span rows drawn in the picture; the .spans.md file holds them all


@dataclass(frozen=True)
class Span:
    """A run of tokens of one kind: ``text``, ``frame`` (with its index), ``newline``, ``timestamp`` or ``padding``."""

    kind: str
    start: int
    end: int  # exclusive
    frame: int = -1
    text: str = ""
    sample: int = -1  # a packed row's k-th sample (-1: the row is one sample)

    @property
    def label(self) -> str:
        name = f"frame {self.frame}" if self.kind == "frame" else self.kind
        return name if self.sample < 0 else f"s{self.sample} {name}"


@dataclass(frozen=True)
class Inspection:
    """One prompt's layout as the LLM receives it: ``mask [L, L]`` (True: may attend), per-token ``frame_ids``
    and ``attention_mask`` [L], ``positions`` (name -> [L]: ``m``, ``tau``, and ``p`` or ``t``/``h``/``w``), the
    spans, and the rules' names."""

    mask: np.ndarray
    frame_ids: np.ndarray
    attention_mask: np.ndarray
    positions: dict[str, np.ndarray]
    spans: list[Span]
    rules: str

    def table(self) -> str:
        """The spans as a markdown table."""
        rows = ["| span | tokens | sequence | positions m | tau | text |", "|---|---:|---|---|---|---|"]
        m, tau = self.positions["m"], self.positions["tau"]
        for s in self.spans:
            text = s.text.replace("|", "\\|").replace("\n", "\\n")
            rows.append(f"| {s.label} | {s.end - s.start} | {s.start}-{s.end - 1} | {m[s.start]}-{m[s.end - 1]} | "
                        f"{tau[s.start]}-{tau[s.end - 1]} | {text[:40]} |")
        return "\n".join(rows) + "\n"


def _text_spans(tokenizer: Any, input_ids: np.ndarray, start: int, end: int) -> list[Span]:
    """A text run cut around its timestamps (Qwen3-VL's ``<1.5 seconds>`` before each temporal patch)."""
    pieces = [tokenizer.decode([int(t)]) for t in input_ids[start:end]]
    ends = np.cumsum([len(p) for p in pieces])
    text = "".join(pieces)
    spans, at = [], start
    for found in TIMESTAMP.finditer(text):
        first = start + int(np.searchsorted(ends, found.start(), side="right"))
        last = start + int(np.searchsorted(ends, found.end() - 1, side="right")) + 1
        if first > at:
            spans.append(Span("text", at, first, text=tokenizer.decode(input_ids[at:first].tolist())))
        spans.append(Span("timestamp", first, last, text=tokenizer.decode(input_ids[first:last].tolist())))
        at = last
    if at < end:
        spans.append(Span("text", at, end, text=tokenizer.decode(input_ids[at:end].tolist())))
    return spans


def spans_of(tokenizer: Any, input_ids: np.ndarray, frame_ids: np.ndarray, attention_mask: np.ndarray,
             placeholder_id: int, sample_ids: np.ndarray | None = None) -> list[Span]:
    """The runs of one kind along a row: padding, each frame, placeholder tokens outside frames (a family's
    newline), text, and timestamps inside text; in a packed row (``sample_ids``) each run within one sample."""
    kinds = np.where(attention_mask == 0, "padding",
                     np.where(frame_ids >= 0, "frame", np.where(input_ids == placeholder_id, "newline", "text")))
    samples = np.full(len(kinds), -1) if sample_ids is None else sample_ids
    spans, start = [], 0
    for i in range(1, len(kinds) + 1):
        if i < len(kinds) and kinds[i] == kinds[start] and frame_ids[i] == frame_ids[start] \
                and samples[i] == samples[start]:
            continue
        kind, sample = str(kinds[start]), int(samples[start]) if kinds[start] != "padding" else -1
        if kind == "text":
            spans.extend(dataclasses.replace(span, sample=sample)
                         for span in _text_spans(tokenizer, input_ids, start, i))
        else:
            spans.append(Span(kind, start, i, int(frame_ids[start]) if kind == "frame" else -1, sample=sample))
        start = i
    return spans


def inspect_batch(model: TCLlava, batch: dict[str, Any], row: int = 0) -> Inspection:
    """Row ``row`` of the layout ``model`` builds for a collated batch (left-padded, or packed with ``sample_ids``),
    read back from :meth:`TCLlava.batch_layout`, the object its forward builds; the mask is the rule's on that
    layout's blocks (and samples), the dense form of what the attention computes."""
    ids, attention, sample_ids = batch["input_ids"], batch["attention_mask"], batch.get("sample_ids")
    if not 0 <= row < ids.shape[0]:
        raise ValueError(f"row {row}: the batch has {ids.shape[0]} row(s)")
    visual = QwenVisual.of(**{k: batch[k] for k in VISUAL_KEYS if k in batch}) if model.family.multimodal_rope \
        else None
    pixels = batch.get("pixel_values") if visual is None else None
    with torch.no_grad():
        layout, _ = model.batch_layout(ids, attention, sample_ids, None, pixels, batch.get("num_frames"), visual)
    block_ids = layout.block_ids if layout.block_ids is not None else torch.full_like(ids, -1)
    mask = block_causal_mask(block_ids, layout.attention_mask, sample_ids)[row, 0].numpy()
    tau = temporal_index(layout.frame_ids, attention) if sample_ids is None else _packed_tau(layout, sample_ids)
    positions = {"m": layout.position_ids[row].numpy(), "tau": tau[row].numpy()}
    rotary = layout.rope_positions
    if rotary.ndim == 3:
        positions.update({axis: rotary[i, row].float().numpy() for i, axis in enumerate("thw")})
    else:
        positions["p"] = rotary[row].float().numpy()
    frame_ids, real = layout.frame_ids[row].numpy(), attention[row].numpy()
    spans = spans_of(model.tokenizer, ids[row].numpy(), frame_ids, real, model.placeholder_token_id,
                     None if sample_ids is None else sample_ids[row].numpy())
    rules = f"rope={model.rope.name} mask={model.mask.name}"
    return Inspection(mask, frame_ids, real, positions, spans, rules)


def _packed_tau(layout: Any, sample_ids: torch.Tensor) -> torch.Tensor:
    """``tau`` restarting at each packed sample, as the model's positions do."""
    packed = PackedSamples(sample_ids)
    return packed.pack(temporal_index(packed.unpack(layout.frame_ids, fill=-1), packed.valid))


def inspect_inputs(model: TCLlava, inputs: dict[str, Any]) -> Inspection:
    """:func:`inspect_batch` of one sample's inputs (:func:`~tc_llava.data.inputs.model_inputs`)."""
    return inspect_batch(model, SFTCollator(pad_id(model), "left")([inputs]))


def pad_id(model: TCLlava) -> int:
    """The pad id batches are padded with (the tokenizer's, else its end-of-sequence id), as evaluation pads."""
    tokenizer = model.tokenizer
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def draw(inspection: Inspection, title: str = "") -> Any:
    """A matplotlib figure: the mask with frame blocks outlined, the positions along the sequence, the span table."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    fig = plt.figure(figsize=(15, 10), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=(3, 2))
    ax_mask, ax_pos, ax_table = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    fig.suptitle(f"{title}  {inspection.rules}  ({len(inspection.frame_ids)} tokens)".strip())
    ax_mask.imshow(inspection.mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    frames = [s for s in inspection.spans if s.kind == "frame"]
    for s in frames:
        ax_mask.add_patch(Rectangle((s.start - 0.5, s.start - 0.5), s.end - s.start, s.end - s.start, fill=False,
                                    edgecolor="tab:red", linewidth=0.8))
    ax_mask.set(title="attention mask (white: may attend; red: frames)", xlabel="key", ylabel="query")
    for name, values in inspection.positions.items():
        ax_pos.plot(values, label=name, linewidth=1)
    for s in frames:
        ax_pos.axvspan(s.start - 0.5, s.end - 0.5, color="tab:red", alpha=0.08, linewidth=0)
    ax_pos.set(title="rotary positions (shaded: frames)", xlabel="token", ylabel="position")
    ax_pos.legend(loc="upper left")
    ax_table.axis("off")
    rows = [[s.label, s.end - s.start, f"{s.start}-{s.end - 1}", s.text.replace("\n", "\\n")[:60]]
            for s in inspection.spans]
    if len(rows) > TABLE_ROWS:
        half = TABLE_ROWS // 2
        rows = rows[:half] + [["...", f"{len(rows) - TABLE_ROWS + 1} more spans", "", ""]] + rows[-half + 1:]
    table = ax_table.table(cellText=rows, colLabels=["span", "tokens", "sequence", "text"], loc="upper center",
                           cellLoc="left", colWidths=(0.12, 0.08, 0.12, 0.68))
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    return fig


def save(inspection: Inspection, out: Path, title: str = "") -> list[Path]:
    """Write the picture to ``out``, the bare mask to ``STEM.mask.png`` and the span table to ``STEM.spans.md``."""
    from PIL import Image
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    fig = draw(inspection, title)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    mask_png, table_md = out.with_suffix(".mask.png"), out.with_suffix(".spans.md")
    Image.fromarray(inspection.mask.astype(np.uint8) * 255).save(mask_png)
    table_md.write_text(inspection.table())
    return [out, mask_png, table_md]


def blank_video(model: TCLlava, count: int) -> tuple[np.ndarray, Clip | None]:
    """``count`` frames of a plain grey 2-fps video (a Qwen-VL model gets the clip its processor reads times from)."""
    frames = np.full((count, 224, 224, 3), 127, dtype=np.uint8)
    clip = Clip(list(range(count)), 2.0, count) if isinstance(model.frame_processor, ClipEncoder) else None
    return frames, clip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tc_llava.inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an export or a llava-hf checkpoint directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--frames", type=int, nargs="+", help="lay out this many frames of a blank video (several "
                        "counts: a batch of one sample each)")
    source.add_argument("--video", nargs="+", help="a video file, gif, folder of 00001.jpg frames, or image (several: "
                        "a batch)")
    parser.add_argument("-q", "--question", default=DEFAULT_QUESTION, help="every sample's question")
    parser.add_argument("--pack", action="store_true", help="pack the samples into one row, as data.packing does "
                        "(default: left-padded rows, as evaluation batches them)")
    parser.add_argument("--row", type=int, default=0, help="the batch row to draw")
    parser.add_argument("--rope", help="a rope rule to inspect instead of the model's (e.g. tad, vanilla)")
    parser.add_argument("--mask", help="a mask rule instead of the model's (causal, frame_block_causal, ...)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a rule parameter, e.g. gamma=0.5 (repeatable)")
    parser.add_argument("--template", help="chat template (default: the one the checkpoint records)")
    parser.add_argument("--backend", default="pyav", help="video decoder: pyav | decord | torchcodec")
    parser.add_argument("--out", default="layout.png", help="the picture (default: layout.png)")
    return parser.parse_args(argv)


def rules_of(args: argparse.Namespace) -> dict[str, Any]:
    """``--rope``/``--mask``/``--param`` as ``from_pretrained`` keyword arguments, checked before the model loads."""
    kinds = rule_parameters()
    params: dict[str, dict[str, Any]] = {"rope": {}, "mask": {}}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or name not in kinds:
            raise ValueError(f"--param {item!r}: expected NAME=VALUE with NAME one of {sorted(kinds)}")
        params[kinds[name]][name] = float(value) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", value) else value
    rules = {}
    for kind in ("rope", "mask"):
        name = getattr(args, kind)
        if name is not None:
            rules[kind] = build_rule(kind, name, params[kind], f"--{kind}")
        elif params[kind]:
            raise ValueError(f"--param {sorted(params[kind])} set {kind} parameters: name the rule with --{kind}")
    return rules


def run(args: argparse.Namespace) -> Inspection:
    """Load, lay out the prompt, save the picture; returns the inspection."""
    if args.frames is not None and min(args.frames) < 1:
        raise ValueError(f"--frames must be positive integers, got {args.frames}")
    rules = rules_of(args)
    model = TCLlava.from_pretrained(args.model, template=args.template, **rules).eval()
    if model.tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: the layout is a prompt's, so the checkpoint must include it")
    if model.template is None:
        raise ValueError(f"{args.model} records no chat template: pass --template (e.g. {model.family.template})")
    samples = []
    for source in args.video or args.frames:
        if args.video is not None:
            frames, _, clip, line = decode_video(model, source, backend=args.backend)
            print(line)
        else:
            frames, clip = blank_video(model, source)
        samples.append(Chat(model, frames, model.template, clip=clip).inputs(args.question))
    collate = PackingCollator(pad_id(model)) if args.pack else SFTCollator(pad_id(model), "left")
    inspection = inspect_batch(model, collate(samples), args.row)
    written = save(inspection, Path(args.out), title=Path(args.model).name)
    print(inspection.table())
    print("wrote " + ", ".join(map(str, written)))
    return inspection


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    with one_line_errors(FileNotFoundError, ValueError):
        run(parse_args(argv))


if __name__ == "__main__":
    main()
