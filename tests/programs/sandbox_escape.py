"""Escape corpus: run as the sidecar (a child of the launcher, inside its Landlock domain).

    python3 -I -S sandbox_escape.py SPEC.json

SPEC (written by the test): home, project (read-write), report (read-write; the result goes
there as escape-report.json), victim (a file in the home directory), config_file (a file under
~/.config, read-only), denied_port / allowed_port (TCP on 127.0.0.1), abstract (an abstract
unix socket name listened on outside the domain), outside_pid (a process of the same user
outside the domain). Every attempt in DENIED must fail; every one in ALLOWED must work.
Prints the ready line when done, then waits to be stopped.
"""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

spec = json.load(open(sys.argv[1]))
HOME, PROJECT, REPORT = spec["home"], spec["project"], spec["report"]
VICTIM, CONFIG_FILE = spec["victim"], spec["config_file"]


def write(path, flags=os.O_WRONLY | os.O_CREAT):
    fd = os.open(path, flags, 0o644)
    os.write(fd, b"escaped")
    os.close(fd)


def tcp(port, bind=False):
    with socket.socket() as s:
        if bind:
            s.bind(("127.0.0.1", port))
        else:
            s.connect(("127.0.0.1", port))


def fresh(name):
    """A file in the project directory (read-write) to move or link elsewhere."""
    path = os.path.join(PROJECT, name)
    write(path)
    return path


def reopen_for_write():
    fd = os.open(CONFIG_FILE, os.O_RDONLY)  # reading ~/.config is allowed
    try:
        write(f"/proc/self/fd/{fd}", os.O_WRONLY)
    finally:
        os.close(fd)


def symlink_out():
    link = os.path.join(PROJECT, "link-to-victim")
    if not os.path.islink(link):
        os.symlink(VICTIM, link)  # making a symlink inside the project is allowed ...
    write(link, os.O_WRONLY | os.O_TRUNC)  # ... following it out of the project is not


def ioctl_device():
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        fcntl.ioctl(fd, 0x5413, b"\0" * 8)  # TIOCGWINSZ: ENOTTY without Landlock, EACCES with it
    finally:
        os.close(fd)


def abstract_connect():
    with socket.socket(socket.AF_UNIX) as s:
        s.connect("\0" + spec["abstract"])


def unix_socket_in_home():
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.path.join(HOME, "escape.sock"))


def child_process_write():
    done = subprocess.run(["/bin/sh", "-c", f'echo escaped > "{HOME}/escape-child.txt"'], stderr=subprocess.DEVNULL)
    if done.returncode != 0:
        raise PermissionError(errno.EACCES, "the child shell could not write either")


DENIED = {
    "create a file in the home directory": lambda: write(os.path.join(HOME, "escape.txt")),
    "write into ~/.ssh": lambda: write(os.path.join(HOME, ".ssh", "authorized_keys")),
    "overwrite a file in the home directory": lambda: write(VICTIM, os.O_WRONLY),
    "append to a file in the home directory": lambda: write(VICTIM, os.O_WRONLY | os.O_APPEND),
    "modify a read-only config file": lambda: write(CONFIG_FILE, os.O_WRONLY),
    "truncate a read-only file (truncate)": lambda: os.truncate(CONFIG_FILE, 0),
    "truncate a read-only file (O_TRUNC)": lambda: write(CONFIG_FILE, os.O_WRONLY | os.O_TRUNC),
    "mkdir in the home directory": lambda: os.mkdir(os.path.join(HOME, "escape-dir")),
    "rmdir in the home directory": lambda: os.rmdir(os.path.join(HOME, spec["empty_dir"])),
    "unlink a file in the home directory": lambda: os.unlink(VICTIM),
    "rename within the home directory": lambda: os.rename(VICTIM, VICTIM + ".moved"),
    "rename a file out of the project into ~/.config (refer)": lambda: os.rename(
        fresh("to-move"), os.path.join(HOME, ".config", "moved-in")
    ),
    "hard-link a project file into the home directory (refer)": lambda: os.link(
        fresh("to-link"), os.path.join(HOME, "linked-in")
    ),
    "symlink in the home directory": lambda: os.symlink("/tmp", os.path.join(HOME, "escape-link")),
    "write through a symlink out of the project": symlink_out,
    "write via .. out of the project": lambda: write(os.path.join(PROJECT, "..", "escape-dotdot.txt")),
    "write via /proc/self/root": lambda: write("/proc/self/root" + os.path.join(HOME, "escape-root.txt")),
    "re-open a read-only file for writing via /proc/self/fd": reopen_for_write,
    "mkfifo in the home directory": lambda: os.mkfifo(os.path.join(HOME, "escape-fifo")),
    "bind a unix socket in the home directory": unix_socket_in_home,
    "create a file in the runtime directory": lambda: write(os.path.join(spec["runtime_dir"], "escape.txt")),
    "ioctl on a device": ioctl_device,
    "TCP connect to a denied port": lambda: tcp(spec["denied_port"]),
    "TCP bind": lambda: tcp(0, bind=True),
    "connect to an abstract unix socket outside the domain": abstract_connect,
    "signal a process outside the domain": lambda: os.kill(spec["outside_pid"], signal.SIGCONT),
    "signal the launcher": lambda: os.kill(os.getppid(), 0),
    "a child process writing to the home directory": child_process_write,
}


def signal_own_child():
    child = subprocess.Popen(["/bin/sleep", "30"])
    os.kill(child.pid, signal.SIGTERM)
    child.wait()


def project_round_trip():
    path = fresh("work.txt")
    os.rename(path, path + ".renamed")
    os.unlink(path + ".renamed")


ALLOWED = {
    "create, rename and delete files in the project": project_round_trip,
    "write in /tmp": lambda: write(f"/tmp/agor-escape-{os.getpid()}"),
    "write in ~/.local/share/agor": lambda: write(os.path.join(HOME, ".local/share/agor/escape-ok.db")),
    "read a config file": lambda: open(CONFIG_FILE).read(),
    "run a program": lambda: subprocess.run(["/bin/true"], check=True),
    "write to /dev/null": lambda: open("/dev/null", "w").write("x"),
    "TCP connect to an allowed port": lambda: tcp(spec["allowed_port"]),
    "signal its own child": signal_own_child,
}


def attempt(action):
    try:
        action()
    except OSError as e:
        return False, f"{errno.errorcode.get(e.errno, e.errno)}: {e.strerror}"
    return True, "succeeded"


report = {"denied": {}, "allowed": {}}
for name, action in DENIED.items():
    worked, detail = attempt(action)
    report["denied"][name] = {"blocked": not worked, "detail": detail}
for name, action in ALLOWED.items():
    worked, detail = attempt(action)
    report["allowed"][name] = {"worked": worked, "detail": detail}
with open(os.path.join(REPORT, "escape-report.json.tmp"), "w") as f:
    json.dump(report, f, indent=1)
os.rename(os.path.join(REPORT, "escape-report.json.tmp"), os.path.join(REPORT, "escape-report.json"))
print('{"type":"ready"}', flush=True)
while True:
    time.sleep(3600)
