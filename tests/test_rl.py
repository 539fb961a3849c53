"""The RL stage's pieces on a tiny model: rollouts whose training-forward log-probabilities are generation's,
the reference with LoRA disabled is the base model, T-GRPO's bonus rule on hand-made groups, and bad settings
refused in one line before any model loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from tc_llava.data.collate import GRID_KEYS, SFTCollator
from tc_llava.data.inputs import Clip, model_inputs
from tc_llava.data.templates import build_prompt, image_token_of
from tc_llava.model.masks import FrameBlockCausalMask
from tc_llava.model.rope import TADRoPE
from tc_llava.model.tc_llava import TCLlava
from tc_llava.rl.grpo import temporal_bonus
from tc_llava.rl.rollout import Completions, completion_mask, reference, repeat_rows, sample, token_logps
from tc_llava.train.tuning import apply_tuning

from conftest import CONFIGS, REPO


def _policy(checkpoint, dtype=torch.float64) -> TCLlava:
    """The tiny model under TAD-RoPE and the frame-block mask, LLM matrices redrawn at std 0.3 (seeded) so that
    sampling is far from uniform and completions stop at different lengths."""
    model = TCLlava.from_pretrained(checkpoint, rope=TADRoPE(gamma=0.5), mask=FrameBlockCausalMask(), dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3, generator=generator)
    return model


def _prompts(model: TCLlava, dtype=torch.float64) -> dict:
    """Two left-padded prompts of different lengths, 4 frames each."""
    n = model.tokens_per_video(4)
    rows = [[1, 5, 6] + [model.image_token_id] * n + [7, 8], [1] + [model.image_token_id] * n + [9, 10, 11, 12, 13]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.randn(2, 4, 3, 56, 56, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "num_frames": torch.tensor([4, 4])}


def test_training_forward_logps_equal_the_generation_that_sampled_them(tiny_llama):
    """Per-token log-probabilities of the sampled tokens: from generation's own scores (KV cache, decode steps)
    and from the training forward (one prefill of prompt + completion), fp64, temperature 0.7, top-p 0.9.

    The stop token is one the first run sampled mid-sequence, so completions end at different lengths and the
    right padding after a stop is exercised. Tolerance 1e-6: generation's scores are float32."""
    model = _policy(tiny_llama)
    group = repeat_rows(_prompts(model), 3)
    args = dict(max_new_tokens=6, temperature=0.7, top_p=0.9, seeds=range(7, 13), pad_token_id=0)
    first = sample(model, group, stops=[-1], **args)
    stop = int(first.ids[0, 2])
    done = sample(model, group, stops=[stop], **args)
    assert done.mask.sum(-1).tolist() != [6] * 6 and 0 < done.mask.sum() < done.mask.numel()
    out = model.generate(group["input_ids"], group["attention_mask"], group["pixel_values"],
                         num_frames=group["num_frames"], max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9,
                         eos_token_id=[stop], pad_token_id=0,
                         generator=[torch.Generator().manual_seed(seed) for seed in range(7, 13)],
                         output_scores=True, suppress_tokens=[model.placeholder_token_id])
    assert torch.equal(out.sequences, done.ids)  # the same draws: the rollout is generation's
    scores = torch.stack(out.scores, 1).double() / 0.7
    generated = torch.log_softmax(scores, -1).gather(-1, done.ids[..., None]).squeeze(-1) * done.mask
    with torch.no_grad():
        trained = token_logps(model, group, done, 0.7, model.placeholder_token_id)
    torch.testing.assert_close(trained, generated, rtol=0, atol=1e-6)
    assert generated.abs().sum() > 1  # not vacuous: real log-probabilities


def test_one_completion_regenerated_alone_with_its_seed_is_the_batchs(tiny_llama):
    """Each row samples from its own generator: a completion regenerated alone (batch size 1, no left padding) from
    its recorded seed draws the same tokens as in the batch of 6, whose rows stop at different lengths."""
    model = _policy(tiny_llama)
    group = repeat_rows(_prompts(model), 3)
    seeds = [101, 202, 303, 404, 505, 606]
    args = dict(max_new_tokens=6, temperature=0.7, top_p=0.9, pad_token_id=0)
    stop = int(sample(model, group, seeds=seeds, stops=[-1], **args).ids[1, 2])
    batch = sample(model, group, seeds=seeds, stops=[stop], **args)
    assert len({tuple(row) for row in batch.ids.tolist()}) > 1 and 0 < batch.mask.sum() < batch.mask.numel()
    for i, seed in enumerate(seeds):
        real = group["attention_mask"][i].bool()
        alone = {"input_ids": group["input_ids"][i, real][None],
                 "attention_mask": group["attention_mask"][i, real][None], "pixel_values": group["pixel_values"][i:i + 1], "num_frames": group["num_frames"][i:i + 1]}
        one = sample(model, alone, seeds=[seed], stops=[stop], **args)
        n = int(batch.mask[i].sum())
        assert one.ids.shape[1] == n and one.ids[0].tolist() == batch.ids[i, :n].tolist()
    with pytest.raises(ValueError, match="one per row"):
        model.generate(group["input_ids"], group["attention_mask"], group["pixel_values"], do_sample=True,
                       generator=[torch.Generator()], num_frames=group["num_frames"])


def _qwen_prompts(model: TCLlava, frames: np.ndarray, order: list[int] | None = None) -> dict:
    """Two left-padded questions about the same 4 frames of a 2-fps clip (taken in ``order``), as the RL prompt
    set encodes them (:func:`model_inputs`, the left-padding collator)."""
    clip = Clip([0, 1, 2, 3], 2.0, 4)
    taken = frames if order is None else frames[order]
    samples = [model_inputs(model.tokenizer, model.frame_processor, None, model.template, taken,
                            build_prompt(model.template, None, question, "", image_token_of(model.tokenizer)),
                            clip=clip) for question in ("Which shape moves first?", "Where?")]
    batch = SFTCollator(model.tokenizer.pad_token_id, padding_side="left")(samples)
    return {key: value.double() if key.startswith("pixel_values") else value for key, value in batch.items()
            if key in ("input_ids", "attention_mask", "num_frames", *GRID_KEYS)}


@pytest.mark.parametrize("ckpt", ["tiny_qwen2_5_vl", "tiny_qwen3_vl"])
def test_a_qwen_policys_training_forward_logps_equal_its_generations(ckpt, request):
    """A Qwen-VL policy (M-RoPE from the video grid, TAD, frame-block mask): its rollout rows carry their own
    patches and grid (repeated G times), and the training forward's log-probabilities are generation's (fp64).

    The shuffled group is re-encoded from the permuted frames: same ids and grid (a clip keeps its times), other
    patches; its first temporal patch stacks frames 2 and 0."""
    model = TCLlava.from_pretrained(request.getfixturevalue(ckpt), rope=TADRoPE(gamma=0.5),
                                    mask=FrameBlockCausalMask(), attn_implementation="sdpa", dtype=torch.float64)
    with torch.no_grad():
        for param in model.language_model.parameters():
            if param.ndim == 2:
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    frames = np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
    batch = _qwen_prompts(model, frames)
    assert batch["attention_mask"][1, 0] == 0  # left-padded
    group = repeat_rows(batch, 3)
    assert torch.equal(group["video_grid_thw"], batch["video_grid_thw"].repeat_interleave(3, 0))
    args = dict(max_new_tokens=5, temperature=0.7, top_p=0.9, seeds=range(6), pad_token_id=0)
    stop = int(sample(model, group, stops=[-1], **args).ids[0, 2])
    done = sample(model, group, stops=[stop], **args)
    assert 0 < done.mask.sum() < done.mask.numel()
    visual = {key: group[key] for key in GRID_KEYS if key in group}
    out = model.generate(group["input_ids"], group["attention_mask"], max_new_tokens=5, do_sample=True,
                         temperature=0.7, top_p=0.9, eos_token_id=[stop], pad_token_id=0,
                         generator=[torch.Generator().manual_seed(seed) for seed in range(6)], output_scores=True,
                         suppress_tokens=[model.placeholder_token_id], **visual)
    assert torch.equal(out.sequences, done.ids)
    generated = torch.log_softmax(torch.stack(out.scores, 1).double() / 0.7, -1)
    generated = generated.gather(-1, done.ids[..., None]).squeeze(-1) * done.mask
    with torch.no_grad():
        trained = token_logps(model, group, done, 0.7, model.placeholder_token_id)
    torch.testing.assert_close(trained, generated, rtol=0, atol=1e-6)
    assert generated.abs().sum() > 1
    order = [2, 0, 3, 1]
    shuffled = _qwen_prompts(model, frames, order)
    assert torch.equal(shuffled["input_ids"], batch["input_ids"])
    assert torch.equal(shuffled["video_grid_thw"], batch["video_grid_thw"])
    patched = _qwen_prompts(model, frames[[2, 0, 2, 0]])["pixel_values_videos"]
    half = len(patched) // 2 // 2  # sample 0's first temporal patch (frames 2, 0) is the first half of its rows
    assert torch.equal(shuffled["pixel_values_videos"][:half], patched[:half])
    assert not torch.equal(shuffled["pixel_values_videos"], batch["pixel_values_videos"])


def test_completion_mask_keeps_the_stop_token_and_nothing_after():
    ids = torch.tensor([[5, 2, 9, 9], [5, 6, 7, 8], [2, 2, 0, 0]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_the_reference_with_adapters_disabled_is_the_base_model(tiny_llama):
    """LoRA adapters with non-zero weights change the log-probabilities; inside ``reference`` (peft's
    ``disable_adapter``) they equal a separately loaded base model's, and after it the adapted ones return."""
    base = _policy(tiny_llama)
    policy = _policy(tiny_llama)
    lora = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    adapters = apply_tuning(policy, llm="lora", lora=lora)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
    group = repeat_rows(_prompts(base), 2)
    done = Completions(torch.randint(20, 500, (4, 5), generator=torch.Generator().manual_seed(4)),
                       torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] + [0] * 4]), [])
    token = base.placeholder_token_id
    with torch.no_grad():
        expected = token_logps(base, group, done, 1.0, token)
        adapted = token_logps(policy, group, done, 1.0, token)
        with reference(adapters):
            ref = token_logps(policy, group, done, 1.0, token)
        again = token_logps(policy, group, done, 1.0, token)
    torch.testing.assert_close(ref, expected, rtol=0, atol=1e-12)
    assert (adapted - expected).abs().max() > 1e-3
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)


def test_temporal_bonus_follows_video_r1s_rule():
    """Per prompt: ordered accuracy p, shuffled p~; +alpha to ordered completions with accuracy > 0.1 iff
    p >= 0.8 p~ (Video-R1's code)."""
    ordered = torch.tensor([[1.0, 0.0, 1.0, 0.0],    # p = 0.5 vs p~ = 0.5: 0.5 >= 0.4, bonus to the right ones
                            [1.0, 0.0, 0.0, 0.0],    # p = 0.25 vs p~ = 1: no bonus
                            [0.0, 0.0, 0.0, 0.0],    # p = 0 >= 0.8 * 0: wins, but nothing right gets it
                            [0.05, 1.0, 0.0, 0.0]],  # p = 0.2625 >= 0.8 * 0.3125 = 0.25: only the 1.0 gets it
                           dtype=torch.float64)
    shuffled = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.625, 0.0]], dtype=torch.float64)
    bonus = temporal_bonus(ordered, shuffled, alpha=0.3, mu=0.8, threshold=0.1)
    assert bonus.tolist() == [[0.3, 0.0, 0.3, 0.0], [0.0] * 4, [0.0] * 4, [0.0, 0.3, 0.0, 0.0]]
    # the ratio decides: at mu = 1 the fourth prompt (0.2625 < 0.3125) loses its bonus
    assert temporal_bonus(ordered, shuffled, 0.3, 1.0, 0.1)[3].tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="one row per prompt"):
        temporal_bonus(ordered, shuffled[:3])


def _rl_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("rl", overrides=list(overrides))


@pytest.mark.parametrize(("override", "message"), [
    ("+rewards.nope=1.0", r"rewards: unknown reward\(s\) \['nope'\]; registered: \["),
    ("algorithm.num_generations=1", "algorithm.num_generations: 1; a group needs at least 2 completions"),
    ("+algorithm.temporal=true", r"algorithm: unknown key\(s\) \['temporal'\]"),
    ("prompts.batch_size=0", "prompts.batch_size=0: expected an integer >= 1"),
    ("algorithm.temperature=0", "algorithm.temperature/top_p: 0/1.0; expected temperature > 0"),
    ("trainer.max_steps=null", "trainer.max_steps=None: expected an integer >= 1"),
    ("model=tiny_qwen2_5_vl prompts.num_frames=4",
     r"prompts.num_frames=4: a qwen2_5_vl policy takes the frames its frame budget chooses"),
])
def test_bad_settings_are_refused_naming_the_key(tmp_path, override, message):
    """Checked before anything loads: the prompt set is missing here too, and is named only after these."""
    from tc_llava.rl.settings import check_rl_config
    from tc_llava.train.settings import SettingsError

    cfg = _rl_cfg(f"paths.data={tmp_path}", f"run_dir={tmp_path / 'run'}", *override.split())
    with pytest.raises(SettingsError, match=f"^{message}"):
        check_rl_config(cfg)


def test_a_missing_prompt_set_is_named_before_the_model_loads(tmp_path):
    from tc_llava.rl.settings import check_rl_config
    from tc_llava.train.settings import SettingsError

    cfg = _rl_cfg(f"paths.data={tmp_path}", f"run_dir={tmp_path / 'run'}")
    with pytest.raises(SettingsError, match=rf"^prompts: benchmark.root={tmp_path}/synthetic/mvbench: .* not found"):
        check_rl_config(cfg)


def test_the_command_says_a_bad_setting_in_one_line(tmp_path):
    """``python -m tc_llava.rl`` with an unknown reward: exit 1, one error line, no traceback, nothing written."""
    proc = subprocess.run([sys.executable, "-m", "tc_llava.rl", f"paths.data={tmp_path}",
                           f"run_dir={tmp_path / 'run'}", "rewards=video_r1", "+rewards.typo=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if "Error" in line]
    assert proc.returncode == 1 and "Traceback" not in output and len(errors) == 1
    assert errors[0].endswith("SettingsError: rewards: unknown reward(s) ['typo']; registered: ['format', "
                              "'mcq_letter', 'numeric_mra', 'temporal_iou']")
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("group", ["algorithm", "rewards", "prompts"])
def test_every_shipped_option_of_the_rl_app_is_valid(tmp_path, group):
    """Each option of rl.yaml's own groups composes into settings the app accepts (run-dir names differ)."""
    from tc_llava.rl.rewards import check_weights
    from tc_llava.rl.settings import grpo_settings

    options = sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))
    names = set()
    for option in options:
        cfg = _rl_cfg(f"paths.outputs={tmp_path}", f"{group}={option}")
        settings = grpo_settings(cfg)
        assert check_weights(dict(cfg.rewards)) and cfg.prompts.batch_size >= 1
        names.add(cfg.run_dir)
        if option == "t_grpo":
            assert settings.temporal_contrast and settings.num_shuffled == 4
            assert cfg.run_dir.endswith("t_grpo-saved-saved")
    assert len(names) == (len(options) if group == "algorithm" else 1)


def test_the_rl_sweep_refuses_a_prompt_set_of_records(tmp_path):
    """The sweep scores every job on its prompt set's benchmark; a records set has none: one error, before training."""
    from tc_llava.ablation.job import check_benchmark
    from tc_llava.train.settings import SettingsError

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("rl_ablation", overrides=[f"paths.data={tmp_path}", "prompts=synthetic_records"])
    with pytest.raises(SettingsError, match=rf"^ablation.benchmark: {tmp_path}/synthetic/rl.json is a prompt set of "
                                            "records, with no benchmark to score the jobs on"):
        check_benchmark(cfg)
