"""tokenfeed.tools: what prepares a run, offline, apart from the daemon that serves it.

`tokenfeed download` (download.py), `train-tokenizer` (train_tokenizer.py, vocab.py),
`import-tokenizer` (importers.py), the sample corpora of the demo, tests and benchmarks
(corpus.py), `tokenfeed demo` (demo.py) and the progress lines they print (progress.py).
commands.py holds the parsers of download, train-tokenizer and import-tokenizer; the
`tokenfeed` CLI (producer/cli.py) adds them and dispatches to it, as it does `demo`.

These modules may import `tokenfeed.common` and `tokenfeed.producer` (the tokenizer
loader, the dataset scan); the daemon imports nothing from here, so its serving path
never loads rustbpe, urllib or the corpus builder.
"""
