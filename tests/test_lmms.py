"""The lmms-eval plugin, against lmms-eval itself: its registry finds ``tc_llava`` through the entry
point, its CLI runs a local multiple-choice task over real video files (``--include_path``) both as
``generate_until`` and as ``multiple_choice`` (``loglikelihood``), and an export loaded through the
plugin keeps its rules.

lmms-eval's pins do not fit the main lock, so these tests run in the separate environment that
``scripts/setup_lmms.sh`` builds (``.venv-lmms``; CI runs them there). Elsewhere they skip, unless
``TC_LLAVA_REQUIRE_LMMS=1`` (set by CI in that environment) turns a missing lmms-eval into a failure.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

try:
    import lmms_eval  # noqa: F401
except ImportError as exc:
    if os.environ.get("TC_LLAVA_REQUIRE_LMMS"):
        raise
    pytest.skip(f"lmms-eval is not installed here ({exc}); bash scripts/setup_lmms.sh builds .venv-lmms",
                allow_module_level=True)

from lmms_eval.api.instance import Instance, unwrap_generation_output  # noqa: E402
from lmms_eval.models import get_model, list_available_models  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402

from tc_llava.data.templates import build_prompt, get_template, image_token_of, render, tokenize_prompt  # noqa: E402
from tc_llava.data.video import sample_frames  # noqa: E402
from tc_llava.eval.runner import GenerationSettings, Item, generate_predictions  # noqa: E402
from tc_llava.lmms.model import RULE_PARAMS, TCLlavaLMM, _OneProcess  # noqa: E402
from tc_llava.model.masks import FrameBlockCausalMask  # noqa: E402
from tc_llava.model.rope import TADRoPE  # noqa: E402
from tc_llava.model.settings import RULE_REGISTRIES  # noqa: E402
from tc_llava.model.tc_llava import TCLlava  # noqa: E402
from tc_llava.train.loop import frame_sampling  # noqa: E402

from conftest import CONFIGS  # noqa: E402

pytestmark = pytest.mark.timeout(600)
FRAMES = 4
CANDIDATES = ["red", "green", "blue", "yellow"]
TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "\\n".join(f"{chr(65 + k)}. {c}" for k, c in enumerate(doc["candidates"]))
    return f"{doc['question']}\\n{options}\\nAnswer with the option's letter from the given choices directly."


def doc_to_choice(doc):
    return [chr(65 + k) for k in range(len(doc["candidates"]))]


def doc_to_answer_index(doc):
    return doc["candidates"].index(doc["answer"])


def process_results(doc, results):
    return {"accuracy": float(results[0].strip()[:1].upper() == chr(65 + doc["candidates"].index(doc["answer"])))}
'''
GEN_TASK = """task: tc_mcq_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  until: ["\\n"]
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
"""
PPL_TASK = """task: tc_mcq_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_answer_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  sample_frames: 3
  frame_sampling: middle
"""


def _write_video(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for frame in rng.integers(0, 256, (16, 4, 4, 3), dtype=np.uint8).repeat(16, 1).repeat(16, 2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _train_config(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base=None):
        return compose("train", overrides=list(overrides))


def _export(lively: Path, out: Path, cfg) -> Path:
    """``lively`` exported as training exports: the rules, template and training record (``frame_sampling``) of ``cfg``."""
    model = TCLlava.from_pretrained(lively, rope=TADRoPE(gamma=1.0), mask=FrameBlockCausalMask(),
                                    template=cfg.data.template)
    model.frame_sampling = frame_sampling(cfg)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def export(lively, tmp_path_factory) -> Path:
    """A TC-LLaVA export as training writes it: TAD RoPE, the frame-block mask, a template and what it trained on."""
    return _export(lively, tmp_path_factory.mktemp("export"), _train_config("data.num_frames=8"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """Four questions over real mp4 files (one of them corrupt) and the two task yamls that ask them."""
    root = tmp_path_factory.mktemp("lmms_tasks")
    records = []
    for k in range(4):
        video = root / f"clip{k}.mp4"
        if k == 3:
            video.write_bytes(np.random.default_rng(9).integers(0, 256, 2048, dtype=np.uint8).tobytes())
        else:
            _write_video(video, k)
        records.append({"video": str(video), "question": f"What colour is shape {k}?", "candidates": CANDIDATES,
                        "answer": CANDIDATES[k]})
    (root / "questions.json").write_text(json.dumps(records))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "tc_mcq_gen.yaml").write_text(GEN_TASK.format(questions=root / "questions.json"))
    (tasks / "tc_mcq_ppl.yaml").write_text(PPL_TASK.format(questions=root / "questions.json").replace(
        "test: " + str(root / "questions.json"), "test: " + str(root / "decodable.json")))
    (root / "decodable.json").write_text(json.dumps(records[:3]))
    return root


def test_lmms_eval_registry_finds_the_plugin():
    names = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert names.get("tc_llava") == "tc_llava.lmms:manifest"
    assert "tc_llava" in list_available_models()
    assert get_model("tc_llava") is TCLlavaLMM


def test_a_bare_loglikelihood_pair_would_reach_the_task_as_text():
    """Why loglikelihood wraps its pairs: lmms-eval 0.7.3 stringifies a bare (float, bool)."""
    assert unwrap_generation_output((1.5, True))[0] == "(1.5, True)"
    from lmms_eval.api.instance import GenerationResult

    assert unwrap_generation_output(GenerationResult((1.5, True)))[0] == (1.5, True)


def _instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1})


def test_an_export_keeps_its_rules_through_the_plugin(export, task_dir):
    plugin = TCLlavaLMM(pretrained=str(export), num_frames=FRAMES, device="cpu")
    direct = TCLlava.from_pretrained(export)
    assert plugin.model.tc_settings() == direct.tc_settings()
    assert plugin.model.tc_settings()["rope"] == {"name": "tad", "gamma": 1.0}
    assert plugin.model.tc_settings()["mask"] == {"name": "frame_block_causal"}

    doc = json.loads((task_dir / "questions.json").read_text())[0]
    plugin.task_dict = {"t": {"test": [doc]}}
    context = "What colour? A. red B. green"
    args = (context, " A", lambda d: [d["video"]], 0, "t", "test")
    (result,) = plugin.loglikelihood([_instance("loglikelihood", args)])
    nll, greedy = result.text

    # the same numbers straight from TCLlava: prompt, frames (uniform, lmms-eval's models'), forward
    prompt = build_prompt("vicuna_v1", "", context, "", "<image>")
    ids = tokenize_prompt(direct.tokenizer, "vicuna_v1", prompt, direct.tokens_per_video(FRAMES))
    target = torch.tensor(direct.tokenizer(" A", add_special_tokens=False)["input_ids"])
    frames, _ = sample_frames(doc["video"], FRAMES, "uniform", None, "pyav")
    pixels = direct.image_processor(images=list(frames), return_tensors="pt")["pixel_values"][None]
    full = torch.cat([ids, target])[None]
    with torch.no_grad():
        logits = direct(full, torch.ones_like(full), pixels).logits
        plugin_logits = plugin.model(full, torch.ones_like(full), pixels).logits
    assert torch.equal(logits, plugin_logits)
    logprobs = torch.log_softmax(logits[0, len(ids) - 1 : -1].float(), -1).gather(-1, target[:, None])[:, 0]
    assert nll == pytest.approx(float(-logprobs.mean()), abs=1e-6) and isinstance(greedy, bool)

    # what a plain-LLaVA load computes instead (llava_hf: vanilla RoPE, causal mask): other logits
    plain = TCLlavaLMM(pretrained=str(export), num_frames=FRAMES, device="cpu", rope="vanilla", mask="causal")
    assert plain.model.tc_settings()["rope"]["name"] == "vanilla"
    with torch.no_grad():
        vanilla_logits = plain.model(full, torch.ones_like(full), pixels).logits
    assert not torch.allclose(vanilla_logits, logits, atol=1e-4)
    with pytest.raises(ValueError, match=r"model_args rope\.delta is not a parameter of rope=tad \(its parameters: gamma\)"):
        TCLlavaLMM(pretrained=str(export), rope="tad", delta=2.0)


@pytest.mark.parametrize("data", ["llava", "synthetic"])  # data.system null (the template's own) and "" (PLLaVA's)
def test_the_plugin_prompts_with_the_system_text_training_rendered(data, lively, tmp_path):
    cfg = _train_config(f"data={data}")
    plugin = TCLlavaLMM(pretrained=str(_export(lively, tmp_path / "export", cfg)), device="cpu")
    question = "What happens first?\nA. a dog runs\nB. a cat sits"
    # training's rendering of a record without an instruction (SFTDataset: data.system, the placeholder first)
    image = image_token_of(plugin.model.tokenizer)
    segments = render(cfg.data.template, [(f"{image}\n{question}", "B")], cfg.data.system, image)
    asked = "".join(seg.text for seg in segments[: [seg.learn for seg in segments].index(True)])
    assert plugin._prompt(question) == asked
    template_system = get_template(cfg.data.template).system
    assert (template_system in asked) == (data == "llava") and template_system
    # model_args system_prompt overrides what the export records
    assert TCLlavaLMM(pretrained=str(tmp_path / "export"), system_prompt="", device="cpu")._prompt(question) == (
        build_prompt(cfg.data.template, "", question, "", image))


# A model_args text for every parameter of every registered rule, and the value the rule must hold (add one with a rule).
RULE_ARGS = {"gamma": ("0.5", 0.5), "delta": ("1.5", 1.5), "temporal_pairs": ("3", 3), "mrope_section": ("[2,3,3]", (2, 3, 3))}
RULE_FIELDS = [(kind, name, field.name) for kind, registry in RULE_REGISTRIES.items() for name, rule in registry.items()
               for field in dataclasses.fields(rule)]


@pytest.mark.parametrize("kind,name,field", RULE_FIELDS, ids=[f"{k}={n}.{f}" for k, n, f in RULE_FIELDS])
def test_every_rule_parameter_is_accepted_from_model_args(kind, name, field, export):
    """Through lmms-eval's own parsing of --model_args and its constructor flags, as its evaluator builds a model."""
    text, value = RULE_ARGS[field]
    plugin = TCLlavaLMM.create_from_arg_string(f"pretrained={export},{kind}={name},{field}={text}",
                                               {"batch_size": "auto", "max_batch_size": 4, "device": "cpu"})
    rule = getattr(plugin.model, kind)
    assert rule == RULE_REGISTRIES[kind][name](**{field: value}) and getattr(rule, field) == value
    assert plugin.model.tc_settings()[kind][field] == value and plugin.batch_size == 4


def test_model_args_refuse_typos_and_take_lmms_eval_flags(export):
    import inspect

    assert not set(RULE_PARAMS) & set(inspect.signature(TCLlavaLMM.__init__).parameters)  # routable by name alone
    flags = {"batch_size": "3", "max_batch_size": 2, "device": "cpu"}  # --max_batch_size caps only auto
    assert TCLlavaLMM.create_from_arg_string(f"pretrained={export}", flags).batch_size == 3
    with pytest.raises(ValueError, match=r"model_args \['gama'\] are not arguments of the tc_llava model"):
        TCLlavaLMM.create_from_arg_string(f"pretrained={export},rope=tad,gama=0.5", flags)
    with pytest.raises(ValueError, match=r"model_args rope\.temporal_pairs must be an integer >= 0, got 'many'"):
        TCLlavaLMM.create_from_arg_string(f"pretrained={export},rope=videorope,temporal_pairs=many", flags)
    with pytest.raises(ValueError, match=r"model_args sampling='random': expected one of \('middle', 'uniform'\)"):
        TCLlavaLMM.create_from_arg_string(f"pretrained={export},sampling=random", flags)


def test_frames_are_sampled_as_the_task_asks(export, task_dir):
    """Uniform over the clip unless the task (or model_args) asks otherwise; the count from the task first."""
    plugin = TCLlavaLMM(pretrained=str(export), device="cpu")
    assert plugin.num_frames == 8  # the export's training frame count
    doc = json.loads((task_dir / "questions.json").read_text())[1]
    plugin.task_dict = {"t": {"test": [doc]}}
    context = "What colour? A. red B. green"
    args = (context, " B", lambda d: [d["video"]], 0, "t", "test")
    prompt = build_prompt("vicuna_v1", "", context, "", "<image>")

    def asked(**metadata) -> float:
        request = Instance(request_type="loglikelihood", arguments=args, idx=0,
                           metadata={"task": "t", "doc_id": 0, "repeats": 1, **metadata})
        return plugin.loglikelihood([request])[0].text[0]

    for metadata, frames, sampling in (({}, 8, "uniform"), ({"sample_frames": 3}, 3, "uniform"),
                                       ({"sample_frames": 3, "frame_sampling": "middle"}, 3, "middle")):
        assert asked(**metadata) == pytest.approx(_nll(plugin.model, doc["video"], frames, sampling, prompt, " B"),
                                                  abs=1e-6), metadata
    assert _nll(plugin.model, doc["video"], 3, "uniform", prompt, " B") != pytest.approx(
        _nll(plugin.model, doc["video"], 3, "middle", prompt, " B"), abs=1e-6)  # the two samplings differ here
    with pytest.raises(ValueError, match=r"task 't' asks for frame_sampling='random'"):
        asked(frame_sampling="random")


def test_lmms_eval_cli_runs_a_local_task_both_ways(export, task_dir, tmp_path):
    """lmms-eval's own flags (--batch_size auto, --max_batch_size) reach the model; each task gets its frames."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
           "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "tc_llava",
           "--model_args", f"pretrained={export},num_frames={FRAMES}",
           "--tasks", "tc_mcq_gen,tc_mcq_ppl", "--include_path", str(task_dir / "tasks"),
           "--batch_size", "auto", "--max_batch_size", "2", "--device", "cpu",
           "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "system text '', batch size 2" in log  # the export's training system text; auto capped by --max_batch_size
    assert "tc_llava: task tc_mcq_gen: 4 frames (model_args num_frames), uniform sampling" in log
    assert "tc_llava: task tc_mcq_ppl: 3 frames (the task's metadata sample_frames), middle sampling" in log
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]
    assert 0.0 <= results["tc_mcq_gen"]["accuracy,none"] <= 1.0
    assert 0.0 <= results["tc_mcq_ppl"]["acc,none"] <= 1.0

    # generate_until: the runner's greedy outputs for the same prompts, cut at the task's "\n"
    samples = [json.loads(line) for line in next(out.rglob("*_samples_tc_mcq_gen.jsonl")).read_text().splitlines()]
    answers = {s["doc_id"]: s["filtered_resps"] for s in samples}  # lmms-eval logs the filtered answer text
    records = json.loads((task_dir / "questions.json").read_text())
    model = TCLlava.from_pretrained(export)
    namespace: dict = {}
    exec(TASK_UTILS, namespace)
    system = model.frame_sampling["system"]
    items = [Item(str(k), r["video"], build_prompt("vicuna_v1", system, namespace["doc_to_text"](r), "", "<image>"))
             for k, r in enumerate(records)]
    expected = generate_predictions(model, items, tmp_path / "cache",
                                    GenerationSettings(num_frames=FRAMES, sampling="uniform", max_new_tokens=8,
                                                       backend="pyav", num_workers=0), _OneProcess(torch.device("cpu")))
    assert expected["3"]["failed"] and answers[3] == ""  # the corrupt video: answered "", logged
    assert all(answers[k].strip() == expected[str(k)]["output"].split("\n")[0].strip() for k in range(3))

    # multiple_choice: four (loss, greedy) pairs per question, scored by the task's argmin (its log writes them as text)
    samples = [json.loads(line) for line in next(out.rglob("*_samples_tc_mcq_ppl.jsonl")).read_text().splitlines()]
    assert len(samples) == 3
    for sample in samples:
        losses = [float(loss) for loss, greedy in sample["filtered_resps"]]
        assert len(losses) == 4 and all(loss > 0 for loss in losses)
        assert sample["acc"] == float(int(np.argmin(losses)) == int(sample["target"]))
    # the ppl task's own frames: 3 segment middles, as its metadata asks
    doc = min(samples, key=lambda s: s["doc_id"])
    record = records[doc["doc_id"]]
    assert float(doc["filtered_resps"][0][0]) == pytest.approx(
        _nll(model, record["video"], 3, "middle", build_prompt("vicuna_v1", system, namespace["doc_to_text"](record),
                                                               "", "<image>"), " A"), abs=1e-5)


def _nll(model: TCLlava, video: str, frames: int, sampling: str, prompt: str, continuation: str) -> float:
    """The mean negative log-likelihood of ``continuation`` after ``prompt`` and the video, straight from TCLlava."""
    ids = tokenize_prompt(model.tokenizer, model.template, prompt, model.tokens_per_video(frames))
    target = torch.tensor(model.tokenizer(continuation, add_special_tokens=False)["input_ids"])
    array, _ = sample_frames(video, frames, sampling, None, "pyav")
    pixels = model.frame_processor(images=list(array), return_tensors="pt")["pixel_values"][None]
    full = torch.cat([ids, target])[None]
    with torch.no_grad():
        logits = model(full, torch.ones_like(full), pixels).logits[0, len(ids) - 1 : -1].float()
    return float(-torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0].mean())


@pytest.mark.parametrize("ckpt", ["tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def test_a_qwen_export_answers_through_the_plugin(ckpt, request, task_dir):
    """A Qwen-VL checkpoint through the plugin: the frames its budget chooses, HF's processors, its template; the
    log-likelihood equals the model's own forward on those inputs, and generation answers."""
    from tc_llava.data.inputs import Clip, model_inputs
    from tc_llava.data.video import read_frames

    path = request.getfixturevalue(ckpt)
    plugin = TCLlavaLMM(pretrained=str(path), device="cpu")
    direct = TCLlava.from_pretrained(path)
    doc = json.loads((task_dir / "questions.json").read_text())[0]
    plugin.task_dict = {"t": {"test": [doc]}}
    context = "What colour? A. red B. green"
    (result,) = plugin.loglikelihood([_instance("loglikelihood", (context, " A", lambda d: [d["video"]], 0, "t",
                                                                   "test"))])
    nll, _ = result.text

    encoder = direct.frame_processor
    frames, indices, fps, total = read_frames(doc["video"], encoder.frame_indices, "pyav")
    prompt = build_prompt(direct.template, None, context, "", image_token_of(direct.tokenizer))
    assert prompt.count("<|vision_start|><|video_pad|><|vision_end|>") == 1
    inputs = model_inputs(direct.tokenizer, encoder, None, direct.template, frames, prompt,
                          clip=Clip(indices, fps, total))
    target = torch.tensor(direct.tokenizer(" A", add_special_tokens=False)["input_ids"])
    full = torch.cat([inputs["input_ids"], target])[None]
    visual = {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    with torch.no_grad():
        logits = direct(full, torch.ones_like(full), **visual).logits[0, len(inputs["input_ids"]) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
    assert nll == pytest.approx(float(-logprobs.mean()), abs=1e-6)

    request_args = (context, {"max_new_tokens": 3, "until": []}, lambda d: [d["video"]], 0, "t", "test")
    (answer,) = plugin.generate_until([_instance("generate_until", request_args)])
    assert isinstance(answer, str)
