"""ZO math: SPSA, aggregation, commits; replay equals following the rounds live."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.directions import DirectionSpec
from protocols.errors import ProtocolError
from protocols.zo import (
    ClientResult,
    Commit,
    aggregate,
    apply_commit,
    derive_seed,
    fingerprint,
    pool_pairs,
    projected_gradient,
    replay,
    slot_seeds,
)

shapes = st.lists(st.lists(st.integers(1, 40), min_size=0, max_size=3).map(tuple),
                  min_size=1, max_size=4)
coefficient = st.floats(-1e-2, 1e-2, allow_nan=False, allow_infinity=False)
commits = st.lists(st.lists(st.tuples(st.integers(0, 2**64 - 1), coefficient), max_size=4),
                   min_size=1, max_size=5)


def weights_for(shape_list, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shape_list]


@given(shape_list=shapes, pair_lists=commits,
       dist=st.sampled_from(["rademacher", "gaussian"]), split=st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_replay_from_a_checkpoint_equals_sequential_application(shape_list, pair_lists, dist,
                                                                split):
    spec = DirectionSpec(dist)
    chain = [Commit(r, tuple(p)) for r, p in enumerate(pair_lists)]
    live = weights_for(shape_list)
    checkpoints = {0: [w.copy() for w in live]}
    for c in chain:
        apply_commit(live, c, spec)
        checkpoints[c.round + 1] = [w.copy() for w in live]
    start = min(split, len(chain))
    restored = [w.copy() for w in checkpoints[start]]
    last = replay(restored, chain, spec, after_round=start - 1)
    assert last == len(chain) - 1
    assert fingerprint(restored) == fingerprint(live)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(restored, live))


def test_replay_refuses_a_gap():
    w = weights_for([(3,)])
    with pytest.raises(ProtocolError, match="round 1 is missing"):
        replay(w, [Commit(0, ((1, 0.1),)), Commit(2, ((2, 0.1),))], DirectionSpec())


def test_projected_gradient_recovers_a_directional_derivative():
    w = np.array([0.3, -0.2, 0.5], np.float64)
    z = np.array([1.0, -1.0, 1.0])
    f = lambda x: float(np.sum(x**2))  # noqa: E731
    g = projected_gradient(f(w + 1e-3 * z), f(w - 1e-3 * z), 1e-3)
    assert g == pytest.approx(float(2 * w @ z), rel=1e-6)


def test_aggregate_weights_clients_by_samples_and_averages_directions():
    commit = aggregate(3, [ClientResult((1, 2), (1.0, 3.0), 30),
                           ClientResult((5,), (-2.0,), 10)], lr=0.1)
    assert commit.round == 3
    want = ((1, 0.1 * 0.75 * 1.0 / 2), (2, 0.1 * 0.75 * 3.0 / 2), (5, 0.1 * 0.25 * -2.0))
    # the commit holds the float32 of each coefficient: all that applying it uses
    assert commit.pairs == tuple((s, float(np.float32(c))) for s, c in want)


def test_aggregate_of_local_steps_divides_by_directions_per_step():
    commit = aggregate(0, [ClientResult((1, 2, 3, 4), (1.0, 1.0, 1.0, 1.0), 10, steps=2)], 0.1)
    assert [c for _, c in commit.pairs] == [float(np.float32(0.05))] * 4


def test_a_pool_sums_the_coefficients_of_the_slots_that_share_a_direction():
    pairs = [(10, 1.0), (11, 2.0), (10, 0.25), (11, -1.0), (10, 1e-17)]
    folded, slots = pool_pairs(pairs, [0, 1, 2, 3, 4], 2)
    assert slots == [0, 1] and folded == [(10, (1.0 + 0.25) + 1e-17), (11, 2.0 - 1.0)]
    assert pool_pairs(pairs[:2], [3, 7], 0) == (pairs[:2], [3, 7])  # distinct seeds: as is
    seeds = slot_seeds(4, 2, 2, 3, 4)  # 4 clients x 2 seeds over a pool of 3
    assert seeds[3:6] == seeds[:3] and len(set(seeds)) == 3
    assert seeds[:3] == tuple(derive_seed(4, 2, t // 2, t % 2) for t in range(3))
    assert slot_seeds(4, 2, 2, 0, 4) == slot_seeds(4, 2, 2, 8, 4)  # a pool that holds all


def test_commit_moves_weights_against_the_gradient():
    spec = DirectionSpec()
    w = [np.full(100, 0.5, np.float32)]
    f = lambda ws: float(np.sum(ws[0].astype(np.float64) ** 2))  # noqa: E731
    before = f(w)
    for r in range(40):
        seed = derive_seed(1, r, 0, 0)
        plus, minus = [x.copy() for x in w], [x.copy() for x in w]
        from protocols.directions import axpy
        axpy(plus, 1e-3, spec, seed)
        axpy(minus, -1e-3, spec, seed)
        g = projected_gradient(f(plus), f(minus), 1e-3)
        apply_commit(w, aggregate(r, [ClientResult((seed,), (g,), 1)], 5e-3), spec)
    assert f(w) < 0.9 * before


def test_fingerprint_sees_one_flipped_bit_and_the_layout():
    w = weights_for([(4, 4), (3,)])
    fp = fingerprint(w)
    assert len(fp) == 32 and fingerprint([x.copy() for x in w]) == fp
    w[1].view(np.uint32)[0] ^= 1
    assert fingerprint(w) != fp
    flat = weights_for([(16,), (3,)])
    assert fingerprint(flat) != fingerprint([flat[0].reshape(4, 4), flat[1]])


def test_commit_refuses_non_finite_coefficients_and_bad_seeds():
    with pytest.raises(ProtocolError):
        Commit(0, ((1, float("inf")),))
    with pytest.raises(ProtocolError):
        Commit(0, ((2**64, 0.1),))


def test_derive_seed_is_stable_and_spreads():
    seeds = {derive_seed(7, r, c, d) for r in range(10) for c in range(10) for d in range(3)}
    assert len(seeds) == 300
    assert derive_seed(7, 1, 2, 0) == derive_seed(7, 1, 2, 0)
