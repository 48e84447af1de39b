"""agor-relay: serve (the default), cert, fingerprint, connect. argparse, as agor-walcheck."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agor_systemd import journal, tracing
from agor_systemd.config import Config, expand_home, load_config
from agor_systemd.console import run_main
from agor_systemd.errors import AgorError, UsageError
from agor_systemd.relay.protocol import DEFAULT_PORT, relay_address, token_digest
from agor_systemd.relay.sessions import SidecarSpec, launcher_program
from agor_systemd.relay.tls import (
    KnownHosts,
    ReloadableContext,
    certificate_pin,
    der_of_pem,
    file_mode_problem,
    spki_pin,
    write_certificate,
)
from agor_systemd.relay.units import CREDENTIAL, RUNTIME_DIRECTORY
from agor_systemd.sandbox.policy import sandbox_paths
from agor_systemd.usage import ArgumentParser

if TYPE_CHECKING:
    from agor_systemd.relay.server import RelaySettings

PROG = "agor-relay"
SUBCOMMANDS = ("serve", "cert", "fingerprint", "connect")
MIB = 1024 * 1024

HELP = f"""\
commands (serve is the default: `agor-relay --port 9750 ...` serves):
  serve         run the relay (TLS WebSocket, agor's controller protocol)
  cert          make a self-signed certificate and key for the relay
  fingerprint   print a certificate's pins (SPKI and agor's certificate SHA-256)
  connect       connect to a relay as a controller would: pin on first use, check token and ping

Set-up on the relay machine:
  agor-relay cert --host build-box.lan --host 192.168.1.20
  head -c 32 /dev/urandom | base64 > ~/.config/agor/relay-token; chmod 600 ~/.config/agor/relay-token
  agor-units install --relay --now         # agor-relay.service, token as a systemd credential
On the controller's machine: agor-relay connect wss://build-box.lan:{DEFAULT_PORT} --token-file FILE

Exit status: 0 ok, 1 error, 2 usage, 3 pin mismatch (connect), 4 refused by the relay (connect).
The token is never taken from the environment; --token on the command line is readable by every
local user (ps) and accepted only for agor compatibility. Docs: docs/relay.md."""


def argument_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog=PROG,
        description="A TLS WebSocket relay that lets agor's controller run terminals and agents on this machine.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)

    serve = sub.add_parser("serve", help="run the relay (the default command)", description=SERVE_HELP)
    serve.add_argument("--port", "-p", type=int, metavar="N", help=f"TCP port (default [relay] port, {DEFAULT_PORT})")
    serve.add_argument("--bind", metavar="ADDRESS", help="listen on this address only (default: every address)")
    serve.add_argument("--token-file", type=Path, metavar="FILE", help="the token, one line (mode 0600)")
    serve.add_argument("--token", "-t", metavar="TOKEN", help="the token itself: visible to every local user in ps")
    serve.add_argument("--tls-cert", type=Path, metavar="PEM", help="certificate (default [relay] tls_cert)")
    serve.add_argument("--tls-key", type=Path, metavar="PEM", help="its key (default [relay] tls_key)")
    serve.add_argument("--insecure", action="store_true", help="serve plain ws:// without TLS (tests, SSH tunnels)")
    serve.add_argument("--config", type=Path, metavar="FILE", help="units.toml (default ~/.config/agor/units.toml)")
    serve.add_argument("--max-connections", type=int, metavar="N", help="connections at most (default 128)")
    serve.add_argument("--max-frame-mib", type=float, metavar="MIB", help="largest frame accepted (default 4)")
    serve.add_argument("--ping-timeout", type=float, metavar="S", help="ping every S s, drop after S s more (15)")
    serve.add_argument("--session-linger", type=float, metavar="S", help="keep a detached session S s (600)")
    serve.add_argument("--no-sidecar", action="store_true", help="terminals only: sessions start no sidecar")
    serve.add_argument(
        "--session-units",
        action="store_true",
        help="terminals and sidecars as systemd user units, so sessions outlive a restart (agor-relay.service)",
    )

    cert = sub.add_parser("cert", help="make a certificate and key", description=CERT_HELP)
    cert.add_argument("--host", action="append", required=True, metavar="NAME", help="name or IP (repeatable)")
    cert.add_argument("--cert", type=Path, metavar="PEM", help="where (default [relay] tls_cert)")
    cert.add_argument("--key", type=Path, metavar="PEM", help="where the key goes (default [relay] tls_key)")
    cert.add_argument("--force", action="store_true", help="replace existing files")
    cert.add_argument("--config", type=Path, metavar="FILE", help="units.toml for the default paths")

    fingerprint = sub.add_parser("fingerprint", help="print a certificate's pins", description=FINGERPRINT_HELP)
    fingerprint.add_argument("certificate", nargs="?", type=Path, metavar="PEM", help="default [relay] tls_cert")
    fingerprint.add_argument("--json", action="store_true", help="print a JSON object")
    fingerprint.add_argument("--config", type=Path, metavar="FILE", help="units.toml for the default path")

    connect = sub.add_parser("connect", help="connect as a controller would", description=CONNECT_HELP)
    connect.add_argument("url", metavar="URL", help=f"wss://HOST[:PORT] (default port {DEFAULT_PORT})")
    connect.add_argument("--token-file", type=Path, metavar="FILE", help="the token, one line")
    connect.add_argument("--known-hosts", type=Path, metavar="FILE", help="pins (default ~/.config/agor/...)")
    connect.add_argument("--session", metavar="ID", help="resume this session (the relay sends state_sync)")
    connect.add_argument("--forget", action="store_true", help="remove the relay's pin and exit")
    connect.add_argument("--json", action="store_true", help="print a JSON object")
    return p


def subcommand_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """name → parser of each subcommand (docs/cli.md shows each one's --help)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


SERVE_HELP = """Serve agor's relay protocol over TLS WebSocket. Refuses to start without a certificate
unless --insecure. The token comes from --token-file, else from the systemd credential relay-token
($CREDENTIALS_DIRECTORY), else --token. Defaults come from [relay] in units.toml, and each session's
sidecar runs as [sidecar]/[sandbox]/[restart] say. SIGHUP reloads the certificate."""
CERT_HELP = """Write a self-signed ECDSA P-256 certificate (SAN, SKI, AKI; valid 825 days) and its key
(mode 0600), each atomically, and print its pins. Then pin it on the controller: `agor-relay connect`
pins on first use, or compare with `agor-relay fingerprint`."""
FINGERPRINT_HELP = """Print the pins of a certificate: the SPKI pin (sha256/BASE64 of the public key,
survives re-issuing with the same key) and agor's pin (SHA-256 of the whole certificate, hex)."""
CONNECT_HELP = """Connect like a controller: pin the relay's certificate on first use (said on stderr,
with the fingerprint), enforce the pin inside the TLS handshake before the token is sent, read
`ready`, send a ping and time the pong. On a pin mismatch: exit 3 with both fingerprints."""


def read_token_file(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    token = text.removesuffix("\n").removesuffix("\r")  # a trailing newline is not part of the token
    if not token or "\n" in token:
        raise AgorError(f"{path}: the token must be one non-empty line")
    return token


def server_token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        if (problem := file_mode_problem(args.token_file)) is not None:
            warn(problem)
        return read_token_file(args.token_file)
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and os.path.exists(os.path.join(credentials, CREDENTIAL)):
        return read_token_file(Path(credentials, CREDENTIAL))
    if args.token:
        warn("--token puts the token in the command line, where every local user can read it; use --token-file")
        return str(args.token)
    raise UsageError(
        "no token: give --token-file FILE (one line, mode 0600), e.g. "
        "`head -c 32 /dev/urandom | base64 > ~/.config/agor/relay-token`"
    )


def warn(message: str) -> None:
    sys.stderr.write(journal.line(PROG, f"warning: {message}", journal.WARNING))


def home() -> str:
    return str(Path.home())


def sidecar_spec(config: Config) -> SidecarSpec:
    """The launcher's argv as agor-sidecar.service runs it, from the same settings."""
    command = config.relay.sidecar_command or config.sidecar.command
    policy, watchdog, sandbox = config.restart, config.watchdog, config.sandbox
    argv = [
        *launcher_program(),
        "--unit",
        "agor-relay-sidecar",
        "--attempts",
        str(policy.attempts),
        "--stability-window",
        f"{policy.stability_window_s:g}",
        "--ready",
        watchdog.ready,
        "--ready-timeout",
        f"{watchdog.ready_timeout_s:g}",
        "--working-directory",
        expand_home(config.sidecar.working_directory, home()),
        "--client-queue-bytes",  # the relay is its bridge's one client
        str(round(config.socket.client_queue_mib * MIB)),
    ]
    if sandbox.enabled:
        read_write, read_only = sandbox_paths(config)
        argv += ["--sandbox", "required" if sandbox.required else "best"]
        for flag, paths in (("--rw", read_write), ("--ro", read_only)):
            for path in paths:
                argv += [flag, expand_home(path, home())]
        if sandbox.tcp_connect is not None:
            argv += ["--tcp-connect", ",".join(map(str, sandbox.tcp_connect))]
        if sandbox.tcp_bind:
            argv += ["--tcp-bind", ",".join(map(str, sandbox.tcp_bind))]
    argv += ["--", *(expand_home(word, home()) for word in command)]
    return SidecarSpec(tuple(argv), policy.base_s, policy.cap_s, policy.attempts, policy.stability_window_s)


def need_websockets() -> None:
    """websockets 14+ (its asyncio API), or one line saying how to get it (an optional dependency)."""
    try:
        import websockets.asyncio  # noqa: F401  # import cost: ~50 ms, only for serve and connect
    except ImportError:
        raise WebsocketsMissing(
            "agor-relay needs websockets 14 or newer (Debian 12 has 10.4): pipx install 'agor-systemd[relay]', "
            "or pip install 'websockets>=14' into the environment that runs agor-relay"
        ) from None


class WebsocketsMissing(AgorError):
    exit_status = 69  # sysexits' EX_UNAVAILABLE


def serve(args: argparse.Namespace) -> int:
    need_websockets()
    # import cost: websockets (~50 ms); cert, fingerprint and connect --forget do not need it
    from agor_systemd.relay.server import Relay, RelaySettings

    config = load_config(args.config)
    relay = config.relay
    cert = args.tls_cert or (None if args.insecure else Path(expand_home(relay.tls_cert, home())))
    key = args.tls_key or (None if args.insecure else Path(expand_home(relay.tls_key, home())))
    if (cert is None) != (key is None):
        raise UsageError("give both --tls-cert and --tls-key, or --insecure for plain ws://")
    if cert is None and not args.insecure:
        raise UsageError(
            "TLS is mandatory: give --tls-cert and --tls-key (make them with `agor-relay cert --host NAME`)"
        )
    if cert is not None and key is not None and not cert.exists() and not key.exists() and args.tls_cert is None:
        raise UsageError(
            f"no certificate at {cert}: make one with `agor-relay cert --host NAME`, or --insecure for plain ws://"
        )
    tls = ReloadableContext(cert, key) if cert is not None and key is not None else None
    if tls is None:
        warn("serving plain ws:// (--insecure): the token and everything else cross the network readable")
    elif (problem := file_mode_problem(tls.key)) is not None:
        warn(problem)
    ping_s = args.ping_timeout if args.ping_timeout is not None else relay.ping_timeout_s
    settings = RelaySettings(
        token_digest=token_digest(server_token(args)),
        tls=tls,
        port=args.port if args.port is not None else relay.port,
        bind=args.bind if args.bind is not None else (relay.bind or None),
        max_connections=args.max_connections or relay.max_connections,
        max_frame_bytes=round((args.max_frame_mib or relay.max_frame_mib) * MIB),
        ping_interval_s=ping_s,
        ping_timeout_s=ping_s,
        client_queue_bytes=round(relay.client_queue_mib * MIB),
        replay_bytes=round(relay.replay_mib * MIB),
        session_linger_s=args.session_linger if args.session_linger is not None else relay.session_linger_s,
        sidecar=None if args.no_sidecar else sidecar_spec(config),
        default_shell=os.environ.get("SHELL") or "/bin/bash",
    )
    if args.session_units:
        settings = with_session_units(settings)
        confine(settings)
    tracing.start(PROG)
    asyncio.run(Relay(settings).run())
    return 0


def confine(settings: RelaySettings) -> None:
    """--session-units: the relay starts no program itself (its sessions' are units of their own), so
    it confines itself with Landlock before it binds or starts a thread: TCP bind on its port only,
    no TCP connect (but to a telemetry collector), writes only in its runtime directory and on
    terminals; reads stay open (certificates, Python). Best effort, as [sandbox] required says."""
    from agor_systemd.sandbox.enforce import SandboxRefused, prepare  # import cost: ~2 ms, ctypes

    try:
        prepared = prepare(
            read_write=[settings.state_directory or "/nonexistent", "/dev/null"],
            read_only=["/"],
            tcp_connect=None if tracing.endpoint() is not None else (),
            tcp_bind=(settings.port,),
            required=False,
            scopes=(),  # systemd's notify socket and D-Bus are outside the domain; no signal is sent
        )
        if prepared.ruleset is not None:
            prepared.ruleset.restrict_self()
            prepared.ruleset.close()
    except (OSError, SandboxRefused) as e:
        warn(f"not confined with Landlock: {e}")
        return
    if prepared.ruleset is None:
        sys.stderr.write(journal.line(PROG, "not confined: this kernel has no Landlock", journal.WARNING))
        return
    connect = "TCP connect only to the telemetry collector" if tracing.endpoint() else "no TCP connect"
    text = f"confined (Landlock ABI {prepared.abi}): TCP bind on port {settings.port} only, {connect}, "
    text += f"writes only in {settings.state_directory}"
    if prepared.missing:
        text += "; not enforced by this kernel: " + ", ".join(prepared.missing)
    sys.stderr.write(journal.line(PROG, text, journal.INFO))


def with_session_units(settings: RelaySettings) -> RelaySettings:
    """--session-units: the user manager over D-Bus, and the sessions' state in the unit's runtime
    directory (RuntimeDirectory=, kept across a restart); outside a unit, $XDG_RUNTIME_DIR/agor-relay."""
    from agor_systemd.relay.host import UnitHost  # import cost: pystemd's (~45 ms), only for --session-units

    directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not directory:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if not runtime:
            raise UsageError("--session-units needs a user manager: $XDG_RUNTIME_DIR is not set")
        directory = os.path.join(runtime, RUNTIME_DIRECTORY)
        os.makedirs(directory, mode=0o700, exist_ok=True)
    return dataclasses.replace(settings, host=UnitHost(), state_directory=directory)


def cert_paths(args: argparse.Namespace, cert: Path | None, key: Path | None) -> tuple[Path, Path]:
    relay = load_config(args.config).relay
    return (
        cert or Path(expand_home(relay.tls_cert, home())),
        key or Path(expand_home(relay.tls_key, home())),
    )


def make_cert(args: argparse.Namespace) -> int:
    cert, key = cert_paths(args, args.cert, args.key)
    write_certificate(cert, key, args.host, force=args.force)
    der = der_of_pem(cert.read_bytes())
    print(f"{cert}: certificate for {', '.join(args.host)}")
    print(f"{key}: its key (mode 0600)")
    print(f"pin: {spki_pin(der)}")
    print(f"agor's pin (certificate sha256): {certificate_pin(der)}")
    return 0


def fingerprint(args: argparse.Namespace) -> int:
    path = args.certificate or cert_paths(args, None, None)[0]
    der = der_of_pem(path.read_bytes())
    pins = {"certificate_file": str(path), "spki": spki_pin(der), "certificate_sha256": certificate_pin(der)}
    if args.json:
        print(json.dumps(pins))
    else:
        print(f"{pins['spki']}\ncertificate sha256 {pins['certificate_sha256']}")
    return 0


def connect(args: argparse.Namespace) -> int:
    _, host, port = relay_address(args.url)
    known = KnownHosts(args.known_hosts)
    if args.forget:
        removed = known.forget(host, port)
        print(f"{known.path}: {'removed' if removed else 'no'} pin for [{host}]:{port}")
        return 0
    if args.token_file is None:
        raise UsageError("give --token-file FILE")
    token = read_token_file(args.token_file)
    need_websockets()
    # import cost: websockets (~50 ms), only when connecting
    from agor_systemd.relay.client import PinMismatch, connect

    def told(pin, how: str) -> None:
        warn(f"[{host}]:{port} {how}: {pin.spki} (certificate sha256 {pin.certificate}) in {known.path}:{pin.line}")

    async def session() -> dict[str, object]:
        started = time.monotonic()
        connection = await connect(args.url, token, session=args.session, known_hosts=known.path, on_new_pin=told)
        connected = time.monotonic()
        try:
            ready = json.loads(await connection.recv())
            sent = time.monotonic()
            await connection.send(json.dumps({"id": "connect-ping", "type": "ping"}))
            while json.loads(await connection.recv()).get("type") != "pong":
                pass
            round_trip = time.monotonic() - sent
        finally:
            await connection.close()
        pin = known.find(host, port)
        payload = ready.get("payload") or {}
        return {
            "url": args.url,
            "pin": pin.spki if pin else None,
            "certificate_sha256": pin.certificate if pin else None,
            "session": payload.get("session"),
            "resumed": payload.get("resumed"),
            "connect_ms": round((connected - started) * 1000, 2),
            "round_trip_ms": round(round_trip * 1000, 2),
        }

    try:
        result = asyncio.run(session())
    except PinMismatch as e:
        for line in e.details:
            sys.stderr.write(f"{PROG}: {line}\n")
        raise
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"connected to {args.url} ({result['pin'] or 'no TLS'}); session {result['session']}; "
            f"ping {result['round_trip_ms']} ms"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if not args_in or (args_in[0] not in SUBCOMMANDS and args_in[0] not in ("-h", "--help")):
        args_in = ["serve", *args_in]
    args = argument_parser().parse_args(args_in)
    handlers = {"serve": serve, "cert": make_cert, "fingerprint": fingerprint, "connect": connect}
    if args.command == "serve":  # a daemon: its connections and commands are the spans (tracing
        return serve(args)  # starts there, after the relay has confined itself: its thread too)
    tracing.start(PROG)
    with tracing.span(f"{PROG} {args.command}", command=args.command) as span:
        status = handlers[args.command](args)
        span.set(**{"exit.status": status})
        return status


def run() -> None:
    """The agor-relay program (and `python -m agor_systemd.relay`)."""
    run_main(PROG, main)
