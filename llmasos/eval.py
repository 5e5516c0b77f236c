"""Accuracy harness: perplexity on the Lee corpus (300 news articles shipped in gensim's wheel), offline.

    windows = token_windows(tok, eval_text(), window=256)          # fixed, non-overlapping
    ppl = perplexity(model_or_graph_or_compiled, windows)
    calib = Calibration(calibration_batches(tok, n=8, seq=256))   # from articles evaluation never sees

The split: the corpus has one article per line; evaluation uses the first 80% of the articles
(``eval_text``), calibration the last 20% (``calibration_text``), so a data-driven pass is never
calibrated on the text it is scored on.
"""
from __future__ import annotations

import importlib.util
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .ir.graph import Graph

LEE_FILE = "test/test_data/lee_background.cor"
EVAL_FRACTION = 0.8


def lee_path() -> Path:
    # find_spec, not import: importing gensim pulls in scipy and takes seconds
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Lee corpus ships in the gensim wheel: pip install gensim")
    path = Path(list(spec.submodule_search_locations)[0]) / LEE_FILE
    if not path.exists():
        raise RuntimeError(f"{path} not found; reinstall gensim (the wheel ships gensim/{LEE_FILE})")
    return path


def lee_corpus() -> str:
    """The whole Lee background corpus: 300 news articles, one per line (299 newlines: the last has none)."""
    return lee_path().read_text(encoding="utf-8", errors="replace")


def _articles() -> list[str]:
    return [line for line in lee_corpus().split("\n") if line.strip()]


def eval_text() -> str:
    """The first 80% of the articles: what perplexity is reported on."""
    a = _articles()
    return "\n".join(a[:int(len(a) * EVAL_FRACTION)])


def calibration_text() -> str:
    """The last 20% of the articles: calibration data, disjoint from ``eval_text``."""
    a = _articles()
    return "\n".join(a[int(len(a) * EVAL_FRACTION):])


def _encode(tokenizer, text: str) -> list:
    if hasattr(tokenizer, "encode"):
        try:  # Hugging Face tokenizers: no BOS/EOS inside a running text
            return list(tokenizer.encode(text, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(text))
    if callable(tokenizer):
        out = tokenizer(text)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    raise TypeError(f"tokenizer must have .encode(text) or be callable, got {type(tokenizer).__name__}")


def token_windows(tokenizer, text: str, window: int = 256, max_windows: Optional[int] = None) -> np.ndarray:
    """Token ids [W, window] int64: ``text`` tokenized once, cut into consecutive non-overlapping windows,
    the incomplete tail dropped; the first ``max_windows`` when given."""
    if not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2 (a window predicts window-1 tokens), got {window!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be a positive int or None, got {max_windows!r}")
    ids = np.asarray(_encode(tokenizer, text), dtype=np.int64)
    w = len(ids) // window
    if w == 0:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    if max_windows is not None:
        w = min(w, max_windows)
    return ids[:w * window].reshape(w, window).copy()


def calibration_batches(tokenizer, n: int = 8, seq: int = 256, seed: int = 0, batch: int = 1) -> list:
    """``n`` batches of token ids [batch, seq] (int64) drawn without replacement (seeded) from the
    calibration articles (the last 20%, never evaluated on)."""
    for name, v in (("n", n), ("seq", seq), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    wins = token_windows(tokenizer, calibration_text(), window=seq)
    if n * batch > len(wins):
        raise ValueError(f"the calibration articles hold {len(wins)} windows of {seq} tokens; "
                         f"{n} batches of {batch} need {n * batch}")
    pick = np.random.default_rng(seed).choice(len(wins), size=n * batch, replace=False)
    return [wins[pick[i * batch:(i + 1) * batch]] for i in range(n)]


def logits_fn(model: Any):
    """(callable ids -> logits tensor, description) for an nn.Module, a Graph or a CompiledModel."""
    import torch  # deferred: `import llmasos` (which imports this module) stays torch-free


    if isinstance(model, Graph):
        from .backends.torch_graph import GraphModule  # deferred: imports torch
        model = GraphModule(model, trainable=False, reference_fallback=True)
    if not callable(model):
        raise TypeError(f"perplexity takes an nn.Module, a Graph or a CompiledModel, got {type(model).__name__}")
    if isinstance(model, torch.nn.Module):
        model.eval()

    def logits(ids):
        out = model(ids)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(np.asarray(out))
        return out
    return logits


def perplexity(model: Any, windows, batch: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) over every predicted position of every window (position 0 predicts nothing).

    ``model``: an nn.Module returning logits (or an object with ``.logits``), an LLMasOS Graph (run through
    ``GraphModule``), or a ``CompiledModel``.
    """
    import torch  # deferred: `import llmasos` (which imports this module) stays torch-free

    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be token ids [W, S] with W >= 1 and S >= 2, got shape {list(windows.shape)}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"windows must be integer token ids, got {windows.dtype}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    fn = logits_fn(model)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[s:s + batch].astype(np.int64))
            logits = fn(ids)
            if logits.shape[:2] != ids.shape:
                raise ValueError(f"model returned logits of shape {list(logits.shape)} for ids {list(ids.shape)}; "
                                 f"expected [batch, seq, vocab]")
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            total += float(nll.double().sum())
            count += nll.numel()
            if progress:
                done = min(s + batch, len(windows))
                print(f"\r[perplexity] {done}/{len(windows)} windows  ppl {math.exp(total / count):.3f}  "
                      f"{count / (time.perf_counter() - t0):.0f} tok/s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return math.exp(total / count)


def model_bytes(model: Any) -> int:
    """Bytes of the parameters as stored: a Graph's param data (packed 4-bit types at 4 bits), or an
    nn.Module's parameters and buffers."""
    if isinstance(model, Graph):
        n = 0
        for name, v in model.params.items():
            data = model.param_data.get(name)
            if v.type.dtype.is_packed or data is None:
                n += int(np.prod(v.type.shape, dtype=np.int64)) * v.type.dtype.bits // 8
            elif hasattr(data, "element_size"):
                n += data.numel() * data.element_size()
            else:
                n += np.asarray(data).nbytes
        return n
    import torch  # deferred: `import llmasos` (which imports this module) stays torch-free
    if isinstance(model, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    raise TypeError(f"model_bytes takes a Graph or an nn.Module, got {type(model).__name__}")


__all__ = ["lee_corpus", "eval_text", "calibration_text", "token_windows", "calibration_batches", "perplexity",
           "model_bytes", "EVAL_FRACTION"]
