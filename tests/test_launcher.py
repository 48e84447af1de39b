"""The launcher's parts that need no systemd: journal records, draining, how it exits, the forwarder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agor_systemd.sidecar.launcher import (
    LINE_MAX,
    OutputStream,
    cgroup_procs_file,
    journal_records,
    split_priority,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"<3>disk full", (b"<3>", b"disk full")),
        (b"<0>", (b"<0>", b"")),
        (b"<7>debug", (b"<7>", b"debug")),
        (b"<8>not a priority", (b"<4>", b"<8>not a priority")),  # journald accepts <0>..<7> only
        (b"<9>", (b"<4>", b"<9>")),
        (b"<03>two digits", (b"<4>", b"<03>two digits")),
        (b"<3", (b"<4>", b"<3")),
        (b"plain", (b"<4>", b"plain")),
        (b"", (b"<4>", b"")),
    ],
)
def test_split_priority(line, expected):
    assert split_priority(line, b"<4>") == expected


def test_records_fit_line_max_with_their_prefix():
    text = b"x" * (3 * LINE_MAX)
    records = journal_records(b"<3>", text)
    assert all(r.startswith(b"<3>") and len(r) <= LINE_MAX - 1 for r in records)
    assert b"".join(r[3:] for r in records) == text
    assert len(records) == 4
    assert journal_records(b"<6>", b"") == [b"<6>"]
    assert journal_records(b"<6>", b"a" * (LINE_MAX - 4)) == [b"<6>" + b"a" * (LINE_MAX - 4)]


def forwarded(chunks: list[bytes], capfd, priority: int = 4) -> list[bytes]:
    """What an OutputStream writes to the journal (fd 1) for these reads, as records."""
    lines: list[bytes] = []
    stream = OutputStream(-1, priority, lambda _stream, line: lines.append(line), is_stdout=False)
    for chunk in chunks:
        stream.feed(chunk)
    stream.flush()
    out = capfd.readouterr().out.encode("utf-8", "surrogateescape")
    return out.split(b"\n")[:-1]


def test_every_record_of_a_long_line_keeps_its_priority(capfd):
    # a line longer than LineMax, arriving in pieces, with and without its own priority
    own = b"<3>" + b"x" * 70000 + b"\n"
    plain = b"y" * 60000 + b"\n"
    data = own + plain
    records = forwarded([data[i : i + 4096] for i in range(0, len(data), 4096)], capfd)
    assert all(len(r) <= LINE_MAX - 1 for r in records)
    xs = [r for r in records if r[3:4] == b"x"]
    ys = [r for r in records if r[3:4] == b"y"]
    assert {r[:3] for r in xs} == {b"<3>"} and b"".join(r[3:] for r in xs) == b"x" * 70000
    assert {r[:3] for r in ys} == {b"<4>"} and b"".join(r[3:] for r in ys) == b"y" * 60000
    assert len(xs) + len(ys) == len(records) == 4


def test_nul_bytes_and_bad_prefixes(capfd):
    assert forwarded([b"before\0after\n<8>eight\n<5>fine\nno newline"], capfd) == [
        b"<4>before",
        b"<4>after",
        b"<4><8>eight",
        b"<5>fine",
        b"<4>no newline",
    ]


def test_drain_takes_what_is_there_and_does_not_wait_for_writers(capfd):
    """A descendant still holds the pipe and keeps writing: drain returns with what was there."""
    read_fd, write_fd = os.pipe()
    os.write(write_fd, b"last words\npartial")
    stream = OutputStream(read_fd, 4, lambda *_: None, is_stdout=False)
    done = threading.Event()
    worker = threading.Thread(target=lambda: (stream.drain_available(), done.set()), daemon=True)
    worker.start()
    assert done.wait(5), "drain waited for the writer"
    assert capfd.readouterr().out == "<4>last words\n<4>partial\n"
    assert stream.open  # not at end of file: the writer is still there
    os.close(write_fd)
    assert not stream.read() and not stream.open
    os.close(read_fd)


EXITS = [
    ((1, 7), 7),
    ((1, 0), 0),
    ((1, 250), 1),  # the sidecar's own 250 must not look like the launcher giving up
    ((2, signal.SIGKILL), -signal.SIGKILL),  # the OOM killer, kill -9: no handler can be installed
    ((2, signal.SIGTERM), -signal.SIGTERM),
    ((3, signal.SIGSEGV), -signal.SIGSEGV),  # "core dumped" cannot be re-created, the signal can
]


@pytest.mark.parametrize(("death", "returncode"), EXITS, ids=[f"{c}-{s}" for (c, s), _ in EXITS])
def test_exit_like_reproduces_the_sidecars_death(death, returncode):
    code, status = death
    done = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {str(REPO)!r}); "
            f"from agor_systemd.sidecar.launcher import exit_like; exit_like({code}, {status})",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == returncode, done.stderr
    assert done.stderr == ""


@pytest.mark.parametrize(
    ("proc_self_cgroup", "expected"),
    [
        (
            "0::/user.slice/user-1000.slice/user@1000.service/app.slice/agor-sidecar.service\n",
            "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/agor-sidecar.service/cgroup.procs",
        ),
        # hybrid: systemd tracks units in the legacy name=systemd hierarchy
        (
            "12:pids:/user.slice\n1:name=systemd:/user.slice/u.service/agor-sidecar.service\n0::/user.slice/u.service/x\n",
            "/sys/fs/cgroup/systemd/user.slice/u.service/agor-sidecar.service/cgroup.procs",
        ),
        ("12:pids:/\n", None),
    ],
)
def test_cgroup_procs_file(proc_self_cgroup, expected):
    assert cgroup_procs_file(proc_self_cgroup) == expected


def test_the_output_forwarder_outlives_sigterm_and_ends_when_the_writers_are_gone():
    """What takes the pipes over after a crash: it forwards with priorities until end of file."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    journal_r, journal_w = os.pipe()
    pid = os.posix_spawn(
        sys.executable,
        [sys.executable, "-I", "-S", str(REPO / "agor_systemd" / "_launch.py"), "--forward-output"],
        dict(os.environ),
        file_actions=[
            (os.POSIX_SPAWN_DUP2, journal_w, 1),
            (os.POSIX_SPAWN_DUP2, out_r, 3),
            (os.POSIX_SPAWN_DUP2, err_r, 4),
        ],
    )
    for fd in (out_r, err_r, journal_w):
        os.close(fd)
    os.write(out_w, b"agent: flushing\n")
    time.sleep(0.5)  # let it set up its signal dispositions
    os.kill(pid, signal.SIGTERM)  # systemd's, to everyone in the unit after a crash
    os.write(err_w, b"<3>agent: could not flush\nlast words")
    os.close(err_w)
    time.sleep(0.2)
    assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # a writer is left: it keeps forwarding
    os.close(out_w)
    with os.fdopen(journal_r, "rb") as journal:
        out = journal.read()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert out.splitlines() == [b"<6>agent: flushing", b"<3>agent: could not flush", b"<4>last words"]
