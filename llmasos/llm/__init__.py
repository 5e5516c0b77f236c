"""LLM inference: a static-KV-cache decoder, its prefill/decode compilation and generation."""
