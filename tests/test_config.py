"""The run configuration: loading, overrides, checks and the TOML round trip."""

from __future__ import annotations

import math
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest

from orchestrator.config import (
    CIFAR10_URL,
    SECTIONS,
    Config,
    ConfigError,
    DataSection,
    FleetSection,
    ModelSection,
    RunSection,
    WarmupSection,
    ZoSection,
    load_config,
    parse_config,
)
from protocols.errors import ZoError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def write(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error(data: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.toml", overrides)
    return str(info.value)


# ---------------------------------------------------------------------------- examples


def test_quickstart_example_loads(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    c = load_config(EXAMPLES / "quickstart.toml")
    assert (c.run.name, c.run.out) == ("quickstart", str(tmp_path / "runs" / "quickstart"))
    assert (c.data.dataset, c.data.clients, c.data.alpha, c.data.split) == (
        "digits", 10, 0.5, "30/70")
    assert (c.model.name, c.model.width) == ("cnn", 16)
    w = c.warmup
    assert (w.rounds, w.strategy, w.client_lr, w.local_epochs, w.batch_size) == (
        15, "fedavg", 0.1, 2, 32)
    z = c.zo
    assert (z.rounds, z.directions, z.eps, z.lr, z.micro_batch, z.agent_threads) == (
        100, 4, 1e-3, 1e-2, 64, 1)
    assert c.eval.every == 10


def test_cifar10_example_loads_with_the_archive_in_place(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(b"")
    c = load_config(EXAMPLES / "cifar10-resnet18.toml")
    assert c.data == replace(c.data, dataset="cifar10", clients=50, alpha=0.1, split="30/70",
                             path=str(tmp_path / "data" / "cifar-10-python.tar.gz"))
    assert c.model.name == "resnet18-gn"
    assert (c.warmup.rounds, c.warmup.local_epochs, c.warmup.batch_size) == (200, 3, 64)
    assert (c.zo.rounds, c.eval.every) == (300, 10)


# ---------------------------------------------------------------------------- defaults


def test_empty_file_gives_every_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = load_config(write(tmp_path, ""))
    assert c == replace(Config(), run=replace(RunSection(), out=str(tmp_path / "runs/zowarmup")))
    assert parse_config({}) == Config()


def test_default_values_match_the_interface():
    c = Config()
    assert c.run == RunSection("zowarmup", "runs/zowarmup", 0, "zowarmup", "auto")
    assert c.data == DataSection("digits", "", 10, 0.5, "30/70", 0.2)
    assert c.model == ModelSection("cnn", None)
    assert (c.warmup.rounds, c.warmup.strategy, c.warmup.server_lr, c.warmup.tau) == (
        20, "fedavg", None, 1e-3)
    assert (c.zo.rounds, c.zo.directions, c.zo.distribution, c.zo.quorum, c.zo.deadline_s) == (
        30, 1, "rademacher", 1.0, 120.0)
    assert (c.eval.every, c.eval.batch_size) == (1, 512)
    assert c.fleet == FleetSection(None, "", "", "", "", 120.0)


def test_sections_are_frozen():
    with pytest.raises(AttributeError):
        Config().zo.rounds = 3  # type: ignore[misc]


def test_int_is_accepted_where_a_float_is_expected():
    c = parse_config({"zo": {"lr": 1, "deadline_s": 30}})
    assert c.zo.lr == 1.0 and isinstance(c.zo.lr, float)
    assert isinstance(c.zo.deadline_s, float)


def test_alpha_iid_and_inf_mean_iid():
    assert parse_config({"data": {"alpha": "iid"}}).data.alpha == math.inf
    assert parse_config({"data": {"alpha": "IID"}}).data.alpha == math.inf
    assert parse_config({"data": {"alpha": math.inf}}).data.alpha == math.inf


# ---------------------------------------------------------------------------- overrides


def test_overrides_of_each_type(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, "[zo]\nrounds = 3\n")
    c = load_config(path, [
        "zo.rounds=5",                         # int
        "data.alpha=0.1",                      # float
        "zo.eps = 2e-4",                       # spaces around '='
        "run.out=/tmp/x",                      # bare string
        "fleet.broker=mqtt://h:1883",          # bare string with ':' and '/'
        'run.name="quoted"',                   # TOML string
        "run.device=cuda:1",
        "model.width=8",                       # optional int
        "warmup.server_lr=1",                  # optional float given an int
        "data.split=50/50",
    ])
    assert c.zo.rounds == 5 and c.data.alpha == 0.1 and c.zo.eps == 2e-4
    assert c.run.out == "/tmp/x" and c.fleet.broker == "mqtt://h:1883"
    assert c.run.name == "quoted" and c.run.device == "cuda:1"
    assert c.model.width == 8 and c.warmup.server_lr == 1.0 and c.data.split == "50/50"


def test_overrides_apply_in_order_and_reach_absent_sections():
    c = parse_config({}, overrides=["zo.rounds=5", "zo.rounds=7", "eval.every=2"])
    assert (c.zo.rounds, c.eval.every) == (7, 2)


def test_override_special_values():
    c = parse_config({"model": {"width": 8}, "zo": {"clients_per_round": 3}},
                     overrides=["data.alpha=iid", "model.width=none",
                                "zo.clients_per_round=None", "run.name=2024"])
    assert c.data.alpha == math.inf
    assert c.model.width is None and c.zo.clients_per_round is None
    assert c.run.name == "2024"  # a string field takes the text as it is
    assert parse_config({}, overrides=["data.alpha=inf"]).data.alpha == math.inf
    assert parse_config({"fleet": {"broker": "mqtt://h:1"}},
                        overrides=["fleet.broker="]).fleet.broker == ""


def test_override_type_error_names_the_override():
    msg = error({}, ("zo.rounds=many",))
    assert "zo.rounds" in msg and "'zo.rounds=many'" in msg and "integer" in msg


@pytest.mark.parametrize("bad", ["zo.rounds", "rounds=5", "zo.rounds.x=5", "=5", ".=1"])
def test_malformed_override_says_the_expected_form(bad):
    msg = error({}, (bad,))
    assert "SECTION.FIELD=VALUE" in msg and "test.toml" in msg


def test_override_of_unknown_field_lists_valid_names():
    msg = error({}, ("zo.round=5",))
    assert "unknown field zo.round" in msg and "'rounds'" in msg and "directions" in msg
    msg = error({}, ("z.rounds=5",))
    assert "unknown section [z]" in msg and "run, data, model, warmup, zo, eval, fleet" in msg


# ---------------------------------------------------------------------------- round trip


def roundtrip(c: Config) -> Config:
    return parse_config(tomllib.loads(c.to_toml()), "roundtrip")


def test_to_toml_round_trips_the_defaults_and_examples(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert roundtrip(Config()) == Config()
    c = load_config(EXAMPLES / "quickstart.toml")
    assert roundtrip(c) == c
    assert load_config(write(tmp_path, c.to_toml())) == c


def test_to_toml_round_trips_awkward_values():
    c = parse_config({
        "run": {"name": "r-1_x", "out": 'runs/"odd" \\dir\t\u00e9\x7f', "seed": 2**62},
        "data": {"alpha": "iid", "test_fraction": 0.1 + 0.2},
        "model": {"width": 3},
        "warmup": {"client_lr": 1e-7, "weight_decay": 5e-324, "server_lr": 1.0},
        "zo": {"eps": 1 / 3, "lr": 12345678901234567.0, "clients_per_round": 2},
        "fleet": {"broker": "mqtts://[::1]:8883", "username": "u", "password": 'p"\n',
                  "local_agents": 0},
    })
    back = roundtrip(c)
    assert back == c
    assert back.data.alpha == math.inf and "alpha = inf" in c.to_toml()
    assert back.zo.eps == 1 / 3 and back.data.test_fraction == 0.1 + 0.2


def test_none_fields_are_left_out_and_come_back_as_none():
    c = Config()
    d = c.to_dict()
    assert "width" not in d["model"] and "server_lr" not in d["warmup"]
    assert "clients_per_round" not in d["zo"] and "local_agents" not in d["fleet"]
    assert set(d) == set(SECTIONS)
    assert roundtrip(c).model.width is None


def test_to_dict_holds_every_set_field():
    c = parse_config({"model": {"width": 4}, "fleet": {"local_agents": 2}})
    d = c.to_dict()
    for name, cls in SECTIONS.items():
        expected = {f.name for f in fields(cls) if getattr(getattr(c, name), f.name) is not None}
        assert set(d[name]) == expected
    assert d["model"]["width"] == 4 and d["fleet"]["local_agents"] == 2


# ---------------------------------------------------------------------------- unknown names


def test_unknown_section_lists_valid_sections():
    msg = error({"warmpu": {"rounds": 3}})
    assert "unknown section [warmpu]" in msg and "'warmup'" in msg
    assert "run, data, model, warmup, zo, eval, fleet" in msg and "test.toml" in msg


def test_unknown_field_lists_valid_fields():
    msg = error({"zo": {"direction": 4}})
    assert "unknown field zo.direction" in msg and "'directions'" in msg
    for name in (f.name for f in fields(ZoSection)):
        assert name in msg
    msg = error({"warmup": {"lr": 0.1}})
    assert "warmup.lr" in msg and "client_lr" in msg and "server_lr" in msg


def test_a_section_must_be_a_table():
    assert "[zo] must be a table" in error({"zo": 5})


# ---------------------------------------------------------------------------- types


@pytest.mark.parametrize("section, key, value, kind", [
    ("zo", "rounds", True, "integer"),           # bool is never an int
    ("zo", "rounds", 5.0, "integer"),
    ("zo", "rounds", "5", "integer"),
    ("zo", "lr", False, "number"),               # nor a float
    ("zo", "lr", "0.1", "number"),
    ("run", "name", 7, "string"),
    ("data", "split", 30, "string"),
    ("model", "width", 16.0, "integer"),
    ("warmup", "server_lr", [1.0], "number"),
    ("fleet", "local_agents", True, "integer"),
])
def test_wrong_types_are_refused(section, key, value, kind):
    msg = error({section: {key: value}})
    assert f"{section}.{key}" in msg and f"must be a{'n' if kind == 'integer' else ''} {kind}" \
        in msg and "allowed:" in msg


def test_alpha_refuses_other_words():
    assert "data.alpha" in error({"data": {"alpha": "skewed"}})


# ---------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("section, key, value", [
    ("run", "name", ""), ("run", "name", "has space"), ("run", "name", "a.b"),
    ("run", "name", "x" * 65), ("run", "name", "-lead"),
    ("run", "out", ""), ("run", "seed", -1), ("run", "method", "fedavg"),
    ("run", "device", "gpu"), ("run", "device", "cuda:x"),
    ("data", "dataset", "mnist"), ("data", "clients", 0), ("data", "alpha", 0),
    ("data", "alpha", -0.5), ("data", "alpha", math.nan), ("data", "split", "30/60"),
    ("data", "split", "30"), ("data", "split", "30.5/69.5"), ("data", "split", "-10/110"),
    ("data", "test_fraction", 0), ("data", "test_fraction", 1), ("model", "width", 0),
    ("warmup", "rounds", -1), ("warmup", "strategy", "fedprox"), ("warmup", "client_lr", 0),
    ("warmup", "client_momentum", 1.0), ("warmup", "weight_decay", -1e-4),
    ("warmup", "local_epochs", 0), ("warmup", "batch_size", 0), ("warmup", "server_lr", 0),
    ("warmup", "beta1", 1), ("warmup", "beta2", -0.1), ("warmup", "tau", 0),
    ("warmup", "clients_per_round", 0), ("warmup", "client_lr", math.inf),
    ("zo", "rounds", -1), ("zo", "directions", 0), ("zo", "directions", 1025),
    ("zo", "eps", 0), ("zo", "eps", math.inf), ("zo", "lr", -1e-3), ("zo", "local_steps", 0),
    ("zo", "local_lr", -1.0), ("zo", "distribution", "uniform"), ("zo", "scale", 0),
    ("zo", "clients_per_round", 0), ("zo", "quorum", 0), ("zo", "quorum", 1.5),
    ("zo", "deadline_s", 0), ("zo", "micro_batch", 0), ("zo", "agent_threads", 0),
    ("zo", "snapshot_every", 0), ("eval", "every", 0), ("eval", "batch_size", 0),
    ("fleet", "local_agents", -1), ("fleet", "broker", "tcp://h:1883"),
    ("fleet", "broker", "mqtt://"), ("fleet", "broker", "mqtt://h:99999"),
    ("fleet", "broker", "mqtt://u:p@h:1883"), ("fleet", "broker", "mqtt://h:1883/x"),
    ("fleet", "join_timeout_s", 0),
])
def test_out_of_range_values_are_refused(section, key, value):
    msg = error({section: {key: value}})
    assert f"{section}.{key}" in msg and "allowed:" in msg and "test.toml" in msg


def test_edges_of_ranges_are_accepted():
    c = parse_config({
        "run": {"name": "a" * 64, "device": "cuda:0", "method": "zo-scratch"},
        "data": {"split": "0/100", "clients": 1, "test_fraction": 0.99},
        "warmup": {"rounds": 0, "client_momentum": 0.0},
        "zo": {"rounds": 0, "directions": 1024, "quorum": 1.0, "local_lr": 0},
        "fleet": {"local_agents": 0, "broker": "mqtts://broker.example:8883"},
    })
    assert c.zo.directions == 1024 and c.data.split == "0/100"
    assert parse_config({"data": {"split": " 100 / 0 "}}).data.split == " 100 / 0 "


# ---------------------------------------------------------------------------- cross-field


def test_high_res_only_needs_high_resource_clients():
    msg = error({"run": {"method": "high-res-only"}, "data": {"split": "0/100"}})
    assert "data.split" in msg and "high-res-only" in msg
    msg = error({"data": {"split": "0/100"}})
    assert "zo-scratch" in msg
    assert parse_config({"run": {"method": "zo-scratch"},
                         "data": {"split": "0/100"}}).data.split == "0/100"


def test_zo_scratch_ignores_the_warmup_section():
    c = parse_config({"run": {"method": "zo-scratch"},
                      "warmup": {"rounds": 50, "clients_per_round": 9},
                      "data": {"clients": 10, "split": "10/90"}})
    assert c.warmup.rounds == 50  # kept as written; the run skips the warm-up


def test_local_agents_cannot_exceed_clients():
    msg = error({"data": {"clients": 4}, "fleet": {"local_agents": 5}})
    assert "fleet.local_agents" in msg and "data.clients = 4" in msg
    assert parse_config({"data": {"clients": 4},
                         "fleet": {"local_agents": 4}}).fleet.local_agents == 4


def test_clients_per_round_cannot_exceed_participants():
    msg = error({"data": {"clients": 4}, "zo": {"clients_per_round": 5}})
    assert "zo.clients_per_round" in msg
    # 10 clients at 30/70: 3 high-resource clients take part in the warm-up
    msg = error({"warmup": {"clients_per_round": 4}})
    assert "warmup.clients_per_round" in msg and "3 high-resource" in msg
    assert parse_config({"warmup": {"clients_per_round": 3}}).warmup.clients_per_round == 3


def test_seeds_per_client_are_bounded():
    msg = error({"zo": {"directions": 64, "local_steps": 32}})
    assert "zo.directions" in msg and "1024" in msg


def test_unknown_model_lists_the_zoo():
    msg = error({"model": {"name": "resnet50"}})
    assert "model.name" in msg and "cnn" in msg and "resnet18-gn" in msg


def test_cifar10_without_a_path_or_archive_points_at_the_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = error({"data": {"dataset": "cifar10"}})
    assert "data.path" in msg and "required" in msg and CIFAR10_URL in msg
    msg = error({"data": {"dataset": "cifar10", "path": "nowhere/cifar.tar.gz"}})
    assert "does not exist" in msg and CIFAR10_URL in msg and str(tmp_path) in msg


def test_data_path_is_relative_to_the_current_directory(tmp_path, monkeypatch):
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "shard.npz").write_bytes(b"")
    path = write(config_dir, '[data]\ndataset = "npz"\npath = "shard.npz"\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path)  # shard.npz sits next to the config, not in the current directory
    monkeypatch.chdir(config_dir)
    c = load_config(path)
    assert c.data.path == str(config_dir / "shard.npz")
    assert "npz file" in error({"data": {"dataset": "npz", "path": str(config_dir)}})


def test_fleet_credentials_need_an_external_broker(tmp_path):
    assert "fleet.username" in error({"fleet": {"username": "u"}})
    assert "fleet.password" in error({"fleet": {"broker": "mqtt://h:1", "password": "p"}})
    msg = error({"fleet": {"broker": "mqtt://h:1883", "tls_ca": "ca.pem"}})
    assert "fleet.tls_ca" in msg and "mqtts://" in msg
    msg = error({"fleet": {"broker": "mqtts://h:8883", "tls_ca": str(tmp_path / "no.pem")}})
    assert "fleet.tls_ca" in msg and "not a file" in msg
    (tmp_path / "ca.pem").write_text("x")
    c = parse_config({"fleet": {"broker": "mqtts://h:8883", "username": "u", "password": "p",
                                "tls_ca": str(tmp_path / "ca.pem")}})
    assert c.fleet.tls_ca == str(tmp_path / "ca.pem")


# ---------------------------------------------------------------------------- files


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.toml")
    bad = write(tmp_path, "[zo\nrounds = 3\n", "bad.toml")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)
    typo = write(tmp_path, "[zo]\nrouns = 3\n", "typo.toml")
    with pytest.raises(ConfigError, match=r"typo\.toml: unknown field zo\.rouns"):
        load_config(typo)


def test_config_error_is_a_zo_error_with_the_field():
    with pytest.raises(ZoError) as info:
        parse_config({"zo": {"rounds": -1}})
    assert isinstance(info.value, ConfigError) and info.value.field == "zo.rounds"
    assert str(info.value).startswith("config: zo.rounds")


def test_sections_default_independently():
    c = parse_config({"zo": {"rounds": 3}})
    assert c.warmup == WarmupSection() and c.zo == replace(ZoSection(), rounds=3)


# ---------------------------------------------------------------------------- docs


def test_docs_describe_every_field_and_their_full_example_loads():
    text = (EXAMPLES.parent / "docs" / "config.md").read_text()
    for name, cls in SECTIONS.items():
        table = text.split(f"## `[{name}]`", 1)[1].split("\n## ", 1)[0]
        for f in fields(cls):
            assert f"| `{f.name}` |" in table, f"{name}.{f.name} is not documented"
    example = text.split("## A full example", 1)[1].split("```toml", 1)[1].split("```", 1)[0]
    c = parse_config(tomllib.loads(example), "docs/config.md")
    assert (c.run.name, c.model.width) == ("my-run", 16)
