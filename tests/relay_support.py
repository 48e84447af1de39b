"""A real agor-relay for tests and the benchmark: the program, on loopback, with a certificate made by
`agor-relay cert`, the echo sidecar under the launcher, and a websockets client acting as agor's controller."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from agor_systemd.relay.tls import der_of_pem, pinned_client_context

REPO = Path(__file__).resolve().parent.parent
ECHO_SIDECAR = REPO / "tests" / "programs" / "echo_sidecar.py"
TOKEN = "relay-test-token-6f1c"
AGOR_RELAY = [sys.executable, "-m", "agor_systemd.relay"]


@dataclass
class RunningRelay:
    process: subprocess.Popen[str]
    port: int
    directory: Path
    cert: Path
    key: Path
    log: Path
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def context(self):
        return pinned_client_context(der_of_pem(self.cert.read_bytes()))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_log(self, needle: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in (text := self.log_text()):
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not in the relay's log:\n{self.log_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def make_certificate(directory: Path, name: str = "relay") -> tuple[Path, Path]:
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [*AGOR_RELAY, "cert", "--host", "127.0.0.1", "--host", "localhost", "--cert", str(cert), "--key", str(key)],
        check=True,
        capture_output=True,
    )
    return cert, key


def start_relay(directory: Path, *flags: str, relay_toml: str = "", sidecar: bool = True) -> RunningRelay:
    """agor-relay serve on 127.0.0.1 and a free port; its units.toml runs the echo sidecar."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "relay-cert.pem", directory / "relay-key.pem"
    if not cert.exists():
        make_certificate(directory)
    token = directory / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    config = directory / "units.toml"
    command = json.dumps([sys.executable, str(ECHO_SIDECAR)])
    config.write_text(
        f'[sidecar]\nworking_directory = "{directory}"\n\n[restart]\nbase_s = 0.2\n\n'
        f"[relay]\nsidecar_command = {command}\n{relay_toml}\n"
    )
    log = directory / "relay.log"
    argv = [
        *AGOR_RELAY,
        "serve",
        "--port",
        "0",
        "--bind",
        "127.0.0.1",
        "--token-file",
        str(token),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--config",
        str(config),
        *(() if sidecar else ("--no-sidecar",)),
        *flags,
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=directory)
    relay = RunningRelay(process, 0, directory, cert, key, log)
    deadline = time.monotonic() + 20
    while (match := re.search(r"listening on wss://[^:]+:(\d+)", relay.log_text())) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the relay did not start:\n{relay.log_text()}")
        time.sleep(0.05)
    relay.port = int(match.group(1))
    return relay


async def controller(
    relay: RunningRelay,
    token: str | None = TOKEN,
    source: str = "127.0.0.1",
    session: str | None = None,
    **kwargs: Any,
) -> ClientConnection:
    """A websockets client as agor's controller connects: Bearer token in the upgrade, pinned TLS."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    if session:
        headers["X-Agor-Session"] = session
    return await ws_connect(
        relay.url,
        ssl=relay.context(),
        additional_headers=headers,
        local_addr=(source, 0),
        compression=None,
        max_size=None,
        **kwargs,
    )


async def next_frame(connection: ClientConnection, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next frame of type `kind` (others are skipped)."""
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await connection.recv())
            if frame["type"] == kind:
                return frame


def command(kind: str, command_id: str = "1", **payload: Any) -> str:
    return json.dumps({"id": command_id, "type": kind, "payload": payload or None})
