"""InstructGPT-style instruction tuning research code in JAX/Flax."""
