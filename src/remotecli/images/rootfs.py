"""The guest's root filesystem: Debian 12 minbase, the display stack, and a tiny init.

Theory of operation. ``debootstrap --variant=minbase`` lays out Debian 12 with the display
stack named package by package (debootstrap resolves dependencies but not virtual packages).
We then add the guest's own init (no systemd: one shell script as PID 1) and its control agent,
strip what a guest never reads (documentation, locales, apt lists), and pack the tree into an
ext4 image with ``mkfs.ext4 -d``, which needs no loop mount.

Inside the guest the root is mounted read-only and every writable place is a tmpfs, so one
image serves every session and writes vanish with the VM. The init starts TigerVNC's Xvnc
(display and VNC server in one; password read from a file the agent rewrites; it accepts a
viewer's SetDesktopSize), matchbox-window-manager (keeps the terminal full-screen), an xterm
themed as a local session's running the provider's command,
and the control agent on the second serial port (``ttyS1``). The agent applies what the host
sends after a snapshot restore: wall clock, entropy, hostname and the VNC password (see
``docs/microvm.md`` for the line protocol).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from remotecli.exceptions import RootfsError
from remotecli.images.initrd import GUEST_INIT
from remotecli.sandbox.terminal import TMUX_CONF

ProgressCallback = Callable[[str], None]
"""Receives short human-readable build steps (the same shape as a driver's progress)."""

SUITE = "bookworm"

# Concrete package names only: debootstrap does not resolve virtual packages.
DISPLAY_PACKAGES = (
    "tigervnc-standalone-server",
    "perl",  # named outright: debootstrap does not resolve tigervnc's "perl:any"
    "xterm",
    "matchbox-window-manager",  # keeps xterm full-screen when a viewer resizes the desktop
    "xfonts-base",
    "fonts-dejavu-core",
    "fonts-symbola",  # fontconfig's fallback for the symbols CLIs draw, as on a local session
    "fonts-noto-color-emoji",  # and for emoji
    "procps",
    "ncurses-term",
    "tmux",  # the CLI runs in tmux: the xterm and each text view attach to it
    "python3",  # the text view's tty server (standard library only)
)

# What an image with provider CLIs adds (the CLIs themselves, and the Node.js some run on, are
# installed by the host's npm: images/clis.py): the CAs their HTTPS clients trust.
CLI_PACKAGES = ("ca-certificates",)

BUSYBOX_IN_GUEST = "/usr/local/lib/remotecli/busybox"
TTY_SERVER_IN_GUEST = "/usr/local/lib/remotecli/tty_server.py"
TMUX_CONF_IN_GUEST = "/usr/local/lib/remotecli/tmux.conf"
RELAY_IN_GUEST = "/usr/local/lib/remotecli/guest_relay.py"
LINKS_FIFO_IN_GUEST = "/run/remotecli/links"
BROWSER_IN_GUEST = "/usr/local/bin/remotecli-open"
BROWSER_NAMES = ("xdg-open", "sensible-browser", "www-browser", "x-www-browser")
"""Programs a CLI may call to open a link; in the guest each hands it to the host instead."""
RUN_IN_GUEST = "/usr/local/sbin/remotecli-run"
START_FIFO_IN_GUEST = "/run/remotecli/start"
GUEST_RUN_SCRIPT = f"""#!/bin/sh
# remote-cli: run the session's command in tmux; when it ends, say so and end the VM, so the
# host ends the session with the reason (never a blank screen). With --wait it first waits
# for the host's go (the agent's "home"): a CLI that keeps a sign-in must start in the clone,
# after its files and its own entropy arrived, not in the template.
if [ "$1" = --wait ]; then
  shift
  read -r _ < {START_FIFO_IN_GUEST}
fi
"$@"
status=$?
printf 'remotecli: the session command exited with status %s\\n' "$status" > /dev/ttyS0
sync
exec {BUSYBOX_IN_GUEST} reboot -f
"""
GUEST_BROWSER_SCRIPT = f"""#!/bin/sh
# remote-cli: this VM has no browser; the link goes to the dashboard of its user.
for url in "$@"; do
  printf '%s\\n' "$url" >{LINKS_FIFO_IN_GUEST} &&
    printf 'remote-cli: the link is shown in your dashboard: %s\\n' "$url" >&2
done
"""

GUEST_TMUX_CONF = TMUX_CONF
"""The guest's tmux configuration: the local session's (:mod:`remotecli.sandbox.terminal`)."""


def tty_server_source() -> str:
    """The tty server's source, installed into the guest (it runs there in its TCP form)."""
    return (Path(__file__).resolve().parents[1] / "sandbox" / "tty_server.py").read_text()


def relay_source() -> str:
    """The guest relay's source (:mod:`remotecli.sandbox.guest_relay`), run in the guest."""
    return (Path(__file__).resolve().parents[1] / "sandbox" / "guest_relay.py").read_text()


GUEST_XTERM_OPTIONS = (
    "-fa 'DejaVu Sans Mono:pixelsize=15' -u8 -tn xterm-256color -bg '#1e1e1e' -fg '#d4d4d4' "
    "-cr '#aeafad' +sb -bw 0 -b 4 -title remote-cli -xrm 'XTerm*directColor: true' "
    "-xrm 'XTerm*metaSendsEscape: true' -xrm 'XTerm*bellIsUrgent: false' "
    + " ".join(
        f"-xrm 'XTerm*color{i}: {colour}'"
        for i, colour in enumerate(
            ("#000000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5",
             "#666666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#ffffff")
        )
    )
)  # fmt: skip
"""The guest's xterm: the local session's terminal (``drivers/local_sandbox.py``'s
``xterm_options``, which this package may not import; a test keeps them equal): dark theme,
DejaVu Sans Mono at 15 px, UTF-8, direct colour."""

GUEST_PATH = ("usr/local/sbin", "usr/local/bin", "usr/sbin", "usr/bin", "sbin", "bin")
"""The guest init's PATH, relative to the root."""

GUEST_INIT_SCRIPT = f"""#!/bin/sh
# PID 1 of a remote-cli guest: writable tmpfs places, network, display, terminal, VNC, agent.
export PATH={":".join("/" + d for d in GUEST_PATH)}
export HOME=/root TERM=xterm-256color COLORTERM=truecolor LANG=C.UTF-8
export BROWSER={BROWSER_IN_GUEST}
bb={BUSYBOX_IN_GUEST}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for dir in /tmp /run /var/tmp /var/log /var/cache /var/lib/remotecli /root /home; do
  mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$dir"
done
chmod 1777 /tmp /var/tmp
mkdir -p /dev/pts /dev/shm /run/remotecli /tmp/.X11-unix
chmod 0700 /run/remotecli
$bb mkfifo -m 0600 {LINKS_FIFO_IN_GUEST}
chmod 1777 /tmp/.X11-unix
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
echo nameserver 10.0.2.3 > /run/resolv.conf
$bb ip link set lo up
$bb ip addr add 10.0.2.15/24 dev eth0
$bb ip link set eth0 up
$bb ip route add default via 10.0.2.2

geometry=1280x720
command=""
wait_flag=""
for word in $(cat /proc/cmdline); do
  case "$word" in
    remotecli.geometry=*) geometry="${{word#remotecli.geometry=}}" ;;
    remotecli.command=*) command="$(echo "${{word#remotecli.command=}}" | $bb base64 -d)" ;;
    remotecli.wait=1) wait_flag="--wait" ;;
  esac
done
[ -n "$command" ] || command="bash -l"

# No VNC password and no terminal secret until the host sends the clone its own: VNC
# authentication, the tty server and the relay all refuse while the files are absent. (A
# boot-time secret would be in the template, so known to every clone restored from it.)
stty -F /dev/ttyS1 raw -echo 115200 2>/dev/null
/usr/local/sbin/remotecli-agent &

# TigerVNC's Xvnc is display and VNC server in one event-driven process: it accepts at once
# and reads the password file on each authentication.
# It takes a viewer's SetDesktopSize; the window manager then keeps xterm full-screen.
Xvnc :0 -geometry "$geometry" -depth 24 -rfbport 5900 -SecurityTypes VncAuth \\
  -PasswordFile /run/remotecli/vncpass -AlwaysShared -desktop remotecli -nolisten tcp \\
  -AcceptSetDesktopSize=1 -FrameRate=250 -dpi 96 -extension GLX >/var/log/Xvnc.log 2>&1 &
while [ ! -S /tmp/.X11-unix/X0 ]; do $bb usleep 10000; done
cd /root
# The CLI runs in tmux; the xterm on the display and each text view (the tty server, reached
# through the host's forward with the VM's secret) attach to it.
tmux="tmux -u -S /run/remotecli/tmux.sock"
$bb mkfifo -m 0600 {START_FIFO_IN_GUEST}
$tmux -f {TMUX_CONF_IN_GUEST} new-session -d -s main -x 158 -y 40 \\
  "{RUN_IN_GUEST} $wait_flag $command"
python3 -I -S {TTY_SERVER_IN_GUEST} --tcp 5902 --secret-file /run/remotecli/ttysecret \\
  /run/remotecli/tmux.sock >/var/log/tty.log 2>&1 &
python3 -I -S {RELAY_IN_GUEST} --port 5903 --secret-file /run/remotecli/ttysecret \\
  --links {LINKS_FIFO_IN_GUEST} >/var/log/relay.log 2>&1 &
DISPLAY=:0 matchbox-window-manager -use_titlebar no >/var/log/wm.log 2>&1 &
DISPLAY=:0 xterm {GUEST_XTERM_OPTIONS} \\
  -e sh -c ': > /run/remotecli/terminal-up; exec $1 attach-session -t main' terminal "$tmux" &
while ! grep -q ':170C 00000000:0000 0A' /proc/net/tcp 2>/dev/null; do $bb usleep 10000; done
while ! grep -q ':170E 00000000:0000 0A' /proc/net/tcp 2>/dev/null; do $bb usleep 10000; done
while ! grep -q ':170F 00000000:0000 0A' /proc/net/tcp 2>/dev/null; do $bb usleep 10000; done
while [ ! -e /run/remotecli/terminal-up ]; do $bb usleep 10000; done
echo "remotecli: display, terminal and VNC server up" > /dev/ttyS0
echo ready > /dev/ttyS1
# PID 1 reaps orphans for ever.
while :; do wait; $bb usleep 1000000; done
"""

# The control agent: one command per line on ttyS1, one answer per line.
#   session EPOCH HOSTNAME PASSWORD SEED TTYSECRET   -> "ok HOSTNAME"
# PASSWORD is the VNC password file's 8 obfuscated bytes as octal escapes (\\ooo x 8);
# TTYSECRET (64 hex digits) is what a connection to the text terminal must start with.
#   ping                                   -> "pong"
#   home TAR                               -> "ok home"
# TAR (base64) holds a kept sign-in's files (none at first): they are unpacked into HOME, then
# the CLI, waiting since the template's boot (remotecli-run --wait), is told to start.
#   collect LIST                           -> "files TAR"
# LIST (base64) names paths under HOME, one per line; TAR (base64, one line) holds what of them
# exists. The host reads it as hostile input (only regular files, within its caps).
GUEST_AGENT_SCRIPT = f"""#!/bin/sh
# remote-cli control agent: applies what the host sends after a snapshot restore.
bb={BUSYBOX_IN_GUEST}
tmux="tmux -u -S /run/remotecli/tmux.sock"
exec 3<>/dev/ttyS1
while read -r verb epoch name password seed ttysecret <&3; do
  case "$verb" in
    home)
      printf '%s' "$epoch" | base64 -d | tar -x -f - -C /root --no-same-owner 2>/dev/null
      timeout 5 sh -c "printf 'go\\n' > {START_FIFO_IN_GUEST}" 2>/dev/null
      printf 'ok home\\n' >&3
      ;;
    collect)
      printf '%s' "$epoch" | base64 -d > /run/remotecli/collect.list
      printf 'files ' >&3
      tar -c -b 1 -f - -C /root -T /run/remotecli/collect.list 2>/dev/null |
        base64 -w 0 >&3
      printf '\\n' >&3
      ;;
    session)
      # Built-ins only before the answer: a fresh clone translates every new code path.
      # The host reads the RFB banner before it sends this line and hands the VM out only
      # after the answer, so no VNC connection can see the file half-written.
      printf "$password" > /run/remotecli/vncpass
      printf '%s' "$ttysecret" > /run/remotecli/ttysecret
      printf 'ok %s\\n' "$name" >&3
      printf '%s' "$seed" > /dev/urandom
      printf '%s\\n' "$name" > /proc/sys/kernel/hostname
      $bb date -s "@$epoch" >/dev/null 2>&1
      ;;
    ping) printf 'pong\\n' >&3 ;;
    *) printf 'error unknown command\\n' >&3 ;;
  esac
done
"""

# Files a guest never reads; removing them keeps the image (and the build) small.
_STRIP = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/cache/debconf/templates.dat-old",
)


def packages_for(providers: Sequence[str]) -> list[str]:
    """Return every Debian package debootstrap installs for an image holding ``providers``."""
    return list(DISPLAY_PACKAGES) + (list(CLI_PACKAGES) if providers else [])


def debootstrap(
    target: Path,
    packages: Sequence[str],
    download_cache: Path,
    progress: ProgressCallback,
    mirror: str | None = None,
) -> None:
    """Install Debian 12 minbase plus ``packages`` into ``target`` (which must not exist)."""
    download_cache.mkdir(parents=True, exist_ok=True)
    argv = [
        "debootstrap",
        "--variant=minbase",
        f"--cache-dir={download_cache}",
        f"--include={','.join(packages)}",
        SUITE,
        str(target),
    ]
    if mirror:
        argv.append(mirror)
    _run_logged(argv, progress, step="debootstrap", fix="check that the Debian mirror is reachable")


def install_guest_files(root: Path, busybox: bytes) -> None:
    """Add the guest init, the control agent and a static busybox to the tree at ``root``."""
    _write(root / GUEST_INIT.lstrip("/"), GUEST_INIT_SCRIPT, 0o755)
    _write(root / "usr/local/sbin/remotecli-agent", GUEST_AGENT_SCRIPT, 0o755)
    _write(root / TTY_SERVER_IN_GUEST.lstrip("/"), tty_server_source(), 0o644)
    _write(root / TMUX_CONF_IN_GUEST.lstrip("/"), GUEST_TMUX_CONF, 0o644)
    _write(root / RELAY_IN_GUEST.lstrip("/"), relay_source(), 0o644)
    _write(root / BROWSER_IN_GUEST.lstrip("/"), GUEST_BROWSER_SCRIPT, 0o755)
    _write(root / RUN_IN_GUEST.lstrip("/"), GUEST_RUN_SCRIPT, 0o755)
    for name in BROWSER_NAMES:
        link = root / "usr/local/bin" / name
        link.unlink(missing_ok=True)
        link.symlink_to("remotecli-open")
    busybox_path = root / BUSYBOX_IN_GUEST.lstrip("/")
    busybox_path.parent.mkdir(parents=True, exist_ok=True)
    busybox_path.write_bytes(busybox)
    busybox_path.chmod(0o755)
    resolv = root / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("/run/resolv.conf")
    _write(root / "etc/hostname", "remotecli\n", 0o644)
    (root / "var/lib/remotecli").mkdir(parents=True, exist_ok=True)


def strip_tree(root: Path) -> None:
    """Remove documentation, locales and package lists the guest never reads."""
    for relative in _STRIP:
        path = root / relative
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.mkdir()
        elif path.exists():
            path.unlink()


def programs_on_path(root: Path) -> set[str]:
    """Return the names of the programs on the guest's PATH in the tree at ``root``."""
    names: set[str] = set()
    for relative in GUEST_PATH:
        directory = root / relative
        if directory.is_dir() and not directory.is_symlink():
            names.update(entry.name for entry in directory.iterdir())
    return names


def tree_size(root: Path) -> int:
    """Return the bytes the tree's regular files take, rounded up to 4 KiB blocks each."""
    total = 0
    for directory, dirnames, filenames in os.walk(root):
        total += 4096 * (1 + len(dirnames))
        for name in filenames:
            path = os.path.join(directory, name)
            if not os.path.islink(path):
                total += (os.lstat(path).st_size + 4095) // 4096 * 4096
            else:
                total += 4096
    return total


def make_ext4(root: Path, image: Path, progress: ProgressCallback) -> None:
    """Pack ``root`` into a fresh ext4 image file with ``mkfs.ext4 -d`` (no loop mount)."""
    size_mib = tree_size(root) * 5 // 4 // (1 << 20) + 64
    image.unlink(missing_ok=True)
    progress(f"mkfs.ext4 -d: {size_mib} MiB image")
    _run_logged(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "remotecli-root",
            "-O",
            "^has_journal",
            "-E",
            "root_owner=0:0",
            "-d",
            str(root),
            str(image),
            f"{size_mib}M",
        ],
        progress,
        step="mkfs.ext4",
        fix="install e2fsprogs 1.43 or later",
    )


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def _run_logged(argv: Sequence[str], progress: ProgressCallback, *, step: str, fix: str) -> None:
    """Run ``argv``, passing its "I:" lines to ``progress``; raise RootfsError on failure."""
    if shutil.which(argv[0]) is None:
        raise RootfsError(f"{argv[0]} is not installed; run scripts/install-system-deps.sh test")
    with subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        tail: list[str] = []
        for line in process.stdout:
            line = line.rstrip()
            tail = [*tail[-19:], line]
            if line.startswith(("I: Retrieving", "I: Validating")):
                continue  # one line per package is noise; the other steps are progress
            if line.startswith(("I: ", "W: ", "E: ")):
                progress(f"{step}: {line[3:]}")
        code = process.wait()
    if code != 0:
        details = "\n".join(tail)
        raise RootfsError(f"{step} failed with exit status {code}; {fix}\n{details}")
