"""States saved by an earlier tokenfeed resume bit for bit: each fixture under
fixtures/states/ (made at commit 1c0a70e by fixtures/make_states.py, which says how;
never regenerate them to make this test pass) holds a saved state,
the batches a consumer resumed from it must produce, and the state those batches end at.

A change to how positions are represented must keep every one of them: concat, best fit,
a shuffled stream, the second epoch, a mixture after a live reweight (pending and
applied, concat and best fit) and elastic layouts (2 -> 3 ranks, and saved again)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Daemon

STATES = Path(__file__).parent / "fixtures" / "states"
FIXTURES = sorted(p.stem for p in STATES.glob("*.json"))
KINDS = {  # what the fixtures must cover: name prefix -> its cursor kind
    "concat": "concat", "bestfit": "best fit", "shuffled": "a shuffled stream",
    "second_epoch_": "the second epoch", "mixture_reweight_pending_": "a pending reweight",
    "mixture_reweighted_concat": "a reweighted concat mixture",
    "mixture_reweighted_bestfit": "a reweighted best-fit mixture",
    "elastic_concat_": "an elastic concat layout", "elastic_bestfit_": "an elastic best-fit layout",
}


def load(name: str) -> dict[str, Any]:
    return json.loads((STATES / f"{name}.json").read_text())


def test_the_fixtures_cover_every_kind_of_position():
    missing = [what for prefix, what in KINDS.items()
               if not any(name.startswith(prefix) for name in FIXTURES)]
    assert not missing, f"no state fixture for {', '.join(missing)} in {STATES}"
    assert any(c["after"]["cursor"]["epoch"] >= 1 for n in FIXTURES
               for c in load(n)["cases"] if n.startswith("second_epoch_"))


@pytest.fixture(scope="module")
def daemons() -> Iterator[dict[str, Daemon]]:
    """One daemon of each kind the fixtures were saved from, shared by them: a state
    attaches to a stream of its own position, so no fixture sees another's."""
    data = STATES / "data"
    started: dict[str, Daemon] = {}
    try:
        started["web"] = Daemon(data / "web")
        started["mixture"] = Daemon(None, f"--source=code={data / 'code'}",
                                    f"--source=web={data / 'web'}")
        yield started
        for kind, daemon in started.items():
            assert daemon.stop() == 0, f"{kind} daemon:\n{daemon.log()}"
            assert daemon.segments() == [], "a clean stop left shared memory behind"
    finally:
        for daemon in started.values():
            daemon.cleanup()


@pytest.mark.parametrize("name", FIXTURES)
def test_saved_state_resumes_to_its_batches(daemons, name):
    fixture = load(name)
    daemon = daemons["web" if fixture["daemon"] == "web" else "mixture"]
    for case in fixture["cases"]:
        where = f"{name} rank {case['rank']}/{case['world_size']}"
        (b, t), n = np.shape(case["batches"][0][0]), len(case["batches"])
        with daemon.feed(b, t, rank=case["rank"], world_size=case["world_size"],
                         **fixture["feed"]) as feed:
            feed.load_state_dict(copy.deepcopy(case["state"]))
            for i, (want_x, want_y) in enumerate(case["batches"]):
                x, y = next(feed)
                assert (str(x.dtype), str(y.dtype)) == ("torch.int32", "torch.int64")
                np.testing.assert_array_equal(x.numpy(), np.array(want_x, np.int32),
                                              err_msg=f"{where} batch {i} of {n}: inputs")
                np.testing.assert_array_equal(y.numpy(), np.array(want_y, np.int64),
                                              err_msg=f"{where} batch {i} of {n}: targets")
            assert json.loads(json.dumps(feed.state_dict())) == case["after"], where
