"""A mixture's declared recipe without processes: the schedule's arithmetic, the mixer
following it and replaying it from any state, repeat counts and budgets, and the
errors a bad schedule, limit or mix file gets."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_mixer import NAMES, source_unit

from tokenfeed.common.errors import ConfigError, DataError, StateMismatchError
from tokenfeed.producer.config import DaemonConfig, load_mix_file, load_recipe
from tokenfeed.producer.mixer import DOCS_PER_UNIT, Mixer
from tokenfeed.producer.position import ConcatPosition, MixState
from tokenfeed.producer.recipe import Curve, Limits, check_disjoint
from tokenfeed.producer.supply import rank_units

RAMP = Curve.build([0, 100_000, 200_000], {"code": [0.1, 0.1, 0.6], "math": [0, 0, 0],
                                           "web": [0.9, 0.9, 0.4]}, "linear")
SOURCES = ("code", "web")


def mix_units(mixer: Mixer, units: int) -> list[np.ndarray]:
    out = []
    while len(out) < units:
        r = mixer.mix(lambda s, u: source_unit(mixer.names[s], u), lambda s: 10**6)
        assert r is not None
        out.append(r.tokens)
    return out


def integral(curve: Curve, x: int, name: str, steps: int = 20_000) -> float:
    """The weight's integral by the midpoint rule: independent of Curve.cumulative."""
    i = curve.names.index(name)
    dx = x / steps
    return sum(curve.weights(int((k + 0.5) * dx))[i] for k in range(steps)) * dx


@pytest.mark.parametrize("interpolate", ["linear", "step"])
def test_cumulative_targets_are_the_integral_of_the_weights(interpolate):
    curve = Curve.build([1000, 5000, 9000], {"a": [1, 3, 0], "b": [1, 1, 1]}, interpolate)
    assert curve.weights(0) == curve.weights(1000) == [0.5, 0.5]
    assert curve.weights(5000) == [0.75, 0.25]
    assert curve.weights(20_000) == [0.0, 1.0]
    assert curve.weights(3000) == ([0.625, 0.375] if interpolate == "linear" else [0.5, 0.5])
    for x in (0, 700, 1000, 3000, 5000, 8999, 12_345):
        got = curve.cumulative(x)
        assert sum(got) == pytest.approx(x)
        assert got[0] == pytest.approx(integral(curve, x, "a"), abs=x * 1e-3 + 1)


def test_a_schedule_round_trips_through_a_state_and_bad_ones_are_refused():
    assert Curve.parse(json.loads(json.dumps(RAMP.to_json()))) == RAMP
    with pytest.raises(StateMismatchError, match="increase strictly"):
        Curve.parse({"tokens": [0, 0], "weights": {"a": [1, 1]}, "interpolate": "step"})
    for table, match in [
        ({"tokens": [0, 10], "web": [1, 1]}, "no weights for \\['code'\\]"),
        ({"tokens": [0, 10], "web": [1, 1], "code": [1, 1], "books": [0, 1]}, "books"),
        ({"tokens": [0, 10], "web": [1, 1], "code": [1]}, "must be 2 weights"),
        ({"tokens": [0, 1.5], "web": [1, 1], "code": [1, 1]}, "not a whole token count"),
        ({"tokens": [0, 10], "web": [0, 1], "code": [0, 1]}, "at tokens = 0 every weight"),
        ({"tokens": [0], "web": [1], "code": [1], "interpolate": "cubic"}, "linear.*step"),
    ]:
        with pytest.raises(ConfigError, match=match):
            Curve.from_toml(table, ["code", "web"])


def test_the_mixer_follows_a_schedule_within_one_document_at_every_document():
    mixer = Mixer(MixState.initial({"code": 0.5, "math": 0.0, "web": 0.5}, RAMP))
    longest = 400  # test_mixer's documents are 1 to 399 tokens
    for _ in range(30):  # ~400k tokens: before, inside and after the ramp
        mix_units(mixer, 1)
        x = sum(mixer.totals())
        targets = RAMP.cumulative(x)
        for name, got in zip(mixer.names, mixer.totals(), strict=True):
            want = targets[RAMP.names.index(name)]
            assert abs(got - want) <= longest, (name, x, got, want)
    assert mixer.weights["code"] == pytest.approx(0.6)  # past the ramp: its last row


def test_replay_from_every_state_of_a_scheduled_mixture_is_identical():
    def fresh() -> Mixer:
        return Mixer(MixState.initial({"code": 0.5, "math": 0.0, "web": 0.5}, RAMP))
    want = mix_units(fresh(), 24)
    live = fresh()
    got = mix_units(live, 14)
    live.reweight({"code": 0.5, "web": 0.5})  # a live change: the schedule stops deciding
    got += mix_units(live, 10)
    np.testing.assert_array_equal(np.concatenate(got[:14]), np.concatenate(want[:14]))
    assert not np.array_equal(np.concatenate(got[14:]), np.concatenate(want[14:]))
    for at in (0, 3, 8, 14, 15, 20):  # before, inside and after the ramp; at the change
        saved = live.state(at, ConcatPosition(at))
        state = MixState.parse(json.loads(json.dumps(saved.to_json())), NAMES, 0, 1)
        assert state == saved and state.curve == RAMP
        resumed = mix_units(Mixer(state), 24 - at)
        for i, (a, b) in enumerate(zip(resumed, got[at:], strict=True)):
            np.testing.assert_array_equal(a, b, err_msg=f"resumed at {at}: unit {at + i}")


def test_a_live_change_equal_to_the_schedule_start_still_ends_the_schedule():
    mixer = Mixer(MixState.initial({"code": 0.5, "math": 0.0, "web": 0.5}, RAMP))
    mix_units(mixer, 20)  # past the ramp: code 0.6
    mixer.reweight({"code": 0.1, "math": 0.0, "web": 0.9})  # the schedule's first row
    assert mixer.schedule[-1] == (20, {"code": 0.1, "math": 0.0, "web": 0.9})
    assert mixer.weights["code"] == pytest.approx(0.1)


def test_a_resume_with_other_weights_ends_the_schedule_where_mixing_stopped():
    mixer = Mixer(MixState.initial({"code": 0.5, "math": 0.0, "web": 0.5}, RAMP))
    want = mix_units(mixer, 5)
    saved = mixer.state(4, ConcatPosition(4))  # the packer still needs unit 4; 5 mixed
    first_row = {"code": 0.1, "math": 0.0, "web": 0.9}
    for weights in ({"code": 0.5, "web": 0.5}, first_row):  # even the schedule's own start
        changed = saved.with_weights(weights)
        assert changed.curve == RAMP and changed.schedule[-1][0] == 5
        resumed = Mixer(changed)
        np.testing.assert_array_equal(mix_units(resumed, 1)[0], want[4])  # as it was mixed
        mix_units(resumed, 1)
        assert resumed.weights["code"] == pytest.approx(weights["code"])


def test_a_repeated_source_gives_each_document_exactly_k_times_then_the_rest_share():
    # code: 3 units (21 documents) repeated 3 times; web unbounded
    state = MixState.initial({"code": 0.5, "math": 0.0, "web": 0.5},
                             limits={"code": Limits(repeat=3)})
    mixer = Mixer(state, ends=[9, None, None])  # 3 units an epoch, 3 epochs
    units = mix_units(mixer, 12)
    docs = Counter()
    for tokens in units:
        for value in np.unique(tokens[tokens < 10**6]):  # code's token values name the doc
            docs[int(value)] += 1
    assert mixer.done() == [True, False, False]
    # every code document of units 0..8 (3 passes over units 0, 1, 2 of this test's
    # stream: test_mixer names documents by unit, so each unit is a distinct pass)
    assert sorted(docs) == [u * 100 + d for u in range(9) for d in range(7)]
    assert set(docs.values()) == {1}
    assert mixer.totals()[0] == sum(len(source_unit("code", u).tokens) for u in range(9))
    assert mixer.weights["web"] == 0.5  # the target; web alone delivers after code is done
    assert all((t >= 2 * 10**6).all() for t in units[-2:])


@pytest.mark.parametrize("limit", [Limits(max_tokens=5_000), Limits(max_documents=17)])
def test_a_budget_stops_a_source_within_one_document(limit):
    mixer = Mixer(MixState.initial({"code": 0.5, "math": 0.0, "web": 0.5},
                                   limits={"code": limit}))
    mix_units(mixer, 4)
    saved = MixState.parse(json.loads(json.dumps(
        mixer.state(4, ConcatPosition(4)).to_json())), NAMES, 0, 1)
    assert saved.limits == {"code": limit}
    code = saved.sources["code"]
    if limit.max_tokens is not None:
        assert limit.max_tokens <= code.total < limit.max_tokens + 400
    else:
        assert code.docs == 17
    assert mixer.done() == [True, False, False]


def test_a_mixture_whose_every_source_is_done_says_the_recipe_is_complete():
    mixer = Mixer(MixState.initial({"code": 1.0}, limits={"code": Limits(max_documents=70)}))
    mix_units(mixer, 1)
    last = mixer.mix(lambda s, u: source_unit(mixer.names[s], u), lambda s: 10**6)
    assert last is not None and len(last.doc_starts) == 70 - DOCS_PER_UNIT  # what was left
    with pytest.raises(DataError, match=r"code.*the recipe is complete"):
        mix_units(mixer, 1)


def test_old_four_count_cursors_still_parse():
    old = {"at": 0, "mixed": 0, "sources": {"web": [3, 1, 10, 99]},
           "weights": [[0, {"web": 1.0}]]}
    state = MixState.parse(old, NAMES, 0, 1)
    assert state.sources["web"].docs == 0 and state.curve is None and state.limits is None
    assert "curve" not in state.to_json() and "limits" not in state.to_json()


def test_rank_units_counts_a_ranks_row_groups_over_k_epochs():
    # 5 row groups, 2 ranks, 3 epochs: global positions 0..14; rank 0 reads 0, 2, ..., 14
    assert rank_units(5, 3, 0, 2) == 8 and rank_units(5, 3, 1, 2) == 7
    assert rank_units(5, 1, 0, 1) == 5 and rank_units(1, 1, 3, 4) == 0


def test_mix_file_limits_schedule_and_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    mix = tmp_path / "mix.toml"
    mix.write_text(f'[sources.web]\npath = "{tmp_path / "a"}"\nweight = 0.7\n'
                   f'[sources.code]\npath = "{tmp_path / "b"}"\nweight = 0.3\nrepeat = 3\n'
                   'max_tokens = 2_000_000_000\n'
                   '[schedule]\ntokens = [0, 8e11, 1e12]\nweb = [0.7, 0.7, 0.4]\n'
                   'code = [0.3, 0.3, 0.6]\ninterpolate = "linear"\n')
    sources, weights = load_mix_file(mix)
    curve, limits = load_recipe(mix)
    assert curve is not None and curve.tokens == (0, 800_000_000_000, 1_000_000_000_000)
    assert dict(limits) == {"code": Limits(repeat=3, max_tokens=2_000_000_000)}
    DaemonConfig(sources=sources, weights=weights, schedule=curve, limits=limits,
                 run_dir=tmp_path / "run")
    mix.write_text(mix.read_text().replace("weight = 0.3", "weight = 0.5"))
    with pytest.raises(ConfigError, match="differ from the \\[schedule\\]'s first row"):
        load_recipe(mix)
    mix.write_text(mix.read_text().replace("repeat = 3", "repeat = 0"))
    with pytest.raises(ConfigError, match=r"sources\.code\.repeat = 0 must be a whole number"):
        load_recipe(mix)
    mix.write_text(f'[sources.web]\npath = "{tmp_path / "a"}"\n'
                   f'[sources.code]\npath = "{tmp_path / "a"}/"\n')
    sources, weights = load_mix_file(mix)
    with pytest.raises(ConfigError, match="sources web and code have the same path"):
        DaemonConfig(sources=sources, weights=weights, run_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match=r"x\.parquet is in sources web and code"):
        check_disjoint({"web": [str(tmp_path / "a" / "x.parquet")],
                        "code": [str(tmp_path / "a" / ".." / "a" / "x.parquet")]})


def test_an_elastic_resume_of_a_scheduled_mixture_saved_without_its_counts_is_refused():
    """States saved before `given` was recorded lack what a new rank counts on from."""
    import dataclasses

    from tokenfeed.producer.elastic import plan_mixture
    from tokenfeed.producer.position import Position

    mixer = Mixer(MixState.initial({"code": 0.5, "math": 0.0, "web": 0.5}, RAMP))
    mix_units(mixer, 2)
    state = mixer.state(1, ConcatPosition(1))
    assert state.given is not None and sum(g[0] for g in state.given.values()) > 0
    old = Position(ConcatPosition(1), mix=dataclasses.replace(state, given=None))
    with pytest.raises(StateMismatchError, match=r"lack 'given'.*resume it at the world size "
                       r"it was saved at"):
        plan_mixture([old, old], "concat", {}, 0, 3)
