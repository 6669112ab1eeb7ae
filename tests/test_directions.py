"""The direction spec: pinned vectors, the written bit layout, chunking, and statistics."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.directions import (
    DirectionSpec,
    axpy_direction,
    direction,
    raw_words,
    reference_block,
)
from protocols.errors import ProtocolError
from protocols.selftest import load_vectors, run_selftest

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
