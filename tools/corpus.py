"""Build real-text Parquet corpora offline, from text that ships with the running Python.

Two corpora. The *sample corpus* (`sample_documents`, `build_sample_corpus`) is small and
fast, for tests and the demo. The *installed corpus* (`installed_documents`,
`build_installed_corpus`) adds every installed package and is written in FineWeb-sized
row groups, for benchmarks.

Sample corpus sources, all English prose read from the running interpreter's install:

- each topic of `pydoc_data.topics.topics` (the language reference help, ~0.47 MB);
- per stdlib module, its docstring followed by its class and function docstrings, read by
  parsing the `.py` source with `ast` (nothing is imported); test directories and
  site-packages are skipped, and so is any document under 200 characters;
- the stdlib's `.txt` files (LICENSE.txt, idlelib's NEWS.txt, ...) except grammar files.

A text that two sources share is kept once.

CPython 3.11 yields about 2.4 MB of UTF-8 in all (543 documents, ~2.3 s to parse). The
sources are listed in sorted order and shuffled with `random.Random(0)`, so one Python
install always gives the same corpus. Documents are taken in that order, skipping any that
would pass `target_bytes`, until fewer than 200 bytes are left (300 kB comes within 200
bytes after ~150 sources, ~0.5 s): sources are parsed lazily, so a small target parses
only a few modules. Nothing repeats: a target above what the install holds returns
everything there is.

The installed corpus reads the same sources plus, per `.py` file of the interpreter's
site-packages (test directories skipped), the same module + class + function docstring
document; each text once. A venv with torch, numpy, sympy, pip and this project's dev
tools holds ~3,800 such documents over 200 characters (~17.5 MB, ~21 s to parse; with the
stdlib ~4,340 documents, ~20 MB, mean ~4.6 kB). Site-packages files are sorted by their
path inside site-packages, so two venvs with the same packages give the same corpus.
`build_installed_corpus` writes them in files of `groups_per_file` row groups of
`docs_per_group` documents (default 1,024, as FineWeb-Edu's row groups hold), the
remainder in one last, shorter file (the val split of a daemon's default `--val-files 1`).

Layout on disk: `shard_00000.parquet`, `shard_00001.parquet`, ... each with a string
column of text (nulls allowed) and an int64 `id` column (the document's global index),
written in row groups of `rows_per_group` rows. Each shard is written to a temporary name
and renamed, so a crash never leaves a truncated shard under its final name.

Failure behaviour: bad sizes or counts raise `ConfigError` naming the value and the fix;
sources that cannot be read or parsed are skipped (logged at debug level).
"""

from __future__ import annotations

import ast
import logging
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tokenfeed.common.errors import ConfigError
from tokenfeed.producer.config import DEFAULT_TEXT_COLUMN
from tokenfeed.tools.download import SHARD_NAME
from tokenfeed.tools.progress import Progress

logger = logging.getLogger(__name__)

MIN_DOC_CHARS = 200
SHUFFLE_SEED = 0
SKIPPED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
ID_COLUMN = "id"

Source = tuple[str, str]  # (kind, key): ("topic", name) or ("module" | "text", file path)
_DocNode = ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef


def _docstrings(node: _DocNode) -> Iterator[str]:
    """Docstrings of `node` and of the classes and functions inside it, in source order."""
    doc = ast.get_docstring(node, clean=True)
    if doc:
        yield doc
    for child in node.body:
        if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _docstrings(child)


def _module_document(path: Path) -> str | None:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as e:
        logger.debug("skipping %s: %s", path, e)
        return None
    return "\n\n".join(_docstrings(tree))


def _text_document(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        logger.debug("skipping %s: %s", path, e)
        return None


def _stdlib_files(stdlib: Path) -> list[Path]:
    """The stdlib's .py and .txt files, sorted by relative path, outside test dirs."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        rel_dir = Path(dirpath).relative_to(stdlib)
        for name in filenames:
            is_text = name.endswith(".txt") and not name.endswith("Grammar.txt")
            if name.endswith(".py") or is_text:
                found.append((rel_dir / name).as_posix())
    return [stdlib / rel for rel in sorted(found)]


def _site_packages_files() -> list[Path]:
    """The .py files of this interpreter's site-packages, sorted by path inside them."""
    paths = sysconfig.get_paths()
    found: list[tuple[str, Path]] = []
    for root in sorted({Path(paths["purelib"]), Path(paths["platlib"])}):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
            rel_dir = Path(dirpath).relative_to(root)
            found.extend(
                ((rel_dir / name).as_posix(), Path(dirpath) / name)
                for name in filenames
                if name.endswith(".py")
            )
    return [path for _, path in sorted(found)]


def _sources(*, site_packages: bool = False) -> list[Source]:
    """Every document source as (kind, key), in a fixed shuffled order."""
    import pydoc_data.topics  # data only: one dict of help texts

    sources = [("topic", key) for key in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(stdlib):
        sources.append(("module" if path.suffix == ".py" else "text", str(path)))
    if site_packages:
        sources.extend(("module", str(path)) for path in _site_packages_files())
    random.Random(SHUFFLE_SEED).shuffle(sources)
    return sources


def _document(kind: str, key: str) -> str | None:
    if kind == "topic":
        import pydoc_data.topics

        return pydoc_data.topics.topics[key]
    if kind == "module":
        return _module_document(Path(key))
    return _text_document(Path(key))


def sample_documents(target_bytes: int, *, progress: Progress | None = None) -> list[str]:
    """English documents from the CPython install, at most `target_bytes` of UTF-8 in all.

    `progress` counts the sources parsed (out of all of them: a target the install cannot
    meet parses every one; one met early sets the total to what was parsed).
    """
    if target_bytes < 1:
        raise ConfigError(f"target_bytes is {target_bytes}; ask for at least 1 byte.")
    docs: list[str] = []
    seen: set[str] = set()  # help topics "if" and "else" share one text
    total_bytes = 0
    sources = _sources()
    if progress is not None:
        progress.total = len(sources)
    for kind, key in sources:
        if progress is not None:
            progress.update(1)
        doc = _document(kind, key)
        if doc is None or len(doc) < MIN_DOC_CHARS or doc in seen:
            continue
        doc_bytes = len(doc.encode("utf-8"))
        if total_bytes + doc_bytes > target_bytes:
            continue  # a smaller document further on may still fit
        docs.append(doc)
        seen.add(doc)
        total_bytes += doc_bytes
        if target_bytes - total_bytes < MIN_DOC_CHARS:
            if progress is not None:
                progress.total = progress.done
            break  # no document is that short: the target is met
    logger.debug("sampled %d documents, %d bytes (target %d)", len(docs), total_bytes, target_bytes)
    return docs


def installed_sources() -> list[Source]:
    """The installed corpus's sources (stdlib and site-packages), in document order."""
    return _sources(site_packages=True)


def installed_documents(
    sources: Sequence[Source] | None = None, *, progress: Progress | None = None
) -> list[str]:
    """One document per source of `sources` (default `installed_sources()`), each text once.

    Sources that yield no text, or under `MIN_DOC_CHARS` characters, are skipped.
    `progress` counts the sources parsed.
    """
    docs: list[str] = []
    seen: set[str] = set()  # vendored copies (pip's, setuptools') share their docstrings
    sources = installed_sources() if sources is None else sources
    if progress is not None:
        progress.total = len(sources)
    for kind, key in sources:
        if progress is not None:
            progress.update(1)
        doc = _document(kind, key)
        if doc is None or len(doc) < MIN_DOC_CHARS or doc in seen:
            continue
        docs.append(doc)
        seen.add(doc)
    logger.debug("installed corpus: %d documents", len(docs))
    return docs


def _write_shard(
    docs: Sequence[str | None], start: int, stop: int, path: Path, *, rows_per_group: int,
    text_column: str,
) -> None:
    """docs[start:stop] (ids start..stop-1) to `path`, through a temporary name."""
    table = pa.table(
        {
            text_column: pa.array(docs[start:stop], type=pa.string()),
            ID_COLUMN: pa.array(range(start, stop), type=pa.int64()),
        }
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp, row_group_size=rows_per_group)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_shards(
    docs: Sequence[str | None],
    out_dir: Path,
    *,
    num_files: int,
    rows_per_group: int,
    text_column: str = DEFAULT_TEXT_COLUMN,
) -> list[Path]:
    """Split `docs` contiguously and evenly over `num_files` Parquet shards in `out_dir`."""
    if num_files < 1:
        raise ConfigError(f"num_files is {num_files}; write at least 1 file.")
    if rows_per_group < 1:
        raise ConfigError(f"rows_per_group is {rows_per_group}; use at least 1 row per group.")
    if len(docs) < num_files:
        raise ConfigError(
            f"{len(docs)} documents cannot fill {num_files} files; lower num_files to at "
            f"most {len(docs)} or pass more documents."
        )
    if not text_column or text_column == ID_COLUMN:
        raise ConfigError(
            f"text_column is {text_column!r}; pick a non-empty name other than {ID_COLUMN!r}."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(len(docs), num_files)
    paths: list[Path] = []
    start = 0
    for index in range(num_files):
        stop = start + base + (1 if index < extra else 0)
        path = out_dir / SHARD_NAME.format(index)
        _write_shard(
            docs, start, stop, path, rows_per_group=rows_per_group, text_column=text_column
        )
        paths.append(path)
        start = stop
    return paths


def build_sample_corpus(
    out_dir: Path,
    *,
    target_bytes: int = 4_000_000,
    num_files: int = 8,
    row_groups_per_file: int = 4,
    progress: Progress | None = None,
) -> list[Path]:
    """Write `sample_documents(target_bytes)` as Parquet shards; returns their paths.

    Rows per group are chosen so every file splits into `row_groups_per_file`
    groups of nearly equal size: with one short tail group per file, rank striding
    would hand every tail to the same rank. `progress` counts the sources parsed (the
    caller closes it).
    """
    docs = sample_documents(target_bytes, progress=progress)
    docs_per_file = -(-len(docs) // num_files)
    return write_shards(
        docs,
        out_dir,
        num_files=num_files,
        rows_per_group=max(1, -(-docs_per_file // row_groups_per_file)),
    )


def build_installed_corpus(
    out_dir: Path,
    *,
    docs_per_group: int = 1024,
    groups_per_file: int = 1,
    sources: Sequence[Source] | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Write `installed_documents(sources)` in row groups of `docs_per_group`; returns paths.

    Every file but the last holds `groups_per_file` full row groups; the last holds what
    is left (a full file when the documents divide evenly). `progress` counts the sources
    parsed (the caller closes it).
    """
    if docs_per_group < 1:
        raise ConfigError(f"docs_per_group is {docs_per_group}; use at least 1.")
    if groups_per_file < 1:
        raise ConfigError(f"groups_per_file is {groups_per_file}; use at least 1.")
    docs = installed_documents(sources, progress=progress)
    docs_per_file = docs_per_group * groups_per_file
    if len(docs) <= docs_per_file:
        raise ConfigError(
            f"the install holds {len(docs)} documents, not enough for two files of "
            f"{docs_per_file}; lower docs_per_group or groups_per_file."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, start in enumerate(range(0, len(docs), docs_per_file)):
        path = out_dir / SHARD_NAME.format(index)
        stop = min(start + docs_per_file, len(docs))
        _write_shard(docs, start, stop, path, rows_per_group=docs_per_group,
                     text_column=DEFAULT_TEXT_COLUMN)
        paths.append(path)
    return paths
