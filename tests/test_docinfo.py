"""Document boundaries of packed batches (`doc_info=True`): position ids and cu_seqlens."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from conftest import BOS_ID

from tokenfeed.consumer.docinfo import DocInfo, doc_info

BOS = 7


def boundaries(inputs: torch.Tensor, bos_id: int) -> list[int]:
    """Reference: flat indices where a sequence starts (row starts and BOS tokens)."""
    b, t = inputs.shape
    return [r * t + c for r in range(b) for c in range(t)
            if c == 0 or int(inputs[r, c]) == bos_id]


def check(inputs: torch.Tensor, bos_id: int, info: DocInfo | None = None) -> None:
    b, t = inputs.shape
    info = info or doc_info(inputs, bos_id)
    starts = boundaries(inputs, bos_id)
    n = len(starts)
    assert int(info.num_seqs) == n
    assert info.cu_seqlens.shape == (b * t + 1,) and info.cu_seqlens.dtype == torch.int32
    assert info.cu_seqlens[: n + 1].tolist() == [*starts, b * t]
    assert set(info.cu_seqlens[n:].tolist()) == {b * t}  # the padding
    flat_pos = info.position_ids.reshape(-1).tolist()
    for s, e in zip(starts, [*starts[1:], b * t], strict=True):
        assert flat_pos[s:e] == list(range(e - s))
    assert int(info.max_seqlen) == max(e - s for s, e in zip(starts, [*starts[1:], b * t],
                                                              strict=True))


def test_boundaries_at_row_starts_and_every_bos():
    inputs = torch.tensor([[5, 5, BOS, 5, BOS], [BOS, 5, 5, 5, 5], [5, BOS, BOS, 5, 5]])
    info = doc_info(inputs, BOS)
    assert info.position_ids.tolist() == [[0, 1, 0, 1, 0], [0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]
    assert info.cu_seqlens[:8].tolist() == [0, 2, 4, 5, 10, 11, 12, 15]
    assert int(info.num_seqs) == 7 and int(info.max_seqlen) == 5
    check(inputs, BOS)


def test_random_batches_agree_with_the_reference():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        inputs = torch.randint(0, 12, (4, 33), generator=gen)
        check(inputs, BOS)


def test_masked_attention_from_doc_info_equals_attention_per_document():
    """A tiny causal attention masked per document = each document attended on its own."""
    gen = torch.Generator().manual_seed(1)
    b, t, d = 3, 16, 8
    inputs = torch.randint(0, 6, (b, t), generator=gen)
    q, k, v = (torch.randn(b, 1, t, d, generator=gen) for _ in range(3))
    info = doc_info(inputs, 3)
    doc_start = torch.arange(t) - info.position_ids  # (B, T)
    qi, ki = torch.arange(t).view(1, t, 1), torch.arange(t).view(1, 1, t)
    mask = (ki <= qi) & (ki >= doc_start.unsqueeze(-1))  # (B, T, T)
    masked = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))
    cu = info.cu_seqlens[: int(info.num_seqs) + 1].tolist()
    flat_q, flat_k, flat_v = (x.permute(0, 2, 1, 3).reshape(b * t, 1, d) for x in (q, k, v))
    pieces = []
    for s, e in itertools.pairwise(cu):
        pieces.append(F.scaled_dot_product_attention(
            flat_q[s:e].transpose(0, 1), flat_k[s:e].transpose(0, 1),
            flat_v[s:e].transpose(0, 1), is_causal=True).transpose(0, 1))
    per_doc = torch.cat(pieces).reshape(b, t, 1, d).permute(0, 2, 1, 3)
    torch.testing.assert_close(masked, per_doc)


def test_feed_yields_doc_info_that_matches_the_bos_positions(start_daemon):
    daemon = start_daemon(workers=2)
    for packing in ("concat", "bestfit"):
        with daemon.feed(4, 128, packing=packing, doc_info=True) as feed:
            for _ in range(15):
                x, y, info = next(feed)
                assert x.shape == y.shape == info.position_ids.shape
                check(x, BOS_ID, info)
                if packing == "bestfit":  # every row starts at a BOS
                    assert bool((x[:, 0] == BOS_ID).all())
            assert feed.bos_id == BOS_ID
