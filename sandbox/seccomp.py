"""The kernel's syscall filter, built with libseccomp (``libseccomp.so.2``) through ctypes.

libseccomp is the library behind Docker's, systemd's and Chromium's filters; it ships with every
mainstream Linux distribution (Debian's ``apt`` depends on it), so no Python binding is needed.
The filter allows everything except:

* sockets other than ``AF_UNIX`` (the kernel talks to the host over Unix sockets): no TCP/UDP,
  netlink or raw packets, even where a network namespace is missing;
* ``execve``/``execveat``: no new programs;
* ``fork``/``vfork`` and ``clone`` without ``CLONE_THREAD``: no new processes, threads allowed;
  ``clone3`` answers ``ENOSYS`` so the C library falls back to ``clone``, whose flags can be checked;
* namespace, mount, tracing, kernel-module, keyring, BPF, io_uring and similar calls;
* ``memfd_create`` and System V / POSIX shared memory and message queues: RAM that
  ``RLIMIT_AS`` would not count;
* ``prctl(PR_SET_PDEATHSIG)``: the kernel cannot detach from its parent's life.

Calls from other architectures (x32, i386) kill the process. Threads that exist when the filter is
installed get it too (``TSYNC``), and it can never be removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import socket

_ALLOW = 0x7FFF0000
_KILL_PROCESS = 0x80000000
_FLTATR_ACT_BADARCH = 2
_FLTATR_CTL_NNP = 3
_FLTATR_CTL_TSYNC = 4
_CMP_NE = 1
_CMP_EQ = 4
_CMP_MASKED_EQ = 7
_CLONE_THREAD = 0x00010000
_PR_SET_PDEATHSIG = 1

#: Calls denied outright (EPERM); names unknown on this architecture are skipped.
DENIED = (
    "execve", "execveat", "fork", "vfork",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr",
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog", "vhangup",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "lookup_dcookie",
    "iopl", "ioperm", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname",
    # memory that RLIMIT_AS does not count: anonymous files and System V / POSIX shared memory
    "memfd_create", "memfd_secret", "shmget", "msgget", "mq_open",
)
#: clone() flags that create namespaces; refused even with CLONE_THREAD.
_CLONE_NAMESPACES = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)


def _errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _library():
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        try:
            lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
        except OSError:
            return None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    return lib


def available() -> bool:
    """Whether libseccomp can be loaded on this machine."""
    return _library() is not None


def install() -> None:
    """Installs the filter on every thread of the calling process, for good.

    Raises:
        OSError: libseccomp is missing or the kernel refused the filter.
    """
    lib = _library()
    if lib is None:
        raise OSError("libseccomp.so.2 not found")
    ctx = lib.seccomp_init(_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        _check(lib.seccomp_attr_set(ctx, _FLTATR_ACT_BADARCH, _KILL_PROCESS), "attr badarch")
        _check(lib.seccomp_attr_set(ctx, _FLTATR_CTL_NNP, 1), "attr no_new_privs")
        _check(lib.seccomp_attr_set(ctx, _FLTATR_CTL_TSYNC, 1), "attr tsync")

        def rule(action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                return  # not a call on this architecture
            arr = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
            _check(lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr), f"rule {name}")

        eperm = _errno(errno.EPERM)
        for name in DENIED:
            rule(eperm, name)
        # Threads only: clone must carry CLONE_THREAD; clone3 hides its flags, so refuse it softly.
        rule(eperm, "clone", (0, _CMP_MASKED_EQ, _CLONE_THREAD, 0))
        for flag in _CLONE_NAMESPACES:
            rule(eperm, "clone", (0, _CMP_MASKED_EQ, flag, flag))
        rule(_errno(errno.ENOSYS), "clone3")
        # Unix sockets only (domain is argument 0).
        rule(_errno(errno.EACCES), "socket", (0, _CMP_NE, socket.AF_UNIX, 0))
        rule(_errno(errno.EACCES), "socketpair", (0, _CMP_NE, socket.AF_UNIX, 0))
        rule(eperm, "prctl", (0, _CMP_EQ, _PR_SET_PDEATHSIG, 0))
        _check(lib.seccomp_load(ctx), "load")
    finally:
        lib.seccomp_release(ctx)


def _check(rc: int, what: str) -> None:
    if rc < 0:
        raise OSError(-rc, f"seccomp {what}: {errno.errorcode.get(-rc, rc)}")
