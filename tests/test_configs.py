"""Every option of every config group of ``train.yaml`` and ``eval.yaml`` composes and instantiates.

Options that point at local files (checkpoints, corpora, benchmark trees) get small stand-ins
built here: tiny checkpoints of the right architecture, corpora whose records point at a real
video, benchmark folders with their question files. Each group is then instantiated the way
the apps do it (``model_from_config``, the dataset and collator, the rules, the projector, the
judge, the trainer's checks, the benchmark's checks before the model loads).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from accelerate import PartialState
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tc_llava.ablation.job import check_benchmark
from tc_llava.configs import CONFIG_DIR
from tc_llava.data.synthetic import generate
from tc_llava.eval.__main__ import check_settings
from tc_llava.eval.judge import Judge
from tc_llava.eval.runner import GenerationSettings
from tc_llava.model.build import model_from_config
from tc_llava.model.masks import MASK_RULES
from tc_llava.model.pooling import VideoPooling
from tc_llava.model.rope import ROPE_RULES
from tc_llava.model.tc_llava import TCLlava
from tc_llava.train.settings import LAUNCHER_ENV, check_train_config, check_trainer
from tc_llava.train.tuning import apply_tuning

from conftest import REPO

PRIMARIES = ("train", "eval")


def _options() -> list[tuple[str, str, str]]:
    """(primary config, group, option) for every group a primary config selects from."""
    found = []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for primary in PRIMARIES:
            choices = compose(primary, return_hydra_config=True).hydra.runtime.choices
            for group in sorted(g for g in choices if not g.startswith("hydra/")):
                found += [(primary, group, option) for option in loader.get_group_options(group)]
    return found


OPTIONS = _options()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, tiny_next, tiny_onevision, tiny_next_video, tiny_qwen2_5_vl,
          tiny_qwen3_vl) -> dict[str, Path]:
    """Stand-ins for everything the options name on disk: checkpoints, data, a video."""
    root = tmp_path_factory.mktemp("world")
    checkpoints, data = root / "checkpoints", root / "data"
    shutil.copytree(tiny_llama, checkpoints / "llava-1.5-7b-hf")
    shutil.copytree(tiny_next, checkpoints / "llava-v1.6-vicuna-7b-hf")
    for name in ("llava-onevision-qwen2-7b-ov-hf", "LLaVA-Video-7B-Qwen2-hf", "llava-onevision-qwen2-7b-si-hf"):
        shutil.copytree(tiny_onevision, checkpoints / name)
    shutil.copytree(tiny_next_video, checkpoints / "LLaVA-NeXT-Video-7B-hf")
    for name in ("Qwen2.5-VL-3B-Instruct", "Qwen2.5-VL-7B-Instruct"):
        shutil.copytree(tiny_qwen2_5_vl, checkpoints / name)
    for name in ("Qwen3-VL-2B-Instruct", "Qwen3-VL-4B-Instruct", "Qwen3-VL-8B-Instruct"):
        shutil.copytree(tiny_qwen3_vl, checkpoints / name)
    generate(data / "synthetic", num_train=4, num_eval_per_task=1, seed=0, num_frames=8)
    generate(data / "ablation", num_train=4, num_eval_per_task=1, seed=0, num_frames=8)
    video = next((data / "synthetic" / "videos").iterdir())
    return {"root": root, "checkpoints": checkpoints, "data": data, "video": video, "tiny": tiny_llama}


def _compose(world: dict[str, Path], primary: str, *overrides: str):
    paths = [f"paths.checkpoints={world['checkpoints']}", f"paths.data={world['data']}",
             f"paths.cache={world['root'] / 'cache'}", f"paths.outputs={world['root'] / 'outputs'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(primary, overrides=[*paths, *overrides])


def _stand_in_corpora(cfg, video: Path) -> None:
    """One record per corpus, pointing at a real video under the corpus's media root."""
    for spec in OmegaConf.to_container(cfg.data.corpora, resolve=True).values():
        media = Path(spec["media_root"])
        media.mkdir(parents=True, exist_ok=True)
        shutil.copy(video, media / "clip.mp4")
        if spec["type"] == "llava":
            record = {"id": "0", "video": "clip.mp4",
                      "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."}]}
        else:
            record = {"video": "clip.mp4", "QA": [{"i": "", "q": "What?", "a": "This."}]}
        Path(spec["json"]).parent.mkdir(parents=True, exist_ok=True)
        Path(spec["json"]).write_text(json.dumps([record]))


def _stand_in_benchmark(cfg, video: Path) -> None:
    """The files a benchmark's check reads before the model loads, with one question each."""
    bench, root = cfg.benchmark, Path(cfg.benchmark.root)
    if bench.protocol == "mvbench":
        if bench.task_table == "from_root":
            return  # the synthetic set written by the world fixture
        for name, (json_file, prefix, *_rest) in bench.table.items():
            (root / bench.video_dir / prefix).mkdir(parents=True, exist_ok=True)
            (root / bench.json_dir).mkdir(parents=True, exist_ok=True)
            (root / bench.json_dir / json_file).write_text(json.dumps(
                [{"video": "clip.mp4", "question": "Which?", "candidates": ["a", "b"], "answer": "a",
                  "start": 0.0, "end": 1.0}]))
    elif bench.protocol == "videochatgpt":
        (root / bench.json_dir).mkdir(parents=True, exist_ok=True)
        (root / bench.video_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(video, root / bench.video_dir / "clip.mp4")
        for split, file in bench.splits.items():
            fields = {"Q1": "What?", "Q2": "And?"} if split == "consistency" else {"Q": "What?"}
            (root / bench.json_dir / file).write_text(json.dumps([{"video_name": "clip", "A": "This.", **fields}]))
    elif bench.protocol == "nextqa":
        (root / bench.video_dir / "0001").mkdir(parents=True, exist_ok=True)
        shutil.copy(video, root / bench.video_dir / "0001" / f"7{bench.video_extension}")
        (root / bench.video_map).write_text(json.dumps({"7": "0001/7"}))
        (root / bench.annotation).write_text("video,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
                                             "7,8,64,64,why,1,0,CW,a,b,c,d,e\n")
    elif bench.protocol == "videomme":
        for folder in (bench.video_dir, bench.subtitle_dir):
            (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(video, root / bench.video_dir / f"v1{bench.video_extension}")
        (root / bench.subtitle_dir / "v1.srt").write_text("1\n00:00:00,000 --> 00:00:09,000\nhello\n")
        (root / bench.annotation).write_text(json.dumps([{
            "videoID": "v1", "duration": "short", "question_id": "001-1", "task_type": "Counting",
            "question": "How many?", "options": ["A. 1", "B. 2", "C. 3", "D. 4"], "answer": "B"}]))
    else:  # zeroshot_qa
        spec = bench.datasets[bench.dataset]
        (root / spec.video_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(video, root / spec.video_dir / f"{spec.video_prefix}clip{spec.video_extensions[0]}")
        (root / spec.questions).parent.mkdir(parents=True, exist_ok=True)
        (root / spec.questions).write_text(json.dumps([{"video_name": "clip", "question": "What?", "question_id": 0}]))
        (root / spec.answers).write_text(json.dumps([{"answer": "This.", "question_id": 0}]))


def instantiate_option(world, tmp_path, monkeypatch, primary: str, group: str, option: str) -> object:
    """Compose ``primary`` with ``group=option`` and build what the apps build from that group."""
    extra = {"benchmark": [f"benchmark.root={tmp_path / 'bench'}"] if option != "mvbench_synthetic" else [],
             "judge": [f"judge.model_path={world['tiny']}"] if option == "local" else [],
             "model": [f"model.checkpoint={world['tiny']}"] if option == "pretrained" else [],
             "experiment": [f"run_dir={tmp_path / 'run'}", "hydra.mode=RUN"]}.get(group, [])
    if group == "benchmark" and option.startswith("videomme"):
        extra.append("benchmark.annotation=videomme.json")  # the official parquet needs pyarrow
    if primary == "eval" and group == "benchmark" and option in ("videochatgpt", "zeroshot_qa"):
        extra.append("benchmark.stage=generate")  # the judge is checked by the judge group
    cfg = _compose(world, primary, f"{group}={option}", *extra)
    if group == "model":
        model = model_from_config(cfg)
        assert isinstance(model, TCLlava) and model.template == cfg.model.template
        return model
    if group in ("rope", "mask"):
        rule = instantiate(cfg[group])
        assert type(rule) is {"rope": ROPE_RULES, "mask": MASK_RULES}[group][rule.name]
        return rule
    if group == "projector":
        pooling = instantiate(cfg.projector)(model_pooling_shape=cfg.model.pllava_pooling_shape)
        assert isinstance(pooling, VideoPooling) and pooling.name == option
        return pooling
    if group == "data":
        _stand_in_corpora(cfg, world["video"])
        model = TCLlava.from_pretrained(world["tiny"])
        dataset = instantiate(cfg.data.dataset, tokenizer=model.tokenizer, image_processor=model.image_processor,
                              num_visual_tokens=model.tokens_per_video(cfg.data.num_frames))
        collate = instantiate(cfg.data.collator, pad_token_id=model.tokenizer.pad_token_id)
        batch = collate([dataset[0]])
        assert batch["pixel_values"].shape[1] == cfg.data.num_frames
        return dataset
    if group == "tuning":
        model = TCLlava.from_pretrained(world["tiny"])
        apply_tuning(model, **cfg.tuning)
        trained = {name.split(".")[2] for name, p in model.named_parameters() if p.requires_grad}
        assert "multi_modal_projector" in trained and ("language_model" in trained) == (option != "frozen")
        return model
    if group == "trainer":
        for key in LAUNCHER_ENV:  # as under accelerate launch / torchrun
            monkeypatch.setenv(key, "0" if "RANK" in key else "1" if key == "WORLD_SIZE" else "127.0.0.1")
        check_trainer(cfg.trainer)
        return cfg.trainer
    if group == "benchmark":
        _stand_in_benchmark(cfg, world["video"])
        check_settings(cfg, PartialState(cpu=True))  # as the eval app: frames and dtype completed, inputs checked
        return GenerationSettings.from_benchmark(cfg.benchmark)
    if group == "judge":
        judge = instantiate(cfg.judge)
        assert isinstance(judge, Judge)
        return judge
    if group == "experiment":
        _stand_in_corpora(cfg, world["video"])
        check_train_config(cfg)
        if option == "ablation":
            check_benchmark(cfg)
        return cfg
    if group == "paths":
        assert {"root", "cache", "checkpoints", "data", "outputs"} <= set(cfg.paths)
        return cfg.paths
    raise AssertionError(f"no instantiation for group {group!r}: add it here")


@pytest.mark.parametrize("primary, group, option", OPTIONS, ids=["/".join(o) for o in OPTIONS])
def test_every_option_composes_and_instantiates(world, tmp_path, monkeypatch, primary, group, option):
    assert instantiate_option(world, tmp_path, monkeypatch, primary, group, option) is not None


def test_the_options_are_all_there():
    groups = {(primary, group) for primary, group, _ in OPTIONS}
    assert {("train", g) for g in ("model", "rope", "mask", "projector", "data", "tuning", "trainer",
                                    "experiment", "paths")} <= groups
    assert {("eval", g) for g in ("model", "rope", "mask", "projector", "benchmark", "judge", "paths")} <= groups


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml")))
def test_trainer_presets_agree_with_their_launch_files(preset):
    """A preset, its DeepSpeed JSON and its accelerate file name the same settings; no file is an orphan."""
    cfg = OmegaConf.load(CONFIG_DIR / "trainer" / f"{preset}.yaml")
    launch = CONFIG_DIR / "trainer" / f"{preset}.accelerate.json"
    if preset == "cpu":
        assert not launch.exists()
        return
    accelerate = json.loads(launch.read_text())
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        trainer = compose("train", overrides=[f"trainer={preset}"]).trainer
    if trainer.deepspeed:
        assert accelerate["distributed_type"] == "DEEPSPEED"
        named = REPO / accelerate["deepspeed_config"]["deepspeed_config_file"]
        assert named.resolve() == Path(trainer.deepspeed).resolve() == (
            CONFIG_DIR / "trainer" / f"{preset}.deepspeed.json").resolve()
        assert accelerate["deepspeed_config"]["zero3_init_flag"] == ("zero3" in preset)
    else:
        assert accelerate["distributed_type"] == "MULTI_GPU"
        assert accelerate["mixed_precision"] == cfg.mixed_precision
    stems = {p.name.split(".")[0] for p in (CONFIG_DIR / "trainer").glob("*.json")}
    assert stems <= {p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml")}
