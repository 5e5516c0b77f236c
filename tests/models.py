"""Small transformer models built from configs (random weights, seeded): the test and bench zoo.

Nothing here downloads: every model comes from a config object.
"""
from __future__ import annotations

import torch


class MLP(torch.nn.Module):
    def __init__(self, d_in=16, d_hidden=32, d_out=8):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, d_hidden)
        self.fc2 = torch.nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MLP().eval()


def gpt2(seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers
    torch.manual_seed(seed)
    cfg = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, use_cache=False)
    cfg.update(overrides)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)).eval()


def llama(seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=128, max_position_embeddings=64, use_cache=False)
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def bert(seed: int = 0, **overrides) -> torch.nn.Module:
    import transformers
    torch.manual_seed(seed)
    cfg = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
               vocab_size=128, max_position_embeddings=64)
    cfg.update(overrides)
    return transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=True).eval()


def token_ids(batch: int, seq: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
