#!/usr/bin/env python3
"""Bridge benchmark: the sidecar's stdio through agor-sidecar.socket against a plain pipe.

Run outside systemd (no root needed)::

    /opt/agor-systemd/venv/bin/python bench/bridge.py [--lines 200000] [--latency-lines 5000] [--json]

The bench plays systemd: it binds a unix socket, and starts the real launcher
(``python -I -S agor_systemd/_launch.py ... -- SIDECAR``) with the socket as fd 3 and
LISTEN_FDS=1, LISTEN_PID, LISTEN_FDNAMES=sidecar, as socket activation does; the launcher's
journal output goes to /dev/null. SIDECAR is this file with ``--sidecar``: it reads commands
on stdin and writes 200-byte lines to stdout. The same sidecar on a plain pipe (what agor has
today: the app spawns the runner) is measured in the same run, interleaved.

1. Throughput: ``burst N`` — N lines of 200 bytes as fast as the sidecar writes them; lines/s
   from the command to the last line. Target: bridge >= 100,000 lines/s.
2. Latency: ``pace N 1000`` — N lines at 1,000 lines/s, each carrying its CLOCK_MONOTONIC write
   time; latency = read time - write time, p50/p99 per path; the bridge's added latency is its
   p50/p99 minus the pipe's. Target: added p99 <= 1 ms.
3. Launcher start-up with the socket and no client: ``--attempts 1 --reset-via notify -- /bin/true``
   (ends as a crash, not a give-up) with and without a passed socket (median of --startups runs, interleaved), and
   ``python3 -I -S -c pass`` for the ratio of docs/benchmarks.md's launcher cost.

Output: a table on stdout; with ``--json`` the table goes to stderr and a JSON document to stdout.
Exit status: 0 targets met, 1 a target missed, 2 the benchmark could not run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / "agor_systemd" / "_launch.py"
LINE_BYTES = 200
TARGET_LINES_PER_S = 100_000
TARGET_ADDED_P99_MS = 1.0


# -- the sidecar ---------------------------------------------------------------------------------


def line_with(stamp: float, n: int) -> bytes:
    head = b'{"type":"agent","t":%.9f,"n":%d,"pad":"' % (stamp, n)
    return head + b"x" * (LINE_BYTES - len(head) - 3) + b'"}\n'


def sidecar() -> None:
    out = sys.stdout.buffer
    out.write(b'{"type":"ready"}\n')
    out.flush()
    for command in sys.stdin.buffer:
        word, count, *rest = command.split()
        if word == b"burst":
            block = line_with(0.0, 0) * 1000
            for _ in range(int(count) // 1000):
                out.write(block)
            out.write(b'{"type":"done"}\n')
            out.flush()
        elif word == b"pace":
            period = 1 / float(rest[0])
            start = time.monotonic()
            for n in range(int(count)):
                time.sleep(max(0.0, start + n * period - time.monotonic()))
                out.write(line_with(time.monotonic(), n))
                out.flush()
            out.write(b'{"type":"done"}\n')
            out.flush()


# -- the two paths -------------------------------------------------------------------------------


class PipePath:
    """The sidecar as agor starts it today: its stdin and stdout are the app's pipes."""

    name = "pipe"

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__, "--sidecar"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        self.out = self.proc.stdout
        assert self.out.readline() == b'{"type":"ready"}\n'

    def send(self, line: bytes) -> None:
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def readline(self) -> bytes:
        return self.out.readline()

    def read_chunk(self) -> bytes:
        return self.out.read1(1 << 20)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


class BridgePath:
    """The sidecar behind the launcher and its bridge, reached through the unix socket."""

    name = "bridge"

    def __init__(self, directory: Path) -> None:
        path = str(directory / "sidecar.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(128)
        self.proc = launcher(listener.fileno(), [sys.executable, "-I", "-S", __file__, "--sidecar"], attempts=5)
        listener.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.out = self.sock.makefile("rb")
        assert self.out.readline() == b'{"type":"ready"}\n'

    def send(self, line: bytes) -> None:
        self.sock.sendall(line)

    def readline(self) -> bytes:
        return self.out.readline()

    def read_chunk(self) -> bytes:
        return self.out.read1(1 << 20)

    def close(self) -> None:
        self.sock.close()
        # not SIGTERM: after a stop the launcher waits until it is alone in its cgroup, which
        # outside systemd is the bench's; the sidecar ends at its stdin's end
        self.proc.kill()
        self.proc.wait()


def launcher(listen: int | None, command: list[str], attempts: int = 0) -> subprocess.Popen:
    """The real launcher, given `listen` as systemd gives it (fd 3, LISTEN_PID = its own pid:
    `exec` keeps the shell's pid)."""
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    args = [sys.executable, "-I", "-S", str(LAUNCH), "--unit", "bench.service", "--attempts", str(attempts)]
    args += ["--stability-window", "300", "--ready", "immediate", "--reset-via", "notify", "--", *command]
    if listen is None:
        return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES="sidecar", BENCH_LISTEN_FD=str(listen))
    script = 'export LISTEN_PID=$$; exec 3<&"$BENCH_LISTEN_FD" "$@"'
    return subprocess.Popen(
        ["/bin/sh", "-c", script, "sh", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(listen,),
    )


# -- the measurements ----------------------------------------------------------------------------


def throughput(path, lines: int) -> float:
    started = time.perf_counter()
    path.send(b"burst %d\n" % lines)
    seen = 0
    tail = b""
    while True:
        chunk = path.read_chunk()
        if not chunk:
            raise RuntimeError(f"{path.name}: EOF during the burst")
        seen += chunk.count(b"\n")
        tail = (tail + chunk)[-32:]
        if tail.endswith(b'{"type":"done"}\n'):
            break
    elapsed = time.perf_counter() - started
    if seen != lines + 1:
        raise RuntimeError(f"{path.name}: {seen - 1} lines of {lines} arrived")
    return lines / elapsed


def latencies(path, lines: int) -> list[float]:
    path.send(b"pace %d 1000\n" % lines)
    found = []
    while True:
        line = path.readline()
        now = time.monotonic()
        if not line or line.startswith(b'{"type":"done"'):
            break
        found.append((now - json.loads(line)["t"]) * 1000)
    if len(found) != lines:
        raise RuntimeError(f"{path.name}: {len(found)} of {lines} paced lines arrived")
    return found


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def startup(listen: int | None) -> float:
    started = time.perf_counter()
    proc = launcher(listen, ["/bin/true"], attempts=1)  # a crash, not a give-up: no give-up path
    proc.wait()
    return (time.perf_counter() - started) * 1000


def python_startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)
    return (time.perf_counter() - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecar", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lines", type=int, default=200_000, help="lines per throughput run")
    parser.add_argument("--reps", type=int, default=3, help="throughput runs per path")
    parser.add_argument("--latency-lines", type=int, default=5000, help="paced lines per path (1,000/s)")
    parser.add_argument("--startups", type=int, default=20, help="launcher starts per variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.sidecar:
        sidecar()
        return 0
    table = sys.stderr if args.json else sys.stdout
    with tempfile.TemporaryDirectory(prefix="agor-bench-bridge-") as directory:
        paths = [PipePath(), BridgePath(Path(directory))]
        try:
            rates: dict[str, list[float]] = {p.name: [] for p in paths}
            for _ in range(args.reps):
                for path in paths:
                    rates[path.name].append(throughput(path, args.lines))
            lat = {path.name: latencies(path, args.latency_lines) for path in paths}
        finally:
            for path in paths:
                path.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(Path(directory) / "idle.sock"))
        listener.listen(8)
        starts: dict[str, list[float]] = {"python -c pass": [], "launcher": [], "launcher + socket": []}
        for _ in range(args.startups):
            starts["python -c pass"].append(python_startup())
            starts["launcher"].append(startup(None))
            starts["launcher + socket"].append(startup(listener.fileno()))
        listener.close()

    result = {
        "lines_per_s": {name: round(statistics.median(r)) for name, r in rates.items()},
        "latency_ms": {
            name: {"p50": round(percentile(v, 0.5), 3), "p99": round(percentile(v, 0.99), 3)} for name, v in lat.items()
        },
        "startup_ms": {name: round(statistics.median(v), 1) for name, v in starts.items()},
    }
    added = {q: round(result["latency_ms"]["bridge"][q] - result["latency_ms"]["pipe"][q], 3) for q in ("p50", "p99")}
    result["added_latency_ms"] = added
    python_ms = result["startup_ms"]["python -c pass"]
    result["socket_startup_cost_ms"] = round(
        result["startup_ms"]["launcher + socket"] - result["startup_ms"]["launcher"], 1
    )
    met = result["lines_per_s"]["bridge"] >= TARGET_LINES_PER_S and added["p99"] <= TARGET_ADDED_P99_MS
    result["targets_met"] = met

    print(f"{'':24}{'pipe':>14}{'bridge':>14}", file=table)
    print(
        f"{'lines/s (200 B)':24}{result['lines_per_s']['pipe']:>14,}{result['lines_per_s']['bridge']:>14,}", file=table
    )
    for q in ("p50", "p99"):
        pipe_ms, bridge_ms = result["latency_ms"]["pipe"][q], result["latency_ms"]["bridge"][q]
        print(f"{'latency ' + q + ' (ms)':24}{pipe_ms:>14.3f}{bridge_ms:>14.3f}   added {added[q]:.3f}", file=table)
    for name, ms in result["startup_ms"].items():
        print(f"start-up {name:<28}{ms:>8.1f} ms", file=table)
    print(
        f"socket's start-up cost: {result['socket_startup_cost_ms']} ms ({python_ms} ms = python -c pass)", file=table
    )
    print(
        f"targets (>= {TARGET_LINES_PER_S:,} lines/s, added p99 <= {TARGET_ADDED_P99_MS} ms): "
        f"{'met' if met else 'MISSED'}",
        file=table,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except (OSError, RuntimeError, AssertionError) as e:
        print(f"bench/bridge.py: {e}", file=sys.stderr)
        sys.exit(2)
