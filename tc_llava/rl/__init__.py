"""Reinforcement learning after SFT: GRPO (DAPO, Dr. GRPO, Video-R1's T-GRPO) with verifiable rewards (docs/rl.md).

:mod:`tc_llava.rl.grpo` holds the algorithm as pure tensor functions (advantages, the clipped
per-token loss under TRL's three normalisations, the k3 KL term, T-GRPO's bonus);
:mod:`tc_llava.rl.rewards` the rule-based rewards, registered by name and weighted from
configuration; :mod:`tc_llava.rl.rollout` sampling through our own generation and the
training-forward log-probabilities; :mod:`tc_llava.rl.prompts` the prompt set;
:mod:`tc_llava.rl.loop` the app (``python -m tc_llava.rl``), built on the SFT app's run
directories, checkpoints and export.
"""
