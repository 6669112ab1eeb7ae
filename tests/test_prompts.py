"""Discrete prompts: the policy-gradient spec, and federated rounds on a real ONNX black box."""

from __future__ import annotations

import numpy as np
import pytest

from protocols.directions import CATEGORICAL, DirectionSpec, axpy, reference_block
from protocols.errors import ProtocolError
from protocols.messages import CommitMessage
from protocols.prompts import (
    advantages,
    apply_policy_commit,
    best,
    exp_nonpositive,
    probabilities,
    sample,
)
from protocols.zo import ClientResult, Commit, aggregate, apply_commit, derive_seed, fingerprint


def test_exp_is_accurate_where_softmax_uses_it():
    x = -np.linspace(0.0, 60.0, 10001)
    assert exp_nonpositive(np.array([0.0]))[0] == 1.0
    np.testing.assert_allclose(exp_nonpositive(x), np.exp(x), rtol=1e-14, atol=0)
    assert exp_nonpositive(np.array([-1e6]))[0] >= 0.0


def test_probabilities_are_a_distribution_per_row():
    logits = np.random.default_rng(0).standard_normal((3, 7)).astype(np.float32) * 5
    p = probabilities(logits)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    assert (np.argsort(p, axis=1) == np.argsort(logits, axis=1)).all()


def test_draws_follow_the_spec_vectors():
    """Pinned, and derived from the written Philox reference: word j of key (seed, 0) as a
    53-bit uniform picks token j. A change here changes every discrete-prompt run."""
    uniform = probabilities(np.zeros((4, 10), np.float32))
    words = reference_block(12345, 0, 0)
    assert sample(12345, uniform).tolist() == [int((w >> 11) * 2.0**-53 * 10) for w in words]
    assert sample(12345, uniform).tolist() == [6, 7, 7, 1]
    skewed = probabilities(np.array([[0, 0, 8.0], [8.0, 0, 0]], np.float32))
    assert sample(7, skewed).tolist() == [2, 0]


def test_draws_match_their_probabilities():
    p = probabilities(np.log(np.array([[0.1, 0.2, 0.7]], np.float32)))
    picks = np.array([sample(seed, p)[0] for seed in range(3000)])
    np.testing.assert_allclose(np.bincount(picks, minlength=3) / 3000, [0.1, 0.2, 0.7],
                               atol=0.03)


def test_advantages_are_centred_and_need_two_draws():
    a = advantages([1.0, 2.0, 3.0])
    assert a == pytest.approx((-1.5, 0.0, 1.5))
    with pytest.raises(ProtocolError):
        advantages([1.0])


def test_a_commit_moves_probability_to_the_draw_with_the_lower_loss():
    logits = np.zeros((1, 4), np.float32)
    p = probabilities(logits)
    seeds = [s for s in range(100) if sample(s, p)[0] in (0, 3)][:2]
    picks = [int(sample(s, p)[0]) for s in seeds]
    losses = [0.2 if pick == picks[0] else 0.9 for pick in picks]
    if picks[0] == picks[1]:
        pytest.skip("the two draws coincide")  # pragma: no cover - seeds chosen to differ
    commit = aggregate(0, [ClientResult(tuple(seeds), advantages(losses), 10)], lr=1.0)
    apply_commit([logits], commit, DirectionSpec(CATEGORICAL))
    after = probabilities(logits)[0]
    assert after[picks[0]] > 0.25 > after[picks[1]]


def test_categorical_steps_have_no_fixed_direction():
    with pytest.raises(ProtocolError, match="categorical"):
        axpy([np.zeros(4, np.float32)], 1.0, DirectionSpec(CATEGORICAL), 1)
    with pytest.raises(ProtocolError):
        apply_policy_commit([np.zeros(4, np.float32)], Commit(0, ((1, 1.0),)))


# --- federated rounds against an ONNX black box --------------------------------------------

torch = pytest.importorskip("torch", reason="the prompt export needs the orchestrator extra")

VOCAB, TEXT, TOKENS = 24, 6, 2
CANDIDATES = np.arange(16, 24)


def toy_world(tmp_path):
    """Bag-of-words black box whose head is biased towards class 0: the right words fix it."""
    from export.prompt import export_discrete_prompt
    from tests.blackboxes import token_blackbox
    rng = np.random.default_rng(3)
    emb = np.zeros((VOCAB, 2), np.float32)
    emb[2:9, 0], emb[9:16, 1] = 1.0, 1.0  # words 2-8 mean class 0, 9-15 class 1
    emb[16:24] = rng.standard_normal((8, 2)) * 0.05
    emb[20] = [0.0, 4.0]  # the one candidate that offsets the bias
    head = np.array([[4.0, 0.0], [0.0, 1.0]], np.float32)
    box = token_blackbox(tmp_path / "bb", VOCAB, TEXT + TOKENS, emb, head)
    model = tmp_path / "prompt"
    export_discrete_prompt(model, CANDIDATES, TOKENS, TEXT, 2)
    shards = []
    for _ in range(3):
        y = rng.integers(0, 2, 30)
        words = np.where(y[:, None] == 0, rng.integers(2, 9, (30, TEXT)),
                         rng.integers(9, 16, (30, TEXT)))
        words[:, :3] = rng.integers(2, 16, (30, 3))  # noisy: half the words are random
        words[:, 0] = 1  # a [CLS]-like first token the prompt goes after
        shards.append((words.astype(np.float32), y))
    return box, model, shards


def test_federated_policy_rounds_find_a_better_prompt_and_stay_bit_exact(tmp_path):
    from edge_agent.blackbox import LocalBlackBox
    from edge_agent.prompt_engine import DiscretePromptEngine
    from edge_agent.shard import Shard
    from protocols.manifest import load_manifest, read_weights
    box_dir, model, shards = toy_world(tmp_path)
    spec = DirectionSpec(CATEGORICAL)
    box = LocalBlackBox(box_dir)
    engines = [DiscretePromptEngine(model, Shard(x, y), box, spec) for x, y in shards]
    _, server = read_weights(model, load_manifest(model))
    x_all = np.concatenate([x for x, _ in shards])
    y_all = np.concatenate([y for _, y in shards])
    union = DiscretePromptEngine(model, Shard(x_all, y_all), box, spec)
    start_loss = np.mean([union.evaluate(choice=c)[0] for c in
                          np.stack(np.meshgrid(range(8), range(8))).reshape(2, -1).T])
    journal = []
    for version in range(25):
        results = []
        for i, engine in enumerate(engines):
            seeds = tuple(derive_seed(5, version, i, j) for j in range(6))
            out = engine.round(seeds)
            assert out.queries == 6 and len(out.scalars) == 6
            results.append(ClientResult(seeds, out.scalars, out.samples))
        commit = aggregate(version, results, lr=4.0)
        apply_commit(server, commit, spec)
        journal.append(commit)
        for engine in engines:
            assert engine.apply([CommitMessage(commit, fingerprint(server))]) == \
                fingerprint(server)
    replayed = [np.zeros((TOKENS, len(CANDIDATES)), np.float32)]
    for commit in journal:
        apply_commit(replayed, commit, spec)
    assert fingerprint(replayed) == fingerprint(server)
    union.weights.assign(server)
    tuned_loss, _ = union.evaluate()
    assert tuned_loss < start_loss - 0.03
    assert 4 in best(server[0])  # candidate 20 (index 4) is the one that fixes the bias


def test_the_prompt_graph_writes_the_drawn_tokens_after_the_first(tmp_path):
    from edge_agent.blackbox import LocalBlackBox
    from edge_agent.prompt_engine import DiscretePromptEngine
    from edge_agent.shard import Shard
    box_dir, model, shards = toy_world(tmp_path)
    x, y = shards[0]
    engine = DiscretePromptEngine(model, Shard(x, y), LocalBlackBox(box_dir),
                                  DirectionSpec(CATEGORICAL))
    out = engine.prompted(x[:3], np.array([4, 0]))
    assert out.dtype == np.int64 and out.shape == (3, TEXT + TOKENS)
    assert (out[:, 0] == 1).all() and (out[:, 1:3] == [20, 16]).all()
    assert (out[:, 3:] == x[:3, 1:]).all()
