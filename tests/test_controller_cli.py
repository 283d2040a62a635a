"""`remotecli up` and `remotecli user add` as real subprocesses, reached through the gateway."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from remotecli.controller.sessions import RESTART_REASON
from tests.conftest import MS

REMOTECLI = [sys.executable, "-m", "remotecli"]
URL_LINE = re.compile(r"(http://127\.0\.0\.1:\d+)/login\?token=(\S+)")


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without REMOTECLI_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTECLI_")}
    env.update(extra)
    return env


class Running:
    """A `remotecli up` subprocess whose printed URL was read."""

    def __init__(self, process: subprocess.Popen[str], base: str, token: str) -> None:
        self.process = process
        self.base = base
        self.token = token

    def client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10_000 * MS,
        )

    def terminate(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=20_000 * MS)


def read_url(process: subprocess.Popen[str]) -> tuple[str, str]:
    """Read stdout lines until the login URL, with a timeout; fail with stderr if it exits."""
    found: list[tuple[str, str]] = []
    done = threading.Event()

    def reader() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            match = URL_LINE.search(line)
            if match:
                found.append((match.group(1), match.group(2)))
                break
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    if not done.wait(15_000 * MS) or not found:
        process.kill()
        _out, err = process.communicate(timeout=5)
        raise AssertionError(f"`remotecli up` printed no URL; stderr:\n{err}")
    return found[0]


@contextmanager
def remotecli_up(
    data_dir: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[Running]:
    """Run `remotecli up --listen 127.0.0.1:0 --data-dir DIR`; kill it if the test leaves it."""
    process = subprocess.Popen(
        [*REMOTECLI, "up", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else clean_env(),
    )
    try:
        base, token = read_url(process)
        yield Running(process, base, token)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def processes_mentioning(text: str) -> list[int]:
    """Return the pids whose command line contains ``text`` (a session id is in its paths)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # it ended while we looked
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def wait_ready(client: httpx.Client, session_id: str) -> str:
    """Follow the SSE stream until ready or a final state; return the state reached."""
    with client.stream("GET", f"/api/sessions/{session_id}/events") as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                state: str = json.loads(line.removeprefix("data: "))["state"]
                if state in ("ready", "failed", "stopped"):
                    return state
    raise AssertionError("the event stream ended without a final state")


def test_up_prints_url_serves_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    """`up` prints the login URL, answers health, readiness and login via the gateway, exits 0."""
    with remotecli_up(tmp_path / "data") as up:
        assert httpx.get(f"{up.base}/healthz", timeout=5000 * MS).status_code == 200
        operator = {"Authorization": f"Bearer {up.token}"}
        ready = httpx.get(f"{up.base}/readyz", headers=operator, timeout=5000 * MS)
        assert {k: ready.json()[k] for k in ("status", "active_sessions")} == {
            "status": "ready",
            "active_sessions": 0,
        }
        assert "limits" in ready.json()["sandbox"]  # which limits are in force (docs/drivers.md)
        login = httpx.get(f"{up.base}/login", params={"token": up.token}, timeout=5000 * MS)
        assert login.status_code == 303
        assert "remotecli_login=" in login.headers["set-cookie"]
        assert httpx.get(f"{up.base}/api/sessions", timeout=5000 * MS).status_code == 401
        assert up.terminate() == 0
    token_file = tmp_path / "data" / "admin.token"
    assert token_file.read_text().strip() == up.token
    assert token_file.stat().st_mode & 0o777 == 0o600


def test_admin_token_from_environment_and_user_add(tmp_path: Path) -> None:
    """REMOTECLI_TOKEN is the admin token; `user add` prints a working token for another user."""
    data = tmp_path / "data"
    added = subprocess.run(
        [*REMOTECLI, "user", "add", "bob", "--token-only", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=20_000 * MS,
        check=True,
    )
    bob_token = added.stdout.strip()
    assert len(bob_token) >= 43
    admin_token = "env-admin-token-0123456789"
    with remotecli_up(data, env=clean_env(REMOTECLI_TOKEN=admin_token)) as up:
        assert up.token == admin_token
        bob = httpx.get(
            f"{up.base}/api/sessions",
            headers={"Authorization": f"Bearer {bob_token}"},
            timeout=5000 * MS,
        )
        assert bob.status_code == 200
        assert up.terminate() == 0


def test_up_on_a_postgresql_store(tmp_path: Path, postgres_url: str) -> None:
    """`up` with REMOTECLI_STORE_URL serves from the PostgreSQL database: a user added from
    another host's data dir signs in, and no SQLite file is made."""
    env = clean_env(REMOTECLI_STORE_URL=postgres_url)
    added = subprocess.run(
        [*REMOTECLI, "user", "add", "bob", "--token-only", "--data-dir", str(tmp_path / "other")],
        capture_output=True,
        text=True,
        env=env,
        timeout=20_000 * MS,
        check=True,
    )
    with remotecli_up(tmp_path / "data", env=env) as up:
        bearer = {"Authorization": f"Bearer {added.stdout.strip()}"}
        me = httpx.get(f"{up.base}/api/me", headers=bearer, timeout=5000 * MS)
        assert me.json()["name"] == "bob"
        operator = {"Authorization": f"Bearer {up.token}"}
        ready = httpx.get(f"{up.base}/readyz", headers=operator, timeout=5000 * MS)
        assert ready.json()["status"] == "ready"
        assert up.terminate() == 0
    assert not (tmp_path / "data" / "remotecli.sqlite3").exists()


def test_bad_listen_address_exits_2(tmp_path: Path) -> None:
    """A malformed --listen is refused with exit status 2 and a message naming the fix."""
    result = subprocess.run(
        [*REMOTECLI, "up", "--listen", "nowhere", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=20_000 * MS,
    )
    assert result.returncode == 2
    assert "is not HOST:PORT" in result.stderr


needs_local_sandbox = pytest.mark.skipif(
    not all(shutil.which(p) for p in ("Xvnc", "tmux", "xterm")),
    reason="the local driver needs Xvnc, tmux and xterm (make test installs them)",
)


@needs_local_sandbox
def test_restart_after_crash_with_a_running_session(tmp_path: Path) -> None:
    """After the controller is killed with a session ready, the next start marks it failed and
    none of its processes is left."""
    data = tmp_path / "data"
    with remotecli_up(data) as up, up.client() as client:
        session = client.post("/api/sessions", json={"provider": "shell"}).json()
        assert wait_ready(client, session["id"]) == "ready"
        assert processes_mentioning(session["id"]) != []  # the check below can see them
        assert up.terminate(signal.SIGKILL) == -signal.SIGKILL
    with remotecli_up(data) as up, up.client() as client:
        after = client.get(f"/api/sessions/{session['id']}").json()
        assert after["state"] == "failed"
        assert "remote-cli was restarted" in after["reason"]
        assert after["end_cause"] == "restart"
        assert processes_mentioning(session["id"]) == []
        assert up.terminate() == 0


@needs_local_sandbox
def test_sigterm_stops_running_sessions(tmp_path: Path) -> None:
    """SIGTERM with a session ready stops it (state stopped) and exits 0."""
    data = tmp_path / "data"
    with remotecli_up(data) as up, up.client() as client:
        session = client.post("/api/sessions", json={"provider": "shell"}).json()
        assert wait_ready(client, session["id"]) == "ready"
        assert up.terminate() == 0
    with remotecli_up(data) as up, up.client() as client:
        after = client.get(f"/api/sessions/{session['id']}").json()
        assert after["state"] == "stopped"
        assert after["reason"] == RESTART_REASON
        assert after["end_cause"] == "restart"
        assert up.terminate() == 0


def test_taken_port_exits_2(tmp_path: Path) -> None:
    """A --listen address already in use is refused with exit status 2 naming the address."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*REMOTECLI, "up", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=20_000 * MS,
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


# --- remotecli secret --------------------------------------------------------------------------


def secret(
    data: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `remotecli secret ARGS --data-dir DATA` and return what it did."""
    return subprocess.run(
        [*REMOTECLI, "secret", *args, "--data-dir", str(data)],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=20_000 * MS,
    )


def keep_two_signins(data: Path, env_key: str | None = None) -> None:
    """Store two kept sign-ins in ``data`` the way the controller does, then let go."""
    from remotecli.controller.server import open_store
    from remotecli.controller.signins import SignIns

    store = open_store(data)
    signins = SignIns.open(store, data, env_key)
    signins.save("alice", "codex", {".codex/auth.json": b"token-a"}, None)
    signins.save("bob", "codex", {".codex/auth.json": b"token-b"}, None)
    signins.close()
    store.close()


def kept_files(data: Path, user: str, env_key: str | None = None) -> dict[str, bytes] | None:
    """Load ``user``'s kept codex sign-in with the data dir's current key."""
    from remotecli.controller.server import open_store
    from remotecli.controller.signins import SignIns

    store = open_store(data)
    try:
        signins = SignIns.open(store, data, env_key)
        kept = signins.load(user, "codex")
        signins.close()
    finally:
        store.close()
    return None if kept is None else kept.files


def test_secret_rotate_replaces_the_key_file(tmp_path: Path) -> None:
    """`secret rotate` re-encrypts every kept sign-in, replaces secret.key and says how many."""
    from remotecli.controller.signins import read_key_file

    data = tmp_path / "data"
    keep_two_signins(data)
    old = read_key_file(data / "secret.key")
    result = secret(data, "rotate")
    assert result.returncode == 0, result.stderr
    new = read_key_file(data / "secret.key")
    assert new.key_id != old.key_id
    assert result.stdout.strip() == f"re-encrypted 2 sign-in(s) with key {new.key_id}"
    assert kept_files(data, "alice") == {".codex/auth.json": b"token-a"}


def test_secret_rotate_with_environment_key(tmp_path: Path) -> None:
    """With REMOTECLI_SECRET_KEY, `secret rotate` needs --new-key-file (exit 2 naming it), and
    with one re-encrypts for that key."""
    data = tmp_path / "data"
    old_key = subprocess.run(
        [*REMOTECLI, "secret", "new-key"], capture_output=True, text=True, check=True
    ).stdout.strip()
    keep_two_signins(data, old_key)
    env = clean_env(REMOTECLI_SECRET_KEY=old_key)
    refused = secret(data, "rotate", env=env)
    assert refused.returncode == 2
    assert "--new-key-file" in refused.stderr
    new_key_file = tmp_path / "new.key"
    created = subprocess.run([*REMOTECLI, "secret", "new-key"], capture_output=True, check=True)
    new_key_file.write_bytes(created.stdout)
    new_key_file.chmod(0o600)
    result = secret(data, "rotate", "--new-key-file", str(new_key_file), env=env)
    assert result.returncode == 0, result.stderr
    assert "set REMOTECLI_SECRET_KEY" in result.stdout
    new_key = new_key_file.read_text().strip()
    assert kept_files(data, "bob", new_key) == {".codex/auth.json": b"token-b"}
    assert not (data / "secret.key").exists()


def test_secret_rotate_refused_while_the_key_is_held(tmp_path: Path) -> None:
    """`secret rotate` exits 2 and changes nothing while a controller holds the key lock."""
    from remotecli.controller.server import open_store
    from remotecli.controller.signins import SignIns

    data = tmp_path / "data"
    keep_two_signins(data)
    before = (data / "secret.key").read_bytes()
    store = open_store(data)
    holder = SignIns.open(store, data, None)
    try:
        result = secret(data, "rotate")
    finally:
        holder.close()
        store.close()
    assert result.returncode == 2
    assert "a controller is running" in result.stderr
    assert (data / "secret.key").read_bytes() == before


def test_secret_rotate_refused_while_up_runs(tmp_path: Path) -> None:
    """`secret rotate` exits 2 while `remotecli up` serves the same data dir."""
    data = tmp_path / "data"
    with remotecli_up(data) as up:
        result = secret(data, "rotate")
        assert up.terminate() == 0
    assert result.returncode == 2
    assert "is using the data dir" in result.stderr


def test_secret_forget(tmp_path: Path) -> None:
    """`secret forget USER PROVIDER` and `secret forget --unreadable` drop what they name."""
    data = tmp_path / "data"
    keep_two_signins(data)
    result = secret(data, "forget", "alice", "codex")
    assert (result.returncode, result.stdout.strip()) == (0, "forgot 1 sign-in(s)")
    assert kept_files(data, "alice") is None
    (data / "secret.key").unlink()  # the key is lost: bob's sign-in cannot be read any more
    result = secret(data, "forget", "--unreadable")
    assert (result.returncode, result.stdout.strip()) == (0, "forgot 1 sign-in(s)")
    assert kept_files(data, "bob") is None
    assert secret(data, "forget").returncode == 2
