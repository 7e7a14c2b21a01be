"""Reference oracle: the data contract (docs/semantics.md), in one page.

This is what the daemon's output is compared to, bit for bit. It is written to be
obviously right, not fast: one process, no shared memory, no tokenfeed imports, each
rule of the contract as a short function in the order the data flows.

1. Files and splits: `*.parquet` in `data_dir`, sorted by name; the last `val_files`
   files are "val", the others "train".
2. Global row-group sequence: every row group of every file of the split, files in
   order, row groups in order. Its length is N; the infinite stream repeats it once
   per epoch. With `shuffle_seed=s`, epoch e visits it in the order
   `numpy.random.default_rng([s, e]).permutation(N)`.
3. Rank striding: rank r of W reads global positions g = r, r+W, r+2W, ... of that
   infinite stream: epoch, ordinal = divmod(g, N); the row group is sequence[ordinal]
   (shuffled: sequence[perm_e[ordinal]]). No per-file striding.
4. Documents: only `text_column` is read; with a shuffle seed, all the row group's
   values (nulls included) are first permuted by
   `numpy.random.default_rng([s, e, ordinal]).permutation(n_rows)`; nulls and non-`str`
   values are skipped (and counted); a document's tokens are
   `[bos_id] + enc.encode_ordinary(text)`.
5. Packing (`concat`): the rank's documents are concatenated; window k is
   stream[k*L:(k+1)*L] with L = batch_size*seq_len + 1; inputs = w[:-1] as (B, T)
   int32, targets = w[1:] as (B, T) int64.
6. Packing (`bestfit`): window k is B rows of T+1 tokens (inputs = row[:-1], targets =
   row[1:]), each row filled from a buffer of pieces kept in the order they entered.
   Each piece has a `born`: the index in the rank's document stream of its document
   (the count of documents read before it); `docs_read` counts the documents read. Before
   every placement the buffer is refilled with the next documents to `buffer_docs`
   pieces; with r tokens left in the row, if the oldest piece (least born; ties:
   earliest) has docs_read - born > `max_age_docs`, it goes next: whole if it fits, else
   its first r tokens. Otherwise the longest piece of length <= r goes in whole (ties:
   earliest), else the first r tokens of the shortest piece (ties: earliest). The rest of
   a cropped piece re-enters the buffer last as [bos_id] + rest, keeping its born, when
   it is at least `min_tail` tokens long (min_tail=None: never, nanochat's rule) and is
   discarded otherwise.

7. Mixtures: each named source is a data_dir of its own; its documents for the rank are
   rules 1-4 on that folder alone. The mixed stream takes whole documents one at a time:
   with t_s the tokens taken from source s and T their sum over sources of positive
   weight, both counted since the weights last changed, the next document comes from
   the source of positive weight with the largest w_s * T - t_s (ties: the first name in
   sorted order). Weights change at document k * docs_per_unit, for the k of each
   schedule entry (k, weights), where counting starts anew. Packing (rules 5, 6) then
   runs on the mixed stream.

8. Elastic resume: W old ranks each delivered some windows; E* is the latest epoch an
   old rank's next unit lies in. Each old rank's work left up to the end of epoch E*
   is listed as items (global position g; kind): its partial unit's tokens from the
   next one (concat: TOKENS), or its buffered pieces (best fit: PIECE, document a from
   token b) and the rest of its read unit (DOCS from document a), then its whole units
   with g < (E*+1)N (WHOLE). All items, sorted by (g, a, b, kind), are cut into W'
   consecutive chunks by weight (the row group's text bytes from the footer: WHOLE all
   of them, TOKENS minus 4 a token read, DOCS their share of rows left, PIECE one
   row's); item j goes to new rank floor((before_j + w_j / 2) * W' / total). New rank r'
   reads its items, then global positions r' + u W' >= (E*+1)N. A mixture does this
   per source, from each source's next token not delivered (concat: REST, its documents
   from document a, the first from token b) or next document not read and its buffered
   pieces (best fit); the new rank mixes its sources' streams with the old weights.

Failure behaviour: a bad argument (unknown split, rank outside [0, W), an empty split,
a non-positive shape) raises ValueError naming the value. A rank whose row groups hold
no document at all raises ValueError instead of looping forever.

Speed: about one `encode_ordinary` call per document plus list appends; ~1M tokens
take a few seconds.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

SPLITS = ("train", "val")


def split_files(data_dir: Path, split: str, val_files: int = 1) -> list[Path]:
    """The split's shards in order: the last `val_files` sorted files are val, the rest train."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {SPLITS}")
    if val_files < 0:
        raise ValueError(f"val_files={val_files} must be >= 0")
    files = sorted(
        (p for p in Path(data_dir).glob("*.parquet") if p.is_file()), key=lambda p: p.name
    )
    n_train = max(len(files) - val_files, 0)
    chosen = files[:n_train] if split == "train" else files[n_train:]
    if not chosen:
        raise ValueError(
            f"split {split!r} of {data_dir} is empty ({len(files)} parquet files, "
            f"val_files={val_files})"
        )
    return chosen


def row_group_sequence(files: list[Path]) -> list[tuple[Path, int]]:
    """One epoch of the global row-group sequence: (file, row group index), files in order."""
    return [(path, i) for path in files for i in range(pq.ParquetFile(path).num_row_groups)]


def epoch_order(n: int, shuffle_seed: int | None, epoch: int) -> list[int]:
    """Which sequence entry each ordinal of `epoch` visits: file order, or a seeded permutation."""
    if shuffle_seed is None:
        return list(range(n))
    return [int(i) for i in np.random.default_rng([shuffle_seed, epoch]).permutation(n)]


def rank_row_groups(
    files: list[Path], *, rank: int, world_size: int, shuffle_seed: int | None = None
) -> Iterator[tuple[int, int, Path, int]]:
    """Infinite: (epoch, ordinal, file, row group) at global positions rank, rank+W, ..."""
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside [0, world_size={world_size})")
    sequence = row_group_sequence(files)
    n = len(sequence)
    if n == 0:
        raise ValueError(f"files {[str(f) for f in files]} hold no row groups")
    g = rank
    while True:
        epoch, ordinal = divmod(g, n)
        path, index = sequence[epoch_order(n, shuffle_seed, epoch)[ordinal]]
        yield epoch, ordinal, path, index
        g += world_size


def read_texts(
    path: Path, row_group: int, text_column: str = "text", row_seed: list[int] | None = None
) -> tuple[list[str], int]:
    """The row group's documents in order, and how many null / non-str values were skipped.

    With `row_seed`, the rows (nulls included) are first put in the order
    `numpy.random.default_rng(row_seed).permutation(n_rows)`.
    """
    table = pq.ParquetFile(path).read_row_group(row_group, columns=[text_column])
    values = table.column(text_column).to_pylist()
    if row_seed is not None:
        order = np.random.default_rng(row_seed).permutation(len(values))
        values = [values[i] for i in order]
    texts: list[str] = []
    skipped = 0
    for value in values:
        if isinstance(value, str):
            texts.append(value)
        else:
            skipped += 1
    return texts, skipped


def rank_documents(
    data_dir: Path,
    *,
    enc: Any,
    bos_id: int,
    split: str,
    rank: int,
    world_size: int,
    val_files: int = 1,
    text_column: str = "text",
    shuffle_seed: int | None = None,
) -> Iterator[list[int]]:
    """Infinite: each document's tokens, BOS first, in the rank's row-group order."""
    files = split_files(Path(data_dir), split, val_files)
    sequence = row_group_sequence(files)
    n = len(sequence)
    # Within N consecutive strides a rank visits every ordinal it will ever visit
    # ((r + kW) mod N covers the residue class of r mod gcd(N, W)), so N empty row
    # groups in a row means the stream can never yield: fail instead of spinning.
    # Shuffled, every row group reaches those ordinals in some epoch, so the stream
    # is dead only when no row group of the split holds a document.
    empty_in_a_row = 0
    row_groups = rank_row_groups(
        files, rank=rank, world_size=world_size, shuffle_seed=shuffle_seed
    )
    for epoch, ordinal, path, index in row_groups:
        row_seed = None if shuffle_seed is None else [shuffle_seed, epoch, ordinal]
        texts, _skipped = read_texts(path, index, text_column, row_seed)
        empty_in_a_row = 0 if texts else empty_in_a_row + 1
        if empty_in_a_row >= n:
            if shuffle_seed is not None and any(
                read_texts(p, i, text_column)[0] for p, i in sequence
            ):
                empty_in_a_row = 0
                continue
            raise ValueError(
                f"rank {rank} of {world_size} in split {split!r} of {data_dir} reads no "
                f"document in column {text_column!r}"
            )
        for text in texts:
            yield [bos_id, *enc.encode_ordinary(text)]


def reference_windows(
    data_dir: Path,
    *,
    enc: Any,
    bos_id: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    val_files: int = 1,
    text_column: str = "text",
    shuffle_seed: int | None = None,
) -> list[np.ndarray]:
    """The first `num_batches` concat windows: int64 arrays of batch_size*seq_len+1 tokens."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")
    if num_batches < 0:
        raise ValueError(f"num_batches={num_batches} must be >= 0")
    window_tokens = batch_size * seq_len + 1
    docs = rank_documents(
        data_dir,
        enc=enc,
        bos_id=bos_id,
        split=split,
        rank=rank,
        world_size=world_size,
        val_files=val_files,
        text_column=text_column,
        shuffle_seed=shuffle_seed,
    )
    windows: list[np.ndarray] = []
    pending: list[int] = []  # stream tokens not yet in a window, in order
    while len(windows) < num_batches:
        while len(pending) < window_tokens:
            pending.extend(next(docs))
        windows.append(np.array(pending[:window_tokens], dtype=np.int64))
        # Windows do not overlap: the next one starts at the token after this one's last.
        pending = pending[window_tokens:]
    return windows


def reference_batches(
    data_dir: Path,
    *,
    enc: Any,
    bos_id: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    val_files: int = 1,
    text_column: str = "text",
    shuffle_seed: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first `num_batches` (inputs int32 (B, T), targets int64 (B, T)) pairs."""
    windows = reference_windows(
        data_dir,
        enc=enc,
        bos_id=bos_id,
        split=split,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        seq_len=seq_len,
        num_batches=num_batches,
        val_files=val_files,
        text_column=text_column,
        shuffle_seed=shuffle_seed,
    )
    return [
        (
            w[:-1].reshape(batch_size, seq_len).astype(np.int32),
            w[1:].reshape(batch_size, seq_len).astype(np.int64),
        )
        for w in windows
    ]


def bestfit_windows(
    docs: Iterable[list[int]],
    *,
    bos_id: int,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    buffer_docs: int,
    min_tail: int | None,
    max_age_docs: int,
    trace: dict[str, Any] | None = None,
) -> tuple[list[np.ndarray], int]:
    """Rule 6 on any document stream: (the first `num_batches` windows, tokens discarded).

    With `trace`, `docs` yields (label, tokens) and at the end trace["pieces"] lists the
    buffer's pieces as label + (first token,) in buffer order (a tail's: the index in its
    document where its rest begins), and trace["next"] the label of the next document.

    A finite `docs` ends the list early, at the first window that would need a document
    past its end (the windows a packer can cut from those documents alone).
    """
    if batch_size < 1 or seq_len < 1 or buffer_docs < 1 or max_age_docs < 0:
        raise ValueError(
            f"batch_size={batch_size}, seq_len={seq_len} and buffer_docs={buffer_docs} "
            f"must all be >= 1 and max_age_docs={max_age_docs} >= 0"
        )
    docs = iter(docs)
    row_tokens = seq_len + 1
    buffer: list[tuple[int, list[int]]] = []  # (born, piece), in the order they entered
    marks: list[tuple[Any, int]] = []  # with `trace`: each piece's (label, first token)
    docs_read = 0
    windows: list[np.ndarray] = []
    discarded = 0
    while len(windows) < num_batches:
        discarded_before_window = discarded
        window: list[int] = []
        for _row in range(batch_size):
            row: list[int] = []
            while len(row) < row_tokens:
                while len(buffer) < buffer_docs:
                    doc = next(docs, None)
                    if doc is None:
                        return windows, discarded_before_window
                    if trace is not None:
                        label, doc = doc
                        marks.append((label, 0))
                    buffer.append((docs_read, list(doc)))
                    docs_read += 1
                room = row_tokens - len(row)
                oldest = 0  # strict < keeps the earliest of a born
                for i, (born, _) in enumerate(buffer):
                    if born < buffer[oldest][0]:
                        oldest = i
                chosen: int | None = None
                if docs_read - buffer[oldest][0] > max_age_docs:
                    chosen = oldest  # too old: placed next, whole or cropped
                else:  # the longest piece that fits; strict > keeps the earliest of a length
                    for i, (_, piece) in enumerate(buffer):
                        if len(piece) <= room and (
                            chosen is None or len(piece) > len(buffer[chosen][1])
                        ):
                            chosen = i
                if chosen is None:  # nothing fits: strict < keeps the earliest shortest
                    chosen = 0
                    for i, (_, piece) in enumerate(buffer):
                        if len(piece) < len(buffer[chosen][1]):
                            chosen = i
                born, piece = buffer.pop(chosen)
                row.extend(piece[:room])
                rest = piece[room:]
                if trace is not None:
                    label, first = marks.pop(chosen)
                if rest and min_tail is not None and len(rest) >= min_tail:
                    buffer.append((born, [bos_id, *rest]))
                    if trace is not None:  # a tail's token 0 is the BOS: rest begins later
                        marks.append((label, first + room - 1 if first else room))
                else:
                    discarded += len(rest)
            window.extend(row)
        windows.append(np.array(window, dtype=np.int64))
    if trace is not None:
        trace["pieces"] = [(*label, first) for label, first in marks]
        trace["next"] = next(docs)[0]
    return windows, discarded


def reference_bestfit_windows(
    data_dir: Path,
    *,
    enc: Any,
    bos_id: int,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    buffer_docs: int = 1000,
    min_tail: int | None,
    max_age_docs: int,
    val_files: int = 1,
    text_column: str = "text",
    shuffle_seed: int | None = None,
) -> list[np.ndarray]:
    """The first `num_batches` bestfit windows: int64 arrays of batch_size*(seq_len+1) tokens."""
    if num_batches < 0:
        raise ValueError(f"num_batches={num_batches} must be >= 0")
    docs = rank_documents(
        data_dir,
        enc=enc,
        bos_id=bos_id,
        split=split,
        rank=rank,
        world_size=world_size,
        val_files=val_files,
        text_column=text_column,
        shuffle_seed=shuffle_seed,
    )
    windows, _discarded = bestfit_windows(
        docs,
        bos_id=bos_id,
        batch_size=batch_size,
        seq_len=seq_len,
        num_batches=num_batches,
        buffer_docs=buffer_docs,
        min_tail=min_tail,
        max_age_docs=max_age_docs,
    )
    return windows


def mix_documents(
    sources: dict[str, Iterator[list[int]]],
    schedule: list[tuple[int, dict[str, float]]],
    docs_per_unit: int = 64,
) -> Iterator[tuple[str, list[int]]]:
    """Rule 7: infinite (source name, document tokens) of the mixed stream."""
    names = sorted(sources)
    changes = {unit * docs_per_unit: weights for unit, weights in schedule}
    if 0 not in changes:
        raise ValueError(f"schedule {schedule} must start at unit 0")
    taken = dict.fromkeys(names, 0)
    weights: dict[str, float] = {}
    k = 0
    while True:
        if k in changes:
            weights = changes[k]
            taken = dict.fromkeys(names, 0)
        active = [n for n in names if weights.get(n, 0.0) > 0]
        total = sum(taken[n] for n in active)
        best = active[0]
        for n in active[1:]:  # strict >: ties keep the first name
            if weights[n] * total - taken[n] > weights[best] * total - taken[best]:
                best = n
        doc = next(sources[best])
        taken[best] += len(doc)
        k += 1
        yield best, doc


def mixture_windows(
    source_dirs: dict[str, Path],
    schedule: list[tuple[int, dict[str, float]]],
    *,
    enc: Any,
    bos_id: int,
    batch_size: int,
    seq_len: int,
    num_batches: int,
    packing: str = "concat",
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: int | None = None,
    min_tail: int | None = 32,
    buffer_docs: int = 1000,
    max_age_docs: int = 8000,
) -> tuple[list[np.ndarray], list[list[tuple[str, int]]]]:
    """The first windows of a mixture, and for each window the (source, tokens) of the
    documents read into it, in order (concat: the tokens each source put in the window)."""
    docs = {
        name: rank_documents(path, enc=enc, bos_id=bos_id, split=split, rank=rank,
                             world_size=world_size, shuffle_seed=shuffle_seed)
        for name, path in source_dirs.items()
    }
    mixed = mix_documents(docs, schedule)
    if packing == "bestfit":
        windows, _ = bestfit_windows(
            (doc for _, doc in mixed), bos_id=bos_id, batch_size=batch_size, seq_len=seq_len,
            num_batches=num_batches, buffer_docs=buffer_docs, min_tail=min_tail,
            max_age_docs=max_age_docs)
        return windows, []
    window_tokens = batch_size * seq_len + 1
    windows, shares = [], []
    pending: list[int] = []
    owners: list[tuple[str, int]] = []  # (source, tokens) of the pending stream, in order
    while len(windows) < num_batches:
        while len(pending) < window_tokens:
            name, doc = next(mixed)
            pending.extend(doc)
            owners.append((name, len(doc)))
        windows.append(np.array(pending[:window_tokens], dtype=np.int64))
        pending = pending[window_tokens:]
        share, left = [], window_tokens
        while left:
            name, n = owners[0]
            take = min(n, left)
            share.append((name, take))
            left -= take
            if take == n:
                owners.pop(0)
            else:
                owners[0] = (name, n - take)
        shares.append(share)
    return windows, shares


WHOLE, TOKENS, DOCS, PIECE, REST = 0, 1, 2, 3, 4


class Positions:
    """Global row-group positions of one split: documents (tokenized) and footer sizes."""

    def __init__(self, data_dir: Path, *, enc: Any, bos_id: int, split: str = "train",
                 shuffle_seed: int | None = None, text_column: str = "text") -> None:
        self.sequence = row_group_sequence(split_files(Path(data_dir), split))
        self.n = len(self.sequence)
        self.enc, self.bos_id, self.seed, self.column = enc, bos_id, shuffle_seed, text_column
        self._docs: dict[int, list[list[int]]] = {}

    def row_group(self, g: int) -> tuple[Path, int, int, int]:
        """(file, row group, epoch, ordinal) at global position g."""
        epoch, ordinal = divmod(g, self.n)
        path, index = self.sequence[epoch_order(self.n, self.seed, epoch)[ordinal]]
        return path, index, epoch, ordinal

    def docs(self, g: int) -> list[list[int]]:
        if g not in self._docs:
            path, index, epoch, ordinal = self.row_group(g)
            row_seed = None if self.seed is None else [self.seed, epoch, ordinal]
            texts, _ = read_texts(path, index, self.column, row_seed)
            self._docs[g] = [[self.bos_id, *self.enc.encode_ordinary(t)] for t in texts]
        return self._docs[g]

    def weight(self, kind: int, g: int, a: int) -> int:
        path, index, _, _ = self.row_group(g)
        rg = pq.ParquetFile(path).metadata.row_group(index)
        size = sum(rg.column(j).total_uncompressed_size for j in range(rg.num_columns)
                   if rg.column(j).path_in_schema == self.column)
        rows = max(rg.num_rows, 1)
        return {WHOLE: size, TOKENS: max(size - 4 * a, 1), DOCS: size * max(rows - a, 0) // rows,
                REST: size * max(rows - a, 0) // rows, PIECE: max(size // rows, 1)}[kind]


def old_rank_items(pos: Positions, *, rank: int, world_size: int, packing: str,
                   batch_size: int, seq_len: int, delivered: int, buffer_docs: int = 1000,
                   min_tail: int | None = 32, max_age_docs: int = 8000,
                   ) -> tuple[list[tuple[int, int, int, int]], int]:
    """An old rank's work left after `delivered` windows, as items in its stream order
    (the WHOLE units run on to the first unit of epoch E*+1, to be cut by the caller),
    and the epoch of its next unit."""
    units = [rank + u * world_size for u in range(delivered * batch_size * seq_len + 64)]
    if packing == "concat":
        left = delivered * (batch_size * seq_len + 1)
        u = 0
        while left >= len(tokens := [t for d in pos.docs(units[u]) for t in d]) and left:
            left -= len(tokens)
            u += 1
        first = [(TOKENS, units[u], left, 0)] if left else [(WHOLE, units[u], 0, 0)]
        return first + [(WHOLE, g, 0, 0) for g in units[u + 1:]], units[u] // pos.n
    labels = ((g, d) for g in units for d in range(len(pos.docs(g))))
    docs = ((label, pos.docs(label[0])[label[1]]) for label in labels)
    state: dict[str, Any] = {}
    bestfit_windows(docs, bos_id=pos.bos_id, batch_size=batch_size, seq_len=seq_len,
                    num_batches=delivered, buffer_docs=buffer_docs, min_tail=min_tail,
                    max_age_docs=max_age_docs, trace=state)
    g, d = state["next"]
    pieces = [(PIECE, pg, pd, start) for pg, pd, start in state["pieces"]]
    u = units.index(g)
    first = [(DOCS, g, d, 0)] if d else [(WHOLE, g, 0, 0)]
    return pieces + first + [(WHOLE, x, 0, 0) for x in units[u + 1:]], g // pos.n


def elastic_items(pos: Positions, old: list[list[tuple[int, int, int, int]]],
                  epochs: list[int], new_rank: int, new_world_size: int
                  ) -> tuple[list[tuple[int, int, int, int]], int]:
    """Rule 8: new rank `new_rank`'s items and its first stride unit."""
    g_end = (max(epochs) + 1) * pos.n
    work = sorted((it for items in old for it in items if it[0] != WHOLE or it[1] < g_end),
                  key=lambda it: (it[1], it[2], it[3], it[0]))
    weights = [pos.weight(kind, g, a) for kind, g, a, _ in work]
    total, before, mine = sum(weights) or 1, 0, []
    for item, w in zip(work, weights, strict=True):
        if (2 * before + w) * new_world_size // (2 * total) == new_rank:
            mine.append(item)
        before += w
    return mine, -(-(g_end - new_rank) // new_world_size)


def elastic_documents(pos: Positions, items: list[tuple[int, int, int, int]], new_rank: int,
                      new_world_size: int, stride_from: int) -> Iterator[list[int]]:
    """The new rank's stream: what is left of each item, then its stride (documents;
    a TOKENS item's first one may be a document's rest, without its BOS)."""
    for kind, g, a, b in items:
        docs = pos.docs(g)
        if kind == WHOLE:
            yield from docs
        elif kind == TOKENS:
            flat = [t for doc in docs for t in doc][a:]
            if flat:
                yield flat
        elif kind == DOCS:
            yield from docs[a:]
        elif kind == REST:
            if a < len(docs):
                yield docs[a][b:]
            yield from docs[a + 1:]
        else:
            doc = docs[a]
            yield [doc[0], *doc[b:]] if b else doc
    u = stride_from
    while True:
        yield from pos.docs(new_rank + u * new_world_size)
        u += 1


def old_mixture_items(positions: dict[str, Positions], weights: dict[str, float], *,
                      rank: int, world_size: int, packing: str, batch_size: int, seq_len: int,
                      delivered: int, buffer_docs: int = 1000, min_tail: int | None = 32,
                      max_age_docs: int = 8000,
                      ) -> tuple[dict[str, list[tuple[int, int, int, int]]], dict[str, int]]:
    """An old mixture rank's work left per source after `delivered` windows (items in
    each source's order, WHOLE units running on), and each source's next unit's epoch."""
    names = sorted(positions)
    labels: dict[str, deque[tuple[int, int]]] = {n: deque() for n in names}

    def source(name: str) -> Iterator[list[int]]:
        pos, u = positions[name], 0
        while True:
            g = rank + u * world_size
            for d, doc in enumerate(pos.docs(g)):
                labels[name].append((g, d))
                yield doc
            u += 1

    mixed = ((name, labels[name].popleft(), doc) for name, doc in
             mix_documents({n: source(n) for n in names}, [(0, weights)]))
    pieces: dict[str, list[tuple[int, int, int, int]]] = {n: [] for n in names}
    nxt: dict[str, tuple[int, int, int]] = {}
    if packing == "concat":
        left = delivered * (batch_size * seq_len + 1)
        for name, (g, d), doc in mixed:
            if left < len(doc):
                nxt[name] = (g, d, left)
                break
            left -= len(doc)
    else:
        state: dict[str, Any] = {}
        bos_id = positions[names[0]].bos_id
        bestfit_windows((((n, *label), doc) for n, label, doc in mixed), bos_id=bos_id,
                        batch_size=batch_size, seq_len=seq_len, num_batches=delivered,
                        buffer_docs=buffer_docs, min_tail=min_tail, max_age_docs=max_age_docs,
                        trace=state)
        for name, g, d, first in state["pieces"]:
            pieces[name].append((PIECE, g, d, first))
        name, g, d = state["next"]
        nxt[name] = (g, d, 0)
    for name, (g, d), _ in mixed:  # the other sources' next documents
        if len(nxt) == len(names):
            break
        nxt.setdefault(name, (g, d, 0))
    items, heads = {}, {}
    for name in names:
        g, d, t = nxt[name]
        first = (REST if packing == "concat" else DOCS) if d or t else WHOLE
        items[name] = pieces[name] + [(first, g, d, t)] + [
            (WHOLE, g + i * world_size, 0, 0) for i in range(1, 4 * positions[name].n)]
        heads[name] = g // positions[name].n
    return items, heads
