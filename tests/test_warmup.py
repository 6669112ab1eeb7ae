"""Step 1 warm-up: FedAvg / FedAdam over the high-resource clients, on the real digits set."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="warm-up needs the orchestrator extra")
datasets = pytest.importorskip("sklearn.datasets", reason="the digits set ships with sklearn")

from torch import nn  # noqa: E402

from orchestrator.train.fedavg import (  # noqa: E402
    RoundStats,
    Warmup,
    WarmupConfig,
    WarmupError,
    evaluate,
    model_bytes,
)
from orchestrator.train.zoo import build_model  # noqa: E402

HIGH = [0, 2, 4]
FAST = dict(client_lr=0.1, client_momentum=0.9, batch_size=16, local_epochs=2)


@pytest.fixture(scope="module")
def digits():
    """Six client shards of the training part and a held-out test part."""
    data = datasets.load_digits()
    x = (data.images / 16).astype(np.float32)[:, None]
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    clients = [(x[:1400][i::6], y[:1400][i::6]) for i in range(6)]
    return clients, (x[1400:], y[1400:])


def cnn(seed: int = 0) -> nn.Module:
    return build_model("cnn", 10, in_channels=1, image_size=8, width=8, seed=seed)


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)).eval()


def all_tensors(warmup: Warmup) -> dict[str, torch.Tensor]:
    state = warmup.state_dict()
    out = {f"model.{k}": v for k, v in state["model"].items()}
    for kind, tensors in state["moments"].items():
        out.update({f"{kind}.{k}": v for k, v in tensors.items()})
    return out


def assert_same_bits(a: Warmup, b: Warmup) -> None:
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


# --- learning ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy,server_lr", [("fedavg", 1.0), ("fedadam", 0.05)])
def test_warmup_learns_digits_from_scratch(digits, strategy, server_lr):
    clients, (x_test, y_test) = digits
    warmup = Warmup(cnn(), clients, HIGH,
                    WarmupConfig(strategy=strategy, server_lr=server_lr, **FAST), seed=3)
    _, before = evaluate(warmup.model, x_test, y_test)
    stats = warmup.run(10)
    loss, after = evaluate(warmup.model, x_test, y_test)
    assert before < 0.25 and after > 0.6, (before, after)
    assert stats[-1].train_loss < stats[0].train_loss and np.isfinite(loss)
    assert [s.round for s in stats] == list(range(10)) and warmup.next_round == 10


def test_group_norm_model_trains_with_no_buffers(digits):
    clients, _ = digits
    model = build_model("resnet18-gn", 10, in_channels=1, image_size=8, width=2, seed=0)
    assert not list(model.buffers())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = Warmup(model, clients, [1], WarmupConfig(local_epochs=1)).run_round(0)
    assert np.isfinite(stats.train_loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- aggregation ---------------------------------------------------------------------------


def uneven_clients(digits):
    clients, _ = digits
    return [(x[:n], y[:n]) for (x, y), n in zip(clients, (50, 7, 120, 9, 33, 5))]


def single_client_state(shards, client: int, config: WarmupConfig) -> dict[str, torch.Tensor]:
    """The local model one client ends its round with: its stream depends only on
    (seed, round, client), so a run where it is the only participant trains it identically."""
    warmup = Warmup(bn_net(), shards, [client], config, seed=5)
    warmup.run_round(0)
    return warmup.local_model.state_dict()


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_batchnorm_statistics_are_the_sample_weighted_average(digits, strategy):
    shards = uneven_clients(digits)
    config = WarmupConfig(strategy=strategy, client_lr=0.05, batch_size=8, local_epochs=2)
    warmup = Warmup(bn_net(), shards, HIGH, config, seed=5)
    warmup.run_round(0)
    sizes = {c: len(shards[c][1]) for c in HIGH}
    locals_ = {c: single_client_state(shards, c, config) for c in HIGH}
    state = warmup.model.state_dict()
    total = sum(sizes.values())
    for key in ("1.running_mean", "1.running_var"):
        expected = sum(locals_[c][key] * (sizes[c] / total) for c in HIGH)
        torch.testing.assert_close(state[key], expected, rtol=0, atol=1e-6)
    # epochs x batches; a trailing one-sample batch is dropped (no BatchNorm statistics)
    batches = {c: 2 * (sizes[c] // 8 + (sizes[c] % 8 > 1)) for c in HIGH}
    assert sizes[4] % 8 == 1
    assert [int(locals_[c]["1.num_batches_tracked"]) for c in HIGH] == list(batches.values())
    assert int(state["1.num_batches_tracked"]) == round(
        sum(batches[c] * sizes[c] / total for c in HIGH))
    weight = sum(locals_[c]["0.weight"] * (sizes[c] / total) for c in HIGH)
    if strategy == "fedavg":  # server_lr 1: the parameters are the weighted average too
        torch.testing.assert_close(state["0.weight"], weight, rtol=0, atol=1e-6)
    else:  # FedAdam moved the parameters by its own rule, not to the average
        assert not torch.allclose(state["0.weight"], weight, atol=1e-6)
        assert all(v.abs().sum() > 0 for v in warmup.moments["m"].values())


def test_fedadam_first_step_follows_reddi_et_al(digits):
    """m = (1-b1) d, v = b2 tau^2 + (1-b2) d^2, w += lr m / (sqrt(v) + tau), d = mean delta."""
    shards = uneven_clients(digits)
    config = WarmupConfig(strategy="fedadam", client_lr=0.05, batch_size=8, local_epochs=1,
                          server_lr=0.02, beta1=0.8, beta2=0.95, tau=0.01)
    start = bn_net().state_dict()
    warmup = Warmup(bn_net(), shards, [0, 2], config, seed=5)
    warmup.run_round(0)
    sizes = {c: len(shards[c][1]) for c in (0, 2)}
    locals_ = {c: single_client_state(shards, c, config) for c in (0, 2)}
    delta = sum((locals_[c]["5.weight"] - start["5.weight"]) * (sizes[c] / sum(sizes.values()))
                for c in (0, 2))
    m = 0.2 * delta
    v = 0.95 * 0.01**2 + 0.05 * delta**2
    expected = start["5.weight"] + 0.02 * m / (v.sqrt() + 0.01)
    torch.testing.assert_close(warmup.model.state_dict()["5.weight"], expected,
                               rtol=0, atol=1e-6)


# --- participation and accounting ------------------------------------------------------


def test_only_sampled_high_resource_clients_take_part(digits):
    clients, _ = digits
    config = WarmupConfig(clients_per_round=2, local_epochs=1, batch_size=64)
    warmup = Warmup(cnn(), clients, HIGH, config, seed=1)
    stats = warmup.run(8)
    seen = set()
    for s in stats:
        assert isinstance(s, RoundStats) and len(s.participants) == 2
        assert set(s.participants) <= set(HIGH) and list(s.participants) == sorted(s.participants)
        assert s.samples == sum(len(clients[c][1]) for c in s.participants)
        assert s.uplink_bytes == s.downlink_bytes == model_bytes(warmup.model) > 0
        assert s.seconds > 0 and s.to_dict()["participants"] == list(s.participants)
        seen.add(s.participants)
    assert len(seen) > 1  # the sample changes from round to round
    all_high = Warmup(cnn(), clients, HIGH, WarmupConfig(local_epochs=1)).run_round(0)
    assert all_high.participants == tuple(HIGH)


def test_model_bytes_counts_float32_parameters_and_buffers():
    model = bn_net()
    params = sum(p.numel() for p in model.parameters())
    assert model_bytes(model) == 4 * (params + 4 + 4) + 8  # mean, var, one int64 counter


# --- determinism and resume ------------------------------------------------------------


@pytest.mark.parametrize("strategy,make", [("fedadam", cnn), ("fedavg", bn_net)])
def test_resume_from_checkpoint_gives_the_same_bits(digits, tmp_path, strategy, make):
    clients, _ = digits
    config = WarmupConfig(strategy=strategy, clients_per_round=2, client_momentum=0.9,
                          batch_size=32, local_epochs=1, client_lr=0.05)
    straight = Warmup(make(), clients, HIGH, config, seed=7)
    straight.run(4)
    first = Warmup(make(), clients, HIGH, config, seed=7)
    first.run(2)
    first.save_checkpoint(tmp_path / "ckpt" / "warmup.pt")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["warmup.pt"]
    resumed = Warmup(make(seed=99), clients, HIGH, config, seed=7)
    resumed.load_checkpoint(tmp_path / "ckpt" / "warmup.pt")
    assert resumed.next_round == 2
    resumed.run(2)
    assert_same_bits(straight, resumed)
    assert resumed.next_round == straight.next_round == 4


def test_same_seed_same_bits_other_seed_other_bits(digits):
    clients, _ = digits
    config = WarmupConfig(strategy="fedadam", clients_per_round=2, local_epochs=1)
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        runs[name] = Warmup(cnn(), clients, HIGH, config, seed=seed)
        runs[name].run(2)
    assert_same_bits(runs["a"], runs["b"])
    ta, tc = all_tensors(runs["a"]), all_tensors(runs["c"])
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_round_index_must_continue_the_run(digits):
    clients, _ = digits
    warmup = Warmup(cnn(), clients, HIGH, WarmupConfig(local_epochs=1))
    with pytest.raises(WarmupError, match="next round is 0"):
        warmup.run_round(1)


def test_mismatched_checkpoint_is_refused_and_changes_nothing(digits, tmp_path):
    clients, _ = digits
    adam = Warmup(cnn(), clients, HIGH, WarmupConfig(strategy="fedadam", local_epochs=1), seed=1)
    adam.run_round(0)
    adam.save_checkpoint(tmp_path / "a.pt")
    cases = [(Warmup(cnn(), clients, HIGH, WarmupConfig(), seed=1), "strategy"),
             (Warmup(cnn(), clients, HIGH, WarmupConfig(strategy="fedadam"), seed=2), "seed"),
             (Warmup(build_model("cnn", 10, 1, 8, width=4), clients, HIGH,
                     WarmupConfig(strategy="fedadam"), seed=1), "shape")]
    for target, reason in cases:
        before = {k: v.clone() for k, v in all_tensors(target).items()}
        with pytest.raises(WarmupError, match=reason):
            target.load_checkpoint(tmp_path / "a.pt")
        after = all_tensors(target)
        assert all(torch.equal(before[k], after[k]) for k in before) and target.next_round == 0
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WarmupError, match="cannot read"):
        adam.load_checkpoint(tmp_path / "junk.pt")


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("strategy", "fedprox"), ("client_lr", 0.0), ("client_lr", float("nan")),
    ("client_momentum", 1.0), ("weight_decay", -1e-4), ("local_epochs", 0),
    ("batch_size", 2.5), ("server_lr", -1.0), ("beta1", 1.0), ("beta2", -0.1), ("tau", 0.0),
    ("clients_per_round", 0), ("device", "warp-drive"), ("local_epochs", True),
])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field if field != "device" else "device"):
        WarmupConfig(**{field: value})


def test_config_defaults_follow_the_paper():
    config = WarmupConfig()
    assert (config.strategy, config.local_epochs, config.batch_size) == ("fedavg", 3, 64)
    assert config.server_lr == 1.0 and WarmupConfig(strategy="fedadam").server_lr == 0.01
    assert WarmupConfig(strategy="fedadam", server_lr=0.1).server_lr == 0.1


@pytest.mark.parametrize("high,config,match", [
    ([], WarmupConfig(), "at least one"),
    ([0, 0], WarmupConfig(), "repeat"),
    ([6], WarmupConfig(), "not one of the 6"),
    ([0, 1], WarmupConfig(clients_per_round=3), "exceeds"),
])
def test_warmup_rejects_bad_client_sets(digits, high, config, match):
    clients, _ = digits
    with pytest.raises(ValueError, match=match):
        Warmup(cnn(), clients, high, config)


def test_warmup_rejects_bad_shards(digits):
    clients, _ = digits
    x, y = clients[0]
    for shard, match in [((x[:, 0], y), "N x C x H x W"), ((x, y[:-1]), "labels"),
                         ((x, y.astype(np.float32)), "integers")]:
        with pytest.raises(ValueError, match=match):
            Warmup(cnn(), [shard, clients[1]], [1])
    with pytest.raises(ValueError, match="no samples"):
        Warmup(cnn(), [(x[:0], y[:0]), clients[1]], [0])
    with pytest.raises(ValueError, match="seed"):
        Warmup(cnn(), clients, HIGH, seed=-1)


# --- evaluation ------------------------------------------------------------------------


def test_evaluate_matches_a_direct_computation_and_keeps_the_mode(digits):
    _, (x, y) = digits
    model = cnn().train()
    loss, accuracy = evaluate(model, x, y, batch_size=37)
    assert model.training
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x))
    expected = nn.functional.cross_entropy(logits, torch.from_numpy(y)).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert accuracy == (logits.argmax(1).numpy() == y).mean()
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, x[:0], y[:0])
