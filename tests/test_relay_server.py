"""agor-relay on real sockets with real TLS: the program, a certificate from `agor-relay cert`, a
websockets client as agor's controller, real PTYs and the echo sidecar under the real launcher."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from relay_support import (
    AGOR_RELAY,
    TOKEN,
    RunningRelay,
    command,
    controller,
    make_certificate,
    next_frame,
    start_relay,
)
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agor_systemd.relay.client import peer_certificate
from agor_systemd.relay.tls import certificate_pin, der_of_pem


@pytest.fixture
def relay(tmp_path):
    running = start_relay(tmp_path / "relay", "--ping-timeout", "1", "--max-connections", "8")
    yield running
    running.stop()


def run(coroutine):
    return asyncio.run(coroutine)


async def refused(relay: RunningRelay, **kwargs) -> int:
    try:
        connection = await controller(relay, **kwargs)
    except InvalidStatus as e:
        return e.response.status_code
    await connection.close()
    return 101


async def serves(relay: RunningRelay, source: str = "127.0.0.1") -> dict:
    """A good controller's round trip: ready, then a ping answered with pong."""
    connection = await controller(relay, source=source)
    try:
        ready = await next_frame(connection, "ready")
        await connection.send(command("ping"))
        await next_frame(connection, "pong")
        return ready
    finally:
        await connection.close()


# -- authentication and abuse ----------------------------------------------------------------------------


def test_the_token_opens_a_session_and_ready_comes_first(relay):
    ready = run(serves(relay))
    assert ready["payload"]["resumed"] is False and len(ready["payload"]["session"]) >= 24


def test_no_token_or_a_wrong_one_is_refused_before_the_upgrade(relay):
    assert run(refused(relay, token=None)) == 401
    assert run(refused(relay, token="wrong")) == 401
    assert run(refused(relay, token=TOKEN[:-1])) == 401
    assert "127.0.0.1: wrong token" in relay.wait_log("127.0.0.1: no token")
    assert TOKEN not in relay.log_text()


def test_failures_lock_out_one_ip_and_not_another(relay):
    """1,000 bad attempts from 127.0.0.2; right after, 127.0.0.3 is served as if nothing happened."""

    async def hammer() -> list[int]:
        statuses = []
        for _ in range(100):
            statuses += await asyncio.gather(*(refused(relay, token="guess", source="127.0.0.2") for _ in range(10)))
        return statuses

    statuses = run(hammer())
    assert statuses[:10] == [401] * 10 and set(statuses[10:]) == {429}
    assert run(refused(relay, source="127.0.0.2")) == 429  # the right token does not help now
    started = time.monotonic()
    assert run(serves(relay, source="127.0.0.3"))["type"] == "ready"
    relay.wait_log("127.0.0.2: wrong token; locked out")
    assert time.monotonic() - started < 5, "a good client from another IP was slowed down"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_old_tls_and_plain_websocket_are_refused(relay):
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        context = relay.context()
        context.minimum_version = context.maximum_version = version
        try:
            context.set_ciphers("ALL:@SECLEVEL=0")
        except ssl.SSLError:
            pass
        with socket.create_connection(("127.0.0.1", relay.port)) as raw, pytest.raises(ssl.SSLError):
            context.wrap_socket(raw).do_handshake()
    with socket.create_connection(("127.0.0.1", relay.port)) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        raw.settimeout(5)
        assert not raw.recv(1024).startswith(b"HTTP/1.1 101")
    assert run(serves(relay))["type"] == "ready"


def test_garbage_and_unknown_frames_get_errors_and_the_connection_keeps_serving(relay):
    async def talk():
        connection = await controller(relay)
        await next_frame(connection, "ready")
        errors = []
        for frame in ("{not json", '{"id": "9", "type": "format_disk"}', '{"id": "10", "type": "pty_write"}'):
            await connection.send(frame)
            errors.append((await next_frame(connection, "error"))["payload"])
        await connection.send(command("ping"))
        await next_frame(connection, "pong")
        await connection.close()
        return errors

    errors = run(talk())
    assert errors[0] == {"commandId": None, "message": "not JSON"}
    assert errors[1]["commandId"] == "9" and "unknown type 'format_disk'" in errors[1]["message"]
    assert errors[2] == {"commandId": "10", "message": "pty_write: payload.id is missing"}


def test_an_oversize_frame_closes_that_connection_only(tmp_path):
    relay = start_relay(tmp_path / "r", "--max-frame-mib", "0.0625", sidecar=False)
    try:

        async def oversize():
            connection = await controller(relay)
            await next_frame(connection, "ready")
            await connection.send(command("agent_query", prompt="x" * 100_000))
            with pytest.raises(ConnectionClosed) as closed:
                await next_frame(connection, "pong")
            return closed.value.rcvd.code if closed.value.rcvd else None

        assert run(oversize()) == 1009  # message too big
        assert run(serves(relay))["type"] == "ready"
    finally:
        relay.stop()


def test_connections_beyond_the_cap_are_refused(relay):
    async def flood():
        held = [await controller(relay) for _ in range(8)]
        statuses = await asyncio.gather(*(refused(relay) for _ in range(20)))
        for connection in held:
            await connection.close()
        await asyncio.sleep(0.3)
        return statuses

    assert set(run(flood())) == {503}
    assert run(serves(relay))["type"] == "ready"


def test_a_silent_peer_is_dropped(relay):
    """--ping-timeout 1: pinged every second, dropped one second after a ping goes unanswered."""

    async def go_silent():
        connection = await controller(relay, ping_interval=None)
        await next_frame(connection, "ready")
        connection.transport.pause_reading()  # it neither reads nor answers pings any more
        await asyncio.sleep(4)
        connection.transport.resume_reading()
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(5):
                while True:
                    await connection.recv()
        return closed.value

    closed = run(go_silent())
    assert closed.rcvd is None or closed.rcvd.code == 1011  # the relay gave up on it (keepalive timeout)
    assert run(serves(relay))["type"] == "ready"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def paused_while(relay: RunningRelay, connection, until: str, seconds: float = 2.0) -> int:
    """Stop reading `connection` until the relay's log says `until` (then `seconds` more), sampling
    the relay's RSS; returns the peak in KiB."""
    connection.transport.pause_reading()
    peak = rss_kib(relay.process.pid)
    deadline = time.monotonic() + 30
    while until not in relay.log_text() and time.monotonic() < deadline:
        peak = max(peak, rss_kib(relay.process.pid))
        await asyncio.sleep(0.05)
    for _ in range(round(seconds / 0.1)):
        peak = max(peak, rss_kib(relay.process.pid))
        await asyncio.sleep(0.1)
    connection.transport.resume_reading()
    return peak


def test_terminal_output_to_a_slow_reader_holds_the_pty_back(tmp_path):
    """16 MB of output for a reader that stopped: the PTY waits (as on a slow terminal), memory stays
    bounded, the connection stays, and every byte arrives once it reads again."""
    relay = start_relay(tmp_path / "r", relay_toml="client_queue_mib = 0.25\nreplay_mib = 1", sidecar=False)
    try:

        async def flood():
            connection = await controller(relay)
            await next_frame(connection, "ready")
            before = rss_kib(relay.process.pid)
            script = "head -c 12000000 /dev/zero | base64 -w 0; echo; echo flood-done"
            await connection.send(command("pty_create", shell="/bin/sh", args=["-c", script]))
            await next_frame(connection, "pty_created")
            connection.transport.pause_reading()
            peak = before
            for _ in range(30):
                peak = max(peak, rss_kib(relay.process.pid))
                await asyncio.sleep(0.1)
            connection.transport.resume_reading()
            received = 0
            async with asyncio.timeout(60):
                while True:
                    frame = json.loads(await connection.recv())
                    if frame["type"] == "pty_data":
                        received += len(frame["payload"])
                    if frame["type"] == "pty_exit":
                        break
            await connection.close()
            return peak - before, received

        growth_kib, received = run(flood())
    finally:
        relay.stop()
    assert received >= 16_000_000  # base64 of 12 MB, every byte (and the terminal's CR/LF)
    assert growth_kib < 32 * 1024, f"the relay grew by {growth_kib} KiB for one slow reader"
    assert "reader too slow" not in relay.log_text()


def test_agent_messages_to_a_slow_reader_close_it_with_1013_and_the_session_replays(tmp_path):
    relay = start_relay(tmp_path / "r", relay_toml="client_queue_mib = 0.25\nreplay_mib = 1")
    try:

        async def slow():
            connection = await controller(relay)
            session = (await next_frame(connection, "ready"))["payload"]["session"]
            await next_frame(connection, "sidecar_message")  # the sidecar is up
            before = rss_kib(relay.process.pid)
            # 16 MB of agent events at 10 MB/s: more than the kernel's socket buffers, the reader's queue
            # and the replay buffer take, slow enough for the launcher's bridge in between (it drops
            # lines for a relay more than [socket] client_queue_mib behind, and says so)
            await connection.send(command("agent_query", prompt="flood:16000:10"))
            peak = await paused_while(relay, connection, "reader too slow")
            relay.wait_log('"type": "echo"', timeout=60)  # the sidecar's last line (the launcher logs it)
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(15):
                    while True:
                        await connection.recv()
            await asyncio.sleep(1)
            resumed = await controller(relay, session=session)
            ready = await next_frame(resumed, "ready")
            sync = await next_frame(resumed, "state_sync")
            replayed = [await next_frame(resumed, "sidecar_message") for _ in range(sync["payload"]["replayed"])]
            await resumed.close()
            return closed.value, ready, sync, replayed, peak - before

        closed, ready, sync, replayed, growth_kib = run(slow())
    finally:
        relay.stop()
    assert closed.rcvd is not None and closed.rcvd.code == 1013, closed
    assert ready["payload"]["resumed"] is True and sync["payload"]["sidecar"] == "running"
    lost = sync["payload"]["lost"].get("sidecar_message", 0)
    assert lost > 0 and len(replayed) == sync["payload"]["replayed"] > 0  # said, never silent
    numbers = [frame["payload"]["n"] for frame in replayed if frame["payload"]["type"] == "event"]
    assert numbers == list(range(16_000 - len(numbers), 16_000))  # the newest, in order
    assert replayed[-1]["payload"]["type"] == "echo"  # the answer after the flood
    assert growth_kib < 48 * 1024, f"the relay grew by {growth_kib} KiB for one slow reader"


# -- sessions: PTYs, the sidecar, reconnecting ----------------------------------------------------------


def test_a_real_pty_runs_a_shell(relay):
    async def shell():
        connection = await controller(relay)
        await next_frame(connection, "ready")
        await connection.send(command("pty_create", "c1", shell="/bin/sh", cols=120, rows=40))
        created = await next_frame(connection, "pty_created")
        pty = created["sessionId"]
        await connection.send(command("pty_write", "c2", id=pty, data="stty size; tty; echo $((6*7)); exit 3\n"))
        output = ""
        async with asyncio.timeout(10):
            while True:
                frame = json.loads(await connection.recv())
                if frame["type"] == "pty_data":
                    output += frame["payload"]
                elif frame["type"] == "pty_exit":
                    break
        await connection.close()
        return created, output, frame

    created, output, exit_frame = run(shell())
    assert created["payload"] == {"commandId": "c1"}
    assert "40 120" in output and "/dev/pts/" in output and "42" in output
    assert exit_frame == {"type": "pty_exit", "sessionId": created["sessionId"], "payload": {"exitCode": 3}}


def test_agent_queries_reach_the_sidecar_under_the_launcher(relay):
    async def query():
        connection = await controller(relay)
        await next_frame(connection, "ready")
        await connection.send(command("agent_query", prompt="hello", session_id="s1"))
        first = await next_frame(connection, "sidecar_message")  # the runner's ready line
        echo = await next_frame(connection, "sidecar_message")
        await connection.send(command("agent_stop", sessionId="s1"))
        stop = await next_frame(connection, "sidecar_message")
        await connection.close()
        return first, echo, stop

    first, echo, stop = run(query())
    assert first["payload"]["type"] == "ready"
    assert echo["payload"] == {"type": "echo", "message": {"prompt": "hello", "session_id": "s1", "type": "query"}}
    assert stop["payload"]["message"] == {"type": "stop", "sessionId": "s1"}
    relay.wait_log("agor-launch: sandbox")  # the launcher's Landlock set-up ran
    # the relay started it, not systemd: no unit of that name to ask for the attempt number
    assert "service manager" not in relay.log_text()


def test_a_crashing_sidecar_is_restarted_on_the_schedule_and_restarted_on_request(relay):
    async def crash():
        connection = await controller(relay)
        await next_frame(connection, "ready")
        first = (await next_frame(connection, "sidecar_message"))["payload"]["pid"]
        await connection.send(command("agent_query", prompt="crash"))
        exited = await next_frame(connection, "sidecar_exited")
        second = (await next_frame(connection, "sidecar_message"))["payload"]["pid"]
        await connection.send(command("sidecar_restart"))
        third = (await next_frame(connection, "sidecar_message"))["payload"]["pid"]
        await connection.close()
        return exited, {first, second, third}

    exited, pids = run(crash())
    assert exited["payload"] == {"exitCode": 3, "restart": 1, "retryInS": 0.2}  # [restart] base_s = 0.2
    assert len(pids) == 3


def test_a_session_survives_a_disconnect_and_resumes_with_state_sync(relay):
    async def away():
        connection = await controller(relay)
        session = (await next_frame(connection, "ready"))["payload"]["session"]
        await connection.send(
            command("pty_create", shell="/bin/sh", args=["-c", "sleep 1; echo output-while-away; sleep 60"])
        )
        pty = (await next_frame(connection, "pty_created"))["sessionId"]
        await connection.close()
        await asyncio.sleep(2)
        again = await controller(relay, session=session)
        ready = await next_frame(again, "ready")
        sync = await next_frame(again, "state_sync")
        output = ""
        while "output-while-away" not in output:
            output += (await next_frame(again, "pty_data"))["payload"]
        await again.send(command("pty_write", id=pty, data="x"))  # the PTY is still usable
        await again.close()
        return pty, ready, sync

    pty, ready, sync = run(away())
    assert ready["payload"]["resumed"] is True
    assert [p["id"] for p in sync["payload"]["ptys"]] == [pty] and sync["payload"]["ptys"][0]["alive"]
    assert sync["payload"]["sidecar"] == "running" and sync["payload"]["replayed"] >= 1


def test_an_unknown_session_starts_a_new_one(relay):
    async def unknown():
        connection = await controller(relay, session="no-such-session")
        ready = await next_frame(connection, "ready")
        await connection.close()
        return ready

    assert run(unknown())["payload"]["resumed"] is False


# -- certificates: reload and pins ---------------------------------------------------------------------


def test_sighup_serves_a_new_certificate_and_keeps_it_when_the_next_pair_is_bad(relay, tmp_path):
    first = certificate_pin(run(peer_certificate("127.0.0.1", relay.port)))

    async def held_connection():
        return await controller(relay)

    loop = asyncio.new_event_loop()
    old = loop.run_until_complete(held_connection())
    subprocess.run(
        [*AGOR_RELAY, "cert", "--host", "127.0.0.1", "--cert", str(relay.cert), "--key", str(relay.key), "--force"],
        check=True,
        capture_output=True,
    )
    relay.process.send_signal(signal.SIGHUP)
    relay.wait_log("SIGHUP: serving")
    second = certificate_pin(run(peer_certificate("127.0.0.1", relay.port)))
    assert second == certificate_pin(der_of_pem(relay.cert.read_bytes())) != first

    async def still_serving():
        await old.send(command("ping"))
        return await next_frame(old, "pong")

    assert loop.run_until_complete(still_serving())["type"] == "pong"  # the open connection is untouched
    loop.run_until_complete(old.close())
    loop.close()

    _, other_key = make_certificate(tmp_path, "other")
    relay.key.write_bytes(other_key.read_bytes())
    relay.process.send_signal(signal.SIGHUP)
    assert "the key does not match the certificate; still serving the previous certificate" in relay.wait_log(
        "still serving the previous"
    )
    assert certificate_pin(run(peer_certificate("127.0.0.1", relay.port))) == second
    assert relay.process.poll() is None


def mitm_listener(cert: Path, key: Path, received: bytearray):
    """A TLS server with another certificate that records every byte a client sends it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                received.extend(data)
        except (ssl.SSLError, ConnectionError):
            pass
        writer.close()

    return asyncio.start_server(record, "127.0.0.1", 0, ssl=context)


def test_connect_pins_on_first_use_and_a_mitm_gets_no_token(relay, tmp_path):
    known = tmp_path / "known_hosts"
    token = relay.directory / "token"
    first = subprocess.run(
        [*AGOR_RELAY, "connect", relay.url, "--token-file", str(token), "--known-hosts", str(known), "--json"],
        capture_output=True,
        text=True,
    )
    assert first.returncode == 0, first.stderr
    result = json.loads(first.stdout)
    pin = certificate_pin(der_of_pem(relay.cert.read_bytes()))
    assert result["certificate_sha256"] == pin and "pinned on first use" in first.stderr and pin in first.stderr
    again = subprocess.run(
        [*AGOR_RELAY, "connect", relay.url, "--token-file", str(token), "--known-hosts", str(known)],
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "pinned" not in again.stderr

    # the relay's address now answers with another certificate: a loopback MITM
    cert, key = make_certificate(tmp_path, "mitm")
    received = bytearray()
    relay.stop()

    async def attacked() -> subprocess.CompletedProcess[str]:
        server = await mitm_listener(cert, key, received)
        port = server.sockets[0].getsockname()[1]
        known.write_text(known.read_text().replace(f"[127.0.0.1]:{relay.port}", f"[127.0.0.1]:{port}"))
        process = await asyncio.create_subprocess_exec(
            *AGOR_RELAY,
            "connect",
            f"wss://127.0.0.1:{port}",
            "--token-file",
            str(token),
            "--known-hosts",
            str(known),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        server.close()
        return subprocess.CompletedProcess([], process.returncode or 0, out.decode(), err.decode())

    cp = run(attacked())
    assert cp.returncode == 3, cp.stderr
    assert bytes(received) == b"" and TOKEN.encode() not in received
    assert f"{known}:1" in cp.stderr and pin in cp.stderr
    assert certificate_pin(der_of_pem(cert.read_bytes())) in cp.stderr
    assert "agor-relay connect --forget wss://127.0.0.1:" in cp.stderr


def test_the_token_is_not_in_the_command_line(relay):
    cmdline = Path(f"/proc/{relay.process.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{relay.process.pid}/environ").read_bytes()
    assert TOKEN.encode() not in cmdline and TOKEN.encode() not in environ


def test_token_on_the_command_line_works_with_a_warning(tmp_path):
    cert, key = make_certificate(tmp_path)
    process = subprocess.Popen(
        [*AGOR_RELAY, "--port", "0", "--bind", "127.0.0.1", "--token", "t0k", "--tls-cert", str(cert)]
        + ["--tls-key", str(key), "--no-sidecar"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "XDG_CONFIG_HOME": str(tmp_path)},
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "--token puts the token in the command line, where every local user can read it" in line
    finally:
        process.terminate()
        process.wait(10)
