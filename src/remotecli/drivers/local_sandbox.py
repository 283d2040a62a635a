"""What a local session's sandbox is: its script, its users, its X cookie, bubblewrap's argv.

The local driver's pure part, as :mod:`remotecli.drivers.qemu_machine` is the QEMU driver's.
Pure: functions of the session's spec and of what the driver found on the host, no process
started and no file written. :mod:`remotecli.drivers.local` runs what these describe:

- :data:`SESSION_SCRIPT`, the bash script the sandbox runs (display server, terminal, VNC
  server), and the report lines it writes on its stdout, read back by :func:`parse_report`
  as hostile input (any process of the session can write to that pipe);
- :func:`launcher_argv`, the launcher's command line (:mod:`remotecli.sandbox.launch`), whose
  JSON plan carries bubblewrap's own argv: namespaces, read-only system directories, the
  provider's program, HOME and the run directory;
- :func:`session_environment`, the environment the session starts with; :data:`PASSWD` and
  :data:`GROUP`, the sandbox's own ``/etc/passwd`` and ``/etc/group``;
  :func:`xauthority_entry`, the X cookie's file.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from remotecli.drivers.base import SessionSpec
from remotecli.sandbox import SYSTEM_PATH, launch, tty_server

SANDBOX_HOME = "/home/user"
SANDBOX_RUN = "/run/session"
SANDBOX_UID = 1000

LINKS_FIFO = "open-url"
"""In the run directory: the FIFO the session's browser stand-ins write links to."""
COMMAND_EXIT = "command.exit"
"""In the run directory: "PROGRAM STATUS" once the session's command has exited."""
BROWSER_DIR = "/run/remotecli/bin"
BROWSER_NAMES = ("xdg-open", "sensible-browser", "www-browser", "x-www-browser")
"""Programs a CLI may call to open a link; in a session each hands it to the user instead."""
BROWSER_SCRIPT = """#!/bin/sh
# remote-cli: this session has no browser; the link goes to the dashboard of its user.
fifo="${REMOTECLI_RUN:-/run/session}/open-url"
for url in "$@"; do
  printf '%s\\n' "$url" >"$fifo" &&
    printf 'remote-cli: the link is shown in your dashboard: %s\\n' "$url" >&2
done
"""

REPORT_LINE_MAX = 256  # "display 12", "exited xterm 0": a longer line is not ours
REPORT_LINES_MAX = 16
REPORTERS = ("Xvnc", "tmux", "remotecli-tty", "matchbox-window-manager", "xterm")
"""The programs an ``exited`` report may name, in order of cause (the display first)."""

PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\n"
    f"user:x:{SANDBOX_UID}:{SANDBOX_UID}:remote-cli session:{SANDBOX_HOME}:/bin/bash\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = f"root:x:0:\nuser:x:{SANDBOX_UID}:\nnogroup:x:65534:\n"

LIB_DIR = "/run/remotecli"
"""In the sandbox: the tmux configuration and the tty server, bound read-only."""
TMUX_CONF_NAME = "tmux.conf"
TTY_SERVER_NAME = "tty_server.py"
TTY_SOCKET = "tty.sock"
"""In the run directory: the text terminal's socket (the tty protocol), as its server makes it."""
VNC_SOCKET = "vnc.sock"

FONT_PIXELS = 15
"""DejaVu Sans Mono's size on the desktop: capitals 11 px tall, cells 9 x 18 px."""
CELL_WIDTH, CELL_HEIGHT, TERMINAL_BORDER = 9, 18, 4
BACKGROUND, FOREGROUND, CURSOR = "#1e1e1e", "#d4d4d4", "#aeafad"
PALETTE = (
    "#000000", "#cd3131", "#0dbc79", "#e5e510", "#2472c8", "#bc3fbc", "#11a8cd", "#e5e5e5",
    "#666666", "#f14c4c", "#23d18b", "#f5f543", "#3b8eea", "#d670d6", "#29b8db", "#ffffff",
)  # fmt: skip
"""The 16 ANSI colours (VS Code's dark terminal palette): readable on :data:`BACKGROUND`."""


def xterm_options() -> list[str]:
    """Return xterm's options: dark theme, TrueType DejaVu Sans Mono, UTF-8, direct colour."""
    options = ["-fa", f"DejaVu Sans Mono:pixelsize={FONT_PIXELS}", "-u8"]
    options += ["-tn", "xterm-256color", "-bg", BACKGROUND, "-fg", FOREGROUND, "-cr", CURSOR]
    options += ["+sb", "-bw", "0", "-b", str(TERMINAL_BORDER), "-title", "remote-cli"]
    resources = ["directColor: true", "metaSendsEscape: true", "bellIsUrgent: false"]
    resources += [f"color{i}: {colour}" for i, colour in enumerate(PALETTE)]
    for resource in resources:
        options += ["-xrm", f"XTerm*{resource}"]
    return options


# Runs inside the sandbox. Arguments: run dir, width, height, the directory holding the tmux
# configuration and the tty server, then the session's command.
SESSION_SCRIPT = r"""
set -u
run=$1 width=$2 height=$3 lib=$4
shift 4
fifo="$run/display.fifo" sock="$run/tmux.sock"
rm -f "$fifo" "$run/vnc.sock" "$run/tty.sock" "$sock"
mkfifo -m 600 "$fifo"
# -FrameRate: Xvnc sends updates on a frame clock that starts half a frame after an idle spell;
# at the default 60 that is 8 ms before a keystroke shows (make bench, keystrokes), at 250 2 ms.
Xvnc -displayfd 3 -rfbunixpath "$run/vnc.sock" -rfbunixmode 0600 -rfbport -1 -nolisten tcp \
  -SecurityTypes None -auth "$run/Xauthority" -AcceptSetDesktopSize=1 -AlwaysShared=1 \
  -geometry "${width}x${height}" -depth 24 -dpi 96 -br -noreset -desktop remote-cli \
  -FrameRate=250 3>"$fifo" </dev/null 2>"$run/xvnc.log" &
xvnc=$!
if ! read -r display <"$fifo"; then
  wait "$xvnc"
  echo "exited Xvnc $?"
  exit 1
fi
rm -f "$fifo"
export DISPLAY=":$display" REMOTECLI_RUN="$run"
echo "display $display"
HOLD_SCRIPT='"$@"; status=$?
printf "%s %d\n" "${1##*/}" "$status" >"$REMOTECLI_RUN/command.exit"
printf "\n[%s exited with status %d; press Enter to end the session]\n" "${1##*/}" "$status"
read -r _
exec tmux -S "$REMOTECLI_RUN/tmux.sock" kill-server'
# The CLI runs in tmux; when it ends, keep its last screen (often an error message) until Enter.
cols=$(((width - 2 * @BORDER@) / @CELL_WIDTH@)) rows=$(((height - 2 * @BORDER@) / @CELL_HEIGHT@))
if ! tmux -u -S "$sock" -f "$lib/tmux.conf" new-session -d -s main -x "$cols" -y "$rows" \
  -- bash -c "$HOLD_SCRIPT" command "$@" </dev/null >/dev/null 2>"$run/tmux.log"; then
  echo "exited tmux 1"
  exit 1
fi
# Ends when tmux's server does: nothing ever signals the channel.
tmux -S "$sock" wait-for remotecli-never </dev/null >/dev/null 2>>"$run/tmux.log" &
tmux=$!
# The system's interpreter, standard library only (-I -S), whatever PATH the session was given.
python=$(PATH=/usr/local/bin:/usr/bin:/bin type -P python3)
(exec -a remotecli-tty "$python" -I -S "$lib/tty_server.py" "$run/tty.sock" "$sock" \
  </dev/null >/dev/null 2>"$run/tty.log") &
tty=$!
# Keeps the terminal full-screen, and follows the screen when a viewer resizes the desktop.
matchbox-window-manager -use_titlebar no </dev/null >/dev/null 2>"$run/wm.log" &
wm=$!
# xterm is only a view of tmux: if it ends while the CLI runs, start another (unless it keeps
# ending at once: then the session ends with its status).
(
  quick=0
  while :; do
    began=$SECONDS
    xterm @XTERM@ -e tmux -u -S "$sock" attach-session -t main </dev/null 2>>"$run/xterm.log"
    status=$?
    tmux -S "$sock" has-session -t main 2>/dev/null || exit "$status"
    if ((SECONDS - began < 2)); then quick=$((quick + 1)); else quick=0; fi
    ((quick < 3)) || exit "$status"
  done
) &
xterm=$!
wait -n -p who
status=$?
# Xvnc's death takes the rest with it, tmux's ends the xterm: name the first program found dead
# or dying, in order of cause, not merely the first one `wait -n` reported. Dead: bash may have
# reaped it already (its status stays available to `wait PID`); dying: PF_EXITING (0x4) in its
# flags, the 7th field after the command name (which may hold spaces: "tmux: server").
for pid in "$xvnc" "$tmux" "$tty" "$wm" "$xterm"; do
  [ "$pid" = "$who" ] && break
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || stat=""
  read -r -a fields <<<"${stat##*) }"
  flags=${fields[6]:-4}
  if (( flags & 4 )); then
    who=$pid
    wait "$pid"
    status=$?
    break
  fi
done
case $who in
  "$xvnc") name=Xvnc ;;
  "$tmux") name=tmux ;;
  "$tty") name=remotecli-tty ;;
  "$wm") name=matchbox-window-manager ;;
  "$xterm") name=xterm ;;
  *) name=unknown ;;
esac
echo "exited $name $status"
"""
SESSION_SCRIPT = (
    SESSION_SCRIPT.replace("@BORDER@", str(TERMINAL_BORDER))
    .replace("@CELL_WIDTH@", str(CELL_WIDTH))
    .replace("@CELL_HEIGHT@", str(CELL_HEIGHT))
    .replace("@XTERM@", " ".join(shlex.quote(option) for option in xterm_options()))
)


# A headless run's script: the command alone, its output the driver's pipe. Arguments: the run
# directory, then the command. Its standard error goes to a file of the run directory (on the
# workdir's small tmpfs), whose end names the cause of a failed run.
RUN_SCRIPT = r"""
set -u
run=$1
shift
cd "$HOME" 2>/dev/null || cd /
exec "$@" </dev/null 2>"$run/@RUN_ERRORS@"
"""
RUN_ERRORS = "stderr"
"""In the run directory: a headless run's standard error, as the command wrote it."""
RUN_SCRIPT = RUN_SCRIPT.replace("@RUN_ERRORS@", RUN_ERRORS)


def tty_server_source() -> bytes:
    """Return the source of :mod:`remotecli.sandbox.tty_server`, to bind into the sandbox."""
    return Path(tty_server.__file__).read_bytes()


_SYSTEM_ROOTS = tuple(Path(p) for p in ("/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/opt"))


def program_roots(program: str) -> list[Path]:
    """Directories to show read-only in the sandbox so the session's program can run.

    A provider's CLI may live outside the system directories, for example in the project's
    ``node_modules/.bin`` as a link into its package: show the whole ``node_modules`` tree it
    belongs to (a Node.js CLI loads its dependencies from there), or else its own directory.
    """
    path = Path(program)
    if not path.is_absolute():
        return []
    roots: list[Path] = []
    for candidate in (path, path.resolve()):
        root = next((p for p in candidate.parents if p.name == "node_modules"), candidate.parent)
        if not any(root.is_relative_to(system) for system in _SYSTEM_ROOTS) and root not in roots:
            roots.append(root)
    return roots


def xauthority_entry(cookie: bytes) -> bytes:
    """Return one Xauthority record for any address and display (FamilyWild)."""

    def counted(value: bytes) -> bytes:
        return struct.pack(">H", len(value)) + value

    family_wild = 0xFFFF
    return struct.pack(">H", family_wild) + b"".join(
        counted(part) for part in (b"", b"", b"MIT-MAGIC-COOKIE-1", cookie)
    )


@dataclass(frozen=True)
class Report:
    """One line of the session script's reports: ``display N`` or ``exited NAME STATUS``."""

    kind: str  # "display" or "exited"
    display: int | None = None
    program: str | None = None
    status: int | None = None


def parse_report(line: bytes) -> Report:
    """Parse one report line; raise ValueError for anything the script does not write."""
    if len(line) > REPORT_LINE_MAX:
        raise ValueError("report line too long")
    words = line.decode("ascii").split()  # UnicodeDecodeError is a ValueError
    if words[:1] == ["display"] and len(words) == 2 and words[1].isdigit():
        return Report("display", display=int(words[1]))
    exited = words[:1] == ["exited"] and len(words) == 3 and words[1] in REPORTERS
    if exited and words[2].isdigit():
        return Report("exited", program=words[1], status=int(words[2]))
    raise ValueError("not a report")


def script_argv(
    spec: SessionSpec, run_dir: str, lib_dir: str = LIB_DIR, *, headless: bool = False
) -> list[str]:
    """Return the argv that runs :data:`SESSION_SCRIPT` for ``spec`` with its run directory.

    ``lib_dir`` holds tmux's configuration (:mod:`remotecli.sandbox.terminal`) and the tty
    server (:data:`LIB_DIR` in the sandbox). ``headless`` runs :data:`RUN_SCRIPT` instead: the
    command alone, no display or terminal (a headless run).
    """
    if headless:
        return ["bash", "-c", RUN_SCRIPT, "run", run_dir, *spec.command]
    width, height = str(spec.width), str(spec.height)
    return ["bash", "-c", SESSION_SCRIPT, "session", run_dir, width, height, lib_dir, *spec.command]


@dataclass(frozen=True)
class LaunchPlan:
    """What the driver decided for one sandboxed session, for :func:`launcher_argv`."""

    bwrap: str
    spec: SessionSpec
    home: Path
    run_dir: Path
    fds: Mapping[str, int]  # info, block, seccomp, browser, tmux_conf, tty_server; passwd, group
    privileged: bool  # root controller: stage binds, own uid, cgroup, passwd
    uid: int | None
    processes: int
    home_bytes: int
    cgroup_procs: Sequence[Path] = ()
    headless: bool = False
    """A headless run: :data:`RUN_SCRIPT`, not the session's display and terminal."""


def bwrap_argv(plan: LaunchPlan, staged: Mapping[str, str], roots: Sequence[Path]) -> list[str]:
    """Return bubblewrap's argv: the namespaces, the filesystem, then the session script."""
    fds = plan.fds
    sandbox = [plan.bwrap, "--die-with-parent", "--new-session", "--unshare-user"]
    sandbox += ["--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--disable-userns"]
    sandbox += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net"]
    sandbox += ["--unshare-cgroup-try", "--hostname", "session"]
    sandbox += ["--info-fd", str(fds["info"]), "--block-fd", str(fds["block"])]
    sandbox += ["--seccomp", str(fds["seccomp"]), "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        root = Path("/") / name
        if root.is_symlink():
            sandbox += ["--symlink", os.readlink(root), str(root)]
        elif root.is_dir():
            sandbox += ["--ro-bind", str(root), str(root)]
    sandbox += ["--ro-bind", "/etc", "/etc", "--ro-bind-try", "/opt", "/opt"]
    if "passwd" in fds:
        sandbox += ["--ro-bind-data", str(fds["passwd"]), "/etc/passwd"]
        sandbox += ["--ro-bind-data", str(fds["group"]), "/etc/group"]
    sandbox += ["--ro-bind-try", "/var/cache/fontconfig", "/var/cache/fontconfig"]
    if "browser" in fds:
        browser = f"{BROWSER_DIR}/remotecli-open"
        sandbox += ["--perms", "0555", "--ro-bind-data", str(fds["browser"]), browser]
        for name in BROWSER_NAMES:
            sandbox += ["--symlink", "remotecli-open", f"{BROWSER_DIR}/{name}"]
    for fd_name, file_name in (("tmux_conf", TMUX_CONF_NAME), ("tty_server", TTY_SERVER_NAME)):
        if fd_name in fds:
            target = f"{LIB_DIR}/{file_name}"
            sandbox += ["--perms", "0444", "--ro-bind-data", str(fds[fd_name]), target]
    sandbox += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # noqa: S108 -- private
    for i, root in enumerate(roots):  # after /tmp: a checkout under /tmp stays visible
        sandbox += ["--ro-bind", staged[f"program{i}"], str(root)]
    sandbox += ["--bind", staged["home"], SANDBOX_HOME, "--bind", staged["run"], SANDBOX_RUN]
    sandbox += ["--chdir", SANDBOX_HOME, "--"]
    return sandbox + script_argv(plan.spec, SANDBOX_RUN, headless=plan.headless)


def launcher_argv(plan: LaunchPlan) -> list[str]:
    """Return the launcher's argv: its JSON plan carries bubblewrap's own argv.

    A privileged launcher stages HOME, the run directory and the program's roots on a private
    tmpfs first (see :mod:`remotecli.sandbox.launch`), so bubblewrap binds them from there.
    """
    binds = {"home": str(plan.home), "run": str(plan.run_dir)}
    roots = program_roots(plan.spec.command[0])
    binds.update({f"program{i}": str(root) for i, root in enumerate(roots)})
    staged = dict(binds)
    if plan.privileged:  # the launcher stages them first
        staged = {name: f"{launch.STAGE}/{name}" for name in binds}
    rlimits: dict[str, tuple[int, int]] = {"core": (0, 0), "nofile": (8192, 8192)}
    if plan.uid is not None:
        rlimits["nproc"] = (plan.processes, plan.processes)
    else:
        rlimits["fsize"] = (plan.home_bytes, plan.home_bytes)
    launch_plan = {
        "cgroup_procs": [str(p) for p in plan.cgroup_procs],
        "rlimits": rlimits,
        "binds": binds if plan.privileged else {},
        "keep_fds": sorted(plan.fds.values()),
        "uid": plan.uid,
        "gid": plan.uid,
        "argv": bwrap_argv(plan, staged, roots),
    }
    return [sys.executable, "-I", "-S", launch.__file__, json.dumps(launch_plan)]


def session_environment(spec: SessionSpec, *, sandboxed: bool) -> dict[str, str]:
    """Return the environment the session's script starts with (``spec.env`` last)."""
    run_dir = SANDBOX_RUN if sandboxed else str(spec.workdir / "run")
    home = SANDBOX_HOME if sandboxed else str(spec.workdir / "home")
    browser_dir = BROWSER_DIR if sandboxed else f"{run_dir}/bin"
    path = SYSTEM_PATH if sandboxed else os.environ.get("PATH", SYSTEM_PATH)
    env = {
        "PATH": f"{browser_dir}:{path}",
        "BROWSER": f"{browser_dir}/remotecli-open",
        "HOME": home,
        "USER": "user",
        "LOGNAME": "user",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "TERM": "xterm-256color",
        "COLORTERM": "truecolor",
        "XAUTHORITY": f"{run_dir}/Xauthority",
        "REMOTECLI_SESSION_ID": spec.session_id,
    }
    env.update(spec.env)
    return env


_PROGRAM_NAME = re.compile(r"[A-Za-z0-9._+-]{1,64}")


def parse_command_exit(text: str) -> tuple[str, int] | None:
    """Parse :data:`COMMAND_EXIT` ("PROGRAM STATUS", written by the session): None if forged."""
    words = text.split()
    if len(words) != 2 or not _PROGRAM_NAME.fullmatch(words[0]) or not words[1].isdigit():
        return None
    status = int(words[1])
    return (words[0], status) if status < 256 else None
