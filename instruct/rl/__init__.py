"""Reinforcement learning from human feedback: sampling, PPO objectives and steps."""
