"""The half that generate-then-judge benchmarks share (VideoChatGPT, zero-shot QA, any other).

Such a benchmark is a loader (its records -> :class:`Entry` s: a video and the questions
whose answers it needs), a scoring call and a results table; this module does the rest:

- **Generation** (:func:`predictions_stage`): each question becomes a prompt
  (configurable system text, question wrapper and answer priming, in ``cfg.template``),
  answered greedily through :mod:`tc_llava.eval.runner`, so generation is batched, sharded
  over ranks and resumable. Predictions are saved as the benchmark's own records with the
  prediction fields added (``predictions/{split}.json``: the upstream scripts' input) and a
  ``meta.json`` beside them. A record whose video is missing (every path tried is reported)
  or cannot be decoded is left out of the prediction file and counted; it never stops the run.
- **Stages**: ``stage`` separates the halves because they need different machines:
  ``generate`` on GPUs, ``score`` later (or with another judge) from the saved predictions
  without loading the model, ``all`` both. Re-running either half only does what its cache lacks.
  ``calibrate`` scores the saved predictions like ``score`` and then measures the judge's
  agreement with a reference judge (:mod:`tc_llava.eval.calibrate`).
- **Checks before the model loads** (:func:`check_inputs`): the benchmark's files for
  generation, the saved predictions for ``score``, and the judge (key, endpoint, model)
  before a generation it will score; ``score`` asks the judge only for uncached verdicts.
- **Results** (:func:`write_results`): a scoring that judges no item at all stops with an
  error and keeps the earlier results; a partial one says so. ``results.json`` carries the
  judge (``judge``, ``judge_provenance``), the prompt hashes and the generation's
  ``provenance`` (annotation hashes, missing or failed videos, model export hash, frames, git).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import PartialState
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from tc_llava.data.templates import build_prompt, image_token_of
from tc_llava.eval import calibrate
from tc_llava.eval.judge import Judge, JudgeError
from tc_llava.eval.runner import GenerationSettings, Item, generate_predictions, model_settings, require_path
from tc_llava.provenance import data_fingerprint, git_state, model_hash, results_provenance

log = logging.getLogger(__name__)

STAGES = ("generate", "score", "all", "calibrate")
PREDICTIONS = "predictions"  # folder of run_dir holding the prediction files and meta.json


@dataclass(frozen=True)
class Entry:
    """One benchmark record: its video and the questions whose answers it needs."""

    split: str
    index: int
    record: dict[str, Any]  # saved with the prediction fields added
    video: Path | None  # None: no candidate path exists
    tried: tuple[str, ...]  # candidate paths in lookup order
    questions: dict[str, str]  # prediction field -> question text
    sources: tuple[Path, ...] = ()  # the annotation files the record came from

    def item_id(self, field: str) -> str:
        return f"{self.split}/{self.index}/{field}"


# A benchmark's judging: (judge, split -> prediction file, verdict cache folder, benchmark config) -> results.
Score = Callable[[Judge, Mapping[str, Path], Path, DictConfig], dict[str, Any]]


def check_stage(cfg: DictConfig) -> str:
    """``cfg.stage``, one of :data:`STAGES`."""
    if cfg.stage not in STAGES:
        raise ValueError(f"benchmark.stage must be one of {STAGES}, got {cfg.stage!r}")
    return cfg.stage


def text_field(record: Any, key: str, where: str, numbers: bool = False) -> str:
    """``record[key]`` as text; ``numbers`` also accepts integers (video names, numeric answers)."""
    value = record.get(key) if isinstance(record, dict) else None
    ok = isinstance(value, str) or (numbers and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        kind = "a string or integer" if numbers else "a string"
        raise ValueError(f"{where}: field {key!r} must be {kind}, got {value!r:.60}")
    return str(value)


def read_json_list(path: Path, what: str, where: str) -> list[Any]:
    """The JSON list at ``path``; ``where`` names the config field the path comes from."""
    require_path(path, "file", where, f"the {what}")
    records = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of {what}, got {type(records).__name__}")
    return records


def locate_video(video_dir: Path, name: str, extensions: Sequence[str]) -> tuple[Path | None, tuple[str, ...]]:
    """The first existing ``{video_dir}/{name}{ext}``, extensions in order, and every path tried."""
    tried = tuple(str(video_dir / f"{name}{ext}") for ext in extensions)
    return next((Path(p) for p in tried if Path(p).is_file()), None), tried


def prompt_text(cfg: DictConfig, question: str, image_token: str) -> str:
    """The full generation prompt: system, video placeholder, wrapped question, primed answer."""
    user = cfg.prompt.question.format(question=question)
    return build_prompt(cfg.template, cfg.prompt.system, user, cfg.prompt.answer_prefix, image_token)


def config_record(cfg: DictConfig) -> dict[str, Any]:
    """The benchmark config of the generation, without ``stage``, ``judge`` and ``calibrate`` (scoring records its judge)."""
    out = {}
    for key in cfg:
        if key not in ("stage", "judge", "calibrate"):
            value = cfg[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value
    return out


def write_json(path: Path, obj: Any) -> None:
    """Written whole or not at all: a crash never leaves a half prediction file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def prediction_files(run_dir: Path, splits: Sequence[str]) -> dict[str, Path]:
    """``{run_dir}/predictions/{split}.json`` per split; ``meta.json`` lies beside them."""
    return {split: run_dir / PREDICTIONS / f"{split}.json" for split in splits}


def _generate(model: Any, entries: Sequence[Entry], cfg: DictConfig, files: Mapping[str, Path], run_dir: Path,
              state: PartialState) -> dict[str, Any] | None:
    """Generate, then (main process) write the prediction files and ``meta.json``; returns the meta."""
    image_token = image_token_of(model.tokenizer)
    items = [Item(e.item_id(field), str(e.video), prompt_text(cfg, question, image_token))
             for e in entries if e.video is not None for field, question in e.questions.items()]
    outputs = generate_predictions(model, items, run_dir / "cache", GenerationSettings.from_benchmark(cfg), state)
    if not state.is_main_process:
        return None
    predictions: dict[str, list[dict[str, Any]]] = {split: [] for split in files}
    failed = []
    for e in entries:
        if e.video is None:
            reason = f"no video file for video_name {e.record['video_name']!r}: tried {', '.join(e.tried)}"
        else:
            reason = "; ".join(dict.fromkeys(
                outputs[e.item_id(f)]["failed"] for f in e.questions if outputs[e.item_id(f)]["failed"]))
        if reason:
            failed.append({"split": e.split, "index": e.index, "video_name": e.record["video_name"], "reason": reason})
        else:
            preds = {field: outputs[e.item_id(field)]["output"].strip() for field in e.questions}
            predictions[e.split].append({**e.record, **preds})
    for split, path in files.items():
        write_json(path, predictions[split])
    counts = {split: {"records": sum(e.split == split for e in entries), "predicted": len(predictions[split]),
                      "failed": sum(f["split"] == split for f in failed)} for split in files}
    described = model_settings(model)
    missing = sorted({t for e in entries if e.video is None for t in e.tried[:1]})
    undecodable = sorted({str(e.video) for e in entries if e.video is not None and
                          any(outputs[e.item_id(f)]["failed"] for f in e.questions)})
    settings = GenerationSettings.from_benchmark(cfg)
    meta = {
        "benchmark": cfg.name,
        "predictions": {split: str(path) for split, path in files.items()},
        "counts": counts,
        "failed_items": failed,
        "settings": {
            "benchmark": config_record(cfg),
            "frame_sampling": settings.sampling,
            "decoding": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "kept": "whole output, stripped"},
            "model": described,
            "git": git_state(),
            "num_processes": state.num_processes,
        },
        "provenance": results_provenance(
            data_fingerprint({p for e in entries for p in e.sources}, cfg.root, len(items), missing, undecodable),
            model_hash(described["checkpoint"], run_dir / "cache" / "model_hash.json"),
            {"num_frames": settings.num_frames, "sampling": settings.sampling},
        ),
    }
    write_json(run_dir / PREDICTIONS / "meta.json", meta)
    log.info("%s: %d records, %d failed; predictions in %s", cfg.name, len(entries), len(failed), run_dir / PREDICTIONS)
    return meta


def predictions_stage(model: Any, cfg: DictConfig, files: Mapping[str, Path], run_dir: Path, state: PartialState,
                      entries: Callable[[DictConfig], list[Entry]]) -> dict[str, Any] | None:
    """The generation half: generate and save (stage generate/all) or check the saved files (score).

    Returns the generation meta on the main process (None when scoring files made elsewhere,
    without ``meta.json``), and None on the other ranks.
    """
    if check_stage(cfg) in ("generate", "all"):
        return _generate(model, entries(cfg), cfg, files, run_dir, state)
    if not state.is_main_process:
        return None
    require_predictions(files)
    meta = run_dir / PREDICTIONS / "meta.json"
    return json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None


def require_predictions(files: Mapping[str, Path]) -> None:
    """stage=score judges saved prediction files: each must exist."""
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]} not found: benchmark.stage=score judges saved predictions; run stage=generate or all first")


def make_judge(cfg: DictConfig) -> Judge:
    """The judge of the eval app's ``judge`` group (interpolated into the benchmark as ``judge``).

    A :class:`JudgeError` from the judge's constructor (e.g. no model at ``model_path``) is
    raised as itself rather than inside Hydra's multi-line instantiation error.
    """
    try:
        judge = instantiate(cfg.judge)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, JudgeError):
            raise exc.__cause__ from None
        raise
    if not isinstance(judge, Judge):
        raise TypeError(f"judge: expected a tc_llava.eval.judge.Judge _target_, got {type(judge).__name__}")
    return judge


def check_inputs(cfg: DictConfig, run_dir: str | Path, state: PartialState, check_files: Callable[[DictConfig], None],
                 splits: Sequence[str]) -> None:
    """Everything that can fail without the model, checked before it loads (minutes at 7B).

    Generation (stage generate/all): ``check_files`` checks the benchmark's files, records
    and video folder, on every rank (each reads them). On the main process, which alone
    scores: the saved predictions of ``splits`` (stage score), then the judge's settings
    (stage score/all) and, for stage all, the judge itself: its key is set, its endpoint
    answers and serves the model (:meth:`Judge.preflight`), or its local model exists. Stage
    score contacts the judge only when an item lacks a cached verdict (:meth:`Judge.ready`),
    so re-scoring from a complete cache needs no judge.
    """
    stage = check_stage(cfg)
    if stage in ("generate", "all"):
        GenerationSettings.from_benchmark(cfg)
        check_files(cfg)
    if not state.is_main_process:
        return
    if stage in ("score", "calibrate"):
        require_predictions(prediction_files(Path(run_dir), splits))
    if stage == "calibrate":
        calibrate.load_reference(cfg.calibrate.reference or "")
    if stage != "generate":
        judge = make_judge(cfg)
        if stage == "all":
            judge.preflight()


def generation_line(meta: Mapping[str, Any] | None) -> str:
    """How many records the generation left out of the scores, as the markdown reports it."""
    if meta is None:
        return "Generation: predictions made elsewhere (no meta.json)."
    counts = meta["counts"].values()
    records, failed = sum(c["records"] for c in counts), sum(c["failed"] for c in counts)
    return f"Generation: {records} records, {failed} failed (missing or undecodable video), left out of the scores."


def judge_line(judge: Mapping[str, Any]) -> str:
    """The judge as the markdown reports it: model and where it ran."""
    return f"Judge: {judge['model']} ({judge.get('base_url') or judge.get('model_path')})"


def write_results(run_dir: Path, title: str, results: Mapping[str, Any], table: str) -> None:
    """``results.json`` and ``results.md``, unless no item has a score: then an error, and the
    files of an earlier run stay as they were. A partial run says so in the markdown."""
    judged, failed = results["judged"], results["failed"]
    if not judged:
        raise RuntimeError(
            f"{title}: nothing judged (0 of {failed} items got a score); results.json and results.md in {run_dir} "
            f"were left as they were. The failed verdicts and their errors are in {run_dir / 'judge'}")
    if failed:
        note = (f"**Partial**: {judged} of {judged + failed} items judged, {failed} failed and left out of the scores; "
                "re-running asks the judge again for the failed ones only.")
        log.warning("%s: %s", title, note.replace("**", ""))
        table = f"{table}\n{note}\n"
    write_json(run_dir / "results.json", results)
    (run_dir / "results.md").write_text(f"# {title}\n\n{table}", encoding="utf-8")
    print(table, flush=True)


def evaluate(model: Any, cfg: DictConfig, run_dir: str | Path, state: PartialState, splits: Sequence[str],
             entries: Callable[[DictConfig], list[Entry]], score: Score,
             table: Callable[[Mapping[str, Any]], str]) -> dict[str, Any] | None:
    """Generate and/or judge per ``cfg.stage``; the main process returns the results (the meta for stage generate).

    Outputs in ``run_dir``: ``predictions/{split}.json`` and ``meta.json``; with scoring,
    ``results.json`` (``score``'s numbers plus ``generation``, the meta), ``results.md``
    (``table`` of them) and the verdict caches in ``judge/``.
    """
    run_dir = Path(run_dir)
    files = prediction_files(run_dir, splits)
    meta = predictions_stage(model, cfg, files, run_dir, state, entries)
    if not state.is_main_process or cfg.stage == "generate":
        return meta
    results = score(make_judge(cfg), files, run_dir / "judge", cfg)
    results["generation"] = meta
    if meta is not None:
        results["provenance"] = meta["provenance"]
    else:  # predictions made elsewhere: what was judged is the prediction files themselves
        results["provenance"] = results_provenance(
            data_fingerprint(files.values(), run_dir, results["judged"] + results["failed"], [], []),
            {"checkpoint": None, "sha256": None}, {})
    if cfg.stage == "calibrate":
        report = calibrate.calibrate(results, cfg.calibrate.reference)
        write_json(run_dir / "calibration.json", report)
        (run_dir / "calibration.md").write_text(calibrate.markdown(report), encoding="utf-8")
        print(calibrate.markdown(report), flush=True)
        return report
    write_results(run_dir, cfg.name, results, table(results))
    return results
