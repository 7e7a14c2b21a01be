"""Exclusion files: documents a stream never delivers again, read and put on the wire.

A file names documents, one per line, in either form (`#` starts a comment line):

    {"source": "web", "file": "shard_00003.parquet", "row_group": 2, "row": 17, ...}
    shard_00003.parquet,2,17                 file,row_group,row
    web,shard_00003.parquet,2,17             source,file,row_group,row

A JSON line is a segment as `tokenfeed explain --json` prints it (other keys are
ignored, `{"pad": n}` lines skipped); a whole batch line of `explain --json`
(`{"batch": k, "rows": [[segment, ...], ...]}`) names every document of its segments,
and its header line (`{"explain": {...}}`, what was dropped) names none, so its output
can be piped in as it is. `file` is the shard's file name as the daemon
lists it (an absolute path or URL under the source's root is accepted; the daemon
checks it). `source` may be left out when one source serves the file.

This module only reads the file and checks its form; which shards, row groups and
rows exist is the daemon's to check (producer/exclude.py), against the data it serves.

On the wire (the `exclude` field of `attach`) the entries travel as content, never as
a path: the trainer's file system may not be the daemon's (containers), and a daemon
must not read files an untrusted frame names. Grouped by (source, file), each group's
(line, row_group, row) triples are packed as little-endian uint32, 12 bytes an entry,
so MAX_ATTACH_ENTRIES fit in one frame (protocol.MAX_FRAME_BYTES); a longer list is
served by the daemon itself (`serve --exclude PATH`).

Failure behaviour: a malformed line raises ConfigError naming the file, the line and
the form it should have; a list over MAX_ATTACH_ENTRIES raises ConfigError naming
`serve --exclude`; a malformed wire field raises ProtocolError.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenfeed.common.errors import ConfigError, ProtocolError

MAX_ATTACH_ENTRIES = 65_536  # 786 KiB of triples: fits a 1 MiB frame with the names
MAX_COUNT = 1 << 31  # row groups, rows and line numbers fit a uint32
MAX_NAME_CHARS = 1024  # a source or file name on the wire
MAX_WIRE_BYTES = 960 << 10  # of the attach frame's 1 MiB; the rest is the cursor's
TRIPLE = struct.Struct("<III")

FORMS = ("a JSON object with \"file\", \"row_group\" and \"row\" (and \"source\"), "
         "file,row_group,row or source,file,row_group,row")


@dataclass(frozen=True, slots=True)
class Entry:
    """One document named by a file's line `line` (1-based); `source` None: unnamed."""

    line: int
    source: str | None
    file: str
    row_group: int
    row: int


def read_exclude_file(path: str | Path) -> list[Entry]:
    """Every entry of the exclusion file at `path`, in file order."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"exclude file {path}: {e}; pass the file of documents to exclude "
                          "(one per line: " + FORMS + ")") from None
    return list(parse_lines(text.splitlines(), str(path)))


def parse_lines(lines: list[str], where: str) -> Iterator[Entry]:
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            yield from _parse_line(line, number)
        except ValueError as e:
            raise ConfigError(f"exclude file {where} line {number}: {e} ({line[:80]!r}); "
                              f"write each line as {FORMS}") from None


def _parse_line(line: str, number: int) -> Iterator[Entry]:
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if "explain" in obj and "file" not in obj:  # `explain --json`'s header: no document
            return
        if "rows" in obj and "file" not in obj:  # a batch line of `explain --json`
            rows = obj["rows"]
            if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
                raise ValueError("'rows' is not a list of lists of segments")
            for segments in rows:
                for segment in segments:
                    entry = _segment(segment, number)
                    if entry is not None:
                        yield entry
            return
        entry = _segment(obj, number)
        if entry is not None:
            yield entry
        return
    fields = [f.strip() for f in line.split(",")]
    if len(fields) not in (3, 4):
        raise ValueError(f"{len(fields)} comma-separated fields, not 3 or 4")
    source = fields[0] if len(fields) == 4 else None
    file, row_group, row = fields[-3:]
    yield Entry(number, _name(source, "source"), _name(file, "file"),
                _count(row_group, "row_group"), _count(row, "row"))


def _segment(obj: Any, number: int) -> Entry | None:
    if not isinstance(obj, dict):
        raise ValueError("a segment is not a JSON object")
    if "pad" in obj and "file" not in obj:
        return None  # padding: no document
    missing = [k for k in ("file", "row_group", "row") if k not in obj]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    return Entry(number, _name(obj.get("source"), "source"), _name(obj["file"], "file"),
                 _count(obj["row_group"], "row_group"), _count(obj["row"], "row"))


def _name(value: Any, what: str) -> Any:
    if value is None or (what == "source" and value == ""):
        if what == "file":
            raise ValueError("no file")
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_CHARS:
        raise ValueError(f"{what} {str(value)[:40]!r} is not a name of 1 to "
                         f"{MAX_NAME_CHARS} characters")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{what} {value!r} is not an integer") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_COUNT:
        raise ValueError(f"{what} {value!r} is not an integer in [0, {MAX_COUNT})")
    return value


# -- the wire -----------------------------------------------------------------

def to_wire(entries: list[Entry], where: str) -> list[list[Any]]:
    """`entries` as the attach field: [[source or "", file, triples], ...]."""
    if len(entries) > MAX_ATTACH_ENTRIES:
        raise ConfigError(
            f"exclude file {where} names {len(entries)} documents; a feed sends at most "
            f"{MAX_ATTACH_ENTRIES} with its attach. Serve the list from the daemon instead: "
            f"`tokenfeed serve --exclude {where} ...`")
    groups: dict[tuple[str, str], list[Entry]] = {}
    for e in entries:
        groups.setdefault((e.source or "", e.file), []).append(e)
    wire = [[source, file, b"".join(TRIPLE.pack(e.line, e.row_group, e.row) for e in group)]
            for (source, file), group in groups.items()]
    size = sum(len(source) + len(file) + len(packed) + 8 for source, file, packed in wire)
    if size > MAX_WIRE_BYTES:
        raise ConfigError(
            f"exclude file {where} takes {size} bytes to send, more than the {MAX_WIRE_BYTES} "
            f"an attach carries (long file names?). Serve the list from the daemon instead: "
            f"`tokenfeed serve --exclude {where} ...`")
    return wire


def exclude_fields(path: str | Path) -> dict[str, Any]:
    """The attach fields that send the exclusion file at `path` ({} if it names nothing)."""
    entries = read_exclude_file(path)
    if not entries:
        return {}
    return {"exclude": to_wire(entries, str(path)), "exclude_name": str(path)}


def from_wire(value: Any) -> list[Entry]:
    """The entries of an attach's `exclude` field (untrusted), else ProtocolError."""
    return [Entry(line, source or None, file, row_group, row)
            for source, file, packed in _groups(value)
            for line, row_group, row in TRIPLE.iter_unpack(packed)]


def wire_digest(value: Any) -> str:
    """A digest of an attach's `exclude` field (checked as `from_wire` does), to know a
    list already seen without reading it again."""
    digest = hashlib.sha256()
    for source, file, packed in _groups(value):
        digest.update(f"{len(source)}:{source}{len(file)}:{file}{len(packed)}:".encode())
        digest.update(packed)
    return digest.hexdigest()


def _groups(value: Any) -> list[tuple[str, str, bytes]]:
    if not isinstance(value, list):
        raise ProtocolError("attach: 'exclude' must be a list of [source, file, triples]")
    total = 0
    for group in value:
        if not (isinstance(group, list) and len(group) == 3
                and all(isinstance(g, str) and len(g) <= MAX_NAME_CHARS for g in group[:2])
                and group[1] and isinstance(group[2], bytes)
                and len(group[2]) % TRIPLE.size == 0):
            raise ProtocolError("attach: an 'exclude' group is not [source, file, "
                                "uint32 (line, row_group, row) triples]")
        total += len(group[2]) // TRIPLE.size
        if total > MAX_ATTACH_ENTRIES:
            raise ProtocolError(f"attach: 'exclude' names more than {MAX_ATTACH_ENTRIES} "
                                "documents")
    return [(g[0], g[1], g[2]) for g in value]
