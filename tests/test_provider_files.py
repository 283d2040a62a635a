"""The built-in providers' ``keep`` files are the ones the real CLIs read, proved offline.

Each test runs a CLI installed by ``npm ci`` (``node_modules/.bin``) with a temporary HOME, once
without and once with files planted at its ``keep`` paths, and asserts that the CLI behaves
differently, in a way that only reading those files explains. The CLIs run with a clean
environment (no proxy, no API key, no ``CODEX_HOME`` / ``CLAUDE_CONFIG_DIR`` /
``GEMINI_CLI_HOME``, update checks and telemetry off) inside a network namespace of their own
(``unshare --net``): only its loopback, which is down, so nothing can reach the internet whatever
a CLI tries. A CLI that is not installed, or that cannot run on this host's Node.js, is skipped
with the catalogue's reason. docs/providers.md says what each proof covers and what it cannot.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import pty
import pwd
import re
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from remotecli.providers import HostPrograms, builtin_provider
from tests.conftest import MS

TIMEOUT = 20_000 * MS  # seconds a CLI may take; each one here answers within about 2 s

QUIET = {
    # Claude Code: no updater, no telemetry, error reports or other non-essential traffic.
    "DISABLE_AUTOUPDATER": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    # Gemini CLI: no relaunch with a bigger heap, no browser; the paste-code flow instead.
    "GEMINI_CLI_NO_RELAUNCH": "true",
    "NO_BROWSER": "true",
}

OFFLINE_PREFIXES = (("unshare", "--net"), ("unshare", "--user", "--map-current-user", "--net"))


@functools.cache
def offline_prefix() -> tuple[str, ...] | str:
    """Return the argv prefix that runs a command in a fresh network namespace, or why none."""
    for prefix in OFFLINE_PREFIXES:
        if shutil.which(prefix[0]) is None:
            continue
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=TIMEOUT, check=False)
        if probe.returncode == 0:
            return prefix
    return (
        "no network namespace can be made here (unshare --net, as root or in a user namespace), "
        "and these tests never let a CLI reach the internet"
    )


def installed(name: str) -> str:
    """Return the absolute path of a built-in provider's program, or skip saying why not."""
    provider = builtin_provider(name)
    assert provider is not None
    answer = HostPrograms().can_run(provider.command)
    if isinstance(answer, str):
        pytest.skip(
            f"{provider.title}: {answer} ({provider.install_hint}; `make test` runs npm ci)"
        )
    prefix = offline_prefix()
    if isinstance(prefix, str):
        pytest.skip(prefix)
    return answer[0]


def clean_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment with HOME and what a CLI needs to start, and nothing of ours."""
    node = shutil.which("node")
    dirs = [os.path.dirname(node)] if node else []
    path = os.pathsep.join(dict.fromkeys([*dirs, "/usr/local/bin", "/usr/bin", "/bin"]))
    env = {"PATH": path, "HOME": str(home), "LANG": "C.UTF-8", "TERM": "dumb", **QUIET}
    env.update(extra or {})
    return env


def run_offline(
    program: str, args: Sequence[str], home: Path, extra: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``program args`` offline with HOME=``home``; stdout and stderr come back together."""
    prefix = offline_prefix()
    assert isinstance(prefix, tuple)
    return subprocess.run(
        [*prefix, program, *args],
        env=clean_env(home, extra),
        cwd=home,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def make_home(tmp_path: Path, name: str) -> Path:
    """Make an empty HOME for one run."""
    home = tmp_path / name
    home.mkdir()
    return home


def plant(home: Path, keep_path: str, content: str) -> Path:
    """Write ``content`` at a ``~/...`` keep path under ``home`` (mode 0600, as the CLIs do)."""
    assert keep_path.startswith("~/")
    target = home / keep_path[2:]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    target.chmod(0o600)
    return target


def keeps(name: str, path: str) -> str:
    """Return ``path``, having checked that it is one of the provider's keep paths."""
    provider = builtin_provider(name)
    assert provider is not None
    assert path in provider.keep, f"{path} is not kept for {name}"
    return path


def in_a_day_ms() -> int:
    return int((time.time() + 86400) * 1000)


# --- Codex CLI --------------------------------------------------------------------------------


def b64url(data: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def codex_chatgpt_auth() -> str:
    """An auth.json as `codex login` writes it after a ChatGPT sign-in (unsigned, made-up JWTs)."""
    claims = {
        "email": "someone@example.com",
        "exp": int(time.time()) + 86400,
        "https://api.openai.com/auth": {
            "chatgpt_plan_type": "plus",
            "chatgpt_account_id": "account-1",
        },
    }
    jwt = f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(claims)}.c2lnbmF0dXJl"
    tokens = {"id_token": jwt, "access_token": jwt, "refresh_token": "rt-made-up"}
    return json.dumps(
        {
            "auth_mode": "chatgpt",
            "OPENAI_API_KEY": None,
            "tokens": {**tokens, "account_id": "account-1"},
            "last_refresh": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )


CODEX_API_KEY_AUTH = json.dumps({"auth_mode": "apikey", "OPENAI_API_KEY": "sk-made-up-0000000000"})


@pytest.mark.parametrize(
    ("auth_json", "signed_in"),
    [
        (codex_chatgpt_auth(), "Logged in using ChatGPT"),
        (CODEX_API_KEY_AUTH, "API key configured"),
    ],
    ids=["chatgpt", "api-key"],
)
def test_codex_signs_in_from_codex_auth_json(
    tmp_path: Path, auth_json: str, signed_in: str
) -> None:
    """`codex login status` is logged in with a planted ~/.codex/auth.json and not without it."""
    codex = installed("codex")
    empty = run_offline(codex, ["login", "status"], make_home(tmp_path, "empty"))
    assert empty.returncode == 1, empty.stdout
    assert "Not logged in" in empty.stdout

    home = make_home(tmp_path, "kept")
    plant(home, keeps("codex", "~/.codex/auth.json"), auth_json)
    kept = run_offline(codex, ["login", "status"], home)
    assert kept.returncode == 0, kept.stdout
    assert signed_in in kept.stdout


# --- Claude Code ------------------------------------------------------------------------------


def claude_credentials() -> str:
    """A ~/.claude/.credentials.json as a claude.ai sign-in leaves it (made-up tokens)."""
    oauth = {
        "accessToken": "sk-ant-oat01-made-up",
        "refreshToken": "sk-ant-ort01-made-up",
        "expiresAt": in_a_day_ms(),
        "scopes": ["user:inference", "user:profile"],
        "subscriptionType": "pro",
    }
    return json.dumps({"claudeAiOauth": oauth})


CLAUDE_ACCOUNT = {
    "accountUuid": "00000000-0000-4000-8000-000000000001",
    "emailAddress": "someone@example.com",
    "organizationUuid": "00000000-0000-4000-8000-000000000002",
    "organizationName": "Example",
}


def claude_status(claude: str, home: Path) -> dict[str, object]:
    done = run_offline(claude, ["auth", "status", "--json"], home)
    status = json.loads(done.stdout)
    assert isinstance(status, dict), done.stdout
    assert (done.returncode == 0) == (status.get("loggedIn") is True), done.stdout
    return status


def test_claude_signs_in_from_credentials_json(tmp_path: Path) -> None:
    """`claude auth status` is logged in through claude.ai with ~/.claude/.credentials.json only."""
    claude = installed("claude-code")
    assert claude_status(claude, make_home(tmp_path, "empty"))["loggedIn"] is False

    home = make_home(tmp_path, "kept")
    plant(home, keeps("claude-code", "~/.claude/.credentials.json"), claude_credentials())
    status = claude_status(claude, home)
    assert status["loggedIn"] is True
    assert status["authMethod"] == "claude.ai"
    assert status["subscriptionType"] == "pro"


def test_claude_account_comes_from_claude_json(tmp_path: Path) -> None:
    """The signed-in account (e-mail, organisation) is read from ~/.claude.json, not the tokens."""
    claude = installed("claude-code")
    home = make_home(tmp_path, "kept")
    plant(home, keeps("claude-code", "~/.claude/.credentials.json"), claude_credentials())
    assert claude_status(claude, home)["email"] is None

    plant(
        home, keeps("claude-code", "~/.claude.json"), json.dumps({"oauthAccount": CLAUDE_ACCOUNT})
    )
    status = claude_status(claude, home)
    assert status["email"] == "someone@example.com"
    assert status["orgName"] == "Example"


def screen_until(
    argv: Sequence[str], env: Mapping[str, str], cwd: Path, marks: Sequence[str]
) -> str:
    """Run ``argv`` on a pseudo-terminal until its screen shows one of ``marks``; return it.

    The screen text has its escape sequences and all white space removed (the CLIs move the
    cursor instead of writing spaces), so ``marks`` are written without spaces.
    """
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        argv, stdin=terminal, stdout=terminal, stderr=terminal, env=dict(env), cwd=cwd
    )
    os.close(terminal)
    raw = b""
    text = ""
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and not any(mark in text for mark in marks):
            ready, _, _ = select.select([controller], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the program exited: EIO on the controller side
                break
            if not chunk:
                break
            raw += chunk
            plain = re.sub(
                r"\x1b\[[0-9;?<>=]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(\x07|\x1b\\)|\x1b.",
                "",
                raw.decode("utf-8", "replace"),
            )
            text = re.sub(r"\s+", "", plain)
    finally:
        process.kill()
        process.wait()
        os.close(controller)
    return text


def test_claude_skips_onboarding_with_claude_json(tmp_path: Path) -> None:
    """With ~/.claude.json's onboarding state Claude Code goes straight to the folder-trust
    question; without it, signed in all the same, it runs its first-start onboarding."""
    claude = installed("claude-code")
    prefix = offline_prefix()
    assert isinstance(prefix, tuple)
    trust, onboarding = "Itrustthisfolder", "UnabletoconnecttoAnthropicservices"

    first = make_home(tmp_path, "first")
    plant(first, keeps("claude-code", "~/.claude/.credentials.json"), claude_credentials())
    env = clean_env(first, {"TERM": "xterm-256color"})
    screen = screen_until([*prefix, claude], env, first, [trust, onboarding])
    assert onboarding in screen  # the welcome screen checks connectivity first: offline, it stops
    assert trust not in screen

    again = make_home(tmp_path, "again")
    plant(again, keeps("claude-code", "~/.claude/.credentials.json"), claude_credentials())
    state = {"hasCompletedOnboarding": True, "oauthAccount": CLAUDE_ACCOUNT}
    plant(again, keeps("claude-code", "~/.claude.json"), json.dumps(state))
    env = clean_env(again, {"TERM": "xterm-256color"})
    screen = screen_until([*prefix, claude], env, again, [trust, onboarding])
    assert trust in screen
    assert onboarding not in screen


# --- Gemini CLI -------------------------------------------------------------------------------

GEMINI_OAUTH = {"security": {"auth": {"selectedType": "oauth-personal"}}}
GEMINI_API_KEY = {"security": {"auth": {"selectedType": "gemini-api-key"}}}


def gemini_oauth_creds() -> str:
    """A ~/.gemini/oauth_creds.json as a Google sign-in leaves it (made-up, unexpired tokens)."""
    return json.dumps(
        {
            "access_token": "ya29.made-up",
            "refresh_token": "1//made-up",
            "scope": "https://www.googleapis.com/auth/cloud-platform",
            "token_type": "Bearer",
            "expiry_date": in_a_day_ms(),
        }
    )


def gemini_sealed_api_key(api_key: str, hostname: str, username: str) -> str:
    """~/.gemini/gemini-credentials.json holding an API key, sealed as Gemini CLI's file keychain
    seals it: AES-256-GCM under scrypt("gemini-cli-oauth", "HOST-USER-gemini-cli")."""
    salt = f"{hostname}-{username}-gemini-cli".encode()
    key = hashlib.scrypt(b"gemini-cli-oauth", salt=salt, n=16384, r=8, p=1, dklen=32)
    entry = {
        "serverName": "default-api-key",
        "token": {"accessToken": api_key, "tokenType": "ApiKey"},
        "updatedAt": int(time.time() * 1000),
    }
    data = {"gemini-cli-api-key": {"default-api-key": json.dumps(entry)}}
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(iv, json.dumps(data).encode(), None)
    return f"{iv.hex()}:{sealed[-16:].hex()}:{sealed[:-16].hex()}"


def test_gemini_auth_choice_comes_from_settings_json(tmp_path: Path) -> None:
    """Gemini CLI asks for an auth method without ~/.gemini/settings.json's selectedType and
    goes on to the Google sign-in with it."""
    gemini = installed("gemini-cli")
    empty = make_home(tmp_path, "empty")
    asked = run_offline(gemini, ["-p", "hello"], empty)
    assert asked.returncode != 0
    assert f"Please set an Auth method in your {empty}/.gemini/settings.json" in asked.stdout

    home = make_home(tmp_path, "kept")
    plant(home, keeps("gemini-cli", "~/.gemini/settings.json"), json.dumps(GEMINI_OAUTH))
    chosen = run_offline(gemini, ["-p", "hello"], home)
    assert chosen.returncode != 0  # no credentials: a sign-in is needed, and -p cannot ask
    assert "Please set an Auth method" not in chosen.stdout
    assert "Manual authorization is required" in chosen.stdout


def test_gemini_reads_google_sign_in_from_oauth_creds_json(tmp_path: Path) -> None:
    """With ~/.gemini/oauth_creds.json Gemini CLI checks the planted token with Google (which
    fails offline); without it there is no token to check."""
    gemini = installed("gemini-cli")
    checked = "Cached credentials are not valid: request to https://oauth2.googleapis.com/tokeninfo"

    bare = make_home(tmp_path, "bare")
    plant(bare, keeps("gemini-cli", "~/.gemini/settings.json"), json.dumps(GEMINI_OAUTH))
    assert checked not in run_offline(gemini, ["--debug", "-p", "hello"], bare).stdout

    home = make_home(tmp_path, "kept")
    plant(home, keeps("gemini-cli", "~/.gemini/settings.json"), json.dumps(GEMINI_OAUTH))
    plant(home, keeps("gemini-cli", "~/.gemini/oauth_creds.json"), gemini_oauth_creds())
    assert checked in run_offline(gemini, ["--debug", "-p", "hello"], home).stdout


def test_gemini_reads_api_key_from_gemini_credentials_json(tmp_path: Path) -> None:
    """An API key saved in the sign-in dialog lives in ~/.gemini/gemini-credentials.json: with it
    Gemini CLI passes authentication (and stops at the folder-trust check); without it, it asks
    for GEMINI_API_KEY."""
    gemini = installed("gemini-cli")
    missing = "you must specify the GEMINI_API_KEY environment variable"
    bare = make_home(tmp_path, "bare")
    plant(bare, keeps("gemini-cli", "~/.gemini/settings.json"), json.dumps(GEMINI_API_KEY))
    assert missing in run_offline(gemini, ["-p", "hello"], bare).stdout

    home = make_home(tmp_path, "kept")
    plant(home, keeps("gemini-cli", "~/.gemini/settings.json"), json.dumps(GEMINI_API_KEY))
    sealed = gemini_sealed_api_key("AIza-made-up", socket.gethostname(), current_user())
    plant(home, keeps("gemini-cli", "~/.gemini/gemini-credentials.json"), sealed)
    passed = run_offline(gemini, ["-p", "hello"], home).stdout
    assert missing not in passed
    assert "is not running in a trusted directory" in passed


def test_gemini_credentials_file_is_bound_to_host_and_user_name(tmp_path: Path) -> None:
    """gemini-credentials.json sealed under another host name is not read: a kept copy only
    works where the host name and user name are the same (the local sandbox's are fixed)."""
    gemini = installed("gemini-cli")
    home = make_home(tmp_path, "kept")
    plant(home, keeps("gemini-cli", "~/.gemini/settings.json"), json.dumps(GEMINI_API_KEY))
    sealed = gemini_sealed_api_key("AIza-made-up", "another-host", current_user())
    plant(home, keeps("gemini-cli", "~/.gemini/gemini-credentials.json"), sealed)
    output = run_offline(gemini, ["-p", "hello"], home).stdout
    assert "you must specify the GEMINI_API_KEY environment variable" in output


def test_gemini_google_accounts_json_has_no_offline_proof() -> None:
    """~/.gemini/google_accounts.json (the signed-in Google account) is read only once a token
    was verified with Google, which cannot happen offline: this test says so and skips."""
    installed("gemini-cli")
    pytest.skip(
        "Gemini CLI reads ~/.gemini/google_accounts.json only after Google accepted the cached "
        "token (oauth2.googleapis.com/tokeninfo), which needs the internet; it is kept because "
        "the sign-in writes it and sign-out clears it (docs/providers.md)"
    )


def current_user() -> str:
    """The user name Node's os.userInfo() reports for this process (from the password file)."""
    return pwd.getpwuid(os.getuid()).pw_name
