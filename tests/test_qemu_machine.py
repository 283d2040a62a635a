"""The QEMU machine's pure parts: command line, forward port, guest control line, TSC rate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from remotecli.drivers.qemu_machine import (
    GUEST_TTY_PORT,
    TCG_TB_SIZE_MIB,
    Machine,
    VmPaths,
    forwarded_port,
    guest_hostname,
    host_tsc_khz,
    ksm_state,
    machine_argv,
    session_line,
    vnc_password_file,
)
from remotecli.exceptions import DriverError
from remotecli.images import GuestImage

IMAGE = GuestImage(Path("/images/k1"), "k1", ())
MACHINE = Machine(IMAGE, "tcg", 256, 2_445_406, ("bash", "-l"), 1280, 720)
PATHS = VmPaths(Path("/s/qmp.sock"), Path("/s/control.sock"), Path("/d/serial.log"), Path("/t/m"))

USERNET = (
    "Hub -1 (net):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]  13       127.0.0.1 42199       10.0.2.15  5902     0     0\r\n"
    "  TCP[HOST_FORWARD]  12       127.0.0.1 42197       10.0.2.15  5900     0     0\r\n"
)


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]


def test_template_and_clone_differ_only_in_memory_sharing_and_incoming() -> None:
    """A clone has the template's devices; only share=off and -incoming defer are added."""
    template = machine_argv(MACHINE, PATHS, share_memory=True, incoming=False)
    clone = machine_argv(MACHINE, PATHS, share_memory=False, incoming=True)
    assert clone[-2:] == ["-incoming", "defer"]
    differing = [(a, b) for a, b in zip(template, clone[:-2], strict=True) if a != b]
    assert len(differing) == 1
    assert differing[0][0].endswith("share=on")
    assert differing[0][1].endswith("share=off")


def test_network_is_restricted_and_forwarded_on_loopback_only() -> None:
    """User-mode networking has restrict=on and the VNC forward binds 127.0.0.1 only."""
    argv = machine_argv(MACHINE, PATHS, share_memory=False, incoming=True)
    (netdev,) = option(argv, "-netdev")
    assert "restrict=on" in netdev
    assert "hostfwd=tcp:127.0.0.1:0-:5900" in netdev


def test_open_egress_lifts_restrict_only_for_qemu_running_as_a_sandbox_uid() -> None:
    """``open`` turns restrict off and needs ``runas``, which drops QEMU to that uid and gid
    under QEMU's seccomp sandbox (no exec); the forwards stay on loopback either way."""
    argv = machine_argv(
        MACHINE, PATHS, share_memory=False, incoming=True, egress="open", runas=3_000_123
    )
    (netdev,) = option(argv, "-netdev")
    assert "restrict=off" in netdev
    assert "hostfwd=tcp:127.0.0.1:0-:5900" in netdev
    assert option(argv, "-runas") == ["3000123:3000123"]
    (sandbox,) = option(argv, "-sandbox")
    assert "spawn=deny" in sandbox.split(",")
    with pytest.raises(DriverError, match="sandbox uid"):
        machine_argv(MACHINE, PATHS, share_memory=False, incoming=True, egress="open")
    with pytest.raises(DriverError, match="unknown"):
        machine_argv(MACHINE, PATHS, share_memory=False, incoming=True, egress="lan")
    unprivileged = machine_argv(MACHINE, PATHS, share_memory=False, incoming=True)
    assert "-runas" not in unprivileged


def test_tcg_has_a_bounded_translation_cache_and_kvm_uses_the_host_cpu() -> None:
    """TCG gets an explicit tb-size; KVM runs -accel kvm with -cpu host."""
    tcg = machine_argv(MACHINE, PATHS, share_memory=True, incoming=False)
    assert option(tcg, "-accel") == [f"tcg,tb-size={TCG_TB_SIZE_MIB}"]
    smaller = machine_argv(
        replace(MACHINE, tcg_cache_mib=8), PATHS, share_memory=True, incoming=False
    )
    assert option(smaller, "-accel") == ["tcg,tb-size=8"]
    assert replace(MACHINE, tcg_cache_mib=8).template_key() == MACHINE.template_key()
    kvm_machine = Machine(IMAGE, "kvm", 256, 2_445_406, ("bash",), 1280, 720)
    kvm = machine_argv(kvm_machine, PATHS, share_memory=True, incoming=False)
    assert option(kvm, "-accel") == ["kvm"]
    assert option(kvm, "-cpu") == ["host"]


def test_kernel_command_line_carries_the_tsc_rate_and_the_command() -> None:
    """The guest gets tsc_early_khz (microvm has no HPET) and the base64 command."""
    line = MACHINE.kernel_command_line()
    assert "tsc_early_khz=2445406" in line.split()
    assert "remotecli.command=YmFzaCAtbA==" in line.split()


def test_template_key_changes_with_the_command() -> None:
    """Two provider commands never share a template."""
    other = Machine(IMAGE, "tcg", 256, 2_445_406, ("codex",), 1280, 720)
    assert MACHINE.template_key() != other.template_key()
    assert MACHINE.template_key() == Machine(*vars(MACHINE).values()).template_key()


def test_forwarded_port_is_read_from_info_usernet() -> None:
    """The kernel-chosen host ports of the VNC and text-terminal forwards are parsed from
    QEMU's text, each by the guest port it goes to."""
    assert forwarded_port(USERNET) == 42197
    assert forwarded_port(USERNET, GUEST_TTY_PORT) == 42199
    with pytest.raises(DriverError, match="no loopback forward"):
        forwarded_port("Hub -1 (net):\r\n")


def test_session_line_refuses_values_that_could_break_the_line() -> None:
    """Only letters, digits and dashes reach the agent; the password as its file's octal bytes."""
    secret = "0f" * 32
    assert session_line(1700000000, "rcli-a", "Pw12", "ab01", secret) == (
        b"session 1700000000 rcli-a \\265\\017\\345\\033\\065\\305\\161\\073 ab01 "
        + secret.encode()
        + b"\n"
    )
    with pytest.raises(DriverError, match="password"):
        session_line(1700000000, "rcli-a", "pw with space", "ab01", secret)
    with pytest.raises(DriverError, match="64 hex digits"):
        session_line(1700000000, "rcli-a", "Pw12", "ab01", "x y")


def test_password_file_matches_the_vncpasswd_format() -> None:
    """The obfuscated bytes are those ``vncpasswd -f`` and ``x11vnc -storepasswd`` write."""
    assert vnc_password_file("Pw12").hex() == "b50fe51b35c5713b"


def test_guest_hostname_is_a_valid_hostname() -> None:
    """Session ids become lower-case hostnames of at most 63 characters."""
    assert guest_hostname("B0bz_RM-x") == "rcli-b0bz-rm-x"
    assert len(guest_hostname("x" * 100)) == 63


def test_tsc_rate_comes_from_cpuinfo() -> None:
    """The host's rate in kHz is read from the first ``cpu MHz`` line."""
    assert host_tsc_khz("processor\t: 0\ncpu MHz\t\t: 2445.406\n") == 2_445_406


def test_ksm_state_names_the_switch_when_off(tmp_path: Path) -> None:
    """KSM off is reported with the command that turns it on; on and absent are said too."""
    run = tmp_path / "run"
    run.write_text("0\n")
    assert str(run) in ksm_state(run)
    assert ksm_state(run).startswith("off")
    run.write_text("1\n")
    assert ksm_state(run).startswith("on")
    assert ksm_state(tmp_path / "absent").startswith("unavailable")
