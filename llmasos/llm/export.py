"""torch.export of the decoder's prefill and decode steps, with symbolic batch and (prefill) sequence length."""
from __future__ import annotations

from typing import Optional

import torch

from llmasos.llm.config import max_ragged_tokens
from llmasos.llm.model import Decoder

PHASES = ("prefill", "decode", "ragged")   # ragged: paged only (Decoder.ragged_twin)


EXAMPLE_BLOCKS = 4     # pool size of a paged export's example inputs (NB is symbolic: any size runs)


def example_inputs(decoder: Decoder, phase: str, batch: int, seq: int, max_seq: int,
                   block_size: Optional[int] = None) -> tuple:
    """(ids, pos, last, *caches) for one call; zeros everywhere except last = seq - 1. A paged decoder
    (block_size given): (ids, pos, last, block_table, *pools), every row's table [0, 1, .., MB-1] mod NB."""
    dev = decoder.embed.weight.device
    if phase == "ragged":
        # one packed row of ``seq`` tokens from ``batch`` sequences: each token's position and table row
        if block_size is None:
            raise ValueError("export_decoder: the ragged step is paged only (give block_size)")
        mb = -(-max_seq // block_size)
        ids = torch.zeros(1, seq, dtype=torch.int64, device=dev)
        pos = torch.zeros(seq, dtype=torch.int32, device=dev)
        last = torch.arange(batch, dtype=torch.int64, device=dev)
        table = (torch.arange(mb, dtype=torch.int32, device=dev) % EXAMPLE_BLOCKS).repeat(seq, 1)
        return (ids, pos, last, table, *decoder.new_pools(EXAMPLE_BLOCKS, block_size))
    T = 1 if phase == "decode" else seq
    ids = torch.zeros(batch, T, dtype=torch.int64, device=dev)
    pos = torch.zeros(batch, dtype=torch.int32, device=dev)
    last = torch.full((batch,), T - 1, dtype=torch.int64, device=dev)
    if block_size is None:
        return (ids, pos, last, *decoder.new_caches(batch, max_seq))
    mb = -(-max_seq // block_size)
    table = (torch.arange(mb, dtype=torch.int32, device=dev) % EXAMPLE_BLOCKS).repeat(batch, 1)
    return (ids, pos, last, table, *decoder.new_pools(EXAMPLE_BLOCKS, block_size))


def export_decoder(decoder: Decoder, phase: str, batch: Optional[int], max_batch: int,
                   max_seq: int, block_size: Optional[int] = None) -> torch.export.ExportedProgram:
    """Export ``decoder`` (mode="export") for ``phase``.

    batch=None makes the batch symbolic, Dim("batch", 1..max_batch), on ids, pos, last and every cache;
    prefill makes ids' length symbolic, Dim("seq", 2..max_seq); decode has T = 1. The cache length is
    max_seq, static. block_size: export the paged twin (``Decoder.paged_twin``) instead, taking a block table
    [B, ceil(max_seq / block_size)] and pools [NB, Hkv, block_size, D] with NB symbolic, Dim("blocks").
    """
    if block_size is not None:
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"export_decoder: block_size must be an int >= 1, got {block_size!r}")
        decoder = decoder.ragged_twin() if phase == "ragged" else decoder.paged_twin()
    if decoder.mode != "export":
        raise ValueError(f"export_decoder needs Decoder(mode='export'), got mode={decoder.mode!r}")
    if phase not in PHASES:
        raise ValueError(f"export_decoder: phase must be one of {PHASES}, got {phase!r}")
    if max_seq > decoder.cfg.max_positions:
        raise ValueError(f"export_decoder: max_seq {max_seq} > the model's max_positions "
                         f"{decoder.cfg.max_positions}")
    if phase == "prefill" and max_seq < 2:
        raise ValueError(f"export_decoder: prefill needs max_seq >= 2 (symbolic seq starts at 2), got {max_seq}")
    if batch is not None and not 1 <= batch <= max_batch:
        raise ValueError(f"export_decoder: batch {batch} is outside 1..max_batch={max_batch}")

    if phase == "ragged":
        return _export_ragged(decoder, max_batch if batch is None else batch, max_seq, block_size)
    if batch is None:
        # export specialises a dynamic dim whose example size is 0 or 1, so the example avoids them
        bdim = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
        ex_batch = 2 if max_batch > 1 else 1
    else:
        bdim, ex_batch = None, batch
    # a Dim needs min < max: with max_seq == 2 the prefill length is simply static 2
    sdim = torch.export.Dim("seq", min=2, max=max_seq) if phase == "prefill" and max_seq > 2 else None
    ex_seq = min(max_seq, 3) if phase == "prefill" else 1
    args = example_inputs(decoder, phase, ex_batch, ex_seq, max_seq, block_size)

    ids_spec = {k: v for k, v in ((0, bdim), (1, sdim)) if v is not None} or None
    vec = {0: bdim} if bdim is not None else None
    # export groups *caches into one entry of the signature: its spec is a tuple, one per cache
    if block_size is None:
        dynamic = (ids_spec, vec, vec, (vec,) * (len(args) - 3))
    else:
        pool = {0: torch.export.Dim("blocks", min=1, max=1 << 24)}
        dynamic = (ids_spec, vec, vec, (vec,) + (pool,) * (len(args) - 4))
    with torch.no_grad():
        return torch.export.export(decoder, args, dynamic_shapes=dynamic, strict=False)


def _export_ragged(decoder: Decoder, max_batch: int, max_seq: int, block_size: int) -> torch.export.ExportedProgram:
    """The ragged step: N tokens symbolic, Dim("tokens", 1..max_batch*max_seq) on ids' length, pos and the
    per-token table; S sequences, Dim("seqs", 1..max_batch) on last (static 1 where max_batch is 1)."""
    # export specialises a dynamic dim whose example size is 0 or 1, so the examples avoid them
    ndim = torch.export.Dim("tokens", min=1, max=max_ragged_tokens(max_batch, max_seq))
    sdim = torch.export.Dim("seqs", min=1, max=max_batch) if max_batch > 1 else None
    args = example_inputs(decoder, "ragged", 2 if sdim is not None else 1, 3, max_seq, block_size)
    tok = {0: ndim}
    pool = {0: torch.export.Dim("blocks", min=1, max=1 << 24)}
    dynamic = ({1: ndim}, tok, {0: sdim} if sdim is not None else None, (tok,) + (pool,) * (len(args) - 4))
    with torch.no_grad():
        return torch.export.export(decoder, args, dynamic_shapes=dynamic, strict=False)
