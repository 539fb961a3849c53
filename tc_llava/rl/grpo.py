"""GRPO's objective as pure tensor functions: group advantages, the clipped per-token loss, k3 KL.

Definitions follow TRL's ``GRPOTrainer`` (huggingface/trl, ``trl/trainer/grpo_trainer.py`` at
commit f2cd57710ae345ea6428ae95363267fcf38a3dc8 and in release 1.16.0: advantages in
``_generate_and_score_completions``, the loss in ``_compute_loss``; ``nanstd`` in
``trl/trainer/utils.py``), token-level importance sampling, so a run here and a TRL run with
the same settings optimise the same number (``tests/test_grpo.py`` runs TRL's ``_compute_loss``
itself when TRL is installed). The
formulas, and the paper each setting comes from, are written out in ``docs/rl.md``.

Layout: a rollout batch holds ``num_prompts x G`` completions, the G completions of a prompt
next to each other (TRL's ``repeat_interleave`` order). Per-token tensors are ``[B, T]``
over completion tokens only, ``mask`` 1 on real tokens and 0 on padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL's: advantages = (r - mean) / (std + 1e-4)


@dataclass(frozen=True)
class GRPOSettings:
    """The algorithm's settings, checked on construction (before any model is loaded).

    ``num_generations`` is G; ``num_iterations`` the optimiser passes over one rollout batch
    (mu in DeepSeekMath; ratios differ from 1 from the second on); ``epsilon_high`` defaults
    to ``epsilon`` (DAPO's clip-higher sets it apart); ``max_completion_length`` is also
    the ``dr_grpo`` normaliser. Defaults are DeepSeekMath's (TRL 1.16 defaults to ``dapo``
    with ``beta`` 0); ``configs/algorithm/`` holds each paper's. ``temperature`` and ``top_p``
    are the rollouts' sampling (the log-probabilities are those of ``logits / temperature``, as
    TRL computes them). ``temporal_contrast`` turns on Video-R1's T-GRPO
    (:func:`temporal_bonus`): ``shuffled_generations`` more completions per prompt (None:
    ``G // 2``, Video-R1's) see the frames shuffled and only score the ordered group.
    """

    num_generations: int = 8
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.04
    num_iterations: int = 1
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    temporal_contrast: bool = False
    temporal_alpha: float = 0.3
    temporal_mu: float = 0.8
    temporal_threshold: float = 0.1
    shuffled_generations: int | None = None

    def __post_init__(self) -> None:
        for name, kind in (("num_generations", int), ("num_iterations", int), ("max_completion_length", int),
                           ("epsilon", (int, float)), ("epsilon_high", (int, float, type(None))),
                           ("beta", (int, float)), ("temperature", (int, float)), ("top_p", (int, float)),
                           ("temporal_contrast", bool), ("temporal_alpha", (int, float)),
                           ("temporal_mu", (int, float)), ("temporal_threshold", (int, float)),
                           ("shuffled_generations", (int, type(None)))):
            value = getattr(self, name)
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
                raise ValueError(f"algorithm.{name}: {value!r} is not a number of the expected kind")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"algorithm.loss_type: {self.loss_type!r} is not one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"algorithm.scale_rewards: {self.scale_rewards!r} is not one of {SCALE_REWARDS}")
        if self.num_generations < 2:
            raise ValueError(f"algorithm.num_generations: {self.num_generations}; a group needs at least 2 completions")
        for name in ("num_iterations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"algorithm.{name}: {getattr(self, name)}; expected an integer >= 1")
        if not 0 < self.epsilon < 1 or not 0 < self.clip_high:
            raise ValueError(f"algorithm.epsilon/epsilon_high: {self.epsilon}/{self.epsilon_high}; "
                             "expected 0 < epsilon < 1 and epsilon_high > 0")
        if self.beta < 0:
            raise ValueError(f"algorithm.beta: {self.beta}; expected >= 0")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"algorithm.temperature/top_p: {self.temperature}/{self.top_p}; "
                             "expected temperature > 0 and 0 < top_p <= 1")
        if self.temporal_contrast and self.num_shuffled < 1:
            raise ValueError(f"algorithm.shuffled_generations: {self.shuffled_generations}; T-GRPO needs >= 1 "
                             "completion on shuffled frames")

    @property
    def num_shuffled(self) -> int:
        """Completions per prompt on shuffled frames (T-GRPO; 0 without it)."""
        if not self.temporal_contrast:
            return 0
        return self.num_generations // 2 if self.shuffled_generations is None else self.shuffled_generations

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group") -> Tensor:
    """``A_i = (r_i - mean(group)) / (std + 1e-4)``, one advantage per completion.

    ``std`` is Bessel-corrected (TRL's ``nanstd``) over the completion's group (``"group"``,
    DeepSeekMath) or over the whole batch (``"batch"``); ``"none"`` leaves the centred reward
    unscaled (Dr. GRPO: the std divides away the difficulty signal of nearly solved groups).
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards: {scale_rewards!r} is not one of {SCALE_REWARDS}")
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"rewards: shape {tuple(rewards.shape)} is not a flat batch of groups of {group_size} (>= 2)")
    grouped = rewards.view(-1, group_size)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale_rewards == "none":
        return centred
    std = grouped.std(dim=1).repeat_interleave(group_size) if scale_rewards == "group" else rewards.std()
    return centred / (std + STD_EPS)


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1``: Schulman's k3, unbiased for KL(pi || ref)
    on tokens sampled from pi, never negative (DeepSeekMath eq. 4)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


@dataclass(frozen=True)
class PolicyLoss:
    """The loss to back-propagate and detached statistics of this batch (masked means over tokens,
    TRL's metric names)."""

    loss: Tensor
    stats: dict[str, Tensor]


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str,
    old_logps: Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    max_completion_length: int | None = None,
    num_items: float | Tensor | None = None,
) -> PolicyLoss:
    """The clipped per-token policy-gradient loss, plus ``beta`` x k3 KL, normalised by ``loss_type``.

    Per token: ``-min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A) + beta KL`` with
    ``rho = exp(logps - old_logps)``. ``old_logps`` are the rollout policy's (detached by
    the caller, recorded once per rollout batch); ``None`` means the first pass, where
    ``rho = 1`` in value but still carries the gradient. ``loss_type``:

    - ``grpo``: each sequence's tokens averaged, then the sequences (DeepSeekMath);
    - ``dapo``: summed over every token, divided by ``num_items``, the completion tokens that
      one optimiser step averages over (default: this batch's; when a step accumulates
      micro-batches, pass the step's total so their gradients add up to the step's; TRL 1.16
      passes the rollout batch's count scaled to one accumulation window) (DAPO);
    - ``dr_grpo``: summed, divided by sequences x ``max_completion_length`` (Dr. GRPO).

    Like TRL, ``grpo`` and ``dr_grpo`` are per-batch means: a caller splitting a batch into
    k micro-batches divides each loss by k.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: {loss_type!r} is not one of {LOSS_TYPES}")
    if logps.dim() != 2 or mask.shape != logps.shape or advantages.shape != logps.shape[:1]:
        raise ValueError(f"policy_loss: logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must be [B, T] and "
                         f"advantages {tuple(advantages.shape)} [B]")
    if beta and ref_logps is None:
        raise ValueError(f"policy_loss: beta={beta} needs ref_logps (the reference policy's token log-probs)")
    if loss_type == "dr_grpo" and (max_completion_length is None or max_completion_length < logps.shape[1]):
        raise ValueError(f"policy_loss: dr_grpo needs max_completion_length >= the completion width {logps.shape[1]}, "
                         f"got {max_completion_length}")
    mask = mask.to(logps.dtype)
    old_logps = logps.detach() if old_logps is None else old_logps
    high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(logps - old_logps)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + high) * adv)
    kl = kl_k3(logps, ref_logps) if ref_logps is not None else None
    if beta:
        per_token = per_token + beta * kl
    masked = per_token * mask
    if loss_type == "grpo":
        loss = (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        total = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=logps.dtype, device=logps.device)
        loss = masked.sum() / total.clamp(min=1.0)
    else:
        loss = masked.sum() / (logps.shape[0] * max_completion_length)
    with torch.no_grad():
        ratio = ratio.detach()
        low_clip = ((ratio < 1 - epsilon) & (adv < 0)).to(logps.dtype)
        high_clip = ((ratio > 1 + high) & (adv > 0)).to(logps.dtype)
        stats = {
            "clip_ratio/low_mean": _masked_mean(low_clip, mask),
            "clip_ratio/high_mean": _masked_mean(high_clip, mask),
            "clip_ratio/region_mean": _masked_mean(low_clip + high_clip, mask),
            "ratio_mean": _masked_mean(ratio, mask),
            "completion_length": mask.sum(-1).mean(),
        }
        if kl is not None:
            stats["kl"] = _masked_mean(kl.detach(), mask)
    return PolicyLoss(loss, stats)


def temporal_bonus(ordered: Tensor, shuffled: Tensor, alpha: float = 0.3, mu: float = 0.8,
                   threshold: float = 0.1) -> Tensor:
    """T-GRPO's reward bonus (Video-R1, Feng et al. 2025, arXiv 2503.21776), per ordered completion ``[P, G]``.

    ``ordered [P, G]`` and ``shuffled [P, S]`` are the accuracy rewards of each prompt's completions on
    ordered and on shuffled frames. A prompt whose ordered accuracy ``p = mean(ordered)`` reaches
    ``mu`` times the shuffled one ``p~ = mean(shuffled)`` gives ``alpha`` to each ordered completion
    whose accuracy exceeds ``threshold``; others get 0. ``p >= mu * p~``, ``mu = 0.8``, ``alpha = 0.3``
    and ``threshold = 0.1`` are Video-R1's code (``src/r1-v/src/open_r1/trainer/grpo_trainer.py``, its
    group being one prompt's completions on one device); its paper writes ``p > mu * p~``.
    """
    if ordered.dim() != 2 or shuffled.dim() != 2 or ordered.shape[0] != shuffled.shape[0] or not shuffled.shape[1]:
        raise ValueError(f"temporal_bonus: ordered {tuple(ordered.shape)} and shuffled {tuple(shuffled.shape)} must be "
                         "[P, G] and [P, S >= 1], one row per prompt")
    wins = ordered.mean(dim=1, keepdim=True) >= mu * shuffled.mean(dim=1, keepdim=True)
    return torch.where(wins & (ordered > threshold), torch.full_like(ordered, alpha), torch.zeros_like(ordered))
