"""Reinforcement learning after SFT: GRPO's objective and verifiable rewards (docs/rl.md).

:mod:`tc_llava.rl.grpo` holds the algorithm as pure tensor functions (advantages, the clipped
per-token loss under TRL's three normalisations, the k3 KL term); :mod:`tc_llava.rl.rewards`
the rule-based rewards, registered by name and weighted from configuration.
"""
