"""Flax Linen decoder-only Transformers (GPT-2/NeoX/Llama families) with logical sharding."""

from instruct.model.config import ModelConfig, PRESETS, count_params, preset
from instruct.model.transformer import (KVCache, ModelOutput, Transformer, stack_layers,
                                        unstack_layers)

__all__ = [
    "ModelConfig", "PRESETS", "count_params", "preset", "KVCache", "ModelOutput", "Transformer",
    "stack_layers", "unstack_layers"
]
