"""Vocabulary conventions of the tokenizers tokenfeed trains and imports (nanochat's).

Plain constants with no imports, so that the CLI can show them in `--help` without
loading tiktoken or pyarrow. `train_tokenizer.py` builds vocabularies with them:

    0 .. 255                 the 256 single bytes
    256 .. M-1               merges, in the order they were learned (rank = id)
    M .. M+len(SPECIAL)-1    SPECIAL_TOKENS in this order: <|bos|> first
"""

from __future__ import annotations

# GPT-4's (cl100k) split pattern with \p{N}{1,2} for \p{N}{1,3}: nanochat's choice for
# vocabularies of ~32k, which spends fewer ids on numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
BOS_TOKEN = "<|bos|>"
# nanochat's tokens, in its order, so that its chat rendering finds every one it needs.
SPECIAL_TOKENS = (
    BOS_TOKEN,  # starts every document: the daemon's document separator
    "<|user_start|>",  # a user message
    "<|user_end|>",
    "<|assistant_start|>",  # an assistant message
    "<|assistant_end|>",
    "<|python_start|>",  # the assistant calls a Python tool
    "<|python_end|>",
    "<|output_start|>",  # the tool's output, back to the assistant
    "<|output_end|>",
)
# nanochat's tok_train.py defaults: 2 billion characters, each document cropped to 10,000.
DEFAULT_MAX_CHARS = 2_000_000_000
DEFAULT_DOC_CAP = 10_000
