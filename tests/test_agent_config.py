"""The agent's settings: a TOML file, the environment and flags, in that order of strength;
strict checks with errors that name the source; the broker password from a file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edge_agent.cli import main
from edge_agent.settings import (
    CONFIG_ENV,
    PASSWORD_ENV,
    PASSWORD_FILE_ENV,
    SETTINGS,
    ConfigError,
    load_file,
    resolve,
    resolve_password,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No ZOWARMUP_ setting of the machine running the tests leaks in."""
    for name in [s.env for s in SETTINGS.values()] + [CONFIG_ENV, PASSWORD_ENV,
                                                      PASSWORD_FILE_ENV, "STATE_DIRECTORY"]:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def board(tmp_path) -> Path:
    """A board's /etc/zowarmup: a shard, a password file (0600) and agent.toml."""
    np.savez(tmp_path / "shard.npz", x=np.zeros((3, 1, 2, 2), np.float32), y=np.zeros(3, np.int64))
    secret = tmp_path / "password"
    secret.write_text("s3cret pass\n")
    secret.chmod(0o600)
    (tmp_path / "agent.toml").write_text(
        '# a board\nbroker = "mqtt://broker.lan:1883"\ndata = "shard.npz"\nid = "pi-7"\n'
        'run = "cifar"\nthreads = 3\nmemory_budget = 400\nstrategy = "inputs"\n'
        'password_file = "password"\n')
    return tmp_path


def check_config(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["run", "--check-config", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


def shown(output: str) -> dict[str, tuple[str, str]]:
    """`key = value    # source` lines as {key: (value, source)}."""
    lines = (line.split(" = ", 1) for line in output.splitlines() if " = " in line)
    return {k: tuple(part.strip() for part in v.split("    # ", 1)) for k, v in lines}


def test_the_file_gives_every_setting_with_paths_from_its_own_directory(board):
    code, out, err = check_config("--config", str(board / "agent.toml"))
    assert code == 0, err
    got = shown(out)
    source = str(board / "agent.toml")
    assert got["broker"] == ('"mqtt://broker.lan:1883"', source)
    assert got["data"] == (f'"{board / "shard.npz"}"', source)
    assert got["threads"] == ("3", source) and got["memory_budget"] == ("400.0", source)
    assert got["mqtt"] == ('"3.1.1"', "default")
    assert got["password"] == ("(set)", f"{source}: password_file {board / 'password'}")
    assert "s3cret" not in out


def test_flags_beat_the_environment_which_beats_the_file(board):
    config = ["--config", str(board / "agent.toml")]
    assert shown(check_config(*config)[1])["threads"][0] == "3"
    env = {"ZOWARMUP_THREADS": "2", "ZOWARMUP_RUN": "from-env"}
    got = shown(check_config(*config, env=env)[1])
    assert got["threads"] == ("2", "ZOWARMUP_THREADS") and got["run"][0] == '"from-env"'
    got = shown(check_config(*config, "--threads", "1", env=env)[1])
    assert got["threads"] == ("1", "--threads") and got["run"][1] == "ZOWARMUP_RUN"
    # the file named by the environment, when no --config
    got = shown(check_config(env={CONFIG_ENV: str(board / "agent.toml")})[1])
    assert got["id"] == ('"pi-7"', str(board / "agent.toml"))


def test_defaults_apply_where_nothing_is_given_and_systemd_names_the_state_directory(board):
    got = resolve(["run", "state_dir", "strategy"], {}, None, environ={})
    assert got.values == {"run": "default", "state_dir": Path("zowarmup-agent-state"),
                          "strategy": "auto"}
    got = resolve(["state_dir"], {}, None, environ={"STATE_DIRECTORY": "/var/lib/zowarmup"})
    assert got["state_dir"] == Path("/var/lib/zowarmup")


@pytest.mark.parametrize("line, message", [
    ("thread = 2", "thread: unknown setting; did you mean 'threads'?"),
    ('threads = "4"', "threads must be an integer, not a string ('4')"),
    ("threads = 4.0", "threads must be an integer, not a number (4.0)"),
    ("threads = true", "threads must be an integer, not a boolean (True)"),
    ("threads = 0", "threads is 0; it must be 1..1024"),
    ('memory_budget = "400"', "memory_budget must be a number, not a string"),
    ("memory_budget = 8", "memory_budget is 8; it must be 16 or more"),
    ("memory_budget = inf", "memory_budget is inf, not a finite number"),
    ("broker = 5", "broker must be a string (in quotes), not an integer (5)"),
    ('broker = "http://x"', "scheme must be mqtt:// or mqtts://"),
    ("mqtt = 5", "mqtt must be a string (in quotes)"),
    ('strategy = "fast"', "strategy is 'fast'; it must be one of 'auto', 'native'"),
    ('data = "missing.npz"', "missing.npz does not exist or is not a file"),
    ('password = "hunter2"', "a password does not go in the configuration file"),
    ("[engine]\nthreads = 2", "engine: unknown setting"),
    ("threads = ", "is not valid TOML"),
])
def test_a_bad_file_is_refused_with_its_name_and_the_key(board, line, message):
    path = board / "bad.toml"
    path.write_text(f"{line}\n")
    with pytest.raises(ConfigError, match="bad.toml") as caught:
        load_file(path)
    assert message in str(caught.value)
    code, out, err = check_config("--config", str(path))
    assert code == 2 and message in err and out == ""


def test_the_whole_file_is_checked_even_where_a_flag_wins(board):
    (board / "agent.toml").write_text('threads = "two"\n')
    code, _, err = check_config("--config", str(board / "agent.toml"), "--threads", "2")
    assert code == 2 and "threads must be an integer" in err


@pytest.mark.parametrize("name, value, message", [
    ("ZOWARMUP_THREADS", "four", "ZOWARMUP_THREADS='four' is not an integer"),
    ("ZOWARMUP_THREADS", "0", "ZOWARMUP_THREADS is 0"),
    ("ZOWARMUP_MEMORY_BUDGET", "lots", "ZOWARMUP_MEMORY_BUDGET='lots' is not a number"),
    ("ZOWARMUP_MEMORY_BUDGET", "nan", "ZOWARMUP_MEMORY_BUDGET is nan, not a finite number"),
    ("ZOWARMUP_MEMORY_BUDGET", "inf", "ZOWARMUP_MEMORY_BUDGET is inf, not a finite number"),
    ("ZOWARMUP_DATA", "/nonexistent/shard.npz", "ZOWARMUP_DATA: /nonexistent/shard.npz does"),
    ("ZOWARMUP_MQTT", "4", "ZOWARMUP_MQTT is '4'; it must be one of '3.1.1', '5'"),
    ("ZOWARMUP_BROKER", "mqtt://", "ZOWARMUP_BROKER: broker URL 'mqtt://' has no host"),
])
def test_a_bad_environment_variable_is_refused_by_name(board, name, value, message):
    code, out, err = check_config("--config", str(board / "agent.toml"), env={name: value})
    assert code == 2 and message in err, err


def test_without_a_broker_or_shard_the_agent_says_where_to_give_them(tmp_path):
    result = CliRunner().invoke(main, ["run", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code == 2
    assert "no broker: give --broker, set ZOWARMUP_BROKER, or set broker in the " \
           "configuration file" in result.stderr
    assert not (tmp_path / "state").exists()


def test_the_password_comes_from_the_strongest_place_in_either_form(board, tmp_path):
    other = tmp_path / "other-password"
    other.write_text("from-env-file")
    other.chmod(0o600)
    got = resolve(["broker"], {}, board / "agent.toml", environ={})
    resolve_password(got, None, None, environ={})
    assert got.password == "s3cret pass" and not got.warnings
    resolve_password(got, None, None, environ={PASSWORD_FILE_ENV: str(other)})
    assert got.password == "from-env-file"
    resolve_password(got, None, None, environ={PASSWORD_ENV: "plain-env"})
    assert got.password == "plain-env"
    resolve_password(got, None, other, environ={PASSWORD_ENV: "plain-env"})
    assert got.password == "from-env-file" and got.password_source.startswith("--password-file")
    with pytest.raises(ConfigError, match="give --password or --password-file, not both"):
        resolve_password(got, "x", other, environ={})
    with pytest.raises(ConfigError, match="ZOWARMUP_PASSWORD or ZOWARMUP_PASSWORD_FILE"):
        resolve_password(got, None, None,
                         environ={PASSWORD_ENV: "a", PASSWORD_FILE_ENV: str(other)})


@pytest.mark.parametrize("content, message", [
    ("", "must hold the password on one line, and it is empty"),
    ("\n", "it is empty"),
    ("one\ntwo\n", "must hold the password on one line"),
])
def test_a_bad_password_file_is_refused(board, content, message):
    (board / "password").write_text(content)
    code, _, err = check_config("--config", str(board / "agent.toml"))
    assert code == 2 and message in err


def test_a_password_file_every_user_can_read_gives_a_warning(board):
    (board / "password").chmod(0o644)
    code, out, err = check_config("--config", str(board / "agent.toml"))
    assert code == 0 and "is readable by every user; chmod 600" in err
    assert "s3cret" not in out + err


def test_bench_takes_its_engine_settings_from_the_file_and_refuses_a_bad_one(board):
    (board / "agent.toml").write_text("micro_batch = -1\n")
    result = CliRunner().invoke(main, ["bench", "--model", str(board), "--data",
                                       str(board / "shard.npz"), "--config",
                                       str(board / "agent.toml")])
    assert result.exit_code == 2 and "micro_batch is -1; it must be 1..1048576" in result.stderr


@pytest.mark.broker
def test_an_agent_started_from_its_file_logs_in_with_the_password_from_its_file(
        board, mosquitto_factory, tmp_path):
    passwords = tmp_path / "mosquitto.passwd"
    made = subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwords), "pi-7", "s3cret pass"],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    passwords.chmod(0o644)
    broker = mosquitto_factory(["allow_anonymous false", f"password_file {passwords}"])
    config = board / "agent.toml"
    config.write_text(config.read_text().replace("mqtt://broker.lan:1883", broker.url)
                      + 'username = "pi-7"\n' + f'state_dir = "{tmp_path / "state"}"\n')
    for wrong, expect in ((False, "connected to"), (True, "not authorized")):
        if wrong:
            (board / "password").write_text("wrong\n")
        log = tmp_path / f"agent-{wrong}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZOWARMUP_")}
        with open(log, "wb") as out:
            agent = subprocess.Popen([sys.executable, "-m", "edge_agent.cli", "run", "--config",
                                      str(config)], stdout=out, stderr=subprocess.STDOUT,
                                     cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})
        try:
            end = time.monotonic() + 30
            while time.monotonic() < end and expect not in log.read_text().lower():
                time.sleep(0.2)
        finally:
            agent.terminate()
            agent.wait(15)
        text = log.read_text()
        assert expect in text.lower(), text[-2000:]
        assert wrong or "as pi-7" in text, text[-2000:]
