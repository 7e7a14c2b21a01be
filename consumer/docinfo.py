"""Document boundaries of a packed batch, for attention masked per document.

`doc_info(inputs, bos_id)` is computed on the batch's own device from the tokens (never
shipped through the ring), with fixed shapes so `torch.compile` sees the same graph for
every batch:

    position_ids  (B, T) int32   position in its document: 0 at every BOS and at every
                                 row start, then 1, 2, ... (rows are separate sequences)
    cu_seqlens    (B*T + 1,) int32   FlashAttention's cumulative sequence lengths over the
                                 flattened B*T tokens: a boundary at every row start and
                                 every BOS, then B*T; padded to the fixed length with B*T
                                 (zero-length sequences), the first `num_seqs + 1` valid
    num_seqs      () int32       documents (pieces) in the batch
    max_seqlen    () int32       the longest of them (T is always a valid upper bound)

A best-fit tail starts with a BOS, so it counts as a document; in concat packing a row
that starts inside a document starts a new sequence there. Use with FlashAttention:

    out = flash_attn_varlen_func(q.view(B * T, H, D), k..., v..., cu_seqlens_q=cu,
                                 cu_seqlens_k=cu, max_seqlen_q=T, max_seqlen_k=T, causal=True)

or FlexAttention, from `position_ids` (a token may attend to the `pos + 1` tokens before
it in its row, itself included):

    doc_start = torch.arange(T) - position_ids          # (B, T): index of its doc's start
    mask_mod = lambda b, h, q, kv: (kv <= q) & (kv >= doc_start[b, q])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DocInfo:
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    num_seqs: torch.Tensor
    max_seqlen: torch.Tensor


def doc_info(inputs: torch.Tensor, bos_id: int) -> DocInfo:
    """Document boundaries of a (B, T) batch of inputs whose documents start at `bos_id`."""
    b, t = inputs.shape
    starts = inputs == bos_id
    starts[:, 0] = True  # every row is its own sequence
    index = torch.arange(t, device=inputs.device).expand(b, t)
    last_start = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    position_ids = (index - last_start).to(torch.int32)
    flat = starts.reshape(-1)
    n = b * t
    where = torch.arange(n, device=inputs.device)
    # Boundaries first, in order; the rest padded with n: a sort keeps the shape fixed
    # where nonzero() would not (and would wait for the device).
    bounds = torch.sort(torch.where(flat, where, torch.full_like(where, n))).values
    cu_seqlens = torch.cat([bounds, bounds.new_full((1,), n)]).to(torch.int32)
    num_seqs = flat.sum().to(torch.int32)
    lengths = torch.diff(cu_seqlens)
    return DocInfo(position_ids, cu_seqlens, num_seqs, lengths.max().to(torch.int32))
