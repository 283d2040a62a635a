"""How one QEMU microVM is configured: the command line and the guest's control line.

Pure functions; the accelerator probe, which runs QEMU, is in ``qemu_accel``. The template and
its clones must be started with the same devices in the same order, or the clone refuses the
template's device state; :func:`machine_argv` is the one place that builds that list.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from Crypto.Cipher import DES

from remotecli.exceptions import DriverError
from remotecli.images import GuestImage

QEMU = "qemu-system-x86_64"
GUEST_VNC_PORT = 5900
GUEST_TTY_PORT = 5902  # the guest's tty server (TCP form), behind the VM's secret
GUEST_RELAY_PORT = 5903  # the guest relay (loopback callbacks, links), behind the same secret
KERNEL_COMMAND_LINE_MAX = 2047
"""x86 Linux keeps this many bytes of its command line (COMMAND_LINE_SIZE 2048, with NUL)."""
DEFAULT_MEMORY_MIB = 256
TCG_TB_SIZE_MIB = 16
"""Translation-block cache per VM under TCG; QEMU's default (1 GiB) would dwarf the guest. QEMU
touches all of it within seconds of a clone's start, so it is most of an idle clone's own
memory: 32 MiB cost about 28 MiB of PSS per clone, 16 MiB about 15, 8 MiB about 7."""
# No default devices, no config files, no display, and exit (never reboot) when the guest does.
BARE_MACHINE = ("-nodefaults", "-no-user-config", "-nographic", "-display", "none", "-no-reboot")

SECCOMP = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
"""QEMU's own seccomp filter for a VM that runs as a sandbox uid. ``elevateprivileges`` stays
allowed: it would forbid the very ``setuid`` that ``-runas`` makes (after which a return to root
is impossible anyway); ``spawn=deny`` is why files reach QEMU as descriptors (QMP ``getfd``)
rather than through ``exec:`` migration."""

_VNC_PASSWD_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])
_USERNET_FORWARD = re.compile(r"HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+(\d+)\s+\S+\s+(\d+)")


@dataclass(frozen=True)
class Machine:
    """What a template and all its clones share: image, accelerator, memory, guest command."""

    image: GuestImage
    accelerator: str
    """``kvm`` or ``tcg``."""
    memory_mib: int
    tsc_khz: int
    command: tuple[str, ...]
    width: int
    height: int
    tcg_cache_mib: int = TCG_TB_SIZE_MIB
    """TCG's translated-code cache; not in the template key (a clone's cache starts empty)."""
    start_in_clone: bool = False
    """The template boots with the command waiting; each clone starts it (after its kept
    sign-in and its own entropy arrived: a CLI may read or make secrets when it starts)."""

    def template_key(self) -> str:
        """Hash of everything a template's saved state depends on."""
        parts = [
            self.image.key,
            self.accelerator,
            str(self.memory_mib),
            str(self.tsc_khz),
            shlex.join(self.command),
            f"{self.width}x{self.height}",
            _qemu_identity(),
            *(["start-in-clone"] if self.start_in_clone else []),
        ]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]

    def kernel_command_line(self) -> str:
        """The guest kernel's command line; the provider command travels base64-encoded."""
        command = base64.b64encode(shlex.join(self.command).encode()).decode()
        line = " ".join(
            [
                "console=ttyS0",
                "reboot=t",
                "panic=-1",
                f"tsc_early_khz={self.tsc_khz}",
                "tsc=reliable",
                "quiet",
                "mitigations=off",
                "8250.nr_uarts=2",
                f"remotecli.geometry={self.width}x{self.height}",
                f"remotecli.command={command}",
                *(["remotecli.wait=1"] if self.start_in_clone else []),
            ]
        )
        if len(line) > KERNEL_COMMAND_LINE_MAX:
            raise DriverError(
                f"the session's command is too long for a microVM: it travels on the guest "
                f"kernel's command line, {len(line)} bytes of at most {KERNEL_COMMAND_LINE_MAX} "
                "(base64-encoded); put it in a script inside the image and run that"
            )
        return line


@dataclass(frozen=True)
class VmPaths:
    """The files of one running VM: monitor and control sockets, console log, memory file."""

    qmp: Path
    control: Path
    serial: Path
    memory: Path | None
    """The RAM file; None for anonymous RAM (a full restore loads every page from the state)."""


def machine_argv(
    machine: Machine,
    paths: VmPaths,
    *,
    share_memory: bool,
    incoming: bool,
    egress: str = "none",
    runas: int | None = None,
) -> list[str]:
    """Return the QEMU command line for a template (``share_memory``) or a clone (``incoming``).

    The template maps its RAM file shared, so the guest's memory lands in the file; a clone
    maps the same file private, so its writes are copy-on-write and the file stays untouched.
    The VNC forward binds loopback only, on a port the kernel picks; ask QEMU for it with
    :func:`forwarded_port`.

    ``egress`` ``none`` keeps the user-mode network ``restrict=on`` (nothing leaves the VM);
    ``open`` lets QEMU open the guest's connections as ordinary sockets of its own, which is
    safe only with ``runas``: QEMU drops to that uid (and gid) once it has opened its files and
    sockets and before the guest runs, so the host's egress filter, which judges that uid's
    sockets, decides where they may go (:mod:`remotecli.sandbox.egress`). With ``runas`` QEMU
    also runs under its seccomp sandbox: no new programs, no obsolete or resource-control calls.
    """
    if egress not in ("open", "none"):
        raise DriverError(f"egress {egress!r} is unknown; choose open or none")
    if egress == "open" and runas is None:
        raise DriverError(
            "egress open for a microVM needs QEMU to run as a sandbox uid the host filter judges"
        )
    accel = "kvm" if machine.accelerator == "kvm" else f"tcg,tb-size={machine.tcg_cache_mib}"
    cpu = "host" if machine.accelerator == "kvm" else "max"
    share = "on" if share_memory else "off"
    if paths.memory is None:
        backend = f"memory-backend-ram,id=mem,size={machine.memory_mib}M"
    else:
        backend = (
            f"memory-backend-file,id=mem,size={machine.memory_mib}M,mem-path={paths.memory},"
            f"share={share}"
        )
    argv = [
        QEMU,
        "-M",
        "microvm,acpi=on,memory-backend=mem",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        f"{machine.memory_mib}M",
        "-smp",
        "1",
        "-object",
        backend,
        *BARE_MACHINE,
        "-kernel",
        str(machine.image.kernel),
        "-initrd",
        str(machine.image.initrd),
        "-append",
        machine.kernel_command_line(),
        "-chardev",
        f"file,id=console,path={paths.serial}",
        "-serial",
        "chardev:console",
        "-chardev",
        f"socket,id=control,path={paths.control},server=on,wait=off",
        "-device",
        "isa-serial,chardev=control,iobase=0x2f8,irq=3",
        "-drive",
        f"file={machine.image.rootfs},if=none,format=raw,readonly=on,id=root",
        "-device",
        "virtio-blk-device,drive=root",
        "-netdev",
        f"user,id=net,restrict={'off' if egress == 'open' else 'on'},"
        f"hostfwd=tcp:127.0.0.1:0-:{GUEST_VNC_PORT},"
        f"hostfwd=tcp:127.0.0.1:0-:{GUEST_TTY_PORT},"
        f"hostfwd=tcp:127.0.0.1:0-:{GUEST_RELAY_PORT}",
        "-device",
        "virtio-net-device,netdev=net",
        "-qmp",
        f"unix:{paths.qmp},server=on,wait=off",
    ]
    if incoming:
        argv += ["-incoming", "defer"]
    if runas is not None:
        argv += ["-runas", f"{runas}:{runas}", "-sandbox", SECCOMP]
    return argv


def forwarded_port(usernet_info: str, guest_port: int = GUEST_VNC_PORT) -> int:
    """Read the host port forwarded to ``guest_port`` from QEMU's ``info usernet`` text."""
    for match in _USERNET_FORWARD.finditer(usernet_info):
        if int(match.group(2)) == guest_port:
            return int(match.group(1))
    raise DriverError(
        f"QEMU reports no loopback forward for the guest's port {guest_port}; the user-mode "
        "network did not start (see the session's qemu.log)"
    )


def session_line(epoch: int, hostname: str, password: str, seed: str, tty_secret: str) -> bytes:
    """The control-agent line that gives a restored clone its own clock, name and secrets.

    ``password`` is the plain VNC password; the line carries its obfuscated password-file
    bytes as octal escapes, which the guest writes with ``printf``. ``tty_secret`` (64 hex
    digits) is what a connection to the guest's text terminal must start with.
    """
    for name, value in (("hostname", hostname), ("password", password), ("seed", seed)):
        if not value or not re.fullmatch(r"[A-Za-z0-9-]+", value):
            raise DriverError(f"the {name} for the guest must be letters, digits and dashes")
    if not re.fullmatch(r"[0-9a-f]{64}", tty_secret):
        raise DriverError("the text terminal's secret for the guest must be 64 hex digits")
    escaped = "".join(f"\\{byte:03o}" for byte in vnc_password_file(password))
    return f"session {epoch} {hostname} {escaped} {seed} {tty_secret}\n".encode()


def vnc_password_file(password: str) -> bytes:
    """The 8 bytes of a VNC password file (``vncpasswd -f``) for ``password``.

    The format DES-encrypts the first 8 bytes of the password with a fixed, public key: it
    obscures, it does not protect. VNC's DES takes key bits in reverse order within each byte.
    """
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in _VNC_PASSWD_KEY)
    plain = password.encode("latin-1")[:8].ljust(8, b"\0")
    encrypted: bytes = DES.new(key, DES.MODE_ECB).encrypt(plain)  # noqa: S304 -- the format
    return encrypted


def guest_hostname(session_id: str) -> str:
    """A valid hostname made from a session id (letters, digits, dashes; at most 63)."""
    cleaned = re.sub(r"[^a-z0-9-]", "-", session_id.lower()).strip("-")
    return f"rcli-{cleaned}"[:63].rstrip("-")


def host_tsc_khz(cpuinfo: str) -> int:
    """Return the host's TSC frequency in kHz from ``/proc/cpuinfo`` text.

    microvm has neither HPET nor PM timer, so the guest kernel cannot calibrate its TSC;
    without ``tsc_early_khz`` about 3 in 10 TCG boots hang. Under TCG the guest's TSC runs
    at the host's rate.
    """
    match = re.search(r"^cpu MHz\s*:\s*([0-9.]+)", cpuinfo, re.MULTILINE)
    if match is None:
        return 2_000_000
    return round(float(match.group(1)) * 1000)


KSM_RUN = Path("/sys/kernel/mm/ksm/run")


def ksm_state(run_file: Path = KSM_RUN) -> str:
    """Say whether the kernel merges identical pages of the VMs (KSM), with the next step.

    QEMU marks guest RAM mergeable by default; the kernel merges only while ``run`` is 1, which
    is the host operator's choice (it costs the scanning thread's CPU).
    """
    try:
        running = run_file.read_text().strip() == "1"
    except OSError:
        return "unavailable (this kernel has no KSM)"
    if running:
        return (
            "on: identical guest pages are merged across VMs (a timing side channel between "
            "the VMs of different users)"
        )
    return (
        f"off: `echo 1 > {run_file}` would merge identical guest pages across VMs (about 6 MiB "
        "less per idle clone here) at the price of a timing side channel between the VMs of "
        "different users; only where they trust each other"
    )


def require_qemu() -> None:
    """Raise DriverError naming the package when QEMU is not installed."""
    if shutil.which(QEMU) is None:
        raise DriverError(f"{QEMU} is not installed; install the Debian package qemu-system-x86")


def _qemu_identity() -> str:
    path = shutil.which(QEMU)
    if path is None:
        return "missing"
    status = os.stat(path)
    return f"{status.st_size}:{int(status.st_mtime)}"


def argv_for_log(argv: Sequence[str]) -> str:
    """The command line as one shell-quoted string, for the session's qemu.log."""
    return shlex.join(argv)
