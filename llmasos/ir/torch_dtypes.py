"""Mapping between torch dtypes and IR dtypes (kept apart so the IR core imports without torch)."""
from __future__ import annotations

import numpy as np

from .types import DType


def _table():
    # deferred, here and below: torch-free modules (the IR, `import llmasos`) import this one and call it
    # only when torch tensors are at hand
    import torch
    return {torch.float32: DType.f32, torch.float16: DType.f16, torch.bfloat16: DType.bf16,
            torch.float8_e4m3fn: DType.f8e4m3, torch.int64: DType.i64, torch.int32: DType.i32,
            torch.int8: DType.i8, torch.uint8: DType.u8, torch.bool: DType.bool}


def dtype_from_torch(dt) -> DType:
    try:
        return _table()[dt]
    except KeyError:
        raise TypeError(f"torch dtype {dt} has no LLMasOS equivalent") from None


def dtype_to_torch(dt: DType):
    for k, v in _table().items():
        if v is dt:
            return k
    raise TypeError(f"LLMasOS dtype {dt} has no torch equivalent")


def torch_to_numpy(t) -> np.ndarray:
    import torch  # deferred: torch (see _table)
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float8_e4m3fn):
        # numpy has no such dtypes; reinterpret the bits as ml_dtypes
        raw = t.contiguous().view(torch.int16 if t.dtype == torch.bfloat16 else torch.uint8).numpy()
        return raw.view(dtype_from_torch(t.dtype).numpy)
    return t.contiguous().numpy()


def numpy_to_torch(a: np.ndarray):
    import torch  # deferred: torch (see _table)
    a = np.ascontiguousarray(a).reshape(np.shape(a))  # ascontiguousarray makes 0-d arrays 1-d
    dt = DType.from_numpy(a.dtype)
    if dt is DType.bf16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    if dt is DType.f8e4m3:
        return torch.from_numpy(a.view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(a)
