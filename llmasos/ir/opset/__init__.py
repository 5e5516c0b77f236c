"""The built-in op set: what GPT-2, Llama and BERT need. Importing this registers the ops."""
from . import elementwise, linalg, nn, shape, reduce, creation, fused, quant, kv, collective  # noqa: F401
