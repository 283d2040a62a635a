"""What the qemu driver says it can run: the programs of the guest images in its cache.

Only ``can_run`` is tested here; it reads image manifests and boots nothing. Booting, cloning
and stopping microVMs is ``tests/e2e/test_qemu.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from remotecli.config import ProviderConfig
from remotecli.drivers.base import SessionSpec
from remotecli.drivers.qemu import QemuDriver
from remotecli.exceptions import DriverError
from remotecli.images.build import image_recipe
from remotecli.providers import Catalogue


def add_image(cache: Path, key: str, providers: list[str], programs: list[str] | None) -> None:
    """Write an image's manifest (all that can_run reads) into the cache."""
    manifest: dict[str, object] = {
        "key": key,
        "recipe": image_recipe(providers),  # built by this remote-cli
        "providers": providers,
        "built_at": 1.0,
    }
    if programs is not None:
        manifest["programs"] = programs
    (cache / key).mkdir(parents=True)
    (cache / key / "manifest.json").write_text(json.dumps(manifest))


def test_no_image_says_how_to_build_one(tmp_path: Path) -> None:
    """Without a guest image nothing can run, and the answer names `remotecli image build`."""
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    answer = driver.can_run(["bash", "-l"])
    assert isinstance(answer, str)
    assert "remotecli image build" in answer


def test_programs_on_the_image_run_as_given(tmp_path: Path) -> None:
    """A program on the image's PATH runs unresolved (the guest finds it), not the host's path."""
    add_image(tmp_path / "images", "base", [], ["bash", "sh", "xterm"])
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    assert driver.can_run(["bash", "-l"]) == ("bash", "-l")
    refused = driver.can_run(["aider"])
    assert isinstance(refused, str)
    assert "`aider` is not in the guest image" in refused


def test_an_npm_provider_needs_an_image_built_with_it(tmp_path: Path) -> None:
    """claude runs only from an image built with --provider claude-code, which the answer names."""
    add_image(tmp_path / "images", "base", [], ["bash"])
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    refused = driver.can_run(["claude"])
    assert isinstance(refused, str)
    assert "--provider claude-code" in refused
    add_image(tmp_path / "images", "claude", ["claude-code"], ["bash", "claude"])
    assert driver.can_run(["claude"]) == ("claude",)


def test_an_image_without_a_program_list_is_trusted(tmp_path: Path) -> None:
    """An image built before images listed their programs accepts any command, as before."""
    add_image(tmp_path / "images", "old", [], None)
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    assert driver.can_run(["aider", "--no-git"]) == ("aider", "--no-git")


def test_the_catalogue_lists_what_the_image_holds(tmp_path: Path) -> None:
    """With the qemu driver, providers are available by the image, not by the host's PATH."""
    add_image(tmp_path / "images", "base", [], ["bash"])
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images")
    statuses = {s.name: s for s in Catalogue(driver=driver).statuses()}
    assert statuses["shell"].available
    assert statuses["shell"].argv() == ["bash", "-l"]
    assert not statuses["claude-code"].available
    assert "--provider claude-code" in (statuses["claude-code"].hint or "")


def test_the_guest_runs_the_providers_command_never_a_host_path(tmp_path: Path) -> None:
    """With the qemu driver the catalogue's program and argv, and so the session's command, are
    the guest-side command (the bare name the guest finds on its PATH), even for a provider
    configured with a path on this host; the kernel command line carries that command."""
    add_image(tmp_path / "images", "claude", ["claude-code"], ["bash", "claude", "aider"])
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images", accelerator="tcg")
    aider = ProviderConfig(name="aider", command=("/opt/host/bin/aider", "--no-git"))
    catalogue = Catalogue([aider], driver=driver)
    claude = catalogue.get("claude-code")
    assert (claude.program, claude.argv()) == ("claude", ["claude"])
    assert catalogue.get("aider").argv() == ["aider", "--no-git"]
    spec = SessionSpec(
        session_id="s1", provider="claude-code", command=claude.argv(), workdir=tmp_path / "s1"
    )
    machine = asyncio.run(driver.machine_for(spec, lambda step: None))
    assert machine.command == ("claude",)
    encoded = machine.kernel_command_line().split("remotecli.command=", 1)[1].split()[0]
    assert base64.b64decode(encoded) == b"claude"
    host_path = SessionSpec(
        session_id="s2",
        provider="claude-code",
        command=["/opt/project/node_modules/.bin/claude"],
        workdir=tmp_path / "s2",
    )
    machine = asyncio.run(driver.machine_for(host_path, lambda step: None))
    assert machine.command == ("claude",)


def test_an_image_that_cannot_list_its_programs_does_not_run_a_cli(tmp_path: Path) -> None:
    """An image built before manifests listed programs is not trusted with an npm provider:
    the listing and the start refuse at once, naming the build command that fixes it."""
    add_image(tmp_path / "images", "old", ["claude-code"], None)
    driver = QemuDriver(tmp_path / "data", image_cache=tmp_path / "images", accelerator="tcg")
    status = Catalogue(driver=driver).get("claude-code")
    assert not status.available
    assert "remotecli image build" in (status.hint or "")
    assert "--provider claude-code" in (status.hint or "")
    spec = SessionSpec(
        session_id="s1", provider="claude-code", command=["claude"], workdir=tmp_path / "s1"
    )
    with pytest.raises(DriverError, match="--provider claude-code"):
        asyncio.run(driver.machine_for(spec, lambda step: None))
