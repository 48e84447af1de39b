"""A sidecar stand-in for the integration tests (run as: python3 -I -S fake_sidecar.py ...).

    fake_sidecar.py --log FILE [--plan FILE] [BEHAVIOUR]

Every start appends one JSON line to --log: CLOCK_MONOTONIC time, pid, argv (hex, so
non-UTF-8 and newlines survive), cwd, FAKE_* and TRACEPARENT environment variables, then prints agor's
ready line {"type":"ready"} on stdout. Then it does what line N of --plan says (N = this
start's number; the last line repeats), else BEHAVIOUR:

    exit:N        exit with status N at once (within a few ms of starting)
    signal:NAME   die by signal NAME (KILL, TERM, SEGV, ...)
    dump          die by SIGSEGV with a core dump
    run:S         run S seconds, then exit with status 1
    hang          run until signalled (SIGTERM ends it: killed by SIGTERM)
    term-exit:N   run until SIGTERM, then exit with status N
    never-ready   like hang, but without the ready line
    late-ready:S  print the ready line only after S seconds, then hang
    socket:PATH   no ready line; listen on unix socket PATH after 0.3 s, then hang
    stop-self:S   after S seconds stop itself with SIGSTOP (hung: T state)
    spin:S        print a heartbeat every 0.1 s; after S seconds spin in a busy loop, silent
    log           print lines with and without <N> priority prefixes on stdout and stderr, hang
    log-edges     on stderr: a 70000-byte line marked <3>, a 60000-byte plain line, a line
                  starting <8>, a line with a NUL byte inside; then hang
    flood-exit:S  start `yes` (a descendant writing to the inherited stdout without pause),
                  exit with status 3 after S seconds
    agents:F      start two agents: one keeps the inherited stdout, one has its own (/dev/null);
                  on SIGTERM each takes 0.3 s to flush, the first prints a line, then each
                  adds "N TERM" to file F; once both work, print "agents: working" and hang
    agents-crash:F  the same agents; exit with status 3 once both work
    count-term:F  add a line to file F for every SIGTERM; exit 0.5 s after the first
    echo          answer every stdin line L with {"type":"answer","to":L,"pid":PID}; the line
                  `emit N` with N lines {"type":"agent","n":I,...} of 200 bytes (I from 1), the
                  line `pace N R` with the same N lines at R lines/s, the line `crash` with
                  exit status 3; keeps running at stdin's end
    emit:N        print those N lines at once, then echo
    tick:S        print a numbered agent line every S seconds (n from 1), and echo
"""

import json
import os
import signal
import sys
import time


def main(argv):
    log_path, plan_path, behaviour = None, None, "hang"
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        if word == "--log":
            log_path = rest.pop(0)
        elif word == "--plan":
            plan_path = rest.pop(0)
        else:
            behaviour = word
    starts = 0
    if log_path and os.path.exists(log_path):
        with open(log_path, "rb") as f:
            starts = sum(1 for _ in f)
    record = {
        "mono": time.clock_gettime(time.CLOCK_MONOTONIC),
        "pid": os.getpid(),
        "argv": [os.fsencode(a).hex() for a in sys.argv],
        "cwd": os.getcwd(),
        "env": {
            k: v
            for k, v in os.environ.items()
            if k.startswith("FAKE_") or k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "TRACEPARENT")
        },
    }
    if log_path:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
    if plan_path:
        with open(plan_path) as f:
            plan = [line.strip() for line in f if line.strip()]
        if plan:
            behaviour = plan[min(starts, len(plan) - 1)]
    if behaviour.partition(":")[0] not in ("never-ready", "late-ready", "socket"):
        print('{"type":"ready"}', flush=True)
    act(behaviour)


def start_agents(flag_file):
    """Two children that trap SIGTERM and need time to flush; returns once both are working."""
    ready_r, ready_w = os.pipe()
    for number in (1, 2):
        if os.fork() == 0:
            os.close(ready_r)
            if number == 2:  # an agent with its own output, as a runner's spawned CLI has
                devnull = os.open("/dev/null", os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)

            def flush_and_exit(*_, number=number):
                time.sleep(0.3)
                if number == 1:
                    print("agent 1: flushed after SIGTERM", flush=True)  # EPIPE if nobody reads any more
                with open(flag_file, "a") as f:
                    f.write(f"{number} TERM\n")
                os._exit(0)

            signal.signal(signal.SIGTERM, flush_and_exit)
            os.write(ready_w, b"x")
            os.close(ready_w)
            while True:
                time.sleep(3600)
    os.close(ready_w)
    with os.fdopen(ready_r, "rb") as ready:
        assert ready.read(2) == b"xx"
    print("agents: working", flush=True)


def agent_line(n):
    """{"type":"agent","n":N,"pad":"..."} padded to 200 bytes with its newline."""
    head = f'{{"type":"agent","n":{n},"pad":"'
    return head + "x" * (200 - len(head) - 3) + '"}\n'


def echo(kind, arg):
    out = sys.stdout
    if kind == "emit":
        out.write("".join(agent_line(n) for n in range(1, int(arg) + 1)))
        out.flush()
    if kind == "tick":
        import threading

        def tick():
            n = 0
            while True:
                time.sleep(float(arg))
                n += 1
                out.write(agent_line(n))
                out.flush()

        threading.Thread(target=tick, daemon=True).start()
    for line in sys.stdin:
        line = line.rstrip("\n")
        if line == "crash":
            os._exit(3)
        if line.startswith("pace "):  # pace N R: N agent lines at R lines/s, in batches of 20
            count, rate = int(line.split()[1]), float(line.split()[2])
            for first in range(1, count + 1, 20):
                out.write("".join(agent_line(n) for n in range(first, min(first + 20, count + 1))))
                out.flush()
                time.sleep(20 / rate)
        elif line.startswith("emit "):
            out.write("".join(agent_line(n) for n in range(1, int(line.split()[1]) + 1)))
        else:
            out.write(json.dumps({"type": "answer", "to": line, "pid": os.getpid()}) + "\n")
        out.flush()
    while True:
        time.sleep(3600)


def act(behaviour):
    kind, _, arg = behaviour.partition(":")
    if kind == "exit":
        os._exit(int(arg))
    if kind == "signal":
        sig = getattr(signal, "SIG" + arg)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):  # these cannot have handlers
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        time.sleep(5)
        os._exit(99)
    if kind == "dump":
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        signal.signal(signal.SIGSEGV, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(5)
        os._exit(99)
    if kind == "run":
        time.sleep(float(arg))
        os._exit(1)
    if kind == "term-exit":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(int(arg)))
    if kind == "late-ready":
        time.sleep(float(arg))
        print('{"type":"ready"}', flush=True)
    if kind == "socket":
        import socket

        time.sleep(0.3)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(arg)
        server.listen(8)
    if kind == "stop-self":
        time.sleep(float(arg))
        os.kill(os.getpid(), signal.SIGSTOP)
    if kind == "spin":
        deadline = time.monotonic() + float(arg)
        while time.monotonic() < deadline:
            print("heartbeat", flush=True)
            time.sleep(0.1)
        while True:
            pass
    if kind == "log-edges":
        sys.stderr.buffer.write(
            b"<3>" + b"x" * 70000 + b"\n" + b"y" * 60000 + b"\n" + b"<8>eight\n" + b"before NUL\0after NUL\n"
        )
        sys.stderr.flush()
    if kind == "flood-exit":
        os.posix_spawn("/usr/bin/yes", ["yes", "agent output"], dict(os.environ))
        time.sleep(float(arg))
        os._exit(3)
    if kind in ("agents", "agents-crash"):
        start_agents(arg)
    if kind == "count-term":
        received = []

        def count(*_):
            with open(arg, "a") as f:
                f.write("TERM\n")
            received.append(time.monotonic())

        signal.signal(signal.SIGTERM, count)
        while not received or time.monotonic() - received[0] < 0.5:
            time.sleep(0.05)
        os._exit(0)
    if kind == "agents-crash":
        os._exit(3)
    if kind in ("echo", "emit", "tick"):
        echo(kind, arg)
    if kind == "log":
        print("plain stdout line", flush=True)
        print("<3>stdout line marked as an error", flush=True)
        sys.stderr.write("plain stderr line\n<7>stderr line marked as debug\n")
        sys.stderr.flush()
    if kind in ("hang", "term-exit", "never-ready", "late-ready", "socket", "stop-self", "log", "log-edges", "agents"):
        while True:
            time.sleep(3600)
    sys.stderr.write(f"fake_sidecar: unknown behaviour {behaviour!r}\n")
    os._exit(64)


if __name__ == "__main__":
    main(sys.argv[1:])
