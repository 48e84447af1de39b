"""agor-sidecar.service as rendered from a Config, per systemd version; units/ reference files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from agor_systemd.btmsg.units import SWEEP_SERVICE, SWEEP_TIMER
from agor_systemd.config import Config, RestartPolicy, SidecarConfig, SocketConfig, WatchdogConfig
from agor_systemd.sidecar.protocol import SIDECAR_SOCKET, SIDECAR_UNIT
from agor_systemd.sidecar.units import (
    NATIVE_BACKOFF_VERSION,
    PACKAGED_LAUNCHER,
    sidecar_unit,
    uses_native_backoff,
)
from agor_systemd.unitfile import HomePath, usec_text
from agor_systemd.units import REFERENCE_VERSIONS, render_units
from agor_systemd.verify import verify_units

SWEEP_UNITS = [SWEEP_SERVICE, SWEEP_TIMER]

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = ["/usr/bin/python3", "-I", "-m", "agor_systemd.sidecar.launcher"]
# the default sandbox: read-write (the working directory, ~/.local/share/agor, is one of them), then
# read-only paths; the launcher adds the command's files at each start
SANDBOX_WORDS = "".join(
    f'"--rw" "{p}" '
    for p in (
        "/tmp",
        "/var/tmp",
        "%h/.local/share/agor",
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/shm",
    )
) + "".join(
    f'"--ro" "{p}" '
    for p in (
        "/usr",
        "/lib",
        "/lib32",
        "/lib64",
        "/bin",
        "/sbin",
        "/etc",
        "/opt",
        "/proc",
        "/sys",
        "/dev",
        "/run",
        "%h/.local",
        "%h/.config",
        "%h/.deno",
        "%h/.nvm",
        "%h/.gitconfig",
        "%h/.claude",
    )
)
# systemd's own hardening, every group (tests/test_hardening.py has the details)
HARDENING_254 = {
    "UMask": ["0077"],
    "KeyringMode": ["private"],
    "NoNewPrivileges": ["yes"],
    "SystemCallFilter": ["@system-service @sandbox"],
    "SystemCallErrorNumber": ["EPERM"],
    "SystemCallArchitectures": ["native"],
    "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6 AF_NETLINK"],
    "RestrictNamespaces": ["yes"],
    "LockPersonality": ["yes"],
    "RestrictRealtime": ["yes"],
    "RestrictSUIDSGID": ["yes"],
    "PrivateUsers": ["yes"],
    "CapabilityBoundingSet": [""],
    "ProtectSystem": ["strict"],
    "ProtectHome": ["read-only"],
    "ReadWritePaths": ['"-/tmp" "-/var/tmp" "-%h/.local/share/agor"'],
    "PrivateMounts": ["yes"],
    "ProtectKernelTunables": ["yes"],
    "ProtectKernelModules": ["yes"],
    "ProtectKernelLogs": ["yes"],
    "ProtectClock": ["yes"],
    "ProtectHostname": ["yes"],
    "ProtectControlGroups": ["yes"],
}
REGENERATE = "regenerate them with `python -m agor_systemd.units` and review the diff"


def config(*, command=None, working_directory=None, environment_file=None, **restart) -> Config:
    sidecar = SidecarConfig()
    if command is not None:
        sidecar = replace(sidecar, command=tuple(command))
    if working_directory is not None:
        sidecar = replace(sidecar, working_directory=working_directory)
    if environment_file is not None:
        sidecar = replace(sidecar, environment_file=environment_file)
    return Config(sidecar=sidecar, restart=replace(RestartPolicy(), **restart))


def render(cfg: Config, version: int, **kwargs) -> str:
    units = render_units(cfg, version, kwargs.pop("launcher", LAUNCHER), **kwargs)
    assert list(units) == [SIDECAR_UNIT, SIDECAR_SOCKET, "agor-walcheck.service", "agor-walcheck.timer", *SWEEP_UNITS]
    return units[SIDECAR_UNIT]


def section(text: str, name: str) -> list[str]:
    """The key=value lines of one [section]."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("["):
            inside = line == f"[{name}]"
        elif inside and line and not line.startswith("#"):
            lines.append(line)
    return lines


def settings(text: str, name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in section(text, name):
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


def one(text: str, name: str, key: str) -> str | None:
    values = settings(text, name).get(key)
    if values is None:
        return None
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


# --- native (systemd ≥ 254) -------------------------------------------------------------------


def test_native_defaults():
    text = render(Config(), 254)
    assert settings(text, "Unit") == {
        "Description": ["agor sidecar (agent runners), supervised by systemd"],
        "Documentation": [
            "file:/usr/share/doc/agor-systemd/supervision.md file:/usr/share/doc/agor-systemd/watchdog.md "
            "file:/usr/share/doc/agor-systemd/sandbox.md"
        ],
        "StartLimitIntervalSec": ["300s"],
        "StartLimitBurst": ["6"],
    }
    assert settings(text, "Service") == {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStart": [
            ':"/usr/bin/python3" "-I" "-m" "agor_systemd.sidecar.launcher" "--unit" "agor-sidecar.service" '
            '"--attempts" "5" "--stability-window" "300" "--ready" "line" "--sandbox" "best" '
            '"--expect-hardening" "umask,seccomp,userns,ro-system,ro-home" '
            '"--working-directory" "%h/.local/share/agor" '
            + SANDBOX_WORDS
            + '"--" "/usr/bin/node" "%h/.local/share/agor/dist/claude-runner.mjs"'
        ],
        "WorkingDirectory": ["-%h/.local/share/agor"],
        "Restart": ["always"],
        "RestartPreventExitStatus": ["250"],
        "RestartSec": ["1s"],
        "RestartSteps": ["4"],
        "RestartMaxDelaySec": ["16s"],
        "TimeoutStartSec": ["40s"],
        "WatchdogSec": ["30s"],
        "WatchdogSignal": ["SIGTERM"],
        "TimeoutAbortSec": ["5s"],
        "KillMode": ["control-group"],
        "SyslogIdentifier": ["agor-sidecar"],
        "Sockets": ["agor-sidecar.socket"],
        **HARDENING_254,
    }
    assert settings(text, "Install") == {"WantedBy": ["default.target"]}


def test_start_limit_interval_is_in_the_unit_section():
    # [Service] only knows the legacy StartLimitInterval=; StartLimitIntervalSec= there is ignored
    text = render(Config(), 254)
    assert "StartLimitIntervalSec" not in settings(text, "Service")
    assert "StartLimitBurst" not in settings(text, "Service")


@pytest.mark.parametrize("version", [254, 255, 257, 260])
def test_native_from_254_on(version):
    text = render(Config(), version)
    assert one(text, "Service", "RestartSteps") == "4"
    assert "--wait-schedule" not in text
    assert uses_native_backoff(Config(), version)


def test_sub_second_base_is_exact():
    text = render(config(base_s=0.2), 254)
    assert one(text, "Service", "RestartSec") == "200ms"
    assert one(text, "Service", "RestartSteps") == "4"
    assert one(text, "Service", "RestartMaxDelaySec") == "3200ms"


def test_constant_schedule_has_no_steps():
    text = render(config(base_s=5, cap_s=5), 254)
    assert one(text, "Service", "RestartSec") == "5s"
    assert one(text, "Service", "RestartSteps") is None
    assert one(text, "Service", "RestartMaxDelaySec") is None
    assert "--wait-schedule" not in text


def test_attempts_and_window_reach_unit_and_launcher():
    text = render(config(attempts=3, stability_window_s=90.5), 254)
    assert one(text, "Unit", "StartLimitBurst") == "4"
    assert one(text, "Unit", "StartLimitIntervalSec") == "90500ms"
    assert '"--attempts" "3" "--stability-window" "90.5"' in one(text, "Service", "ExecStart")


# --- fallback (systemd < 254, or a schedule systemd cannot express) --------------------------


def test_fallback_defaults_on_252():
    text = render(Config(), 252)
    service = settings(text, "Service")
    assert service["RestartSec"] == ["0"]
    assert "RestartSteps" not in service and "RestartMaxDelaySec" not in service
    assert '"--wait-schedule" "1,2,4,8,16" "--ready" "line" "--sandbox"' in service["ExecStart"][0]
    assert service["TimeoutStartSec"] == ["56s"]  # the launcher's longest wait + 10 s ready + 30 s
    assert service["Restart"] == ["always"] and service["RestartPreventExitStatus"] == ["250"]
    assert service["Type"] == ["notify"]
    assert not uses_native_backoff(Config(), 252)


@pytest.mark.parametrize("version", [252, 253])
def test_fallback_below_254(version):
    assert "--wait-schedule" in render(Config(), version)


def test_inexpressible_schedule_falls_back_on_new_systemd():
    cfg = config(attempts=7)  # 1, 2, 4, 8, 16, 30, 30
    text = render(cfg, 257)
    assert one(text, "Service", "RestartSec") == "0"
    assert one(text, "Service", "RestartSteps") is None
    assert '"--wait-schedule" "1,2,4,8,16,30,30"' in one(text, "Service", "ExecStart")
    assert one(text, "Service", "TimeoutStartSec") == "70s"  # 30 s wait + 10 s ready + 30 s
    assert not uses_native_backoff(cfg, 257)


def test_fallback_timeout_rounds_the_wait_up():
    text = render(config(base_s=0.3, attempts=3), 252)  # 0.3, 0.6, 1.2
    assert one(text, "Service", "TimeoutStartSec") == "42s"
    assert '"--wait-schedule" "0.3,0.6,1.2"' in text


def test_zero_attempts_fallback():
    text = render(config(attempts=0), 252)
    assert one(text, "Unit", "StartLimitBurst") == "1"
    assert one(text, "Service", "TimeoutStartSec") == "40s"


# --- sidecar settings -------------------------------------------------------------------------


def test_environment_file_only_when_configured():
    assert one(render(Config(), 254), "Service", "EnvironmentFile") is None
    assert "--environment-file" not in render(Config(), 254)
    text = render(config(environment_file=HomePath(".config/agor/sidecar.env")), 254)
    assert one(text, "Service", "EnvironmentFile") == "-%h/.config/agor/sidecar.env"
    assert '"--environment-file" "%h/.config/agor/sidecar.env"' in one(text, "Service", "ExecStart")
    text = render(config(environment_file="/etc/agor/side car.env"), 254)
    assert one(text, "Service", "EnvironmentFile") == "-/etc/agor/side car.env"


def test_working_directory():
    text = render(config(working_directory="/srv/100%"), 254)
    assert one(text, "Service", "WorkingDirectory") == "-/srv/100%%"
    assert '"--working-directory" "/srv/100%%"' in one(text, "Service", "ExecStart")
    assert one(render(config(working_directory=HomePath("agor")), 254), "Service", "WorkingDirectory") == "-%h/agor"


@pytest.mark.parametrize("version", [252, 254])
def test_missing_paths_reach_the_launcher_not_systemd(version):
    """'-': systemd starts the launcher even when they are missing (no 200/CHDIR outside the
    budget); the launcher checks the same paths itself."""
    cfg = config(working_directory=HomePath("proj"), environment_file="/etc/agor.env")
    text = render(cfg, version)
    assert one(text, "Service", "WorkingDirectory") == "-%h/proj"
    assert one(text, "Service", "EnvironmentFile") == "-/etc/agor.env"
    exec_start = one(text, "Service", "ExecStart")
    assert '"--working-directory" "%h/proj" "--environment-file" "/etc/agor.env"' in exec_start


def test_system_mode_reaches_the_launcher():
    text = render(Config(), 252, system=True)
    assert '"--wait-schedule" "1,2,4,8,16" "--ready" "line" "--sandbox" "best"' in text
    assert '"--system" "--"' in text


def test_default_launcher_is_the_packaged_one():
    script = "/usr/lib/python3/dist-packages/agor_systemd/_launch.py"
    assert ("/usr/bin/python3", "-I", "-S", script) == PACKAGED_LAUNCHER
    text = render_units(Config(), 254)[SIDECAR_UNIT]
    assert one(text, "Service", "ExecStart").startswith(f':"/usr/bin/python3" "-I" "-S" "{script}" ')


def test_every_line_stands_alone():
    """No rendered line may end in a backslash: systemd would join it with the next line
    (WorkingDirectory=/srv/agor\\ swallows Restart=always)."""
    cfg = config(working_directory="/srv/agor\\")
    try:
        text = render(cfg, 254)
    except ValueError:
        return  # refusing the value is fine
    assert [line for line in text.splitlines() if line.endswith("\\")] == []


@pytest.mark.parametrize(
    "usec, text",
    [
        (0, "0s"),
        (1, "1us"),
        (1500, "1500us"),
        (200_000, "200ms"),
        (1_000_000, "1s"),
        (1_500_000, "1500ms"),
        (86_400_000_000, "86400s"),
    ],
)
def test_usec_text(usec, text):
    assert usec_text(usec) == text


def test_native_version_constant():
    assert NATIVE_BACKOFF_VERSION == 254


def test_sidecar_unit_name():
    assert sidecar_unit(Config(), 254).name == SIDECAR_UNIT


# --- units/ in the repository -----------------------------------------------------------------


@pytest.mark.parametrize("mode, version", list(REFERENCE_VERSIONS.items()))
def test_reference_units_are_up_to_date(mode, version):
    for name, text in render_units(Config(), version, PACKAGED_LAUNCHER).items():
        path = REPO / "units" / mode / name
        assert path.is_file(), f"{path.relative_to(REPO)} is missing; {REGENERATE}"
        assert path.read_text(encoding="utf-8") == text, (
            f"{path.relative_to(REPO)} differs from render_units(Config(), {version}); {REGENERATE}"
        )


# --- offline check with systemd-analyze verify --------------------------------------------------

HOSTILE_COMMANDS = [
    [
        "/usr/bin/node",
        "a b",
        "new\nline",
        "tab\t",
        "100%",
        "%h",
        "$HOME",
        "${X}",
        '"',
        "'",
        "\\",
        "",
        ";",
        "--",
        "ünï 😀",
        "\x01\x7f",
        "#x",
        "[Unit]",
    ],
    [HomePath("bin/agor runner"), "--", "--unit", "x", HomePath("")],
]


def hostile_configs() -> list[Config]:
    configs = [Config(), config(base_s=0.2), config(attempts=7), config(attempts=0), config(base_s=5, cap_s=5)]
    configs += [config(command=cmd) for cmd in HOSTILE_COMMANDS]
    configs += [config(working_directory="/srv/my agor $HOME 100%", environment_file="/etc/agor/ä b.env")]
    return configs


def render_all(version: int) -> dict[str, str]:
    """Every config's unit under its own name, so one systemd-analyze run checks them all."""
    return {f"agor-check{i}.service": render(cfg, version) for i, cfg in enumerate(hostile_configs())}


needs_analyze = pytest.mark.skipif(
    verify_units({"probe.service": "[Service]\nExecStart=/bin/true\n"}, user=False) != [],
    reason="systemd-analyze verify is not usable here",
)


@needs_analyze
def test_units_rendered_for_252_verify_clean():
    assert verify_units(render_all(252), user=False) == []


@needs_analyze
def test_verify_reports_keys_the_installed_systemd_ignores():
    # this machine's systemd-analyze is 252: RestartSteps/RestartMaxDelaySec are unknown there,
    # and verify must say so even though systemd-analyze exits 0
    problems = verify_units({SIDECAR_UNIT: render(Config(), 254)}, user=False)
    assert any("Unknown key 'RestartSteps'" in p for p in problems), problems
    assert any("Unknown key 'RestartMaxDelaySec'" in p for p in problems), problems
    assert all(p.startswith(f"{SIDECAR_UNIT}:") for p in problems), problems


@needs_analyze
def test_verify_reports_a_broken_unit():
    problems = verify_units({"agor-broken.service": "[Service]\nExecStart=relative/path\n"}, user=False)
    assert problems and all("agor-broken.service" in p for p in problems), problems


def test_verify_without_systemd_analyze():
    assert verify_units({"x.service": ""}, analyze="/nonexistent/systemd-analyze") == [
        "/nonexistent/systemd-analyze not found (apt-get install systemd)"
    ]


def test_watchdog_settings_reach_unit_and_launcher():
    cfg = Config(
        watchdog=WatchdogConfig(
            interval_s=2.5,
            ready="socket:/run/user/1000/agor.sock",
            ready_timeout_s=3,
            activity_timeout_s=4,
            probe="exec:curl -sf x",
        )
    )
    text = render(cfg, 257)
    assert one(text, "Service", "WatchdogSec") == "2500ms"
    exec_start = one(text, "Service", "ExecStart")
    for words in (
        '"--ready" "socket:/run/user/1000/agor.sock"',
        '"--ready-timeout" "3"',
        '"--activity-timeout" "4"',
        '"--probe" "exec:curl -sf x"',
    ):
        assert words in exec_start
    assert "--reset-via" not in exec_start  # ResetFailedUnit over D-Bus before systemd 258


def test_watchdog_off_and_restart_reset_on_258():
    text = render(Config(watchdog=WatchdogConfig(interval_s=0)), 258)
    assert one(text, "Service", "WatchdogSec") is None
    assert one(text, "Service", "WatchdogSignal") is None
    assert '"--reset-via" "notify"' in one(text, "Service", "ExecStart")


def test_every_reference_directory_is_generated():
    """units/ holds exactly the generated directories: a removed variant leaves no stale copy."""
    assert sorted(p.name for p in (REPO / "units").iterdir() if p.is_dir()) == sorted(REFERENCE_VERSIONS)


# --- agor-sidecar.socket (docs/socket.md) ------------------------------------------------------


def test_the_socket_unit_hands_a_named_private_socket_to_the_service():
    units = render_units(Config(), 254, LAUNCHER)
    assert settings(units[SIDECAR_SOCKET], "Socket") == {
        "ListenStream": ["%t/agor/sidecar.sock"],
        "SocketMode": ["0600"],
        "DirectoryMode": ["0700"],
        "FileDescriptorName": ["sidecar"],
        "Accept": ["no"],
        "RemoveOnStop": ["yes"],
        "Service": [SIDECAR_UNIT],
    }
    assert settings(units[SIDECAR_SOCKET], "Install") == {"WantedBy": ["sockets.target"]}
    assert one(units[SIDECAR_UNIT], "Service", "Sockets") == SIDECAR_SOCKET


def test_socket_off_leaves_the_sidecar_without_one():
    config = Config(socket=SocketConfig(enabled=False))
    units = render_units(config, 254, LAUNCHER)
    assert SIDECAR_SOCKET not in units
    assert one(units[SIDECAR_UNIT], "Service", "Sockets") is None


def test_socket_buffers_reach_the_launcher_only_when_not_the_default():
    default = one(render(Config(), 254), "Service", "ExecStart") or ""
    assert "--buffer-bytes" not in default and "--client-queue-bytes" not in default
    config = Config(socket=SocketConfig(buffer_mib=0.5, client_queue_mib=1))
    start = one(render(config, 254), "Service", "ExecStart") or ""
    assert '"--buffer-bytes" "524288"' in start and '"--client-queue-bytes" "1048576"' in start


@needs_analyze
def test_the_socket_and_its_service_verify_clean():
    units = render_units(Config(), 252, LAUNCHER)
    assert verify_units({name: units[name] for name in (SIDECAR_UNIT, SIDECAR_SOCKET)}, user=False) == []
