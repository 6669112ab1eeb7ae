"""The direction spec: pinned vectors, the written bit layout, chunking, and statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.directions import (
    GROUP,
    PAIRWISE,
    SUM64,
    CommitPlan,
    DirectionSpec,
    axpy,
    axpy_direction,
    direction,
    raw_words,
    reference_block,
)
from protocols.errors import ProtocolError
from protocols.selftest import load_vectors, run_selftest
from protocols.zo import Commit, apply_commit

VECTORS = load_vectors()


def test_selftest_agrees_with_the_pinned_vectors():
    assert run_selftest() == []


@pytest.mark.parametrize("case", VECTORS["philox"])
def test_numpy_philox_matches_the_plain_integer_spec(case):
    want = [int(w, 16) for w in case["words"]]
    assert reference_block(case["seed"], case["tensor_index"], case["block"]) == want
    got = raw_words(case["seed"], case["tensor_index"], case["block"], 4)
    assert [int(w) for w in got] == want


def test_rademacher_bit_layout_is_as_written():
    # parameter p takes bit p % 64 (LSB first) of word p // 64; 1 -> +1, 0 -> -1
    words = [int(w) for w in raw_words(11, 2, 0, 8)]
    z = direction(DirectionSpec(), 11, 2, 0, 512)
    expected = [1.0 if (words[p // 64] >> (p % 64)) & 1 else -1.0 for p in range(512)]
    assert z.tolist() == expected


def test_a_tampered_vector_is_reported():
    import copy
    bad = copy.deepcopy(VECTORS)
    bad["directions"][0]["head"][0] = "3f800001"
    problems = run_selftest(bad)
    assert len(problems) == 1 and "rademacher direction" in problems[0]


@given(seed=st.integers(0, 2**64 - 1), tensor=st.integers(0, 1000),
       size=st.integers(1, 3000), chunk_blocks=st.integers(1, 5),
       dist=st.sampled_from(["rademacher", "gaussian"]))
@settings(max_examples=60, deadline=None)
def test_chunked_generation_gives_the_bits_of_one_piece(seed, tensor, size, chunk_blocks, dist):
    spec = DirectionSpec(dist, 0.75)
    base = np.linspace(-1, 1, size, dtype=np.float32)
    whole, chunked = base.copy(), base.copy()
    axpy_direction(whole, 1e-3, spec, seed, tensor, chunk=1 << 20)
    axpy_direction(chunked, 1e-3, spec, seed, tensor, chunk=256 * chunk_blocks)
    assert whole.tobytes() == chunked.tobytes()
    expect = base + np.float32(1e-3) * direction(spec, seed, tensor, 0, size)
    assert whole.tobytes() == expect.astype(np.float32).tobytes()


def test_tensors_and_seeds_get_independent_directions():
    a = direction(DirectionSpec(), 1, 0, 0, 100_000)
    b = direction(DirectionSpec(), 1, 1, 0, 100_000)
    c = direction(DirectionSpec(), 2, 0, 0, 100_000)
    assert abs(float(np.mean(a * b))) < 0.02 and abs(float(np.mean(a * c))) < 0.02
    assert abs(float(a.mean())) < 0.02 and set(np.unique(a)) == {-1.0, 1.0}


def test_gaussian_has_unit_moments_and_scale_applies():
    z = direction(DirectionSpec("gaussian", 1.0), 3, 0, 0, 200_000).astype(np.float64)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.mean(z**4) - 3) < 0.1  # kurtosis of a normal
    half = direction(DirectionSpec("gaussian", 0.5), 3, 0, 0, 1000)
    assert np.allclose(half, 0.5 * z[:1000], rtol=1e-6)


@pytest.mark.parametrize("bad", [dict(distribution="uniform"), dict(scale=0.0),
                                 dict(scale=float("nan")), dict(scale=1e9)])
def test_bad_specs_are_refused(bad):
    with pytest.raises(ProtocolError):
        DirectionSpec(**bad)


def test_seeds_outside_uint64_are_refused():
    with pytest.raises(ProtocolError):
        raw_words(2**64, 0, 0, 4)
    with pytest.raises(ProtocolError):
        raw_words(-1, 0, 0, 4)


def test_unaligned_chunks_are_refused():
    with pytest.raises(ValueError):
        direction(DirectionSpec(), 1, 0, 100, 10)


def _summed_by_the_letter(w: np.ndarray, spec: DirectionSpec, pairs) -> np.ndarray:
    """The summed rule as docs/protocol.md words it, element by element in plain Python:
    exact float32 x float32 terms, sums of GROUP pairs left to right, one rounding."""
    zs = [direction(spec, seed, 0, 0, w.size).astype(np.float64) for seed, _ in pairs]
    cs = [float(np.float32(c)) for _, c in pairs]
    out = []
    for p, value in enumerate(w.tolist()):
        total = None
        for g in range(0, len(pairs), GROUP):
            group = None
            for j in range(g, min(g + GROUP, len(pairs))):
                term = cs[j] * float(zs[j][p])
                group = term if group is None else group + term
            total = group if total is None else total + group
        out.append(value - total)
    return np.array(out, dtype=np.float64).astype(np.float32)


@given(seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=19),
       size=st.integers(1, 600), dist=st.sampled_from(["rademacher", "gaussian"]),
       scale=st.sampled_from([1.0, 0.25, 3.0]), chunk_blocks=st.integers(1, 3))
@settings(max_examples=40, deadline=None)
def test_a_summed_commit_is_the_written_rule_in_any_chunking(seeds, size, dist, scale,
                                                               chunk_blocks):
    spec = DirectionSpec(dist, scale)
    rng = np.random.default_rng(len(seeds) + size)
    pairs = [(s, float(rng.standard_normal() * 10.0 ** rng.integers(-9, -2))) for s in seeds]
    w = rng.standard_normal(size).astype(np.float32)
    want = _summed_by_the_letter(w, spec, pairs)
    got = w.copy()
    for start, total in CommitPlan(spec, pairs).totals(size, 0, 256 * chunk_blocks):
        part = got[start:start + total.size]
        part[...] = (part.astype(np.float64) - total).astype(np.float32)
    assert got.tobytes() == want.tobytes()


def test_plans_drawn_together_give_the_bits_of_the_written_rule():
    """Plans share idle generators and make their sign tables in batches of groups: two
    plans drawn interleaved, one with more groups than a batch, zero and negative-zero
    coefficients among them, each give the bits of the rule as written."""
    spec, size = DirectionSpec(), 300
    rng = np.random.default_rng(11)
    many = [(int(s), float(c)) for s, c in zip(rng.integers(0, 2**64, 8 * 1024 + 13,
                                                            dtype=np.uint64),
                                                rng.standard_normal(8 * 1024 + 13) * 1e-6)]
    many[5], many[8200] = (many[5][0], 0.0), (many[8200][0], -0.0)
    few = [(int(s), float(c)) for s, c in zip(rng.integers(0, 2**63, 11), [-0.0] * 3 + [2e-3] * 8)]
    w = rng.standard_normal(size).astype(np.float32)
    got = {0: w.copy(), 1: w.copy()}
    draws = [CommitPlan(spec, pairs).totals(size, 0, 256) for pairs in (many, few)]
    for (start, t_many), (_, t_few) in zip(*draws):
        for key, total in ((0, t_many), (1, t_few)):
            part = got[key][start:start + total.size]
            part[...] = (part.astype(np.float64) - total).astype(np.float32)
    assert got[0].tobytes() == _summed_by_the_letter(w, spec, many).tobytes()
    assert got[1].tobytes() == _summed_by_the_letter(w, spec, few).tobytes()


def test_small_steps_survive_the_summed_rule_and_are_lost_pair_by_pair():
    """Weights near 1.0 (ulp 1.2e-7), 400 pairs of |c| = 3e-8: pair by pair, almost every
    addend rounds away; summed in float64 and rounded once, the step lands within an ulp."""
    spec, n = DirectionSpec(), 4096
    rng = np.random.default_rng(7)
    pairs = tuple((int(s), float(c)) for s, c in zip(rng.integers(0, 2**63, 400),
                                                      rng.choice([-3e-8, 3e-8], 400)))
    exact = np.zeros(n)
    for seed, c in pairs:
        exact -= float(np.float32(c)) * direction(spec, seed, 0, 0, n).astype(np.float64)
    errors = {}
    for rule in (PAIRWISE, SUM64):
        w = [np.ones(n, np.float32)]
        apply_commit(w, Commit(0, pairs, rule), spec)
        step = w[0].astype(np.float64) - 1.0
        errors[rule] = np.linalg.norm(step - exact) / np.linalg.norm(exact)
    assert errors[SUM64] < 0.1 < 0.5 < errors[PAIRWISE], errors


def test_a_pairwise_commit_is_applied_as_pairs_were():
    spec, w = DirectionSpec(), [np.linspace(-1, 1, 999, dtype=np.float32)]
    by_pairs = [w[0].copy()]
    pairs = ((3, 1e-3), (4, -2e-3))
    for seed, c in pairs:
        axpy(by_pairs, -c, spec, seed)
    apply_commit(w, Commit(0, pairs, PAIRWISE), spec)
    assert w[0].tobytes() == by_pairs[0].tobytes()
