"""A controller's side of agor-relay, with the pin enforced inside the handshake that carries the token.

    from agor_systemd.relay.client import connect
    connection = await connect("wss://build-box:9750", token)   # pins on first use
    await connection.send('{"id":"1","type":"ping"}')

First use (no pin for `[host]:port` in ~/.config/agor/relay_known_hosts): a probe handshake reads the
relay's certificate — the probe sends nothing, the token least of all — the certificate is pinned and
`on_new_pin` is told (ssh's accept-new). Every connection then trusts only the pinned certificate, so a
relay with another certificate fails the TLS handshake before the WebSocket request (and its
`Authorization: Bearer`) is written. A new certificate with the same key (the SPKI pin matches) is
re-pinned and reported; any other certificate raises PinMismatch.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from agor_systemd.errors import AgorError
from agor_systemd.relay.protocol import SESSION_HEADER, relay_address
from agor_systemd.relay.tls import KnownHosts, Pin, certificate_pin, pinned_client_context, probe_context, spki_pin

PIN_MISMATCH_STATUS = 3
REFUSED_STATUS = 4


class PinMismatch(AgorError):
    """The relay's certificate is not the pinned one (nor a re-issue with the pinned key)."""

    exit_status = PIN_MISMATCH_STATUS

    def __init__(self, message: str, details: list[str]) -> None:
        super().__init__(message)
        self.details = details


class Refused(AgorError):
    """The relay answered the upgrade with an HTTP error (401 wrong token, 429 locked out, 503 full)."""

    exit_status = REFUSED_STATUS


async def peer_certificate(host: str, port: int, timeout_s: float = 10.0) -> bytes:
    """The DER certificate a relay presents; the connection is closed right after the handshake."""
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=probe_context(), server_hostname=host), timeout_s
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    finally:
        writer.close()
    if not der:
        raise AgorError(f"{host}:{port} presented no certificate")
    return der


def mismatch(known: KnownHosts, pin: Pin, der: bytes, host: str, port: int) -> PinMismatch:
    return PinMismatch(
        f"the certificate of [{host}]:{port} does not match its pin ({known.path}:{pin.line}); "
        "someone may be intercepting the connection, or the relay has a new key",
        [
            f"pinned:    {pin.spki}  certificate sha256 {pin.certificate}  ({known.path}:{pin.line})",
            f"presented: {spki_pin(der)}  certificate sha256 {certificate_pin(der)}",
            "nothing was sent to it (no token).",
            f"if the relay's key really changed: agor-relay connect --forget wss://{host}:{port}",
        ],
    )


async def connect(
    url: str,
    token: str,
    *,
    session: str | None = None,
    known_hosts: str | Path | None = None,
    on_new_pin: Callable[[Pin, str], None] | None = None,
    open_timeout_s: float = 10.0,
) -> ClientConnection:
    """An open connection to the relay at `url`, authenticated with `token` (Refused, PinMismatch,
    or an OSError). `session`: resume that session (the relay answers with state_sync)."""
    scheme, host, port = relay_address(url)
    headers = {"Authorization": f"Bearer {token}"}
    if session:
        headers[SESSION_HEADER] = session
    context: ssl.SSLContext | None = None
    known = KnownHosts(known_hosts)
    pin: Pin | None = None
    if scheme == "wss":
        pin = known.find(host, port)
        if pin is None:
            pin = known.add(host, port, await peer_certificate(host, port, open_timeout_s))
            if on_new_pin is not None:
                on_new_pin(pin, "pinned on first use")
        context = pinned_client_context(pin.der)
    for attempt in (1, 2):
        try:
            return await ws_connect(
                url,
                ssl=context,
                additional_headers=headers,
                compression=None,
                open_timeout=open_timeout_s,
                max_size=None,
                ping_interval=15,
                ping_timeout=15,
            )
        except ssl.SSLCertVerificationError:
            if pin is None or attempt == 2:
                raise
            der = await peer_certificate(host, port, open_timeout_s)
            if spki_pin(der) != pin.spki:
                raise mismatch(known, pin, der, host, port) from None
            pin = known.add(host, port, der)  # re-issued with the pinned key
            if on_new_pin is not None:
                on_new_pin(pin, "re-pinned: a new certificate for the pinned key")
            context = pinned_client_context(pin.der)
        except InvalidStatus as e:
            body = e.response.body.decode(errors="replace").strip() if e.response.body else ""
            raise Refused(f"{url}: refused with HTTP {e.response.status_code} {body}".rstrip()) from None
    raise AssertionError("unreachable")
