"""Control-plane framing (common/protocol.py) and the client helpers (common/control.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.control import ERROR_KINDS, connect, error_from_reply, error_kind
from tokenfeed.common.errors import (
    DaemonUnavailableError,
    ProtocolError,
    TokenfeedError,
    TokenizerError,
)
from tokenfeed.common.version import package_version


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


# -- encode / decode ---------------------------------------------------------


def test_encode_decode_round_trips_fields_op_and_version() -> None:
    fields = {
        "stream": 3,
        "cursor": {"unit": 7, "offset": 12, "doc": 2},
        "name": "tokenfeed-1-abc-s0",
        "blob": b"\x00\xff",
        "ratio": 0.25,
        "items": [1, 2, 3],
        "none": None,
    }
    msg = protocol.decode(protocol.encode("ready", **fields))
    assert msg == {**fields, "v": protocol.PROTOCOL_VERSION, "op": "ready"}


def test_decode_rejects_bytes_that_are_not_msgpack() -> None:
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        protocol.decode(b"\xc1 this is not msgpack")


def test_decode_rejects_trailing_bytes_after_a_message() -> None:
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        protocol.decode(protocol.encode("ping") + b"\x00")


def test_decode_rejects_a_msgpack_list() -> None:
    with pytest.raises(ProtocolError, match="list"):
        protocol.decode(pack([protocol.PROTOCOL_VERSION, "ping"]))


def test_decode_rejects_a_map_without_version() -> None:
    with pytest.raises(ProtocolError, match="'v'"):
        protocol.decode(pack({"op": "ping"}))


def test_decode_rejects_a_map_without_op() -> None:
    with pytest.raises(ProtocolError, match="'op'"):
        protocol.decode(pack({"v": protocol.PROTOCOL_VERSION}))


def test_decode_rejects_a_non_integer_version() -> None:
    with pytest.raises(ProtocolError, match="integer 'v'"):
        protocol.decode(pack({"v": "1", "op": "ping"}))


def test_decode_rejects_a_bool_version() -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(pack({"v": True, "op": "ping"}))


def test_decode_refuses_a_newer_version_and_says_to_upgrade_this_side() -> None:
    newer = protocol.PROTOCOL_VERSION + 1
    with pytest.raises(ProtocolError) as info:
        protocol.decode(pack({"v": newer, "op": "ping", "package": "9.0.0"}))
    message = str(info.value)
    assert f"protocol v{newer} (from tokenfeed 9.0.0) is newer" in message
    assert f"v{protocol.OLDEST_PROTOCOL_VERSION} to v{protocol.PROTOCOL_VERSION}" in message
    assert "upgrade this side: daemons are upgraded before the trainers" in message


def test_decode_refuses_a_version_older_than_the_previous_and_says_to_upgrade_it() -> None:
    older = protocol.OLDEST_PROTOCOL_VERSION - 1
    with pytest.raises(ProtocolError) as info:
        protocol.decode(pack({"v": older, "op": "ping"}))
    message = str(info.value)
    assert f"protocol v{older} (from another tokenfeed release) is older" in message
    assert "upgrade that side to a release at most one protocol version behind" in message


def test_decode_accepts_the_previous_protocol_version() -> None:
    assert protocol.OLDEST_PROTOCOL_VERSION == protocol.PROTOCOL_VERSION - 1
    msg = protocol.decode(pack({"v": protocol.OLDEST_PROTOCOL_VERSION, "op": "attach"}))
    assert msg == {"v": protocol.OLDEST_PROTOCOL_VERSION, "op": "attach"}


def test_hello_frames_carry_the_package_version_and_others_do_not() -> None:
    for op in sorted(protocol.HELLO_OPS):
        assert protocol.decode(protocol.encode(op))["package"] == package_version()
    assert "package" not in protocol.decode(protocol.encode("ready", slot=1))
    assert package_version() == version("tokenfeed")  # one definition: pyproject's


def test_a_frame_for_a_v1_peer_leaves_out_the_fields_v1_lacks() -> None:
    frame = protocol.encode_as(1, "attached", stream=3, package="0.2.0")
    assert msgpack.unpackb(frame) == {"v": 1, "op": "attached", "stream": 3}
    with pytest.raises(ValueError, match="cannot encode protocol v0"):
        protocol.encode_as(0, "ping")


def test_peers_answer_each_identity_in_the_version_it_spoke_last() -> None:
    peers = protocol.Peers(capacity=2)
    peers.heard(b"old", {"v": 1, "op": "attach"})
    peers.heard(b"new", {"v": 2, "op": "attach", "package": "0.2.0"})
    peers.heard(b"new", {"v": 2, "op": "heartbeat"})  # keeps the package its hello named
    assert msgpack.unpackb(peers.encode(b"old", "pong", version=2))["v"] == 1
    assert "package" not in msgpack.unpackb(peers.encode(b"old", "pong", version=2))
    assert msgpack.unpackb(peers.encode(b"new", "pong", version=2))["package"] == package_version()
    assert peers.describe(b"old") == "tokenfeed 0.1.x, protocol v1"
    assert peers.describe(b"new") == "tokenfeed 0.2.0, protocol v2"
    peers.heard(b"cli", {"v": 2, "op": "status"})  # a third identity: the oldest is forgotten
    assert peers.version(b"old") == protocol.PROTOCOL_VERSION
    assert peers.version(b"new") == 2


def test_decode_rejects_a_frame_over_max_frame_bytes() -> None:
    frame = protocol.encode("ping", pad=b"x" * protocol.MAX_FRAME_BYTES)
    assert len(frame) > protocol.MAX_FRAME_BYTES
    with pytest.raises(ProtocolError, match=f"{len(frame)} bytes exceeds"):
        protocol.decode(frame)


def test_decode_accepts_a_frame_of_exactly_max_frame_bytes() -> None:
    pad_bytes = protocol.MAX_FRAME_BYTES
    while len(protocol.encode("ping", pad=b"x" * pad_bytes)) > protocol.MAX_FRAME_BYTES:
        pad_bytes -= 1  # the framing overhead is a few bytes
    frame = protocol.encode("ping", pad=b"x" * pad_bytes)
    assert len(frame) == protocol.MAX_FRAME_BYTES
    assert protocol.decode(frame)["op"] == "ping"


# -- field -------------------------------------------------------------------


def test_field_returns_a_value_of_the_asked_type() -> None:
    msg = protocol.decode(protocol.encode("release", stream=2, seq=9))
    assert protocol.field(msg, "seq", int) == 9


def test_field_accepts_any_type_of_a_tuple() -> None:
    msg = {"v": 1, "op": "scale", "workers": 2.5}
    assert protocol.field(msg, "workers", (int, float)) == 2.5


def test_field_rejects_a_missing_field_naming_it_and_the_op() -> None:
    with pytest.raises(ProtocolError, match="op 'release': field 'seq'"):
        protocol.field({"v": 1, "op": "release"}, "seq", int)


def test_field_rejects_a_value_of_the_wrong_type() -> None:
    with pytest.raises(ProtocolError, match="field 'spec'"):
        protocol.field({"v": 1, "op": "attach", "spec": [1, 2]}, "spec", dict)


def test_field_rejects_a_bool_where_an_int_is_required() -> None:
    with pytest.raises(ProtocolError, match="field 'seq'"):
        protocol.field({"v": 1, "op": "release", "seq": True}, "seq", int)


def test_field_accepts_a_bool_where_a_bool_is_required() -> None:
    assert protocol.field({"v": 1, "op": "x", "flag": False}, "flag", bool) is False


# -- error replies -----------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
def test_error_reply_round_trips_to_the_same_exception_class(kind: str) -> None:
    cls = ERROR_KINDS[kind]
    error = cls(f"something about {kind} went wrong")
    assert error_kind(error) == kind
    frame = protocol.encode("error", message=str(error), kind=error_kind(error))
    raised = error_from_reply(protocol.decode(frame))
    assert type(raised) is cls
    assert str(raised) == str(error)


def test_error_kind_of_an_unlisted_error_is_internal() -> None:
    assert error_kind(TokenizerError("no such encoding")) == "internal"


def test_error_from_reply_of_an_unknown_kind_is_a_tokenfeed_error() -> None:
    raised = error_from_reply({"v": 1, "op": "error", "message": "boom", "kind": "internal"})
    assert type(raised) is TokenfeedError
    assert str(raised) == "boom"


# -- connect -----------------------------------------------------------------


@pytest.fixture
def short_run_dir() -> Iterator[Path]:
    """An empty run dir short enough for a Unix socket path (pytest's tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="tf-proto-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_connect_without_a_socket_file_raises_daemon_unavailable_naming_serve(
    short_run_dir: Path,
) -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        with pytest.raises(DaemonUnavailableError) as info:
            connect(ctx, short_run_dir)
    finally:
        ctx.term()
    message = str(info.value)
    assert "tokenfeed serve" in message
    assert str(short_run_dir) in message


# -- the RELEASES frame (batched control traffic) ----------------------------------------


def test_a_releases_frame_round_trips_its_stream_and_seqs() -> None:
    frame = protocol.encode_releases(3, [7, 8, 2**63])
    assert protocol.is_releases(frame)
    assert protocol.decode_releases(frame) == (3, (7, 8, 2**63))


def test_a_msgpack_message_is_never_taken_for_a_releases_frame() -> None:
    assert not protocol.is_releases(protocol.encode("release", stream=0, seq=1))


@pytest.mark.parametrize("frame, problem", [
    (b"TFr1", "shorter than its 12-byte header"),
    (protocol.encode_releases(0, [1, 2])[:-1], "does not hold the 2 seqs"),
    (protocol.encode_releases(0, [1]) + b"\0" * 8, "does not hold the 1 seqs"),
    (protocol.RELEASES_HEADER.pack(b"TFr1", 0, 0, 0), "does not hold the 0 seqs"),
    (protocol.RELEASES_HEADER.pack(b"TFr1", 0, protocol.MAX_RELEASES + 1, 0)
     + b"\0" * 8 * (protocol.MAX_RELEASES + 1), "1 to 1024"),
    (protocol.RELEASES_HEADER.pack(b"TFr2", 0, 1, 0) + b"\0" * 8, "not b'TFr1'"),
])
def test_decode_releases_rejects_a_frame_that_does_not_match_its_layout(frame, problem) -> None:
    with pytest.raises(ProtocolError, match=problem):
        protocol.decode_releases(frame)


def test_encode_releases_refuses_an_empty_or_oversized_list() -> None:
    with pytest.raises(ValueError, match="1 to 1024 seqs"):
        protocol.encode_releases(0, [])
    with pytest.raises(ValueError, match="1 to 1024 seqs"):
        protocol.encode_releases(0, list(range(protocol.MAX_RELEASES + 1)))
