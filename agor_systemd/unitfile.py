"""Unit file text from structured data, with systemd's quoting and specifier escaping.

Nothing a user typed is ever pasted into unit text: every value passes through one of
the encoders here, which either produce text systemd parses back to exactly the input,
or raise UnitValueError naming what cannot be expressed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from agor_systemd.errors import AgorError


class UnitValueError(AgorError, ValueError):
    """A value that cannot be written into a unit file faithfully."""


@dataclass(frozen=True)
class HomePath:
    """A path below the home directory of the manager's user, written with systemd's %h.

    `~/x` in the configuration becomes HomePath("x"), so unit files do not hard-code a home
    directory and `units/` renders the same on every machine.
    """

    relative: str

    def expand(self, home: str) -> str:
        return home.rstrip("/") + ("/" + self.relative if self.relative else "")

    def __str__(self) -> str:
        return "~/" + self.relative if self.relative else "~"


@dataclass(frozen=True)
class Specifier:
    """A systemd specifier written as is (`%n`: the unit's own name, `%i`: its instance), for the
    words of a template unit that name the instance; never built from user input."""

    letter: str

    def __post_init__(self) -> None:
        if self.letter not in ("n", "i"):
            raise UnitValueError(f"specifier %{self.letter} is not one the toolkit writes")

    def __str__(self) -> str:
        return "%" + self.letter


Text = str | HomePath
Word = Text | Specifier  # a word of a command line


def check_text(value: str, what: str) -> None:
    """Reject what no unit file can carry: NUL, and bytes that are not UTF-8."""
    if "\0" in value:
        raise UnitValueError(f"{what} contains a NUL byte")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UnitValueError(f"{what} is not valid UTF-8: {value!r}") from None


def _escape_exec_char(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if ch == '"':
        return '\\"'
    if ch == "%":  # specifiers are expanded on the raw line before it is split into words
        return "%%"
    if ch == "\n":
        return "\\n"
    if ord(ch) < 0x20 or ord(ch) == 0x7F:
        return f"\\x{ord(ch):02x}"
    return ch


def exec_word(value: Word, what: str = "argument") -> str:
    """One ExecStart= word, double-quoted with C escapes; systemd unquotes it back to `value`.

    `$` needs no escaping because command lines are written with the ':' prefix, which turns
    off environment variable substitution (systemd ≥ 243).
    """
    if isinstance(value, Specifier):
        return f'"{value}"'
    if isinstance(value, HomePath):
        check_text(value.relative, what)
        rest = "".join(_escape_exec_char(c) for c in value.relative)
        return '"%h' + ("/" + rest if rest else "") + '"'
    check_text(value, what)
    return '"' + "".join(_escape_exec_char(c) for c in value) + '"'


def check_program(program: Word) -> None:
    """systemd strips prefix characters (-@:+!) from the program word even when quoted, and
    refuses names with quotes, backslashes or control characters, or ending in '/'."""
    if isinstance(program, Specifier):
        raise UnitValueError(f"program path {program} is a specifier")
    text = str(program) if isinstance(program, str) else "%h/" + program.relative
    if (
        not text
        or text.endswith("/")
        or text[0] in "-@:+!"
        or any(c in text for c in "\"'\\")
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
    ):
        raise UnitValueError(f"program path {text!r} cannot be started by systemd; move it to a plain path")


def exec_line(argv: Sequence[Word]) -> str:
    """An ExecStart= value running argv verbatim: no $VAR expansion, every word quoted."""
    if not argv:
        raise UnitValueError("empty command line")
    check_program(argv[0])
    return ":" + " ".join(exec_word(a, f"argument {i}") for i, a in enumerate(argv))


def environment_assignment(name: str, value: str) -> str:
    """One Environment= word, `"NAME=value"`: systemd unquotes it, undoes the C escapes, then
    expands specifiers (so `%` is doubled); `$` means nothing there."""
    if not name or not (name[0].isalpha() or name[0] == "_") or not all(c.isalnum() or c == "_" for c in name):
        raise UnitValueError(f"{name!r} is not an environment variable name")
    return exec_word(f"{name}={value}", f"the value of {name}")


def path_value(value: Text, what: str) -> str:
    """A path for settings that take the rest of the line unquoted (WorkingDirectory=, ...).

    Those settings cannot carry a newline or leading/trailing whitespace, and only
    absolute, normalized paths are accepted, so such paths are rejected here.
    """
    if isinstance(value, HomePath):
        inner = value.relative
        text = "%h" + ("/" + inner.replace("%", "%%") if inner else "")
    else:
        inner = value
        if not value.startswith("/"):
            raise UnitValueError(f"{what} must be an absolute path, got {value!r}")
        text = value.replace("%", "%%")
    check_text(inner, what)
    if any(c in inner for c in "\n\r") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in inner):
        raise UnitValueError(f"{what} contains a control character (newline?): {str(value)!r}")
    if inner != inner.strip():
        raise UnitValueError(f"{what} has leading or trailing whitespace: {str(value)!r}")
    if inner.endswith("\\"):  # a trailing backslash would join the next line onto this one
        raise UnitValueError(f"{what} ends with a backslash: {str(value)!r}")
    parts = inner.split("/")
    if any(p in (".", "..") for p in parts) or "//" in inner or (inner.endswith("/") and inner != "/"):
        raise UnitValueError(f"{what} is not a normalized path: {str(value)!r}")
    return text


@dataclass
class UnitFile:
    """Sections of (key, already-encoded value) pairs, rendered in order."""

    name: str
    sections: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    header: str = ""

    def add(self, section: str, key: str, value: str) -> None:
        if "\n" in value or "\r" in value:
            raise UnitValueError(f"{self.name}: value for {key}= spans lines")
        self.sections.setdefault(section, []).append((key, value))

    def render(self) -> str:
        lines = [f"# {line}" if line else "#" for line in self.header.splitlines()]
        for section, items in self.sections.items():
            if lines:
                lines.append("")
            lines.append(f"[{section}]")
            lines.extend(f"{key}={value}" for key, value in items)
        return "\n".join(lines) + "\n"


HEADER = """Generated by agor-units (agor-systemd); edit ~/.config/agor/units.toml and run
`agor-units install` instead of editing this file."""


def usec_text(usec: int) -> str:
    """A systemd time span that is exact to the microsecond."""
    if usec % 1_000_000 == 0:
        return f"{usec // 1_000_000}s"
    if usec % 1000 == 0:
        return f"{usec // 1000}ms"
    return f"{usec}us"


# where the Debian package puts README.md and docs/*.md (pyproject.toml's data-files, under /usr)
PACKAGED_DOCS = "/usr/share/doc/agor-systemd"


def seconds_text(value: float) -> str:
    """Seconds as an exact systemd time span (at least 1 µs: 0 would mean "off" to systemd)."""
    return usec_text(max(1, round(value * 1e6)))


def documentation(docs: str | None, *pages: str) -> str | None:
    """A Documentation= value: file: URIs of the installed docs (percent-encoded, with `%` then
    doubled for systemd's specifier expansion); None when the docs are not installed."""
    if docs is None:
        return None

    return " ".join("file:" + quote(f"{docs}/{page}").replace("%", "%%") for page in pages)


def timer_driven(
    service_name: str,
    timer_name: str,
    descriptions: tuple[str, str],
    pages: str | None,
    argv: list[Text],
    *,
    timeout_start: str,
    identifier: str,
    environment: dict[str, str],
    first_run_s: float,
    interval_s: float,
    accuracy: str,
) -> list[UnitFile]:
    """[service, timer]: a oneshot `argv` run every `interval_s` by its timer, counted from the END
    of the previous run (agor-walcheck and the btmsg sweep). `descriptions`: (service, timer);
    `pages`: a Documentation= value or None. A failing run leaves the service `failed` until the
    next good one; the timer keeps going."""
    service = UnitFile(service_name, header=HEADER)
    service.add("Unit", "Description", descriptions[0])
    if pages is not None:
        service.add("Unit", "Documentation", pages)
    # Only the timer starts it, at most once per interval and never while a run is still going, so
    # the default start limit (5 starts per 10 s) could only trip for intervals under 2 s, as in
    # the tests, and then the timer would stop for good.
    service.add("Unit", "StartLimitIntervalSec", "0")
    service.add("Service", "Type", "oneshot")
    service.add("Service", "ExecStart", exec_line(argv))
    # a oneshot has no start timeout by default
    service.add("Service", "TimeoutStartSec", timeout_start)
    service.add("Service", "SyslogIdentifier", identifier)
    for name, value in environment.items():
        service.add("Service", "Environment", environment_assignment(name, value))

    timer = UnitFile(timer_name, header=HEADER)
    timer.add("Unit", "Description", descriptions[1])
    if pages is not None:
        timer.add("Unit", "Documentation", pages)
    # Monotonic, counted from the END of the last run (OnUnitInactiveSec=), not OnCalendar= and not
    # OnUnitActiveSec=: a run still going when a timer elapses is never doubled (systemd leaves a
    # running unit alone), but counted from the last *start* a run longer than the interval is
    # followed by an immediate catch-up run, back to back; counted from its end there is always one
    # full interval in between. No wall-clock alignment, so a clock change cannot bunch or skip
    # runs, and Persistent= (only for OnCalendar=) is not needed: after a suspend or a login the
    # next run comes within one interval anyway. OnUnitInactiveSec= alone never fires before the
    # service has run once, hence OnStartupSec= (from the user manager's start, i.e. the login; if
    # that is already past when the timer starts, as on a first `install --now`, at once).
    timer.add("Timer", "OnStartupSec", seconds_text(first_run_s))
    timer.add("Timer", "OnUnitInactiveSec", seconds_text(interval_s))
    # the default AccuracySec= is 1 minute: a "5 minute" timer would fire after 5-6 minutes
    timer.add("Timer", "AccuracySec", accuracy)
    timer.add("Install", "WantedBy", "timers.target")
    return [service, timer]
