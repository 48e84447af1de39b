"""After a package upgrade: the manifest names the version that wrote the units, doctor compares it
with the installed generator, and `install` records the new version even when the text is the same
(fast; the real upgrade is in test_deb.py)."""

from __future__ import annotations

import json

from agor_systemd import __version__
from agor_systemd.doctor import generator_check, version_key
from agor_systemd.install import MANIFEST, InstallReport, manifest_version, write_units


def test_version_key_orders_releases_and_ignores_suffixes():
    assert version_key("0.1.0") < version_key("0.1.0.1") < version_key("0.2") < version_key("1.0")
    assert version_key("0.1.0+deb1") == version_key("0.1.0rc2") == (0, 1, 0)


def test_doctor_names_units_older_or_newer_than_the_generator():
    assert generator_check("0.1.0", "0.1.0").status == "ok"
    older = generator_check("0.1.0", "0.2.0")
    assert older.status == "warn" and "older than the installed 0.2.0" in older.detail
    assert "keeps the old code until it restarts" in older.detail
    assert older.fix == "agor-units install --now"
    assert "newer than this 0.1.0" in generator_check("0.2.0", "0.1.0").detail
    unknown = generator_check(None, "0.2.0")
    assert unknown.status == "warn" and "names no version" in unknown.detail and unknown.fix


def test_install_records_its_version_also_when_the_text_is_unchanged(tmp_path):
    units = {"agor-x.service": "[Service]\nExecStart=/bin/true\n"}
    write_units(tmp_path, units, InstallReport(tmp_path, 252), {})
    assert manifest_version(tmp_path) == __version__
    # the same units written by an older agor-systemd
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "version": "0.0.1"}))
    report = InstallReport(tmp_path, 252)
    write_units(tmp_path, units, report, dict(manifest["units"]))
    assert report.unchanged == ["agor-x.service"] and report.written == []
    assert manifest_version(tmp_path) == __version__


def test_a_manifest_without_a_version_reads_as_unknown(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps({"units": {}}))
    assert manifest_version(tmp_path) is None
    assert manifest_version(tmp_path / "missing") is None
