"""Generation backends for the inference mode (transformers, vLLM)."""
