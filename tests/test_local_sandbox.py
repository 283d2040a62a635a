"""The local sandbox as data (remotecli.drivers.local_sandbox): reports, argv, environment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remotecli.drivers.base import SessionSpec
from remotecli.drivers.local_sandbox import (
    REPORT_LINE_MAX,
    SANDBOX_HOME,
    LaunchPlan,
    Report,
    launcher_argv,
    parse_report,
    session_environment,
    xauthority_entry,
)


def spec(tmp_path: Path, command: tuple[str, ...] = ("bash", "-l")) -> SessionSpec:
    return SessionSpec("s1", "shell", command, tmp_path / "s1", env={"EXTRA": "1"})


def test_reports_the_script_writes_are_parsed() -> None:
    """`display N` and `exited NAME STATUS` lines become reports with their numbers."""
    assert parse_report(b"display 12\n") == Report("display", display=12)
    assert parse_report(b"exited xterm 0\n") == Report("exited", program="xterm", status=0)


@pytest.mark.parametrize(
    "line",
    [
        b"display\n",
        b"display twelve\n",
        b"exited bash 0\n",  # not one of the three programs the script names
        b"exited xterm -1\n",
        b"exited xterm 0 extra\n",
        b"hello\n",
        b"\n",
        b"display \xff\n",
        b"display 1" + b"0" * REPORT_LINE_MAX + b"\n",
    ],
)
def test_anything_else_on_the_report_pipe_is_refused(line: bytes) -> None:
    """A line the script never writes (forged by the session) raises ValueError."""
    with pytest.raises(ValueError, match=r"report|codec"):
        parse_report(line)


def test_launcher_plan_binds_a_program_under_tmp_after_the_private_tmp(tmp_path: Path) -> None:
    """A provider's node_modules under /tmp is bound after bwrap's private /tmp, not hidden."""
    program = tmp_path / "checkout" / "node_modules" / ".bin" / "claude"
    program.parent.mkdir(parents=True)
    program.touch()
    plan = LaunchPlan(
        bwrap="/usr/bin/bwrap",
        spec=spec(tmp_path, (str(program),)),
        home=tmp_path / "home",
        run_dir=tmp_path / "run",
        fds={"info": 5, "block": 6, "seccomp": 7},
        privileged=True,
        uid=3000001,
        processes=1024,
        home_bytes=1 << 30,
    )
    argv = launcher_argv(plan)
    launch = json.loads(argv[-1])
    bwrap = launch["argv"]
    root = str(tmp_path / "checkout" / "node_modules")
    assert launch["binds"]["program0"] == root
    assert bwrap.index("/tmp") < bwrap.index(root)
    assert launch["rlimits"]["nproc"] == [1024, 1024]
    assert launch["uid"] == launch["gid"] == 3000001
    assert launch["keep_fds"] == [5, 6, 7]
    assert bwrap[bwrap.index("--chdir") + 1] == SANDBOX_HOME


def test_environment_is_the_sandbox_view_with_the_spec_last(tmp_path: Path) -> None:
    """Inside the sandbox HOME is /home/user; the spec's own variables are added last."""
    env = session_environment(spec(tmp_path), sandboxed=True)
    assert env["HOME"] == SANDBOX_HOME
    assert env["EXTRA"] == "1"
    assert env["REMOTECLI_SESSION_ID"] == "s1"
    bare = session_environment(spec(tmp_path), sandboxed=False)
    assert bare["HOME"] == str(tmp_path / "s1" / "home")


def test_xauthority_entry_is_one_familywild_record() -> None:
    """The X cookie file holds one FamilyWild MIT-MAGIC-COOKIE-1 record with the cookie."""
    cookie = bytes(range(16))
    entry = xauthority_entry(cookie)
    assert entry[:2] == b"\xff\xff"
    assert entry.endswith(b"\x00\x10" + cookie)
    assert b"MIT-MAGIC-COOKIE-1" in entry
