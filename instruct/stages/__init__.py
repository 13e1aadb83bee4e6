"""Stages: the supervised tasks (pretraining, SFT, reward model) and the stage table."""
