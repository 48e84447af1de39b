"""Landlock through ctypes: the filesystem, TCP and scope rights of every ABI (1–7).

The PyPI `landlock` package covers filesystem rights up to ABI 5 only (no TCP rules, no
scoping), and adding what it lacks would mean two layers over the same three system calls;
this module is the one layer (see docs/sandbox.md). It is imported by the launcher, so it
loads nothing but ctypes, and only when the sandbox is on.

Kernel interface: Documentation/userspace-api/landlock.rst. The syscall numbers are the
same on every architecture that has Landlock (generic table): 444, 445, 446.
"""

from __future__ import annotations

import ctypes
import os

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38

# filesystem rights: name → (bit, first ABI)
FS_RIGHTS = {
    "execute": (1 << 0, 1),
    "write_file": (1 << 1, 1),
    "read_file": (1 << 2, 1),
    "read_dir": (1 << 3, 1),
    "remove_dir": (1 << 4, 1),
    "remove_file": (1 << 5, 1),
    "make_char": (1 << 6, 1),
    "make_dir": (1 << 7, 1),
    "make_reg": (1 << 8, 1),
    "make_sock": (1 << 9, 1),
    "make_fifo": (1 << 10, 1),
    "make_block": (1 << 11, 1),
    "make_sym": (1 << 12, 1),
    "refer": (1 << 13, 2),
    "truncate": (1 << 14, 3),
    "ioctl_dev": (1 << 15, 5),
}
NET_RIGHTS = {"bind_tcp": (1 << 0, 4), "connect_tcp": (1 << 1, 4)}
SCOPES = {"abstract_unix_socket": (1 << 0, 6), "signal": (1 << 1, 6)}
# rights that make sense on a file (not a directory) in a path-beneath rule
FILE_RIGHTS = ("execute", "write_file", "read_file", "truncate", "ioctl_dev")
READ_ONLY = ("execute", "read_file", "read_dir")
LATEST_KNOWN_ABI = 7


def mask(names, table, abi: int) -> int:
    """OR of the rights in `names` that ABI `abi` knows."""
    return sum(bit for name, (bit, since) in table.items() if name in names and since <= abi)


def unsupported(names, table, abi: int) -> list[str]:
    return [name for name in names if table[name][1] > abi]


class RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is packed: 8 + 4 bytes
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class NetPortAttr(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(number: int, *args) -> int:
    result = _libc.syscall(ctypes.c_long(number), *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def abi_version(cap: int | None = None) -> int:
    """The kernel's Landlock ABI (0: none — not built in, not in the LSM list, or too old).

    `cap` lowers it, to test what older kernels get ($AGOR_LANDLOCK_ABI in the launcher).
    """
    try:
        abi = _syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    except OSError:
        abi = 0
    return abi if cap is None else min(abi, cap)


class Ruleset:
    """A ruleset for one ABI: create, add rules, then restrict_self() in the process to confine."""

    def __init__(self, abi: int, fs: tuple[str, ...], net: tuple[str, ...], scopes: tuple[str, ...]) -> None:
        self.abi = abi
        attr = RulesetAttr(mask(fs, FS_RIGHTS, abi), mask(net, NET_RIGHTS, abi), mask(scopes, SCOPES, abi))
        # older kernels reject a struct larger than they know (E2BIG unless the tail is zero);
        # pass only the fields this ABI has
        size = 24 if abi >= 6 else 16 if abi >= 4 else 8
        self.handled_fs = attr.handled_access_fs
        self.handled_net = attr.handled_access_net
        self.fd = _syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))

    def allow_path(self, path: str, rights: tuple[str, ...]) -> None:
        """Allow `rights` beneath `path` (a file gets only the rights files can have)."""
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        try:
            is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
            names = rights if is_dir else tuple(r for r in rights if r in FILE_RIGHTS)
            access = mask(names, FS_RIGHTS, self.abi) & self.handled_fs
            if access:
                attr = PathBeneathAttr(access, fd)
                _syscall(SYS_ADD_RULE, self.fd, ctypes.c_int(RULE_PATH_BENEATH), ctypes.byref(attr), ctypes.c_uint32(0))
        finally:
            os.close(fd)

    def allow_port(self, port: int, rights: tuple[str, ...]) -> None:
        access = mask(rights, NET_RIGHTS, self.abi) & self.handled_net
        if access:
            attr = NetPortAttr(access, port)
            _syscall(SYS_ADD_RULE, self.fd, ctypes.c_int(RULE_NET_PORT), ctypes.byref(attr), ctypes.c_uint32(0))

    def restrict_self(self) -> None:
        """Confine the calling thread and its future children (needs no_new_privs)."""
        if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        _syscall(SYS_RESTRICT_SELF, ctypes.c_int(self.fd), ctypes.c_uint32(0))

    def close(self) -> None:
        os.close(self.fd)
