"""Live provenance is fetched when asked: the `provenance {stream, seq, ring}` op.

The daemon keeps, per published batch, what its record is cut from (the last
2 * slots + 2 batches) and cuts it when a consumer asks; `ready` carries nothing
extra. These tests hold the op to its contract: the record it answers is the one
`last_provenance()` lists, a batch no longer kept, a ring of another daemon or stream
and a stream that records nothing are refused naming `tokenfeed explain`, bad fields
get an error reply and leave the daemon serving, and a malformed record from a
socket that poses as the daemon is refused before any value of it is used."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import zmq

from tokenfeed.common import protocol
from tokenfeed.common.config import control_address
from tokenfeed.common.control import request
from tokenfeed.common.errors import ConfigError, ProtocolError
from tokenfeed.consumer.provenance import Delivered, fetch, last_rows, parse


def asked(feed: Any, seq: Any, **fields: Any) -> dict[str, Any]:
    """The daemon's answer to a provenance request for batch `seq` of `feed`'s stream."""
    link = feed._link
    fields = {"stream": link.stream_id, "seq": seq, "ring": link.ring.segment.name, **fields}
    return request(Path(link.run_dir), "provenance", **fields)


def test_the_record_asked_for_is_the_one_last_provenance_lists(start_daemon):
    with start_daemon().feed(4, 64, provenance=True) as feed:
        for seq in range(3):
            next(feed)
            got = parse(asked(feed, seq)["record"], 4, 64, "concat").rows()
            assert got == feed.last_provenance()
            assert len(got) == 4 and all(got)


def test_a_batch_no_longer_kept_is_unavailable_naming_explain(start_daemon):
    # 4 slots: the daemon keeps the last 2 * 4 + 2 = 10 published batches
    with start_daemon(slots=4).feed(2, 32, provenance=True) as feed:
        for _ in range(16):
            next(feed)
        record = asked(feed, 0)["record"]
        assert set(record) == {"unavailable"} and "keeps the last 10" in record["unavailable"]
        with pytest.raises(ConfigError, match=r"tokenfeed explain"):
            parse(record, 2, 32, "concat").rows()
        assert feed.last_provenance()  # the batch just returned is always kept


def test_a_request_for_another_ring_or_a_stream_without_provenance_is_refused(start_daemon):
    daemon = start_daemon()
    with daemon.feed(2, 32, provenance=True) as feed:
        next(feed)
        with pytest.raises(ConfigError, match=r"not on this daemon.*tokenfeed explain"):
            asked(feed, 0, ring="tf-0-elsewhere-ring")
        with pytest.raises(ConfigError, match=r"not on this daemon"):
            asked(feed, 0, stream=feed._link.stream_id + 100)
    with daemon.feed(2, 32, shuffle_seed=9) as plain:
        next(plain)
        with pytest.raises(ConfigError, match=r"records no provenance.*provenance=True"):
            asked(plain, 0)


BAD_REQUESTS = [  # (seq, other fields, what the error names)
    ("0", {}, "'seq'"),
    (True, {}, "'seq'"),
    (0, {"stream": None}, "'stream'"),
    (0, {"ring": 7}, "'ring'"),
]


def test_bad_request_fields_get_an_error_and_the_daemon_serves_on(start_daemon):
    """Each bad request in turn, on one daemon: an error naming the field, and the
    stream serves its next batch and that batch's record after every one."""
    daemon = start_daemon()
    with daemon.feed(2, 32, provenance=True) as feed:
        next(feed)
        for seq, fields, why in BAD_REQUESTS:
            with pytest.raises(ProtocolError, match=why):
                asked(feed, seq, **fields)
            next(feed)
            assert feed.last_provenance(), (seq, fields)


def test_last_provenance_of_a_batch_from_a_link_since_left_names_explain():
    """A re-attach (or a round's end) replaces the feed's link: the batch's record stayed
    with the stream that delivered it, so no request goes to whatever serves now."""
    delivered = Delivered(link=SimpleNamespace(), seq=3)
    with pytest.raises(ConfigError, match=r"has left since.*tokenfeed explain"):
        last_rows(True, delivered, SimpleNamespace())
    with pytest.raises(ConfigError, match=r"provenance=True"):
        last_rows(False, delivered, delivered.link)
    assert last_rows(True, None, None) is None


def _posing_daemon(run_dir: Path, record: Any, ready: threading.Event,
                   stop: threading.Event) -> None:
    """A ROUTER on run_dir's control address that answers one provenance request with
    `record` (what a broken or hostile peer might send)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.bind(control_address(run_dir))
        ready.set()
        while not stop.is_set():
            if sock.poll(50):
                identity, frame = sock.recv_multipart()
                assert protocol.decode(frame)["op"] == "provenance"
                sock.send_multipart([identity, protocol.encode("provenance", record=record)])
    finally:
        sock.close(linger=0)


ONE = np.array([(0, 0, 3, 0, 65)], dtype="<i8").tobytes()  # B=2 T=32 concat: 65 tokens


@pytest.mark.parametrize("record, why", [
    ({"files": [["data", "a.parquet"]], "spans": ONE[:-8]}, "'spans' is not int64"),
    ({"files": [["data", "a.parquet"]], "spans": ONE[:40] * 2}, "cover 130 tokens"),
    ({"files": [], "spans": ONE}, "outside its table"),
    ([1, 2], "not a map"),
    (None, "not a map"),
])
def test_a_malformed_record_from_the_daemon_is_refused(tmp_path, record, why):
    ready, stop = threading.Event(), threading.Event()
    server = threading.Thread(target=_posing_daemon, args=(tmp_path, record, ready, stop))
    server.start()
    try:
        assert ready.wait(5.0)
        link = SimpleNamespace(run_dir=str(tmp_path), stream_id=0,
                               ring=SimpleNamespace(segment=SimpleNamespace(name="ring")),
                               transfer=SimpleNamespace(B=2, T=32, packing="concat"))
        with pytest.raises(ProtocolError, match=why):
            fetch(Delivered(link, 0))
    finally:
        stop.set()
        server.join(5.0)
