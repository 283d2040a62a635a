"""The controller's configuration: flags > environment > TOML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from remotecli.config import (
    ControllerConfig,
    ProviderConfig,
    default_data_dir,
    load_controller_config,
    parse_duration,
    parse_listen,
)
from remotecli.exceptions import ConfigError

TOML = """
[controller]
listen = "127.0.0.1:9000"
driver = "qemu"
session_ttl = "2h"
idle_stop = 300
max_sessions = 7
allowed_origins = ["https://cli.example.com"]

[providers.aider]
command = ["aider", "--no-git"]
title = "Aider"
install_hint = "pip install aider-chat"
"""


def write_config(tmp_path: Path, text: str = TOML) -> Path:
    path = tmp_path / "remotecli.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    """With nothing given: 127.0.0.1:8080, the local driver, 1 h TTL, 30 min idle stop."""
    config = load_controller_config({}, environ={"HOME": "/home/u"})
    assert config.listen == ("127.0.0.1", 8080)
    assert config.driver == "local"
    assert config.session_ttl == 3600
    assert config.idle_stop == 1800
    assert config.data_dir == ControllerConfig().data_dir
    assert config.admin_token is None


def test_data_dir_follows_xdg() -> None:
    """The data dir is $XDG_DATA_HOME/remotecli, else ~/.local/share/remotecli."""
    assert default_data_dir({"XDG_DATA_HOME": "/x"}) == Path("/x/remotecli")
    assert default_data_dir({"HOME": "/home/u"}) == Path("/home/u/.local/share/remotecli")


def test_file_values(tmp_path: Path) -> None:
    """The TOML file sets controller values and adds providers."""
    config = load_controller_config({}, environ={}, config_file=write_config(tmp_path))
    assert config.listen == ("127.0.0.1", 9000)
    assert config.driver == "qemu"
    assert config.session_ttl == 7200
    assert config.idle_stop == 300
    assert config.max_sessions == 7
    assert config.allowed_origins == ("https://cli.example.com",)
    assert config.providers == (
        ProviderConfig("aider", ("aider", "--no-git"), "Aider", "pip install aider-chat"),
    )


def test_precedence_flags_env_file(tmp_path: Path) -> None:
    """A flag beats the environment, which beats the file, which beats the default."""
    path = write_config(tmp_path)
    env = {
        "REMOTECLI_LISTEN": "127.0.0.1:9100",
        "REMOTECLI_MAX_SESSIONS": "9",
        "REMOTECLI_TOKEN": "t" * 20,
        "REMOTECLI_ALLOWED_ORIGINS": "https://a.example, https://b.example",
    }
    config = load_controller_config({"listen": "[::1]:9200"}, environ=env, config_file=path)
    assert config.listen == ("::1", 9200)
    assert config.max_sessions == 9
    assert config.driver == "qemu"
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    assert config.admin_token == "t" * 20
    assert "t" * 20 not in repr(config)


def test_store_url_from_environment_is_kept_out_of_repr() -> None:
    """REMOTECLI_STORE_URL selects a PostgreSQL store; its password never shows in the config's
    repr, and without it the store is the SQLite file (None)."""
    url = "postgresql://remotecli:hunter2@db.internal:5432/remotecli"
    config = load_controller_config({}, environ={"REMOTECLI_STORE_URL": url})
    assert config.store_url == url
    assert "hunter2" not in repr(config)
    assert load_controller_config({}, environ={}).store_url is None


def test_config_file_from_environment(tmp_path: Path) -> None:
    """REMOTECLI_CONFIG names the file when --config is not given."""
    env = {"REMOTECLI_CONFIG": str(write_config(tmp_path))}
    assert load_controller_config({}, environ=env).max_sessions == 7


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"listen": "8080"}, {}, "is not HOST:PORT"),
        ({}, {"REMOTECLI_SESSION_TTL": "soon"}, "is not a duration"),
        ({}, {"REMOTECLI_MAX_SESSIONS": "0"}, "must be at least 1"),
        ({}, {"REMOTECLI_DRIVER": "firecracker"}, "choose local or qemu"),
        ({}, {"REMOTECLI_TOKEN": "short"}, "too short"),
        ({}, {"REMOTECLI_LOG_LEVEL": "loud"}, "choose one of: debug, info"),
        ({}, {"REMOTECLI_STORE_URL": "mysql://db/remotecli"}, "write postgresql://USER"),
    ],
)
def test_bad_values_name_the_fix(
    flags: dict[str, object], env: dict[str, str], message: str
) -> None:
    """A bad value is a ConfigError whose message says what to write instead."""
    with pytest.raises(ConfigError, match=message):
        load_controller_config(flags, environ=env)


def test_unknown_file_key_and_bad_toml(tmp_path: Path) -> None:
    """An unknown key in [controller] and invalid TOML are refused, naming the problem."""
    with pytest.raises(ConfigError, match="unknown controller setting 'listn'"):
        load_controller_config(
            {}, environ={}, config_file=write_config(tmp_path, '[controller]\nlistn = "x"\n')
        )
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_controller_config({}, environ={}, config_file=write_config(tmp_path, "[controller"))


def test_parsers() -> None:
    """Durations accept seconds and s/m/h/d suffixes; listen accepts bracketed IPv6."""
    assert parse_duration("90s", "x") == 90
    assert parse_duration("30m", "x") == 1800
    assert parse_duration(0, "x") == 0
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen("0.0.0.0:8080") == ("0.0.0.0", 8080)


def test_sandbox_settings_parse_sizes_cpus_and_egress() -> None:
    """Session limits read sizes like 512M and 2G, CPUs as a number, and egress open or none."""
    config = load_controller_config(
        {},
        environ={
            "REMOTECLI_SESSION_MEMORY": "512M",
            "REMOTECLI_SESSION_HOME_SIZE": "2GiB",
            "REMOTECLI_SESSION_CPUS": "0.5",
            "REMOTECLI_SESSION_PROCESSES": "256",
            "REMOTECLI_EGRESS": "none",
        },
    )
    assert config.session_memory == 512 * 1024**2
    assert config.session_home_size == 2 * 1024**3
    assert config.session_cpus == 0.5
    assert config.session_processes == 256
    assert config.egress == "none"
    for variable, value in (("REMOTECLI_SESSION_MEMORY", "1M"), ("REMOTECLI_EGRESS", "host")):
        with pytest.raises(ConfigError):
            load_controller_config({}, environ={variable: value})


def test_a_provider_s_headless_command_and_format(tmp_path: Path) -> None:
    """run and run_format come from [providers.NAME]; without run_format the output is text."""
    text = (
        "[providers.aider]\n"
        'command = ["aider"]\n'
        'run = ["aider", "--message={prompt}", "--yes"]\n'
        "[providers.tool]\n"
        'command = ["tool"]\n'
        'run = ["tool", "-p", "{prompt}"]\n'
        'run_format = "claude-stream-json"\n'
    )
    config = load_controller_config({}, environ={}, config_file=write_config(tmp_path, text))
    aider, tool = config.providers
    assert aider.run == ("aider", "--message={prompt}", "--yes")
    assert aider.run_format == "text"
    assert tool.run == ("tool", "-p", "{prompt}")
    assert tool.run_format == "claude-stream-json"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ('run = ["tool", "-p"]', "needs an argument holding {prompt}"),
        ('run = ["{prompt}"]', "needs an argument holding {prompt}"),
        ('run = "tool -p {prompt}"', "must be a list of strings"),
        ('run = ["tool", "{prompt}"]\nrun_format = "xml"', "run_format = 'xml' is unknown"),
        ('run_format = "text"', "run_format needs run"),
    ],
)
def test_a_bad_headless_command_names_the_fix(tmp_path: Path, entry: str, message: str) -> None:
    """A run without the prompt's place, of the wrong type, or an unknown format is refused."""
    text = f'[providers.tool]\ncommand = ["tool"]\n{entry}\n'
    with pytest.raises(ConfigError, match=message):
        load_controller_config({}, environ={}, config_file=write_config(tmp_path, text))


def test_run_limits_and_quota_settings() -> None:
    """Runs at once, the timeout and the quota come from the environment; 0 turns a quota off."""
    env = {
        "REMOTECLI_MAX_RUNS_PER_USER": "3",
        "REMOTECLI_MAX_RUNS": "6",
        "REMOTECLI_RUN_TIMEOUT": "15m",
        "REMOTECLI_QUOTA_PERIOD": "week",
        "REMOTECLI_RUNS_PER_PERIOD": "0",
        "REMOTECLI_TOKENS_PER_PERIOD": "2000000",
    }
    config = load_controller_config({}, environ=env)
    assert (config.max_runs_per_user, config.max_runs) == (3, 6)
    assert config.run_timeout == 900
    assert config.quota_period == "week"
    assert (config.runs_per_period, config.tokens_per_period) == (0, 2_000_000)
    with pytest.raises(ConfigError, match="choose one of: month, day, week"):
        load_controller_config({}, environ={"REMOTECLI_QUOTA_PERIOD": "year"})
    with pytest.raises(ConfigError, match="run_timeout must be more than 0"):
        load_controller_config({}, environ={"REMOTECLI_RUN_TIMEOUT": "0"})


def test_controller_takeover_after_is_zero_or_three_heartbeats() -> None:
    """``controller_takeover_after`` defaults to 30 s, takes 0 (never) and durations of at least
    three heartbeats, and refuses a shorter one, naming the smallest it takes."""
    assert load_controller_config({}, environ={}).controller_takeover_after == 30.0
    variable = "REMOTECLI_CONTROLLER_TAKEOVER_AFTER"
    assert load_controller_config({}, environ={variable: "0"}).controller_takeover_after == 0
    assert load_controller_config({}, environ={variable: "1m"}).controller_takeover_after == 60
    with pytest.raises(ConfigError, match="at least 15s"):
        load_controller_config({}, environ={variable: "10s"})
