"""The built-in model families, one adapter a file (see llmasos/llm/adapter.py); importing this package
registers them. A new family: a module here calling ``register_adapter``, imported below."""
from . import gemma, gpt2, llama, mistral, phi3, qwen2  # noqa: F401  (each registers its adapter)
