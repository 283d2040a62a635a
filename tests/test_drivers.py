"""The driver registry: one list of names, and each driver built with its settings from config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from remotecli.config import DRIVER_NAMES, ControllerConfig, load_controller_config
from remotecli.drivers import create_driver
from remotecli.drivers.qemu import QemuDriver
from remotecli.exceptions import ConfigError


def test_qemu_options_reach_the_driver_from_the_environment(tmp_path: Path) -> None:
    """REMOTECLI_QEMU_MEMORY, _ACCELERATOR and _POOL_SIZE become the qemu driver's settings."""
    environ = {
        "REMOTECLI_DRIVER": "qemu",
        "REMOTECLI_QEMU_MEMORY": "512M",
        "REMOTECLI_QEMU_ACCELERATOR": "tcg",
        "REMOTECLI_QEMU_POOL_SIZE": "2",
    }
    config = load_controller_config({"data_dir": tmp_path}, environ=environ)
    driver = create_driver(config.driver, tmp_path, config)
    assert isinstance(driver, QemuDriver)
    # The settings are private to the driver; read them here rather than boot a VM to see them.
    assert (driver._memory_mib, driver._accelerator, driver._pool_size) == (512, "tcg", 2)


def test_qemu_defaults_probe_the_accelerator_and_keep_no_pool(tmp_path: Path) -> None:
    """By default the qemu driver gets 256 MiB, probes KVM itself and keeps no warm pool."""
    driver = create_driver("qemu", tmp_path, ControllerConfig(data_dir=tmp_path))
    assert isinstance(driver, QemuDriver)
    assert (driver._memory_mib, driver._accelerator, driver._pool_size) == (256, None, 0)


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("REMOTECLI_QEMU_ACCELERATOR", "hvf", "choose one of: auto, kvm, tcg"),
        ("REMOTECLI_QEMU_POOL_SIZE", "-1", "must be at least 0"),
        ("REMOTECLI_QEMU_MEMORY", "1M", "at least 16M"),
        ("REMOTECLI_DRIVER", "docker", "choose local or qemu"),
    ],
)
def test_bad_driver_settings_are_refused(
    tmp_path: Path, variable: str, value: str, words: str
) -> None:
    """A bad driver name or qemu setting is a ConfigError that says what to write instead."""
    with pytest.raises(ConfigError, match=words):
        load_controller_config({"data_dir": tmp_path}, environ={variable: value})


def test_every_driver_name_builds_a_driver_of_that_name(tmp_path: Path) -> None:
    """DRIVER_NAMES is the one list: create_driver builds each, and refuses any other name."""
    assert DRIVER_NAMES[0] == ControllerConfig().driver
    assert create_driver("qemu", tmp_path).name == "qemu"
    with pytest.raises(ConfigError, match="choose one of: local, qemu, cluster"):
        create_driver("docker", tmp_path)


def test_cluster_driver_needs_its_address_and_token_file(tmp_path: Path) -> None:
    """driver cluster is refused without cluster_address and cluster_token_file, built with."""
    with pytest.raises(ConfigError, match="cluster_address"):
        create_driver("cluster", tmp_path, ControllerConfig(data_dir=tmp_path))
    config = load_controller_config(
        {"data_dir": tmp_path, "driver": "cluster"},
        environ={
            "REMOTECLI_CLUSTER_ADDRESS": "10.0.0.1:6379",
            "REMOTECLI_CLUSTER_TOKEN_FILE": str(tmp_path / "token"),
        },
    )
    assert (config.cluster_address, config.cluster_token_file) == (
        "10.0.0.1:6379",
        tmp_path / "token",
    )
    assert create_driver("cluster", tmp_path, config).name == "cluster"


def test_cluster_channel_tls_is_on_unless_switched_off(tmp_path: Path) -> None:
    """The session channel's TLS is on by default, off by ``false`` or ``off``; else refused."""
    base = {"data_dir": tmp_path, "driver": "cluster", "cluster_address": "10.0.0.1:6379"}
    base["cluster_token_file"] = tmp_path / "token"
    config = load_controller_config(base, environ={})
    assert config.cluster_channel_tls is True
    assert create_driver("cluster", tmp_path, config).channel_tls is True  # type: ignore[attr-defined]
    off = load_controller_config(base, environ={"REMOTECLI_CLUSTER_CHANNEL_TLS": "off"})
    assert off.cluster_channel_tls is False
    assert create_driver("cluster", tmp_path, off).channel_tls is False  # type: ignore[attr-defined]
    flagged = load_controller_config({**base, "cluster_channel_tls": False}, environ={})
    assert flagged.cluster_channel_tls is False
    with pytest.raises(ConfigError, match="not on or off"):
        load_controller_config(base, environ={"REMOTECLI_CLUSTER_CHANNEL_TLS": "maybe"})


def test_cluster_hosts_get_the_controllers_driver_egress_and_memory(tmp_path: Path) -> None:
    """``cluster_host_driver`` (local unless said; qemu; else refused) and the controller's
    egress and qemu_memory are what the cluster driver sends each host's actor."""
    base = {"data_dir": tmp_path, "driver": "cluster", "cluster_address": "10.0.0.1:6379"}
    base["cluster_token_file"] = tmp_path / "token"
    plain = create_driver("cluster", tmp_path, load_controller_config(base, environ={}))
    assert plain._host_settings()["driver"] == "local"  # type: ignore[attr-defined]
    environ = {"REMOTECLI_CLUSTER_HOST_DRIVER": "qemu", "REMOTECLI_EGRESS": "none"}
    config = load_controller_config({**base, "qemu_memory": "512M"}, environ=environ)
    settings = create_driver("cluster", tmp_path, config)._host_settings()  # type: ignore[attr-defined]
    assert (settings["driver"], settings["egress"], settings["qemu_memory_mib"]) == (
        "qemu",
        "none",
        512,
    )
    with pytest.raises(ConfigError, match="cluster_host_driver"):
        load_controller_config({**base, "cluster_host_driver": "firecracker"}, environ={})


def test_a_microvm_host_will_not_join_without_a_guest_image(tmp_path: Path) -> None:
    """``cluster join --driver qemu`` on a host with no guest image exits 1 naming the command
    that builds one, before ``ray start`` runs (no token file is even needed)."""
    from click.testing import CliRunner

    from remotecli.cli import cli

    argv = ["cluster", "join", "10.0.0.1:6379", "--node-ip", "10.0.0.2"]
    argv += ["--token-file", str(tmp_path / "missing"), "--driver", "qemu"]
    result = CliRunner().invoke(cli, argv, env={"HOME": str(tmp_path)})
    assert result.exit_code == 1, result.output
    assert "this host cannot run microVM sessions" in result.output
    if shutil.which("qemu-system-x86_64") is None:
        assert "qemu" in result.output  # the first thing it lacks
    else:
        assert f"no guest image in {tmp_path}/.cache/remotecli/images" in result.output
        assert "remotecli image build --cache-dir" in result.output
