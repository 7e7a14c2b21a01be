"""A finished unit: the tokens a stream's packer takes next, with its document starts.

A reader joins a unit's task results into one (a row group's documents in the rank's
order), the token cache or an elastic layout may shape it, a mixture makes virtual
ones of documents from several sources. The packer only ever sees these.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class Unit:
    tokens: np.ndarray  # or, concat from the token cache, cache.FileTokens (read on fill)
    doc_starts: np.ndarray  # index in `tokens` of each document's first token (its BOS)

    @classmethod
    def of_lengths(cls, tokens: np.ndarray, lengths: np.ndarray) -> Unit:
        """`tokens` holding documents of `lengths` tokens each (0: none, skipped)."""
        starts = np.cumsum(lengths) - lengths
        return cls(tokens, starts[lengths > 0])


# A unit that delivers nothing: a skipped row group, or one a resume reads past.
EMPTY = Unit(np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64))
