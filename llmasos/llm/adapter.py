"""Model-family adapters: how a transformers causal LM becomes a llmasos Decoder.

An adapter is data: the transformers ``model_type`` values it takes, a function mapping such a config to a
``DecoderConfig`` (refusing options the Decoder does not model), and the weight-name map -- for every
Decoder parameter, the transformers state-dict tensors it is made of. ``DecoderConfig.from_hf`` and
``Decoder.from_hf`` look the adapter up here by ``model_type``. The built-in families are one file each
in llmasos/llm/adapters/ (imported with llmasos.llm); a new family is one more file calling
``register_adapter``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class W:
    """Where one Decoder parameter comes from in a transformers state dict.

    ``names`` are state-dict keys, ``{p}`` standing for the base model's prefix ("model.", "transformer.",
    or "" for a bare base model); several are concatenated along dim 0 (q, k, v -> the fused wqkv).
    ``transpose``: stored as [in, out] (GPT-2's Conv1D). ``fallback``: the key used when the first is absent
    (an output head tied to the embedding). ``rows``: (start, stop) along dim 0 of the result (one half of a
    fused gate|up projection, Phi-3). ``offset``: added to the values (Gemma's RMSNorm scales by 1 + weight)."""
    names: tuple
    transpose: bool = False
    fallback: Optional[str] = None
    rows: Optional[tuple] = None
    offset: float = 0.0


def w(*names: str, transpose: bool = False, fallback: Optional[str] = None, rows: Optional[tuple] = None,
      offset: float = 0.0) -> W:
    return W(tuple(names), transpose, fallback, rows, offset)


@dataclass(frozen=True)
class Adapter:
    name: str
    model_types: tuple                          # transformers config.model_type values this adapter takes
    config: Callable[[Any], Any]                # transformers config -> DecoderConfig
    weights: Callable[[Any], dict]              # DecoderConfig -> {Decoder parameter name: W}
    prefix: str = "model."                      # the base model's prefix in a *ForCausalLM state dict
    notes: str = ""                             # what is mapped approximately or refused


_ADAPTERS: dict = {}     # model_type -> Adapter


def register_adapter(adapter: Adapter, replace: bool = False) -> Adapter:
    """Make ``adapter`` the one for each of its model types (``replace=True`` to override one)."""
    for t in adapter.model_types:
        if t in _ADAPTERS and not replace and _ADAPTERS[t] is not adapter:
            raise ValueError(f"model_type {t!r} already has the adapter {_ADAPTERS[t].name!r} (pass replace=True)")
    for t in adapter.model_types:
        _ADAPTERS[t] = adapter
    return adapter


def registered() -> dict:
    """{model_type: Adapter} of every registered family."""
    return dict(_ADAPTERS)


def adapter_for(hf_config_or_type, who: str = "llmasos") -> Adapter:
    """The adapter of a transformers config (or a model_type string); an unknown type lists the known ones."""
    kind = hf_config_or_type if isinstance(hf_config_or_type, str) or hf_config_or_type is None \
        else getattr(hf_config_or_type, "model_type", None)
    try:
        return _ADAPTERS[kind]
    except KeyError:
        raise ValueError(f"{who}: model_type {kind!r} is not supported; registered model types: "
                         f"{', '.join(sorted(_ADAPTERS))} (a new family is an adapter: "
                         f"llmasos.llm.adapter.register_adapter)") from None
