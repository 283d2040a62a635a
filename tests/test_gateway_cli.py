"""`remotecli gateway` as a real process, and TLS and metrics of a Gateway."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import MS
from tests.gateway_peers import HttpUpstream, WebSocketUpstream, running_gateway

REMOTECLI = [sys.executable, "-m", "remotecli"]


# Overriding event_loop_policy is deprecated in pytest-asyncio; its replacement hook would have
# to live in the shared conftest, so the warning is silenced here instead.
pytestmark = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy"')


@pytest.fixture
def event_loop_policy() -> uvloop.EventLoopPolicy:
    """Run these tests on uvloop, as `remotecli gateway` does."""
    return uvloop.EventLoopPolicy()


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run `remotecli` with ``args`` to completion; return status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *REMOTECLI,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 20000 * MS)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_help_documents_every_option() -> None:
    """`remotecli gateway --help` lists every option the issue asks for."""
    status, out, _ = await run_cli("gateway", "--help")
    assert status == 0
    for option in (
        "--listen", "--route", "--connect-timeout", "--response-timeout",
        "--handshake-timeout", "--idle-timeout", "--max-header-bytes", "--max-connections",
        "--trusted-proxy", "--host-rewrite", "--tls-cert", "--tls-key", "--shutdown-grace",
        "--metrics-listen", "--log-format", "--log-level",
    ):  # fmt: skip
        assert option in out


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--route", "/api/=https://x:1"], {}, "uses https"),
        (["--route", "api=http://x:1"], {}, "must start with '/'"),
        (["--route", "/=http://x:1", "--trusted-proxy", "10.0.0.300/8"], {}, "not a CIDR"),
        ([], {"REMOTECLI_GATEWAY_ROUTE": "/=tcp://x"}, "is not understood"),
        ([], {"REMOTECLI_GATEWAY_LISTN": "x"}, "REMOTECLI_GATEWAY_LISTN is not a gateway option"),
        (["--route", "/=http://x:1", "--tls-cert", "/nonexistent.pem"], {}, "both --tls-cert"),
    ],
)
async def test_bad_configuration_exits_2_naming_it(
    args: list[str], env: dict[str, str], message: str
) -> None:
    """Bad routes, CIDRs, TLS options or variables exit 2 with one line naming the problem."""
    status, _, err = await run_cli("gateway", "--listen", "127.0.0.1:0", *args, env=env)
    assert status == 2
    assert message in err
    assert "Traceback" not in err


@pytest.fixture
async def gateway_process(
    tmp_path: Path,
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int, HttpUpstream, WebSocketUpstream]]:
    """A `remotecli gateway` subprocess routing / to HTTP and /ws/ to WebSocket upstreams."""
    upstream = await HttpUpstream().start()
    ws_upstream = await WebSocketUpstream().start()
    process = await asyncio.create_subprocess_exec(
        *REMOTECLI, "gateway", "--listen", "127.0.0.1:0", "--log-format", "json",
        "--route", f"/={upstream.url}", "--route", f"/ws/={ws_upstream.url}",
        "--shutdown-grace", str(1000 * MS),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    port = 0
    async with asyncio.timeout(20000 * MS):
        while not port:
            record = json.loads(await process.stderr.readline())
            if record["event"] == "gateway listening":
                port = int(record["address"].rsplit(":", 1)[1])
    yield process, port, upstream, ws_upstream
    if process.returncode is None:
        process.kill()
        await process.wait()
    upstream.close()
    await ws_upstream.close()


async def test_sigterm_finishes_in_flight_closes_tunnels_and_exits_0(
    gateway_process: tuple[asyncio.subprocess.Process, int, HttpUpstream, WebSocketUpstream],
) -> None:
    """On SIGTERM the gateway stops accepting, finishes a request, ends tunnels, exits 0."""
    process, port, upstream, _ = gateway_process
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(timeout=10000 * MS) as client:
        assert (await client.get(f"{base}/ok")).status_code == 200
        async with connect(f"ws://127.0.0.1:{port}/ws/") as ws:
            in_flight = asyncio.create_task(client.get(f"{base}/wait"))
            await asyncio.wait_for(upstream.waiting.wait(), 5000 * MS)
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5000 * MS):  # listener closes: new connections fail
                while True:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                    except OSError:
                        break
                    writer.close()
                    await asyncio.sleep(10 * MS)
            await ws.send(b"still open during the grace")
            assert await ws.recv() == b"still open during the grace"
            upstream.release.set()
            response = await asyncio.wait_for(in_flight, 5000 * MS)
            assert response.status_code == 200
            assert response.headers["connection"] == "close"
            with pytest.raises(ConnectionClosed):  # closed after the 1 s grace
                await asyncio.wait_for(ws.recv(), 10000 * MS)
    assert await asyncio.wait_for(process.wait(), 10000 * MS) == 0


def self_signed(directory: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for 127.0.0.1 and its key; return their paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_serves_https_and_wss_on_one_port(tmp_path: Path) -> None:
    """With a certificate, https and wss work on the same port and upstreams see proto https."""
    cert, key = self_signed(tmp_path)
    client_tls = ssl.create_default_context(cafile=str(cert))
    upstream = await HttpUpstream().start()
    ws_upstream = await WebSocketUpstream().start()
    routes = {"/": upstream.url, "/ws/": ws_upstream.url}
    async with running_gateway(routes, tls_cert=str(cert), tls_key=str(key)) as gateway:
        port = gateway.address[1]
        async with httpx.AsyncClient(verify=client_tls) as client:
            response = await client.get(f"https://127.0.0.1:{port}/secure")
        assert response.status_code == 200
        assert upstream.header(b"x-forwarded-proto") == b"https"
        async with connect(f"wss://127.0.0.1:{port}/ws/", ssl=client_tls) as ws:
            await ws.send(b"over tls" * 10000)
            assert await ws.recv() == b"over tls" * 10000
        assert ws_upstream.seen[-1]["X-Forwarded-Proto"] == "https"
    upstream.close()
    await ws_upstream.close()


async def test_metrics_endpoint_serves_the_gateway_registry() -> None:
    """--metrics-listen serves requests by status, tunnels and upstream errors."""
    upstream = await HttpUpstream().start()
    async with running_gateway(
        {"/": upstream.url, "/dead/": "http://127.0.0.1:1"}, metrics_listen=("127.0.0.1", 0)
    ) as gateway:
        assert gateway.metrics_address is not None
        base = f"http://127.0.0.1:{gateway.address[1]}"
        async with httpx.AsyncClient() as client:
            await client.get(f"{base}/ok")
            await client.get(f"{base}/dead/x")
            host, port = gateway.metrics_address
            text = (await client.get(f"http://{host}:{port}/metrics")).text
    assert 'remotecli_gateway_requests_total{status="200"} 1.0' in text
    assert 'remotecli_gateway_requests_total{status="502"} 1.0' in text
    assert 'remotecli_gateway_upstream_errors_total{kind="refused"} 1.0' in text
    assert "remotecli_gateway_tunnels_open 0.0" in text
    assert "remotecli_gateway_handshake_seconds_bucket" in text
    assert 'remotecli_gateway_bytes_total{direction="down"}' in text
    upstream.close()


async def test_listen_address_in_use_exits_2() -> None:
    """A --listen address already taken exits 2 saying it cannot listen there."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    status, _, err = await run_cli("gateway", "--listen", f"127.0.0.1:{port}")
    server.close()
    assert status == 2
    assert f"cannot listen on 127.0.0.1:{port}" in err
