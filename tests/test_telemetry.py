"""Telemetry without systemd: the tracing API, its export to a real OTLP/HTTP receiver, the
programs with tracing off (nothing loaded) and on, a collector that is down, the settings and
units, journald's native protocol, the log bridge."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from agor_systemd import journal, logbridge, tracing
from agor_systemd.config import Config, ConfigError, parse_config, with_endpoint_from_environment
from agor_systemd.doctor import _telemetry
from agor_systemd.lab.otlp_receiver import Receiver, closed_port
from agor_systemd.sidecar import trace
from agor_systemd.units import render_units

REPO = Path(__file__).resolve().parent.parent
TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"

# -- pure parts -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://localhost:4318", "http://localhost:4318/v1/traces"),
        ("http://localhost:4318/", "http://localhost:4318/v1/traces"),
        ("https://otel.example/base", "https://otel.example/base/v1/traces"),
        ("http://h:4318/v1/traces", "http://h:4318/v1/traces"),
        (" http://h:4318/v1/traces/ ", "http://h:4318/v1/traces/"),
    ],
)
def test_the_endpoint_gets_the_traces_path_once(endpoint, url):
    assert tracing.traces_url(endpoint) == url


@pytest.mark.parametrize(
    ("value", "ids"),
    [
        (f"00-{TRACE}-{PARENT}-01", (TRACE, PARENT)),
        (f"00-{TRACE.upper()}-{PARENT}-00", (TRACE, PARENT)),
        (f"01-{TRACE}-{PARENT}-01", None),  # an unknown version
        (f"00-{'0' * 32}-{PARENT}-01", None),
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"00-{TRACE[:-1]}g-{PARENT}-01", None),
        ("garbage", None),
        ("", None),
        (None, None),
    ],
)
def test_traceparent_parsing(value, ids):
    assert tracing.parse_traceparent(value) == ids


def test_the_run_file_keeps_only_what_is_valid():
    good = f"00-{TRACE}-{PARENT}-01"
    assert trace.parse_run(f"parent={good}\ncause={good}\nended_at=123\n") == {
        "parent": good,
        "cause": good,
        "ended_at": "123",
    }
    assert trace.parse_run(f"parent={good}\ncause=x\nended_at=soon\nother=1\n") == {"parent": good}
    assert trace.parse_run("cause=" + good) == {}  # no run without its parent
    assert trace.parse_run("") == {}


def test_the_run_file_lives_in_the_runtime_directory(monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert trace.run_file() == "/run/user/1000/agor/sidecar.trace"
    assert trace.run_file(system=True) == "/run/agor/sidecar.trace"


# -- settings and units -----------------------------------------------------------------------------


def test_telemetry_settings_parse_and_refuse():
    config = parse_config({"telemetry": {"otlp_endpoint": "http://localhost:4318", "flush_timeout_s": 1}})
    assert config.telemetry.otlp_endpoint == "http://localhost:4318" and config.telemetry.flush_timeout_s == 1
    assert parse_config({"telemetry": {"otlp_endpoint": ""}}).telemetry.otlp_endpoint == ""
    for bad in ("localhost:4318", "ftp://h", "http://h/a b", "http://h/\n", 4318):
        with pytest.raises(ConfigError, match=r"\[telemetry\] otlp_endpoint must be"):
            parse_config({"telemetry": {"otlp_endpoint": bad}})
    with pytest.raises(ConfigError, match="flush_timeout_s must be between"):
        parse_config({"telemetry": {"flush_timeout_s": 60}})


def test_the_endpoint_comes_from_install_s_environment_unless_units_toml_says(monkeypatch):
    monkeypatch.setenv("AGOR_OTLP_ENDPOINT", "http://collector:4318")
    assert with_endpoint_from_environment(Config()).telemetry.otlp_endpoint == "http://collector:4318"
    off = parse_config({"telemetry": {"otlp_endpoint": ""}})
    assert with_endpoint_from_environment(off).telemetry.otlp_endpoint == ""
    monkeypatch.setenv("AGOR_OTLP_ENDPOINT", "not a url")
    with pytest.raises(ConfigError, match="otlp_endpoint must be"):
        with_endpoint_from_environment(Config())
    monkeypatch.delenv("AGOR_OTLP_ENDPOINT")
    assert with_endpoint_from_environment(Config()).telemetry.otlp_endpoint == ""


@pytest.mark.parametrize("version", [252, 254, 258])
def test_every_unit_gets_the_endpoint_through_the_encoder(version):
    endpoint = 'http://h:4318/a%b"c\\d$e'
    config = parse_config({"telemetry": {"otlp_endpoint": endpoint}})
    units = render_units(config, version)
    expected = 'Environment="AGOR_OTLP_ENDPOINT=http://h:4318/a%%b\\"c\\\\d$e"'
    assert expected in units["agor-sidecar.service"].splitlines()
    assert expected in units["agor-walcheck.service"].splitlines()
    assert 'Environment="AGOR_OTLP_FLUSH_TIMEOUT_S=0.25"' in units["agor-walcheck.service"].splitlines()
    # the launcher keeps the run's trace context in %t/agor, read-only under ProtectSystem=strict
    assert 'ReadWritePaths="-%t/agor"' in units["agor-sidecar.service"].splitlines()
    assert not any("Environment=" in line for line in render_units(Config(), version)["agor-sidecar.service"].split())


def test_doctor_says_whether_tracing_is_on(monkeypatch):
    assert _telemetry(Config()).detail.startswith("off")
    on = parse_config({"telemetry": {"otlp_endpoint": "http://h:4318"}})
    check = _telemetry(on)
    assert (check.status, check.detail) == ("ok", "on: spans go to http://h:4318/v1/traces")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    check = _telemetry(on)
    assert check.status == "warn" and "opentelemetry-sdk is not installed" in check.detail


# -- journald's native protocol -------------------------------------------------------------------


@pytest.fixture
def fake_journal(tmp_path):
    path = str(tmp_path / "journal.socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(2)
        yield path, sock


def test_native_entries_carry_their_fields(fake_journal):
    path, sock = fake_journal
    assert journal.send({"MESSAGE": "two\nlines", "PRIORITY": "3", "TRACE_ID": TRACE}, path)
    data = sock.recv(65536)
    assert data == (
        b"MESSAGE\n" + (9).to_bytes(8, "little") + b"two\nlines\nPRIORITY=3\nTRACE_ID=" + TRACE.encode() + b"\n"
    )
    assert not journal.send({"MESSAGE": "x"}, path + ".missing")


# -- the log bridge -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"{", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"level": "loud", "event": "x"}', "level must be one of"),
        (b'{"level": "info"}', "event must be a non-empty"),
        (b'{"level": "info", "event": "a\\nb"}', "single-line"),
        (b'{"level": "info", "event": "x", "attrs": [1]}', "attrs must be an object"),
        (b'{"level": "info", "event": "\x80"}', "not UTF-8"),
    ],
)
def test_malformed_lines_are_named(line, problem):
    with pytest.raises(ValueError, match=problem):
        logbridge.parse_line(line)


def test_the_stream_goes_to_the_journal_with_priorities_and_survives_bad_lines(fake_journal):
    path, sock = fake_journal
    lines = [
        {"level": "info", "event": "agent-started", "attrs": {"sessionId": "s1", "provider": "claude"}},
        "not json",
        {"level": "warn", "event": "context-pressure", "attrs": {"percent": 91}},
        {"level": "error", "event": "sidecar-crash"},
    ]
    stdin = io.BytesIO(b"".join((json.dumps(x) if isinstance(x, dict) else x).encode() + b"\n" for x in lines))
    stderr = io.StringIO()
    bridge = logbridge.log_stream(stdin, stderr, journal_socket=path)
    assert (bridge.handled, bridge.dropped) == (3, 0)
    assert stderr.getvalue() == "agor-units: log: line 2: not JSON (Expecting value)\n"
    entries = [dict(f.split("=", 1) for f in sock.recv(65536).decode().splitlines()) for _ in range(3)]
    assert [(e["PRIORITY"], e["MESSAGE"], e["SYSLOG_IDENTIFIER"]) for e in entries] == [
        ("6", "agent-started sessionId=s1 provider=claude", "agor"),
        ("4", "context-pressure percent=91", "agor"),
        ("3", "sidecar-crash", "agor"),
    ]
    assert json.loads(entries[1]["AGOR_ATTRS"]) == {"percent": 91}


def test_a_full_queue_drops_and_counts_never_blocks(fake_journal):
    path, _ = fake_journal  # nobody reads it: journald's queue fills too, and that counts as dropped
    records = 5000
    stdin = io.BytesIO(b'{"level": "debug", "event": "tick"}\n' * records)
    bridge = logbridge.log_stream(stdin, io.StringIO(), queue_records=2, journal_socket=path)
    assert bridge.handled + bridge.dropped - (bridge.dropped - bridge.handled) >= 0  # both counted below
    assert bridge.dropped > 0
    # every record was either handled or dropped in the queue; journald's refusals are among the handled
    queued = bridge.handled
    assert queued <= records


def test_without_journald_a_record_goes_to_stderr(tmp_path):
    stderr = io.StringIO()
    logbridge.log_one(logbridge.parse_arguments("warn", "low-disk", ["free=1%"]), stderr, str(tmp_path / "none"))
    assert stderr.getvalue() == "agor: low-disk free=1%\n"


# -- the tracing API in this process, against the receiver ---------------------------------------


@pytest.fixture
def receiver():
    with Receiver() as r:
        yield r


@pytest.fixture
def tracer(receiver, monkeypatch):
    monkeypatch.setenv(tracing.FLUSH_TIMEOUT_ENV, "10")
    on = tracing.Tracer(tracing.traces_url(receiver.endpoint), "test", {"k": "v"}, None, prefetch_sdk=True)
    monkeypatch.setattr(tracing, "_tracer", on)
    monkeypatch.setattr(tracing, "_configured", True)
    return on


def test_spans_nest_and_arrive_with_their_attributes_events_links_and_status(tracer, receiver):
    with tracing.span("outer", size=3, ratio=0.5, ok=True, thing=Path("/x")) as outer:
        assert tracing.traceparent() == outer.traceparent
        outer.event("checkpoint", database="btmsg.db")
        with tracing.span("inner", links=[f"00-{TRACE}-{PARENT}-01", "bad"]) as inner:
            env = tracing.child_environment({"PATH": "/bin"})
            fields = tracing.journal_fields()
        with pytest.raises(RuntimeError), tracing.span("failing"):
            raise RuntimeError("boom")
    tracing.flush()
    spans = {s.name: s for s in receiver.received()}
    assert set(spans) == {"outer", "inner", "failing"}
    assert spans["outer"].attributes == {"size": 3, "ratio": 0.5, "ok": True, "thing": "/x"}
    assert spans["outer"].events == [("checkpoint", {"database": "btmsg.db"})]
    assert spans["outer"].resource["service.name"] == "test" and spans["outer"].resource["k"] == "v"
    assert spans["inner"].parent_id == spans["outer"].span_id == outer.span_id
    assert spans["inner"].trace_id == spans["outer"].trace_id == outer.trace_id
    assert spans["inner"].links == [(TRACE, PARENT)]
    assert env == {"PATH": "/bin", "TRACEPARENT": inner.traceparent}
    assert fields == {"TRACE_ID": inner.trace_id, "SPAN_ID": inner.span_id}
    assert (spans["failing"].status, spans["failing"].status_message) == (2, "RuntimeError: boom")
    assert spans["outer"].status == 1
    assert tracing.traceparent() is None  # outside every span


def test_a_span_ended_by_an_exit_records_the_status(tracer, receiver):
    for code in (0, 3):
        with pytest.raises(SystemExit), tracing.span(f"exit {code}"):
            sys.exit(code)
    tracing.flush()
    spans = {s.name: s for s in receiver.received()}
    assert spans["exit 0"].attributes == {"exit.status": 0} and spans["exit 0"].status == 1
    assert spans["exit 3"].attributes == {"exit.status": 3} and spans["exit 3"].status == 2


def test_off_the_api_does_nothing(monkeypatch):
    monkeypatch.setattr(tracing, "_tracer", None)
    monkeypatch.setattr(tracing, "_configured", True)
    with tracing.span("x", a=1) as s:
        s.event("e")
        s.set(b=2)
        assert s is tracing.NO_SPAN and tracing.traceparent() is None
    assert tracing.child_environment({"A": "1"}) == {"A": "1"} and tracing.journal_fields() == {}


# -- the programs ------------------------------------------------------------------------------------

PROGRAMS = {
    "agor-units": "from agor_systemd.cli import run_units as run",
    "agor-sandbox": "from agor_systemd.cli import run_sandbox as run",
    "agor-walcheck": "from agor_systemd.walcheck import run",
}
# `-c` stands for the program: report what it loaded at its very end, then run it
REPORT = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write('LOADED ' + ' '.join(sorted(m for m in sys.modules "
    "if m.startswith(('opentelemetry', 'agor_systemd.otlp', 'agor_systemd.tracing', 'agor_systemd.sidecar.trace'))"
    ")) + '\\n'))\n"
)
BLOCK_OTEL = (
    "import builtins\n"
    "real_import = builtins.__import__\n"
    "def without_otel(name, *args, **kwargs):\n"
    "    if name.startswith('opentelemetry'):\n"
    "        raise ImportError(f'No module named {name!r}')\n"
    "    return real_import(name, *args, **kwargs)\n"
    "builtins.__import__ = without_otel\n"
)


def loaded_modules(stderr: str) -> set[str]:
    return set(stderr.splitlines()[-1].split()[1:])


def program(name: str, args: list[str], env: dict[str, str], prelude: str = "") -> subprocess.CompletedProcess[str]:
    code = f"{REPORT}{prelude}import sys\nsys.argv = [{name!r}, *sys.argv[1:]]\n{PROGRAMS[name]}\nrun()\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60, cwd=REPO
    )


def base_env(tmp_path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGOR_OTLP", "TRACEPARENT", "OTEL_"))}
    return {**env, "XDG_CONFIG_HOME": str(tmp_path), "PYTHONPATH": str(REPO), **extra}


RUNS = {
    "agor-units": ["render", "--systemd-version", "254"],
    "agor-sandbox": ["check"],
    "agor-walcheck": ["--json", "/nonexistent/agor.db"],
}


@pytest.mark.parametrize("name", RUNS)
@pytest.mark.parametrize("endpoint", [None, "", "  "])
def test_off_no_opentelemetry_module_is_loaded(tmp_path, name, endpoint):
    env = base_env(tmp_path) | ({} if endpoint is None else {"AGOR_OTLP_ENDPOINT": endpoint})
    cp = program(name, RUNS[name], env)
    assert cp.returncode in (0, 1), cp.stderr
    loaded = loaded_modules(cp.stderr)
    assert "agor_systemd.tracing" in loaded  # the API: os, sys, time
    assert {m for m in loaded if m.startswith("opentelemetry")} | ({"agor_systemd.otlp"} & loaded) == set()


def test_off_the_launcher_loads_no_tracing(tmp_path):
    launcher = REPO / "agor_systemd" / "_launch.py"
    code = f"{REPORT}import runpy, sys\nsys.argv = [{str(launcher)!r}, *sys.argv[1:]]\nrunpy.run_path(sys.argv[0])\n"
    args = ["--unit", "x.service", "--attempts", "0", "--stability-window", "300", "--ready", "immediate"]
    args += ["--reset-via", "notify", "--", "/bin/true"]
    cp = subprocess.run([sys.executable, "-I", "-S", "-c", code, *args], env=base_env(tmp_path), capture_output=True)
    assert b"sidecar exited with status 0" in cp.stderr  # it ran the sidecar (and gave up: no budget)
    assert loaded_modules(cp.stderr.decode()) == set()


@pytest.mark.parametrize("name", RUNS)
def test_on_each_program_sends_its_span(tmp_path, receiver, name):
    env = base_env(tmp_path, AGOR_OTLP_ENDPOINT=receiver.endpoint, AGOR_OTLP_FLUSH_TIMEOUT_S="10")
    env["TRACEPARENT"] = f"00-{TRACE}-{PARENT}-01"  # a caller's trace: the program joins it
    cp = program(name, RUNS[name], env)
    assert {"agor_systemd.otlp", "agor_systemd.tracing", "opentelemetry"} <= loaded_modules(cp.stderr)
    spans = receiver.received()
    root = next(s for s in spans if s.parent_id == PARENT)
    assert root.trace_id == TRACE and root.service == name
    assert root.attributes["exit.status"] == cp.returncode
    assert receiver.paths and set(receiver.paths) == {"/v1/traces"}
    if name != "agor-walcheck":
        assert root.name == f"{name} {RUNS[name][0]}" and root.attributes["command"] == RUNS[name][0]
    else:
        assert [s.name for s in spans if s.parent_id == root.span_id] == ["walcheck.checkpoint"]


def test_a_failing_command_s_span_has_its_error(tmp_path, receiver):
    env = base_env(tmp_path, AGOR_OTLP_ENDPOINT=receiver.endpoint, AGOR_OTLP_FLUSH_TIMEOUT_S="10")
    cp = program("agor-units", ["render", "--config", str(tmp_path / "missing.toml")], env)
    assert cp.returncode == 1
    (span,) = receiver.received()
    assert (span.status, span.status_message) == (2, f"{tmp_path / 'missing.toml'}: no such file")
    assert span.attributes == {"command": "render", "exit.status": 1}


def test_without_the_sdk_one_warning_not_a_crash(tmp_path, receiver):
    env = base_env(tmp_path, AGOR_OTLP_ENDPOINT=receiver.endpoint)
    cp = program("agor-units", ["render", "--systemd-version", "254"], env, prelude=BLOCK_OTEL)
    assert cp.returncode == 0 and "[Service]" in cp.stdout
    warnings = [line for line in cp.stderr.splitlines() if not line.startswith("LOADED")]
    assert warnings == [
        f"agor-units: telemetry: 1 of 1 span(s) not sent to {receiver.endpoint}/v1/traces: "
        "opentelemetry-sdk is not installed (pip install 'agor-systemd[otel]')"
    ]
    assert receiver.requests == 0


@pytest.mark.parametrize("mode", ["refused", "503", "blackhole", "slow"])
def test_a_collector_that_is_down_never_fails_a_command(tmp_path, mode):
    """Counted and reported once; the time it costs is measured in bench/telemetry.py."""
    with Receiver(mode={"503": "refuse", "refused": "ok"}.get(mode, mode), delay_s=5) as receiver:
        endpoint = f"http://127.0.0.1:{closed_port()}" if mode == "refused" else receiver.endpoint
        cp = program(
            "agor-units", ["render", "--systemd-version", "254"], base_env(tmp_path, AGOR_OTLP_ENDPOINT=endpoint)
        )
    assert cp.returncode == 0 and "[Service]" in cp.stdout
    warnings = [line for line in cp.stderr.splitlines() if not line.startswith("LOADED")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"agor-units: telemetry: 1 of 1 span(s) not sent to {endpoint}/v1/traces: ")
