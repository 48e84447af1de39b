"""The systemd manager over D-Bus (pystemd): properties, reload, start/stop, reset-failed."""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

from agor_systemd.errors import AgorError

DESTINATION = b"org.freedesktop.systemd1"
MANAGER_PATH = b"/org/freedesktop/systemd1"
MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
PROPERTIES_IFACE = b"org.freedesktop.DBus.Properties"


class BusError(AgorError, RuntimeError):
    """systemd could not be reached or refused a request; the message is one line."""


def _text(value: Any) -> Any:
    """pystemd hands back bytes; turn them (recursively) into str for callers."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [_text(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_text(v) for v in value)
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return value


def runtime_directory() -> str:
    """The user manager's runtime directory (%t in its units)."""
    return os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.getuid()}"


def user_private_socket() -> Path:
    return Path(runtime_directory()) / "systemd" / "private"


class Systemd:
    """A connection to the user's (or, with system=True, the system's) service manager.

    Like systemctl, a user connects straight to the manager's private socket when it can
    (no D-Bus daemon needed) and falls back to the session bus.
    """

    def __init__(self, system: bool = False) -> None:
        self.system = system
        self._bus: Any = None  # pystemd's DBus or DBusAddress while open (pystemd has no type hints)

    def __enter__(self) -> Systemd:
        from pystemd.dbuslib import DBus, DBusAddress  # import cost: ~26 ms, only when a call is made

        private = Path("/run/systemd/private") if self.system else user_private_socket()
        try:
            if os.access(private, os.W_OK):
                self._bus = DBusAddress(b"unix:path=" + os.fsencode(private), peer_to_peer=True)
            else:
                self._bus = DBus(user_mode=not self.system)
            self._bus.open()
        except Exception as e:  # pystemd raises DBusError subclasses of Exception
            where = "system manager" if self.system else "user manager (systemd --user)"
            raise BusError(f"cannot connect to the {where}: {_reason(e)}; see `agor-units doctor`") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def call(
        self, path: bytes, interface: bytes, method: bytes, signature: bytes = b"", args: list | None = None
    ) -> Any:
        from pystemd.dbuslib import apply_signature  # import cost: loaded by __enter__ already

        try:
            reply = self._bus.call_method(
                DESTINATION, path, interface, method, apply_signature(signature, args or []) if signature else None
            )
        except Exception as e:
            raise BusError(f"{method.decode()} failed: {_reason(e)}") from None
        return _text(reply.body)

    def manager(self, method: str, signature: str = "", *args: Any) -> Any:
        encoded = [a.encode() if isinstance(a, str) else a for a in args]
        return self.call(MANAGER_PATH, MANAGER_IFACE, method.encode(), signature.encode(), encoded)

    def version(self) -> int:
        """The major version of the running manager, e.g. 252 for '252.39-1~deb12u2'."""
        props = self.call(MANAGER_PATH, PROPERTIES_IFACE, b"Get", b"ss", [MANAGER_IFACE, b"Version"])
        text = props[0] if isinstance(props, (list, tuple)) else props
        return parse_version(str(text))

    def unit_properties(self, unit: str) -> dict[str, Any]:
        """Unit + Service properties merged, with str keys and values."""
        path = unit_path(unit)
        props: dict[str, Any] = {}
        for interface in (b"org.freedesktop.systemd1.Unit", b"org.freedesktop.systemd1.Service"):
            body = self.call(path, PROPERTIES_IFACE, b"GetAll", b"s", [interface])
            props.update(body[0] if isinstance(body, (list, tuple)) else body)
        return props

    def reload(self) -> None:
        self.manager("Reload")

    def reset_failed(self, unit: str) -> None:
        """Clear failed state, NRestarts and the start limiter; a unit not loaded has none."""
        try:
            self.manager("ResetFailedUnit", "s", unit)
        except BusError as e:
            if "not loaded" not in str(e):
                raise

    def start(self, unit: str) -> None:
        self.manager("StartUnit", "ss", unit, "replace")

    def restart(self, unit: str) -> None:
        self.manager("RestartUnit", "ss", unit, "replace")

    def stop(self, unit: str) -> None:
        self.manager("StopUnit", "ss", unit, "replace")

    def unset_environment(self, names: list[str]) -> None:
        """Manager.UnsetEnvironment: the variables leave the environment of units started from now on."""
        self.call(MANAGER_PATH, MANAGER_IFACE, b"UnsetEnvironment", b"as", [[n.encode() for n in names]])

    def enable(self, paths: list[str]) -> None:
        self.call(MANAGER_PATH, MANAGER_IFACE, b"EnableUnitFiles", b"asbb", [[p.encode() for p in paths], False, True])

    def disable(self, names: list[str]) -> None:
        self.call(MANAGER_PATH, MANAGER_IFACE, b"DisableUnitFiles", b"asb", [[n.encode() for n in names], False])

    def start_transient(self, name: str, properties: list[tuple[str, str, Any]]) -> None:
        """Manager.StartTransientUnit(name, "replace", properties): (name, D-Bus signature, value)."""
        from pystemd.dbuslib import apply_signature  # import cost: loaded by __enter__ already

        args = apply_signature(b"ss", [name.encode(), b"replace"])
        args += [(ord("a"), b"(sv)")]
        for key, signature, value in properties:
            args += [(ord("r"), b"sv"), (ord("s"), key.encode()), (ord("v"), signature.encode())]
            args += apply_signature(signature.encode(), [_bytes(value)])
            args += [(-1, None), (-1, None)]
        args += [(-1, None), (ord("a"), b"(sa(sv))"), (-1, None)]
        try:
            self._bus.call_method(DESTINATION, MANAGER_PATH, MANAGER_IFACE, b"StartTransientUnit", args)
        except Exception as e:
            raise BusError(f"StartTransientUnit failed: {_reason(e)}") from None

    def run_probes(
        self,
        property_sets: list[list[tuple[str, str, Any]]],
        argv: list[str],
        success_statuses: list[int],
        timeout_s: float = 5.0,
    ) -> list[dict[str, Any]]:
        """Run `argv` once per property set as parallel transient oneshot units; for each, the
        outcome {"code": ExecMainCode, "status": ExecMainStatus, "result": Result} or {"error": why
        the manager refused the unit}. The units are stopped and forgotten afterwards."""

        names: list[str | None] = []
        outcomes: list[dict[str, Any]] = []
        for props in property_sets:
            name = f"agor-hardening-probe-{secrets.token_hex(4)}.service"
            base = [
                ("Description", "s", "agor-units: which hardening directives take effect here"),
                ("Type", "s", "oneshot"),
                ("RemainAfterExit", "b", True),
                ("ExecStart", "a(sasb)", [(argv[0], argv, False)]),
                ("SuccessExitStatus", "(aiai)", (success_statuses, [])),
            ]
            try:
                self.start_transient(name, base + props)
            except BusError as e:
                names.append(None)
                outcomes.append({"error": str(e).removeprefix("StartTransientUnit failed: ")})
                continue
            names.append(name)
            outcomes.append({})
        pending = {i: name for i, name in enumerate(names) if name}
        deadline = time.monotonic() + timeout_s
        try:
            while pending:
                for i, name in sorted(pending.items()):
                    state = self.unit_properties(name)
                    job = state.get("Job") or (0, "/")
                    # inactive counts only once the start job is gone (before it ran, it is inactive too)
                    if state.get("ActiveState") in ("active", "failed") or (
                        state.get("ActiveState") == "inactive" and not job[0] and state.get("ExecMainCode")
                    ):
                        outcomes[i] = {
                            "code": state.get("ExecMainCode"),
                            "status": state.get("ExecMainStatus"),
                            "result": state.get("Result"),
                        }
                        del pending[i]
                if pending:
                    if time.monotonic() > deadline:
                        for i in pending:
                            outcomes[i] = {"result": f"no answer within {timeout_s:g} s"}
                        break
                    time.sleep(0.01)
        finally:
            for started in names:
                if started:
                    try:
                        self.stop(started)
                    except BusError:
                        pass  # failed units are not running; gone already
                    self.reset_failed(started)
        return outcomes


def unit_path(unit: str) -> bytes:
    """The D-Bus object path of a unit."""
    from pystemd.dbuslib import path_encode  # import cost: loaded by Systemd.__enter__ already

    return path_encode(b"/org/freedesktop/systemd1/unit", unit.encode())


def _bytes(value: Any) -> Any:
    """pystemd wants bytes for D-Bus strings: convert (recursively) what a caller gave as str."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, list):
        return [_bytes(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_bytes(v) for v in value)
    return value


def parse_version(text: str) -> int:
    digits = ""
    for ch in text.strip():
        if not ch.isdigit():
            break
        digits += ch
    if not digits:
        raise BusError(f"cannot parse systemd version {text!r}")
    return int(digits)


def _reason(error: Exception) -> str:
    """pystemd's DBusError carries errno and the bus error message; keep it to one readable line."""
    message = getattr(error, "err_message", None)
    if isinstance(message, bytes):
        message = message.decode(errors="replace")
    errno = getattr(error, "errno", None)
    if not message and isinstance(errno, int):
        message = os.strerror(abs(errno))
    return " ".join((message or str(error) or type(error).__name__).split())


def installed_systemd_version() -> int | None:
    """`systemctl --version` of the installed systemd, for rendering without a manager."""
    try:
        out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.split()
    return parse_version(words[1]) if len(words) > 1 and words[0] == "systemd" else None
