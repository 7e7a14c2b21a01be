"""The mixer alone, without processes: its rule against the oracle's, replay from a state,
weight changes, and the errors a bad state gets."""

from __future__ import annotations

import json
from itertools import pairwise

import numpy as np
import pytest
from oracle import mix_documents

from tokenfeed.common.errors import ConfigError, StateMismatchError
from tokenfeed.producer.mixer import DOCS_PER_UNIT, Mixer
from tokenfeed.producer.position import ConcatPosition, MixState
from tokenfeed.producer.units import Unit

NAMES = ("code", "math", "web")


def source_unit(name: str, unit: int) -> Unit:
    """A source's unit: 7 documents of varying length, tokens that name source, unit, doc."""
    rng = np.random.default_rng([NAMES.index(name), unit])
    lengths = rng.integers(1, 400, size=7)
    tokens = np.concatenate([np.full(n, NAMES.index(name) * 10**6 + unit * 100 + d,
                                     dtype=np.uint32) for d, n in enumerate(lengths)])
    return Unit.of_lengths(tokens, lengths.astype(np.int64))


def source_docs(name: str):
    unit = 0
    while True:
        r = source_unit(name, unit)
        bounds = [*r.doc_starts.tolist(), len(r.tokens)]
        for lo, hi in pairwise(bounds):
            yield r.tokens[lo:hi].tolist()
        unit += 1


def run(mixer: Mixer, units: int, available=lambda s, u: True) -> list[np.ndarray]:
    out = []
    take = lambda s, u: source_unit(mixer.names[s], u) if available(s, u) else None  # noqa: E731
    while len(out) < units:
        r = mixer.mix(take, lambda s: 10**6)
        assert r is not None
        out.append(r.tokens)
    return out


def oracle_tokens(schedule, units: int) -> np.ndarray:
    mixed = mix_documents({n: source_docs(n) for n in NAMES}, schedule)
    return np.concatenate([np.array(next(mixed)[1]) for _ in range(units * DOCS_PER_UNIT)])


def test_mixer_follows_the_oracle_rule_and_its_schedule():
    weights = {"code": 0.2, "math": 0.1, "web": 0.7}
    mixer = Mixer(MixState.initial(weights))
    got = run(mixer, 5)
    mixer.reweight({"code": 0.5, "web": 0.5})
    got += run(mixer, 5)
    schedule = [(0, weights), (5, {"code": 0.5, "math": 0.0, "web": 0.5})]
    np.testing.assert_array_equal(np.concatenate(got), oracle_tokens(schedule, 10))
    assert mixer.state(10, ConcatPosition(10)).to_json()["weights"] == [
        [0, weights], [5, schedule[1][1]]]


def test_shares_track_the_weights_at_every_unit():
    weights = {"code": 0.3, "math": 0.0, "web": 0.7}
    mixer = Mixer(MixState.initial(weights))
    run(mixer, 40)
    totals = dict(zip(mixer.names, mixer.totals(), strict=True))
    assert totals["math"] == 0
    share = totals["code"] / sum(totals.values())
    assert abs(share - 0.3) < 0.005, share


def test_replay_from_any_state_is_identical_even_when_sources_arrive_late():
    mixer = Mixer(MixState.initial({"code": 0.25, "math": 0.25, "web": 0.5}))
    want = run(mixer, 12)
    mixer2 = Mixer(MixState.initial({"code": 0.25, "math": 0.25, "web": 0.5}))
    late = {"n": 0}

    def sometimes(source: int, unit: int) -> bool:  # every third request is not in yet
        late["n"] += 1
        return late["n"] % 3 != 0

    first = []
    take = lambda s, u: source_unit(mixer2.names[s], u) if sometimes(s, u) else None  # noqa: E731
    while len(first) < 6:
        r = mixer2.mix(take, lambda s: 10**6)
        if r is not None:
            first.append(r.tokens)
    saved = mixer2.state(6, ConcatPosition(6))
    state = MixState.parse(json.loads(json.dumps(saved.to_json())), NAMES, 0, 1)
    assert state == saved
    resumed = run(Mixer(state), 6)
    for i, (a, b) in enumerate(zip(first + resumed, want, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"virtual unit {i}")


def test_resume_with_other_weights_changes_them_where_mixing_stopped():
    state = MixState.initial({"code": 0.5, "web": 0.5})
    mixer = Mixer(state)
    run(mixer, 3)
    saved = mixer.state(2, ConcatPosition(2))  # a packer that still needs unit 2; 3 mixed
    changed = saved.with_weights({"web": 1.0})
    assert changed.schedule[-1] == (3, {"code": 0.0, "web": 1.0})
    assert changed.to_json()["weights"][-1] == [3, {"code": 0.0, "web": 1.0}]
    assert changed != saved
    same = saved.with_weights({"code": 0.5, "web": 0.5})  # same weights: as is
    assert same == saved
    resumable = {k: v for k, v in saved.to_json().items() if k not in ("exact", "pieces")}
    assert same.to_json() == resumable


def test_reweight_names_only_sources_of_the_stream():
    mixer = Mixer(MixState.initial({"code": 0.5, "web": 0.5}))
    with pytest.raises(ConfigError, match="not math"):
        mixer.reweight({"math": 1.0})


@pytest.mark.parametrize("state, match", [
    ({"at": 0, "mixed": 0, "sources": {"books": [0, 0, 0, 0]},
      "weights": [[0, {"books": 1.0}]]}, "source 'books', which this daemon does not serve"),
    ({"at": 0, "mixed": 0, "sources": {"web": [0, 0, -1, 0]},
      "weights": [[0, {"web": 1.0}]]}, "not \\[unit, doc, taken, total\\]"),
    ({"at": 0, "mixed": 0, "sources": {"web": [0, 0, 0, 0]},
      "weights": [[0, {"web": 0.0}]]}, "one of them > 0"),
    ({"at": 0, "sources": {}, "weights": []}, "lacks counts"),
    ({"at": 2, "mixed": 1, "sources": {"web": [0, 0, 0, 0]},
      "weights": [[0, {"web": 1.0}]]}, "weights begin after"),
])
def test_bad_states_are_refused_naming_the_problem(state, match):
    with pytest.raises(StateMismatchError, match=match):
        MixState.parse(state, NAMES, 0, 1)
