"""The daemon's tokenizer as a training rank sees it, and the checks against the model's.

A daemon reports its tokenizer with every ping and attach: `n_vocab` (ids, special
tokens included), `bos_id`, `name` and `identity` (a digest of its ranks, specials and
BOS). A model built for another tokenizer would index past its embedding (an error
inside a CUDA kernel, no Python traceback) or, with the same size, silently train on
other ids; both checks here fail at once, naming both sides and the fix.

    feed = TokenFeed(32, 2048, vocab_size=V)                  # V >= the daemon's n_vocab
    feed.check_tokenizer(bos_id=tok.bos_id, vocab_size=V)     # both, after construction

A model vocabulary larger than the tokenizer's passes: embeddings padded up (to a
multiple of 64, say) are common, and ids above the tokenizer's never occur.
"""

from __future__ import annotations

from typing import Any

from tokenfeed.common.errors import TokenfeedError, VocabularyMismatchError


def checked_facts(
    info: dict[str, Any], model_vocab_size: int | None, run_dir: Any
) -> dict[str, Any]:
    """The daemon's tokenizer facts, refused when they overflow the model's vocabulary."""
    n_vocab = info.get("n_vocab")
    if not isinstance(n_vocab, int):
        raise TokenfeedError(f"the daemon reported no tokenizer size ({info!r})")
    if model_vocab_size is not None and model_vocab_size < n_vocab:
        raise VocabularyMismatchError(
            f"TokenFeed(vocab_size={model_vocab_size}) is smaller than the daemon's "
            f"tokenizer {info.get('name')!r}, which has {n_vocab} token ids (BOS "
            f"{info.get('bos_id')}): its ids would index past the model's embedding. "
            f"Serve the tokenizer the model was built for (tokenfeed serve --tokenizer "
            f"..., run dir {run_dir}) or build the model with vocab_size >= {n_vocab}"
        )
    return dict(info)


def check_bos(info: dict[str, Any], bos_id: int, run_dir: Any) -> None:
    """Refuse a daemon whose tokenizer starts documents with another id than the model's."""
    if not isinstance(bos_id, int) or isinstance(bos_id, bool):
        raise VocabularyMismatchError(f"check_tokenizer(bos_id={bos_id!r}): pass the int id "
                                      "the model's tokenizer starts documents with")
    if info.get("bos_id") != bos_id:
        raise VocabularyMismatchError(
            f"the daemon's tokenizer {info.get('name')!r} starts documents with id "
            f"{info.get('bos_id')}, the model's tokenizer with {bos_id}: they are different "
            f"tokenizers. Serve the model's (tokenfeed serve --tokenizer ..., run dir "
            f"{run_dir}; tokenfeed import-tokenizer converts a Hugging Face or nanochat one)"
        )


def fact(info: dict[str, Any], key: str, run_dir: Any) -> Any:
    if key not in info:
        raise TokenfeedError(
            f"the daemon at {run_dir} did not report its tokenizer's {key!r} "
            "(an older daemon?); it is known after the first next()"
        )
    return info[key]
