"""Reinforcement learning from verifiable rewards: GRPO (``grpo``), rewards (``rewards``), rollouts and the
RL stage that ``emoqwen-train`` runs for stages of kind ``rl``."""
