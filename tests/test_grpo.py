"""GRPO's objective against the papers' formulas written element by element (fp64).

The reference below loops over sequences and tokens with scalar arithmetic, as DeepSeekMath
(eq. 3, 4), DAPO (eq. 8) and Dr. GRPO (eq. 3) write the objective, so a slip in the
vectorised code (a wrong normaliser, a clip on the wrong side, KL of the wrong sign) shows
up as a value or gradient mismatch. The policy is a free logit table trained by SGD for
several steps on one rollout batch, so later steps have importance ratios away from 1 and
some tokens clipped.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from tc_llava.configs import CONFIG_DIR
from tc_llava.rl.grpo import LOSS_TYPES, GRPOSettings, group_advantages, kl_k3, policy_loss

B, T, V, G, L_MAX = 6, 5, 7, 3, 8
EPS_LOW, EPS_HIGH = 0.2, 0.28


def _rollout():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(V, (B, T), generator=gen)
    lengths = torch.tensor([5, 3, 1, 4, 5, 2])
    mask = (torch.arange(T) < lengths[:, None]).double()
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0], dtype=torch.float64)
    logits = torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    ref_logits = logits + 0.3 * torch.randn(B, T, V, generator=gen, dtype=torch.float64)
    return tokens, mask, rewards, logits, ref_logits


def _logps(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)


def _reference_loss(logps, old, ref, adv, mask, loss_type, beta):
    """The objective as the papers write it, one token at a time."""
    seq_terms, token_sum, n_tokens = [], 0.0, 0
    for i in range(B):
        length = int(mask[i].sum())
        seq_sum = 0.0
        for t in range(length):
            rho = torch.exp(logps[i, t] - old[i, t])
            clipped = torch.clamp(rho, 1 - EPS_LOW, 1 + EPS_HIGH)
            term = -torch.minimum(rho * adv[i], clipped * adv[i])
            if beta:
                ratio_ref = torch.exp(ref[i, t] - logps[i, t])  # pi_ref / pi_theta
                term = term + beta * (ratio_ref - torch.log(ratio_ref) - 1)
            seq_sum = seq_sum + term
        seq_terms.append(seq_sum / length)
        token_sum, n_tokens = token_sum + seq_sum, n_tokens + length
    if loss_type == "grpo":
        return sum(seq_terms) / B
    if loss_type == "dapo":
        return token_sum / n_tokens
    return token_sum / (B * L_MAX)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradients_equal_the_formulas_over_several_steps(loss_type, beta):
    tokens, mask, rewards, logits0, ref_logits = _rollout()
    adv = group_advantages(rewards, G)
    ref = _logps(ref_logits, tokens)
    old = _logps(logits0, tokens)  # recorded once, at rollout
    logits = logits0.clone().requires_grad_()
    ratios_moved, clipped = False, 0.0
    for step in range(4):
        out = policy_loss(_logps(logits, tokens), adv, mask, loss_type=loss_type,
                          old_logps=None if step == 0 else old, epsilon=EPS_LOW, epsilon_high=EPS_HIGH,
                          beta=beta, ref_logps=ref, max_completion_length=L_MAX)
        (grad,) = torch.autograd.grad(out.loss, logits)
        expected = _reference_loss(_logps(logits, tokens), old, ref, adv, mask, loss_type, beta)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)
        rho = torch.exp(_logps(logits, tokens) - old).detach()
        ratios_moved |= bool(((rho - 1).abs() * mask).max() > 0.05)
        clipped = max(clipped, float(out.stats["clip_ratio/region_mean"]))
        if beta:
            kl = (kl_k3(_logps(logits, tokens), ref) * mask).sum() / mask.sum()
            torch.testing.assert_close(out.stats["kl"], kl.detach())
        with torch.no_grad():
            logits -= 20.0 * grad  # one SGD step on the same rollout batch
    assert ratios_moved and clipped > 0, "the test must exercise ratios away from 1 and clipping"


def test_clip_statistics_count_the_clipped_tokens():
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    # ratios: row 0 (A > 0) 1.5 clipped high, 1.0, 0.5 (not clipped: A > 0 keeps the lower ratio);
    # row 1 (A < 0) 0.5 clipped low, 1.5 (not clipped: A < 0 keeps the higher), padding ignored
    logps = torch.log(torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.5, 9.0]], dtype=torch.float64))
    stats = policy_loss(logps, adv, mask, loss_type="dapo", old_logps=old).stats
    assert float(stats["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
    assert float(stats["clip_ratio/low_mean"]) == pytest.approx(1 / 5)
    assert float(stats["clip_ratio/region_mean"]) == pytest.approx(2 / 5)
    assert float(stats["completion_length"]) == pytest.approx(2.5)


def test_dapo_micro_batches_add_up_to_the_batch():
    """With the batch's token count as ``num_items``, micro-batch losses sum to the whole batch's."""
    tokens, mask, rewards, logits, _ = _rollout()
    adv = group_advantages(rewards, G)
    logps = _logps(logits, tokens)
    whole = policy_loss(logps, adv, mask, loss_type="dapo").loss
    parts = sum(policy_loss(logps[s], adv[s], mask[s], loss_type="dapo", num_items=mask.sum()).loss
                for s in (slice(0, 2), slice(2, 6)))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=0)


def test_group_advantages_match_the_sample_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 2.0, 1.0, 0.0], dtype=torch.float64)
    groups = [rewards[k:k + 3].tolist() for k in range(0, 9, 3)]
    scaled = group_advantages(rewards, 3)
    plain = group_advantages(rewards, 3, "none")
    batch = group_advantages(rewards, 3, "batch")
    all_std = statistics.stdev(rewards.tolist())
    for k, group in enumerate(groups):
        mean, std = statistics.fmean(group), statistics.stdev(group)
        for j, r in enumerate(group):
            assert float(scaled[3 * k + j]) == pytest.approx((r - mean) / (std + 1e-4), rel=1e-12)
            assert float(plain[3 * k + j]) == pytest.approx(r - mean, abs=1e-15)
            assert float(batch[3 * k + j]) == pytest.approx((r - mean) / (all_std + 1e-4), rel=1e-12)
    assert scaled[3:6].abs().max() == 0  # a group that all scored alike teaches nothing


def test_kl_k3_is_the_estimator():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -2.0, -0.1])
    expected = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    assert kl_k3(logp, ref).tolist() == pytest.approx(expected)
    assert float(kl_k3(logp, ref)[1]) == 0 and (kl_k3(logp, ref) >= 0).all()


@pytest.mark.parametrize("bad, message", [
    ({"loss_type": "bnpo"}, "algorithm.loss_type"),
    ({"scale_rewards": "yes"}, "algorithm.scale_rewards"),
    ({"num_generations": 1}, "algorithm.num_generations"),
    ({"num_generations": "8"}, "algorithm.num_generations: '8'"),
    ({"num_iterations": 0}, "algorithm.num_iterations"),
    ({"epsilon": 1.5}, "algorithm.epsilon"),
    ({"beta": -0.1}, "algorithm.beta"),
])
def test_settings_refuse_what_the_loss_cannot_mean(bad, message):
    with pytest.raises(ValueError, match=message):
        GRPOSettings(**bad)
    assert GRPOSettings(epsilon_high=0.28).clip_high == 0.28 and GRPOSettings().clip_high == 0.2


def test_loss_refuses_inconsistent_inputs():
    logps, adv, mask = torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3)
    with pytest.raises(ValueError, match="max_completion_length"):
        policy_loss(logps, adv, mask, loss_type="dr_grpo", max_completion_length=2)
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, adv, mask, loss_type="grpo", beta=0.04)
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)


@pytest.mark.parametrize("preset", ["grpo", "dapo", "dr_grpo"])
def test_shipped_algorithm_presets_are_valid_settings(preset):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose(overrides=[f"+algorithm={preset}"])
    settings = GRPOSettings(**OmegaConf.to_container(cfg.algorithm))
    assert (settings.loss_type, settings.num_generations) == (preset, 8)
    assert (settings.scale_rewards, settings.beta) == {"grpo": ("group", 0.04), "dapo": ("group", 0.0),
                                                      "dr_grpo": ("none", 0.0)}[preset]
    assert settings.clip_high == (0.28 if preset == "dapo" else 0.2)


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_equals_trl_grpo_trainer(loss_type, beta):
    """TRL's own ``GRPOTrainer._compute_loss`` (run with TRL installed, e.g. trl==1.16.0) on the same
    rollout: same loss and gradient, first pass and a later one with ratios away from 1."""
    trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    tokens, mask, rewards, logits0, ref_logits = _rollout()
    adv = group_advantages(rewards, G)
    old, ref = _logps(logits0, tokens), _logps(ref_logits, tokens)
    for logits, old_logps in [(logits0, None), (logits0 + 0.4 * torch.randn_like(logits0), old)]:
        logits = logits.clone().requires_grad_()
        logps = _logps(logits, tokens)
        trainer = SimpleNamespace(
            _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
            top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
            beta=beta, loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, use_vllm=False,
            max_completion_length=L_MAX, current_gradient_accumulation_steps=1, aux_loss_enabled=False,
            _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
            model=SimpleNamespace(training=True),
            args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
            accelerator=SimpleNamespace(num_processes=1, gather=_one_process, reduce=_one_process, sync_gradients=True),
        )
        inputs = {"prompt_ids": tokens[:, :1], "prompt_mask": torch.ones(B, 1), "completion_ids": tokens,
                  "completion_mask": mask, "advantages": adv, "ref_per_token_logps": ref,
                  "num_items_in_batch": mask.sum()}
        if old_logps is not None:
            inputs["old_per_token_logps"] = old_logps
        expected = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
        (expected_grad,) = torch.autograd.grad(expected, logits)
        out = policy_loss(_logps(logits, tokens), adv, mask, loss_type=loss_type, old_logps=old_logps,
                          epsilon=EPS_LOW, epsilon_high=EPS_HIGH, beta=beta, ref_logps=ref,
                          max_completion_length=L_MAX)
        (grad,) = torch.autograd.grad(out.loss, logits)
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-13)
        metrics = trainer._metrics["train"]
        assert float(out.stats["clip_ratio/region_mean"]) == pytest.approx(metrics["clip_ratio/region_mean"][0])
        assert (old_logps is None) == (metrics["clip_ratio/region_mean"][0] == 0)  # the later pass clips
        if beta:
            assert float(out.stats["kl"]) == pytest.approx(metrics["kl"][0])


def _one_process(x, **_):
    """``accelerator.gather``/``reduce`` on one process."""
    return x
