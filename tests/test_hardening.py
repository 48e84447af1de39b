"""systemd's own hardening for agor-sidecar.service: directives per version and group, encoding,
the probe's decisions (with a fake manager), the launcher's run-time check, and the exposure score."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import replace

import pytest

from agor_systemd.config import Config, SandboxConfig
from agor_systemd.lab.testbed import available_builds
from agor_systemd.sandbox import effects, hardening
from agor_systemd.sandbox.effects import EFFECT_BITS, PROBE_BASE
from agor_systemd.sandbox.hardening import (
    bus_properties,
    expected_effects,
    hardening_directives,
    probe,
    wanted_groups,
)
from agor_systemd.sidecar.protocol import SIDECAR_UNIT, parse_launcher_arguments
from agor_systemd.unitfile import HomePath, UnitValueError
from agor_systemd.units import render_units

EXPOSURE_TARGET = 3.0


def keys(directives) -> dict[str, str]:
    assert all(section == "Service" for section, _, _ in directives)
    found = {}
    for _, key, value in directives:
        assert key not in found, f"{key}= twice"
        found[key] = value
    return found


def with_rw(*paths) -> Config:
    return Config(sandbox=replace(SandboxConfig(), read_write_paths=tuple(paths)))


# --- directives ---------------------------------------------------------------------------------


def test_252_lists_the_landlock_syscalls_and_254_uses_the_sandbox_group():
    old = keys(hardening_directives(Config(), 252))
    assert old["SystemCallFilter"] == (
        "@system-service landlock_create_ruleset landlock_add_rule landlock_restrict_self"
    )
    new = keys(hardening_directives(Config(), 254))
    assert new["SystemCallFilter"] == "@system-service @sandbox"
    for directives in (old, new):
        assert directives["SystemCallErrorNumber"] == "EPERM"  # a denied call fails, it does not kill
        assert directives["PrivateUsers"] == "yes"  # needed on 252/253, explicit on 254+
        assert directives["NoNewPrivileges"] == "yes"
        assert directives["UMask"] == "0077"
        assert directives["ProtectSystem"] == "strict" and directives["ProtectHome"] == "read-only"


def test_left_out_on_purpose():
    directives = keys(hardening_directives(Config(), 260))
    for key in (
        "MemoryDenyWriteExecute",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateNetwork",
        "IPAddressDeny",
        "ProtectProc",
        "ProcSubset",
        "DynamicUser",
        "User",
    ):
        assert key not in directives
    assert directives["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"


@pytest.mark.parametrize(
    ("available", "present", "absent"),
    [
        (None, ["UMask", "NoNewPrivileges", "PrivateUsers", "ProtectSystem"], []),
        ({"always"}, ["UMask"], ["NoNewPrivileges", "PrivateUsers", "ProtectSystem"]),
        (
            {"always", "seccomp"},
            ["UMask", "SystemCallFilter"],
            ["PrivateUsers", "CapabilityBoundingSet", "ReadWritePaths"],
        ),
        ({"seccomp", "userns"}, ["PrivateUsers", "CapabilityBoundingSet"], ["UMask", "ProtectHome"]),
        ({"always", "seccomp", "mounts"}, ["UMask"], ["ProtectSystem", "PrivateUsers"]),  # mounts needs userns
        (set(), [], ["UMask", "NoNewPrivileges"]),
    ],
)
def test_groups(available, present, absent):
    directives = keys(hardening_directives(Config(), 254, available))
    assert all(k in directives for k in present)
    assert not any(k in directives for k in absent)


def test_version_gates():
    assert "mounts" not in wanted_groups(250)  # user managers: no mount namespaces before 251
    assert "mounts" in wanted_groups(250, system=True)
    assert hardening.version_gaps(250) and not hardening.version_gaps(251)
    old = keys(hardening_directives(Config(), 251))
    assert "ProtectClock" in old and "ProtectKernelLogs" in old
    older = keys(hardening_directives(Config(), 243, system=True))
    assert "ProtectClock" not in older and "ProtectKernelLogs" not in older


def test_read_write_paths_mirror_the_landlock_table():
    directives = keys(hardening_directives(with_rw("/srv/project", HomePath("work")), 254))
    # devices need no entry (ProtectSystem=strict keeps /dev writable); every entry may be missing
    assert directives["ReadWritePaths"] == '"-/tmp" "-/var/tmp" "-%h/.local/share/agor" "-/srv/project" "-%h/work"'


def test_read_write_paths_with_odd_characters_are_quoted_words():
    value = keys(hardening_directives(with_rw("/srv/a b", "/srv/100%", '/srv/q"uote', "/srv/back\\slash"), 254))[
        "ReadWritePaths"
    ]
    assert value.endswith(' "-/srv/a b" "-/srv/100%%" "-/srv/q\\"uote" "-/srv/back\\\\slash"')


def test_unencodable_paths_are_refused():
    with pytest.raises(UnitValueError, match="control character"):
        hardening_directives(with_rw("/srv/new\nline"), 254)


def test_bus_properties_are_the_same_directives_with_home_expanded():
    props = {k: (sig, v) for k, sig, v in bus_properties(with_rw(HomePath("p q")), 252, hardening.GROUPS, "/home/u")}
    assert props["ReadWritePaths"] == ("as", ["-/tmp", "-/var/tmp", "-/home/u/.local/share/agor", "-/home/u/p q"])
    assert props["SystemCallFilter"] == ("(bas)", (True, ["@system-service", *hardening.LANDLOCK_SYSCALLS]))
    assert props["UMask"] == ("u", 0o077)
    assert props["CapabilityBoundingSet"] == ("t", 0)
    assert props["RestrictNamespaces"] == ("t", 0)
    assert set(props) == {k for _, k, _ in hardening_directives(with_rw(HomePath("p q")), 252)}


def test_the_launcher_is_told_what_to_expect():
    units = render_units(Config(), 254, hardening={"always", "seccomp"})
    text = units[SIDECAR_UNIT]
    assert '"--expect-hardening" "umask,seccomp"' in text
    assert "PrivateUsers" not in text
    words = re.findall(r'"((?:[^"\\]|\\.)*)"', text.split("ExecStart=", 1)[1].splitlines()[0])
    options = parse_launcher_arguments(words[words.index("--unit") :])
    assert options.expect_hardening == ("umask", "seccomp")
    none = render_units(Config(), 254, hardening=set())[SIDECAR_UNIT]
    assert "--expect-hardening" not in none and "UMask" not in none
    assert expected_effects(hardening.GROUPS) == ("umask", "seccomp", "userns", "ro-system", "ro-home")


# --- the probe's decisions (fake manager) -------------------------------------------------------


class FakeManager:
    """Answers run_probes like a manager where `broken` groups fail or are skipped."""

    def __init__(self, behaviour):
        self.behaviour = behaviour  # group -> "ok" | "namespace" | "skipped" | "refused"
        self.rounds: list[list[set[str]]] = []

    def run_probes(self, property_sets, argv, success_statuses, timeout_s):
        assert argv[1:4] == ["-I", "-S", "-c"]
        owner = {
            key: group for group in hardening.GROUPS for key, _, _ in bus_properties(Config(), 254, (group,), "/h")
        }
        results, this_round = [], []
        for props in property_sets:
            groups = {owner[key] for key, _, _ in props}
            this_round.append(groups)
            kinds = {self.behaviour.get(g, "ok") for g in groups}
            if "refused" in kinds:
                results.append({"error": "Cannot set property ProtectClock, or unknown property."})
            elif "namespace" in kinds:
                results.append({"code": 1, "status": 226, "result": "exit-code"})
            else:
                bits = sum(
                    EFFECT_BITS[e] for g in groups if self.behaviour.get(g, "ok") == "ok" for e in effects.EFFECTS[g]
                )
                results.append({"code": 1, "status": PROBE_BASE | bits, "result": "success"})
        self.rounds.append(this_round)
        return results


def test_probe_all_good_is_one_unit():
    manager = FakeManager({})
    result = probe(manager, Config(), 254)
    assert result.applied == hardening.GROUPS and result.left_out == {}
    assert len(manager.rounds) == 1 and len(manager.rounds[0]) == 1


def test_probe_drops_a_group_that_fails_with_namespace():
    manager = FakeManager({"mounts": "namespace"})
    result = probe(manager, Config(), 254)
    assert result.applied == ("always", "seccomp", "userns")
    assert "226/NAMESPACE" in result.left_out["mounts"]
    assert len(manager.rounds) == 3  # all, each group, the survivors together


def test_probe_sees_silently_skipped_directives():
    # 252 without a usable user namespace: the unit starts, nothing namespaced happened
    manager = FakeManager({"userns": "skipped", "mounts": "skipped"})
    result = probe(manager, Config(), 252)
    assert result.applied == ("always", "seccomp")
    assert "not in effect" in result.left_out["userns"] and "userns" in result.left_out["userns"]
    assert result.left_out["mounts"] == "needs userns, left out"


def test_probe_reports_a_refused_property():
    result = probe(FakeManager({"mounts": "refused"}), Config(), 254)
    assert "mounts" not in result.applied
    assert result.left_out["mounts"].startswith("refused by the manager: Cannot set property")


def test_probe_user_manager_before_251_never_tries_mounts():
    manager = FakeManager({})
    result = probe(manager, Config(), 250)
    assert result.applied == ("always", "seccomp", "userns")
    assert "251" in result.left_out["mounts"]


# --- what is in effect --------------------------------------------------------------------------


def test_observed_effects_of_this_process(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    old = os.umask(0o077)
    try:
        observed = effects.observed_effects()
    finally:
        os.umask(old)
    assert "umask" in observed
    assert "ro-home" not in observed  # tmp_path is writable
    if old != 0o077:
        assert effects.missing_effects(["umask", "ro-home"]) == ["umask", "ro-home"]


def test_launcher_warns_about_hardening_not_in_effect(monkeypatch, capfd):
    from agor_systemd.sidecar import launcher

    monkeypatch.setattr(effects, "observed_effects", lambda: {"umask", "seccomp"})
    launcher.check_hardening(("umask", "seccomp"))
    assert capfd.readouterr().err == ""
    launcher.check_hardening(("umask", "seccomp", "userns", "ro-home"))
    err = capfd.readouterr().err
    assert err == (
        "<4>agor-launch: hardening asked for but not in effect: userns (PrivateUsers=yes), "
        "ro-home (ProtectHome=read-only)\n"
    )


def test_probe_program_exit_status(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    cp = subprocess.run(hardening._probe_command(), env=env, check=False, timeout=30)
    assert cp.returncode & ~0x1F == PROBE_BASE
    assert not cp.returncode & EFFECT_BITS["ro-home"]


# --- exposure score -----------------------------------------------------------------------------


def exposure(build, path) -> float:
    cp = subprocess.run(
        [str(build.systemd_analyze), "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **build.tool_env()},
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", cp.stdout + cp.stderr)
    assert match, cp.stdout[-500:] + cp.stderr[-500:]
    return float(match.group(1))


BUILDS = available_builds()


@pytest.mark.parametrize("build", BUILDS or [None], ids=lambda b: b.name if b else "no-systemd")
def test_exposure_with_every_group_is_at_most_3(build, tmp_path):
    if build is None:
        pytest.skip("systemd-analyze is not installed")
    path = tmp_path / SIDECAR_UNIT
    path.write_text(render_units(Config(), build.version)[SIDECAR_UNIT])
    full = exposure(build, path)
    scores = {"all groups": full}
    for groups in (("always", "seccomp", "userns"), ("always", "seccomp"), ()):
        path.write_text(render_units(Config(), build.version, hardening=set(groups))[SIDECAR_UNIT])
        scores[", ".join(groups) or "none"] = exposure(build, path)
    print(f"\nsystemd-analyze {build.version} security --offline=yes agor-sidecar.service: {scores}")
    assert full <= EXPOSURE_TARGET, scores
    assert scores["none"] > scores["always, seccomp"] > full
