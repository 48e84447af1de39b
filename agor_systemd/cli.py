"""agor-units: a thin command line over agor_systemd's library API."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from agor_systemd import __version__, tracing
from agor_systemd.btmsg.sweep import health_summary
from agor_systemd.config import (
    SETTINGS,
    Config,
    Setting,
    apply_overrides,
    expand_home,
    load_config,
    with_endpoint_from_environment,
)
from agor_systemd.console import call, run_main
from agor_systemd.doctor import MINIMUM_VERSION, run_checks
from agor_systemd.errors import AgorError
from agor_systemd.install import (
    current_launcher,
    installed_docs,
    manual_restart,
    start_path_problems,
)
from agor_systemd.install import install as do_install
from agor_systemd.install import uninstall as do_uninstall
from agor_systemd.logbridge import log_one, log_stream, parse_arguments
from agor_systemd.manager import BusError, Systemd, installed_systemd_version
from agor_systemd.sandbox.check import sandbox_report
from agor_systemd.sidecar.backoff import schedule
from agor_systemd.sidecar.health import read_health
from agor_systemd.sidecar.protocol import SIDECAR_UNIT
from agor_systemd.sidecar.units import uses_native_backoff
from agor_systemd.units import render_units
from agor_systemd.verify import verify_units

# click ≥ 8.2 shows the help for a group called without a command through this UsageError
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


class OneLineUsageError(click.ClickException):
    """A usage error as one line, `PROG: error: …`, exit status 2 (click's own shows the usage,
    a hint and the error on three lines)."""

    exit_code = 2

    def __init__(self, prog: str, error: click.UsageError) -> None:
        super().__init__(" ".join(error.format_message().split()).rstrip("."))
        self.prog = prog
        self.command_path = error.ctx.command_path if error.ctx is not None else prog

    def show(self, file=None) -> None:
        click.echo(f"{self.prog}: error: {self.message} (see `{self.command_path} --help`)", err=True)


class OneLineUsageGroup(click.Group):
    """A command group whose usage errors, its own and its commands', are one line."""

    def __init__(self, *args, prog: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prog = prog

    @contextlib.contextmanager
    def _one_line_usage(self) -> Iterator[None]:
        try:
            yield
        except click.UsageError as e:
            if isinstance(e, _NO_ARGS_IS_HELP):
                raise  # a bare `agor-units` shows the help, as before
            raise OneLineUsageError(self.prog, e) from None

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        with self._one_line_usage():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context):
        with self._one_line_usage():
            return super().invoke(ctx)

    def resolve_command(self, ctx: click.Context, args: list[str]):
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:  # the program's span is named after the command (docs/telemetry.md)
            tracing.current().rename(f"{self.prog} {command.name}")
            tracing.current().set(command=command.name)
        return name, command, rest


def config_path_option(func):
    """--config after the command too (`agor-units install --config F`), as before it."""
    return click.option(
        "--config",
        "command_config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        help="units.toml to use (may also go before the command).",
    )(func)


def chosen_config_path(ctx: click.Context, command_config_path: Path | None) -> Path | None:
    return command_config_path or ctx.obj["config_path"]


def friendly_errors(func):
    """Expected problems become one line on stderr and their exit status, never a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        prog = getattr(click.get_current_context().find_root().command, "prog", "agor-units")
        return call(prog, func, *args, **kwargs)

    return wrapper


def emit(data, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def default_text(setting: Setting) -> str:
    """A setting's default as the flag's help says it: `1`, `~/.local/share/agor`, `on`."""
    default = setting.default
    if default is None:
        return setting.unset
    if isinstance(default, bool):
        return "on" if default else "off"
    if isinstance(default, float):
        return f"{default:g}"
    return str(default)


def setting_option(setting: Setting):
    """The override flag a setting declares (config.SETTINGS), as a click option."""
    if setting.flag == "--":
        return click.argument(setting.name, nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND [ARG]...]")
    assert setting.flag is not None
    if setting.appends:
        help_text = f"{setting.help} (repeatable; added to units.toml's list)."
        return click.option(setting.flag, setting.name, multiple=True, metavar=setting.metavar, help=help_text)
    help_text = f"{setting.help} (default {default_text(setting)})."
    if isinstance(setting.default, bool):
        # None when not given, so units.toml decides; a flag without a --no- form can only turn it on
        return click.option(setting.flag, setting.name, is_flag=True, default=None, help=help_text)
    if isinstance(setting.default, int | float):
        number = int if type(setting.default) is int else float
        return click.option(setting.flag, setting.name, type=number, help=help_text)
    return click.option(setting.flag, setting.name, metavar=setting.metavar, help=help_text)


OVERRIDABLE = {setting.name: setting for setting in SETTINGS if setting.flag}


def config_options(func):
    """Flags that override units.toml for one invocation; the sidecar command goes after `--`."""
    for setting in reversed(OVERRIDABLE.values()):
        func = setting_option(setting)(func)
    return config_path_option(func)


def systemd_version_option(help_text: str):
    # older managers lack the ':' ExecStart prefix the units rely on
    return click.option("--systemd-version", type=click.IntRange(min=MINIMUM_VERSION), metavar="N", help=help_text)


def effective_config(
    ctx: click.Context, command_config_path: Path | None, user_config: bool = True, **flag_values
) -> Config:
    """units.toml (or, with user_config=False and no --config, the defaults) with the flags applied."""
    config_path = chosen_config_path(ctx, command_config_path)
    config = load_config(config_path) if user_config or config_path is not None else Config()
    if user_config:
        config = with_endpoint_from_environment(config)
    given = {name: value for name, value in flag_values.items() if value is not None and value != ()}
    # click gives a repeated flag (and the words after --) as a tuple; units.toml has lists
    return apply_overrides(
        config, {OVERRIDABLE[name]: list(v) if isinstance(v, tuple) else v for name, v in given.items()}
    )


def rendered(ctx: click.Context, config: Config, systemd_version: int | None) -> dict[str, str]:
    """The units install would write from `config`, for `systemd_version` or the running manager's."""
    return render_units(
        config,
        systemd_version or target_version(ctx.obj["system"]),
        current_launcher(),
        ctx.obj["system"],
        docs=installed_docs(),
    )


def target_version(system: bool) -> int:
    """The running manager's version, else the installed systemd's."""
    try:
        with Systemd(system) as manager:
            return manager.version()
    except BusError:
        version = installed_systemd_version()
    if version is None:
        raise AgorError("cannot tell the systemd version; pass --systemd-version")
    return version


@click.group(cls=OneLineUsageGroup, prog="agor-units", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="agor-units")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="units.toml to use (default: $XDG_CONFIG_HOME/agor/units.toml); may also go after the command.",
)
@click.option("--system", is_flag=True, help="Use the system manager and /etc/systemd/system instead of the user's.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, system: bool) -> None:
    """Run agor's sidecar under systemd: exact restart backoff, give-up, health.

    \b
    Typical use:
      agor-units install --now -- /usr/bin/node ~/agor/dist/claude-runner.mjs
      agor-units health --json
      agor-units restart          # after it gave up
    Settings live in ~/.config/agor/units.toml (docs/settings.md); flags override them.
    """
    ctx.obj = {"config_path": config_path, "system": system}


@main.command()
@config_options
@systemd_version_option("Render for this systemd version (default: the running one).")
@click.option("--json", "as_json", is_flag=True, help="Print {unit name: text} as JSON.")
@click.pass_context
@friendly_errors
def render(ctx, systemd_version, as_json, **overrides):
    """Print the unit files install would write."""

    config = effective_config(ctx, **overrides)
    units = rendered(ctx, config, systemd_version)
    emit(units, as_json, "\n".join(f"# {name}\n{text}" for name, text in units.items()).rstrip("\n"))


@main.command()
@config_options
@click.option("--now", is_flag=True, help="Also (re)start the sidecar with a fresh restart budget.")
@click.option("--dry-run", is_flag=True, help="Show what would change; write nothing.")
@click.option("--force", is_flag=True, help="Overwrite units edited by hand since the last install.")
@click.option(
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write the units into DIR (for packagers): the default configuration unless --config, no manager, no probing.",
)
@systemd_version_option("With --output: render for this systemd version.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.pass_context
@friendly_errors
def install(ctx, now, dry_run, force, output, systemd_version, as_json, **overrides):
    """Write the units, reload systemd, enable them (and start with --now). Idempotent."""
    if output is not None and now:
        raise click.UsageError("--now cannot be used with --output, which only writes files", ctx)
    # a package gets the default configuration, not the units.toml of whoever builds it
    config = effective_config(ctx, **overrides, user_config=output is None)
    report = do_install(
        config,
        system=ctx.obj["system"],
        output=output,
        now=now,
        dry_run=dry_run,
        systemd_version=systemd_version,
        force=force,
    )

    mode = "native" if uses_native_backoff(config, report.systemd_version) else "launcher fallback"
    lines = [f"{'would write' if dry_run else 'wrote'} {report.directory / n}" for n in report.written]
    lines += [f"unchanged {report.directory / n}" for n in report.unchanged]
    lines += [
        f"systemd {report.systemd_version}: restart backoff {mode}, delays "
        + ", ".join(f"{d:g}s" for d in schedule(config.restart))
    ]
    lines += [
        f"systemd hardening: {', '.join(report.hardening) or 'none'}"
        + (" (not probed: --output renders every group)" if output else " (what took effect in a probe)")
    ]
    lines += [f"hardening left out: {group}: {why}" for group, why in report.left_out.items()]
    lines += [f"done: {a}" for a in report.actions]
    lines += [f"note: {n}" for n in report.notes]
    emit(report.as_dict() | {"backoff": mode}, as_json, "\n".join(lines))


@main.command()
@click.option("--dry-run", is_flag=True, help="Show what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report.")
@click.pass_context
@friendly_errors
def uninstall(ctx, dry_run, as_json):
    """Stop, disable and remove exactly the units install wrote."""
    report = do_uninstall(system=ctx.obj["system"], dry_run=dry_run)
    lines = [f"{'would remove' if dry_run else 'removed'} {report.directory / n}" for n in report.removed]
    lines += [f"kept {report.directory / n} (edited since install)" for n in report.kept]
    lines += [f"note: {n}" for n in report.notes]
    emit(report.as_dict(), as_json, "\n".join(lines) or "nothing installed")


HEALTH_EXIT = {"healthy": 0, "starting": 3, "restarting": 3, "failed": 4, "stopped": 5}


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the health object as JSON.")
@click.pass_context
@friendly_errors
def health(ctx, as_json):
    """The sidecar's health, from systemd.

    \b
    {"status": "healthy"}
    {"status": "healthy", "clients": 0, "buffering_lines": 12}   (agor-sidecar.socket)
    {"status": "starting"}
    {"status": "restarting", "attempt": 2, "next_retry_s": 1.4}
    {"status": "failed", "attempts": 5, "last_error": "exited with status 3"}
    {"status": "stopped"}
    With [btmsg] on and btmsg.db present, "agents" adds agent health: counts by state, dead
    letters (queued, parked) and agor's attention queue (score, reason), or why it cannot be read.
    Exit status (the sidecar's): 0 healthy, 3 starting/restarting, 4 failed, 5 stopped, 1 error.
    """
    config = load_config(ctx.obj["config_path"])
    state: dict = dict(read_health(SIDECAR_UNIT, ctx.obj["system"]))
    details = ", ".join(f"{k} {v}" for k, v in state.items() if k != "status")
    text = state["status"] + (f" ({details})" if details else "")
    agents = health_summary(expand_home(config.btmsg.database, str(Path.home()))) if config.btmsg.enabled else None
    if agents is not None:
        state["agents"] = agents
        text += "\nagents: " + agents_text(agents)
    emit(state, as_json, text)
    sys.exit(HEALTH_EXIT[state["status"]])


def agents_text(agents: dict) -> str:
    if "error" in agents:
        return agents["error"]
    counts = ", ".join(f"{n} {state}" for state, n in agents["counts"].items())
    letters = agents["dead_letters"]
    lines = [f"{counts}; dead letters: {letters['queued']} queued, {letters['parked']} parked"]
    lines += [f"  {item['score']:>3}  {item['agent']}: {item['reason']}" for item in agents["attention"]]
    return "\n".join(lines)


@main.command()
@click.pass_context
@friendly_errors
def restart(ctx):
    """Manual restart: clear the failed state and the restart budget, start the sidecar."""
    manual_restart(ctx.obj["system"])
    click.echo(f"restarted {SIDECAR_UNIT} with a full restart budget")


@main.command()
@config_options
@systemd_version_option("Render for this systemd version (default: the running one).")
@click.pass_context
@friendly_errors
def verify(ctx, systemd_version, **overrides):
    """Run `systemd-analyze verify` on the units rendered from the configuration."""

    config = effective_config(ctx, **overrides)
    units = rendered(ctx, config, systemd_version)

    problems = start_path_problems(config) + verify_units(units, user=not ctx.obj["system"])
    for line in problems:
        click.echo(line, err=True)
    if problems:
        sys.exit(1)
    click.echo(f"ok: {', '.join(units)} pass systemd-analyze verify")


@main.command()
@config_path_option
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
@friendly_errors
def doctor(ctx, command_config_path, as_json):
    """Check systemd version and features, the user manager, lingering and the install."""
    config = with_endpoint_from_environment(load_config(chosen_config_path(ctx, command_config_path)))
    checks = run_checks(config, ctx.obj["system"])
    marks = {"ok": "ok  ", "warn": "warn", "error": "FAIL"}
    lines = [f"[{marks[c.status]}] {c.name}: {c.detail}" + (f"\n       fix: {c.fix}" if c.fix else "") for c in checks]
    emit([c.as_dict() for c in checks], as_json, "\n".join(lines))
    sys.exit(1 if any(c.status == "error" for c in checks) else 0)


@main.command()
@click.option("--fast", is_flag=True, help="Use a 0.2 s base delay instead of 1 s (the whole show takes ~10 s).")
@click.option(
    "--systemd",
    "systemd_build",
    metavar="VERSION",
    help="Which systemd build to run the manager with (default: the installed one).",
)
@friendly_errors
def demo(fast, systemd_build):
    """Show supervision live on an ephemeral user manager (needs root; nothing is left behind).

    Starts a throw-away `systemd --user` for a demo user, installs the units with a sidecar
    that keeps crashing, prints the timeline (crash, countdown, restart, ..., give-up), then
    presses the manual-restart button with the sidecar fixed, and cleans up.
    """
    # the test bed is fenced off from the product: the demo runs as a program of its own
    argv = [
        sys.executable,
        "-m",
        "agor_systemd.lab.demo",
        *(["--fast"] if fast else []),
        *(["--systemd", systemd_build] if systemd_build else []),
    ]
    sys.stdout.flush()
    os.execv(sys.executable, argv)


# -- agor-sandbox ---------------------------------------------------------------------------------


def port_list(ports: list[int] | str) -> str:
    """`any`, `none` or `80, 443` (an empty list means no port at all)."""
    return ports if isinstance(ports, str) else ", ".join(map(str, ports)) or "none"


@click.group(cls=OneLineUsageGroup, prog="agor-sandbox", context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="units.toml to use (default: $XDG_CONFIG_HOME/agor/units.toml); may also go after the command.",
)
@click.pass_context
def sandbox_main(ctx: click.Context, config_path: Path | None) -> None:
    """Inspect the Landlock sandbox agor-systemd puts around the sidecar."""
    ctx.obj = {"config_path": config_path}


@sandbox_main.command()
@config_path_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def check(ctx: click.Context, command_config_path: Path | None, as_json: bool) -> None:
    """Validate [sandbox] and report what this kernel enforces.

    Exit status: 0 when the sidecar would start (even with a partial or no sandbox, unless
    `required = true`), 1 when it would be refused or the configuration is invalid.
    """
    report = call("agor-sandbox", sandbox_report, chosen_config_path(ctx, command_config_path))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"sandbox: {report['level']} (kernel Landlock ABI {report['landlock_abi']})")
        for item in report["not_enforced"]:
            click.echo(f"  not enforced: {item}")
        click.echo(f"  read-write: {', '.join(report['read_write'])}")
        click.echo(f"  read-only: {', '.join(report['read_only'])}")
        if report["command_readable"]:
            click.echo(f"  read-only for the command: {', '.join(report['command_readable'])}")
        click.echo(f"  TCP connect: {port_list(report['tcp_connect'])}; TCP bind: {port_list(report['tcp_bind'])}")
        for path in report["missing_paths"]:
            click.echo(f"  missing (skipped at start): {path}")
        for warning in report["warnings"]:
            click.echo(f"warning: {warning}", err=True)
        if not report["would_start"]:
            click.echo("refused: [sandbox] required = true, but this kernel has no Landlock", err=True)
    sys.exit(0 if report["would_start"] else 1)


def attach_note(line: bytes) -> str | None:
    """A bridge or supervisor line said in words for a terminal; None for the sidecar's own lines."""
    if b'"type"' not in line or not (b'"bridge"' in line or b'"supervisor"' in line):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if message.get("type") == "bridge" and message.get("event") == "dropped":
        return f"-- {message['lines']} lines dropped ({message['reason']})"
    if message.get("type") == "supervisor" and message.get("state") == "failed":
        return f"-- the sidecar gave up: {message['last_error']}; run `agor-units restart`"
    if message.get("type") == "supervisor" and message.get("state") == "restarting":
        return (
            f"-- the sidecar ended ({message['last_error']}); "
            f"restart {message['restart']} of {message['attempts']} follows: attach again"
        )
    return None


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Raw lines both ways, nothing added (for scripts).")
@click.pass_context
@friendly_errors
def attach(ctx, as_json):
    """Connect the terminal to the sidecar's stdin and stdout (agor-sidecar.socket).

    Lines typed go to the sidecar, its stdout lines are printed; other clients (agor) keep
    theirs. Ends at the sidecar's exit (EOF) or Ctrl-C; the end of stdin only stops sending.
    Exit status: 0, 4 when the sidecar has given up.
    """
    import select  # import cost: <1 ms; only attach waits on two streams

    # import cost: socket, ~5 ms; only attach connects
    from agor_systemd.sidecar.client import connect

    gave_up = ended = False
    partial = b""
    with connect(system=ctx.obj["system"]) as stream:
        if not as_json:
            click.echo(f"-- attached to {SIDECAR_UNIT}; Ctrl-C detaches", err=True)
        sources = [stream.sock, sys.stdin]
        with contextlib.suppress(KeyboardInterrupt):
            while not ended:
                readable, _, _ = select.select(sources, [], [])
                if sys.stdin in readable:
                    line = sys.stdin.buffer.readline()
                    if line:
                        stream.send(line)
                    else:
                        sources.remove(sys.stdin)
                if stream.sock in readable:
                    data = stream.sock.recv(65536)  # raw: a buffered reader would hide lines from select
                    ended = not data
                    *lines, partial = (partial + data).split(b"\n")
                    for line in lines:
                        note = attach_note(line)
                        gave_up = gave_up or (note is not None and note.startswith("-- the sidecar gave up"))
                        if note is not None and not as_json:
                            click.echo(note, err=True)
                        else:
                            sys.stdout.buffer.write(line + b"\n")
                    sys.stdout.flush()
        if ended and not as_json:
            click.echo("-- the sidecar's output ended (it exited)", err=True)
    sys.exit(4 if gave_up else 0)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("level", required=False)
@click.argument("event", required=False)
@click.argument("attributes", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--stream", is_flag=True, help='Read JSON lines {"level", "event", "attrs"} on stdin until its end.')
@friendly_errors
def log(level, event, attributes, stream):
    """The log bridge for agor's frontend: records to the journal (and the trace).

    \b
      agor-units log info agent-started sessionId=s1 provider=claude
      agor-units log --stream < records.jsonl     # one process for many records
    LEVEL is error, warn, info, debug or trace: the journal priority (journalctl --user -t agor).
    With AGOR_OTLP_ENDPOINT set, each record is also an event in the trace. --stream never holds
    the writer up: records it cannot keep up with are dropped and counted; a malformed line gets
    a one-line complaint and the stream goes on.
    """
    if stream:
        if level is not None:
            raise click.UsageError("--stream reads the records on stdin: give no LEVEL or EVENT")
        bridge = log_stream(sys.stdin.buffer)
        if bridge.dropped:
            click.echo(
                f"agor-units: log: {bridge.dropped} of {bridge.handled + bridge.dropped} records dropped", err=True
            )
        return
    if level is None or event is None:
        raise click.UsageError("give LEVEL and EVENT (or --stream)")
    try:
        record = parse_arguments(level, event, attributes)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    log_one(record)


def traced(prog: str, program: Callable[[], object]) -> Callable[[], None]:
    """`program` inside the span of this invocation (named after its command once known)."""

    def main() -> None:
        tracing.start(prog)
        with tracing.span(prog):
            program()

    return main


def run_units() -> None:
    """The agor-units program."""
    run_main("agor-units", traced("agor-units", main))


def run_sandbox() -> None:
    """The agor-sandbox program."""
    run_main("agor-sandbox", traced("agor-sandbox", sandbox_main))


if __name__ == "__main__":
    run_units()
