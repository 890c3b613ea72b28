"""Kill points: SIGKILL a function just before its n-th file operation in a folder.

`run_killed(call, folder, kill_at, log)` runs `call()` in this process's child and kills it just
before its `kill_at`-th operation that changes a file in `folder` (or the folder itself); this
process then ends the way the child did (SIGKILL, or the child's exit code), so whoever started
it reads the outcome from its exit code. Each operation is sent on `log` (a multiprocessing
connection) as ("op", what) before it runs; ("mode", how) comes first.

How the operations are seen, best first:
- "system calls": on Linux (x86_64, aarch64) the child is traced with ptrace, and the kill
  point is the entry of each system call that changes a file: open for writing or truncating,
  write and its variants, truncate, fsync, fdatasync, fallocate, rename, link, unlink, mkdir,
  chmod, copy_file_range, sendfile. The child is killed in that stop, so the call never runs.
  Whatever API the function writes through (open, pathlib, os.write, os.replace, shutil, a C
  extension), the kernel sees the same calls, so no way of writing slips between two points.
- "python hooks", elsewhere or when tracing is refused (FAILLAB_KILL_POINTS=python forces it):
  audit hooks (open, os.rename/os.replace, os.truncate, os.remove, shutil's copies) and
  wrappers around io.open (builtins.open, pathlib) and os's fd-level writes (os.open, os.write,
  os.fsync, os.ftruncate, ...). Each write through a wrapped file reaches the OS at once, as a
  disk that shows every write would.
"""
from __future__ import annotations

import builtins
import ctypes
import errno
import io
import os
import platform
import signal
import sys
import traceback

MODE_VARIABLE = "FAILLAB_KILL_POINTS"
SIGKILL = getattr(signal, "SIGKILL", signal.SIGTERM)


def run_killed(call, folder, kill_at: int, log) -> None:
    """Run call(), killed just before its kill_at-th file operation in `folder` (see the module)."""
    folder = os.path.realpath(os.fspath(folder))
    if os.environ.get(MODE_VARIABLE, "") != "python" and _tracer_arch() is not None:
        code = _traced(call, folder, kill_at, log)
        if code is not None:
            _end_as(code)
    log.send(("mode", "python hooks"))
    PythonHooks(folder, kill_at, log).install()
    call()


def _end_as(code: int) -> None:
    """End this process the way the traced child ended (a negative code: that signal)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if code < 0:
        os.kill(os.getpid(), -code)
    os._exit(code)


# -- system calls, traced with ptrace (Linux) ------------------------------------------------------
PTRACE_TRACEME, PTRACE_GETREGS, PTRACE_SETOPTIONS, PTRACE_SYSCALL = 0, 12, 0x4200, 24
PTRACE_GETREGSET, NT_PRSTATUS = 0x4204, 1
PTRACE_O_TRACESYSGOOD, PTRACE_O_TRACECLONE, PTRACE_O_EXITKILL = 0x1, 0x8, 0x100000
WALL = 0x40000000
PR_SET_PDEATHSIG = 1
AT_FDCWD = -100
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_APPEND", 0)
TRACE_REFUSED = 97  # the child's exit code when it cannot be traced

# What each system call changes: ("fd", n) the file open as argument n, ("path", n) the path in
# argument n, ("at", d, p) the path in argument p relative to the directory fd in argument d;
# "open" calls count only when their flags (argument `flags`) write, create or truncate.
_GENERIC = {  # asm-generic numbers (aarch64)
    56: ("openat", [("at", 0, 1)], 2), 437: ("openat2", [("at", 0, 1)], "how"),
    64: ("write", [("fd", 0)]), 66: ("writev", [("fd", 0)]), 68: ("pwrite64", [("fd", 0)]),
    70: ("pwritev", [("fd", 0)]), 287: ("pwritev2", [("fd", 0)]),
    45: ("truncate", [("path", 0)]), 46: ("ftruncate", [("fd", 0)]), 47: ("fallocate", [("fd", 0)]),
    82: ("fsync", [("fd", 0)]), 83: ("fdatasync", [("fd", 0)]), 84: ("sync_file_range", [("fd", 0)]),
    38: ("renameat", [("at", 0, 1), ("at", 2, 3)]), 276: ("renameat2", [("at", 0, 1), ("at", 2, 3)]),
    35: ("unlinkat", [("at", 0, 1)]), 37: ("linkat", [("at", 0, 1), ("at", 2, 3)]),
    36: ("symlinkat", [("at", 1, 2)]), 34: ("mkdirat", [("at", 0, 1)]),
    52: ("fchmod", [("fd", 0)]), 53: ("fchmodat", [("at", 0, 1)]),
    285: ("copy_file_range", [("fd", 2)]), 71: ("sendfile", [("fd", 0)]),
}
_X86_64 = {
    2: ("open", [("path", 0)], 1), 85: ("creat", [("path", 0)]), 257: ("openat", [("at", 0, 1)], 2),
    437: ("openat2", [("at", 0, 1)], "how"),
    1: ("write", [("fd", 0)]), 20: ("writev", [("fd", 0)]), 18: ("pwrite64", [("fd", 0)]),
    296: ("pwritev", [("fd", 0)]), 328: ("pwritev2", [("fd", 0)]),
    76: ("truncate", [("path", 0)]), 77: ("ftruncate", [("fd", 0)]), 285: ("fallocate", [("fd", 0)]),
    74: ("fsync", [("fd", 0)]), 75: ("fdatasync", [("fd", 0)]), 277: ("sync_file_range", [("fd", 0)]),
    82: ("rename", [("path", 0), ("path", 1)]), 264: ("renameat", [("at", 0, 1), ("at", 2, 3)]),
    316: ("renameat2", [("at", 0, 1), ("at", 2, 3)]),
    87: ("unlink", [("path", 0)]), 263: ("unlinkat", [("at", 0, 1)]), 84: ("rmdir", [("path", 0)]),
    86: ("link", [("path", 0), ("path", 1)]), 265: ("linkat", [("at", 0, 1), ("at", 2, 3)]),
    88: ("symlink", [("path", 1)]), 266: ("symlinkat", [("at", 1, 2)]),
    83: ("mkdir", [("path", 0)]), 258: ("mkdirat", [("at", 0, 1)]),
    90: ("chmod", [("path", 0)]), 91: ("fchmod", [("fd", 0)]), 268: ("fchmodat", [("at", 0, 1)]),
    326: ("copy_file_range", [("fd", 2)]), 40: ("sendfile", [("fd", 0)]),
}


def _tracer_arch() -> str | None:
    if not sys.platform.startswith("linux"):
        return None
    machine = platform.machine()
    return machine if machine in ("x86_64", "aarch64") else None


class _Regs(ctypes.Structure):
    _fields_ = [("r", ctypes.c_ulonglong * 34)]  # x86_64 user_regs_struct is 27; aarch64 is 34


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    libc.ptrace.restype = ctypes.c_long
    return libc


def _traced(call, folder: str, kill_at: int, log) -> int | None:
    """Fork; the child runs call() under ptrace; return how it ended (negative: the signal), or
    None when the child could not be traced (then nothing of call() ran)."""
    libc = _libc()
    tracer = os.getpid()
    pid = os.fork()
    if pid == 0:  # the traced child
        code = 0
        try:
            libc.prctl(PR_SET_PDEATHSIG, SIGKILL)  # it never outlives the tracer, even stopped
            if os.getppid() != tracer:
                os._exit(TRACE_REFUSED)
            if libc.ptrace(PTRACE_TRACEME, 0, None, None) != 0:
                os._exit(TRACE_REFUSED)
            os.kill(os.getpid(), signal.SIGSTOP)  # the tracer sets its options here
            call()
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # the function raised: its exit code says so, as a process's would
            traceback.print_exc()
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, WALL)
    if os.WIFEXITED(status):  # it could not be traced
        return None
    log.send(("mode", "system calls"))
    libc.ptrace(PTRACE_SETOPTIONS, pid, None,
                ctypes.c_void_p(PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL))
    return _Tracer(libc, pid, folder, kill_at, log).follow()


class _Tracer:
    def __init__(self, libc, pid: int, folder: str, kill_at: int, log):
        self.libc, self.pid, self.folder, self.kill_at, self.log = libc, pid, folder, kill_at, log
        self.table = _X86_64 if platform.machine() == "x86_64" else _GENERIC
        self.seen = 0
        self.in_call: dict[int, bool] = {}  # thread -> between a call's entry and its exit

    def follow(self) -> int:
        """Resume the child until it ends; return its exit code (negative: killed by that signal)."""
        self.resume(self.pid, 0)
        while True:
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                return -SIGKILL
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.in_call.pop(tid, None)
                if tid == self.pid:
                    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
                continue
            sig = os.WSTOPSIG(status)
            if sig == signal.SIGTRAP | 0x80:  # a system call's entry or exit
                entering = not self.in_call.get(tid, False)
                self.in_call[tid] = entering
                if entering and self.at_entry(tid):
                    continue  # killed: the call never runs
                self.resume(tid, 0)
            elif sig == signal.SIGTRAP or (sig == signal.SIGSTOP and tid not in self.in_call):
                self.in_call.setdefault(tid, False)  # a ptrace event, or a new thread's first stop
                self.resume(tid, 0)
            else:  # a signal for the child: deliver it
                self.resume(tid, sig)

    def resume(self, tid: int, sig: int) -> None:
        self.libc.ptrace(PTRACE_SYSCALL, tid, None, ctypes.c_void_p(sig))

    def at_entry(self, tid: int) -> bool:
        """Count the call if it changes a file in the folder; kill the child at the kill point."""
        nr, args = self.registers(tid)
        spec = self.table.get(nr)
        if spec is None:
            return False
        name, places = spec[0], spec[1]
        if len(spec) == 3 and not self.opens_to_write(tid, args, spec[2]):
            return False
        paths = [p for p in (self.place(tid, args, place) for place in places) if p]
        if not any(self.inside(p) for p in paths):
            return False
        self.seen += 1
        self.log.send(("op", f"{name} {' to '.join(self.name(p) for p in paths)}"))
        if self.seen == self.kill_at:
            os.kill(self.pid, SIGKILL)  # in the entry stop: the call is not made
            return True
        return False

    def registers(self, tid: int) -> tuple[int, list[int]]:
        regs = _Regs()
        if platform.machine() == "x86_64":
            self.libc.ptrace(PTRACE_GETREGS, tid, None, ctypes.byref(regs))
            r = regs.r  # orig_rax; rdi, rsi, rdx, r10, r8, r9
            return r[15], [r[14], r[13], r[12], r[7], r[9], r[8]]
        iov = _IoVec(ctypes.cast(ctypes.byref(regs), ctypes.c_void_p), ctypes.sizeof(regs))
        self.libc.ptrace(PTRACE_GETREGSET, tid, ctypes.c_void_p(NT_PRSTATUS), ctypes.byref(iov))
        return regs.r[8], [regs.r[i] for i in range(6)]

    def opens_to_write(self, tid: int, args: list[int], flags_at) -> bool:
        if flags_at == "how":  # openat2: struct open_how starts with the flags
            flags = int.from_bytes(self.memory(tid, args[2], 8), "little")
        else:
            flags = args[flags_at]
        return bool(flags & WRITE_FLAGS)

    def place(self, tid: int, args: list[int], place) -> str | None:
        """The absolute path an argument names, as the child sees it."""
        try:
            if place[0] == "fd":
                return os.readlink(f"/proc/{self.pid}/fd/{_signed(args[place[1]])}")
            if place[0] == "path":
                return self.absolute(self.string(tid, args[place[1]]), AT_FDCWD)
            return self.absolute(self.string(tid, args[place[2]]), _signed(args[place[1]]))
        except OSError:  # a closed fd, a bad pointer: the call itself will fail
            return None

    def absolute(self, path: str, dirfd: int) -> str:
        if not os.path.isabs(path):
            base = f"/proc/{self.pid}/cwd" if dirfd == AT_FDCWD else f"/proc/{self.pid}/fd/{dirfd}"
            path = os.path.join(os.readlink(base), path)
        return os.path.realpath(path)

    def memory(self, tid: int, address: int, size: int) -> bytes:
        fd = os.open(f"/proc/{tid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, size, address)
        finally:
            os.close(fd)

    def string(self, tid: int, address: int) -> str:
        """A NUL-terminated string of the child's memory, read a page at most at a time."""
        got = b""
        while b"\0" not in got and len(got) < 4096:
            chunk = 4096 - (address + len(got)) % 4096
            piece = self.memory(tid, address + len(got), chunk)
            if not piece:
                raise OSError(errno.EFAULT, "unreadable path")
            got += piece
        return os.fsdecode(got.split(b"\0", 1)[0])

    def inside(self, path: str) -> bool:
        return path == self.folder or path.startswith(self.folder + os.sep)

    def name(self, path: str) -> str:
        return "the folder" if path == self.folder else os.path.basename(path)


def _signed(value: int) -> int:
    """An int argument (fd, dirfd) from a 64-bit register."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# -- Python hooks (any OS) ---------------------------------------------------------------------------
class PythonHooks:
    """Kill points from inside the process: audit hooks for the os-level calls, wrappers for
    io.open's files and for os's fd-level writes (audit events do not report writes)."""

    EVENTS = {"open", "os.rename", "os.remove", "os.truncate", "os.link", "os.symlink",
              "shutil.copyfile", "shutil.copymode", "shutil.copystat", "os.rmdir", "os.chmod", "os.mkdir"}
    FD_CALLS = ("write", "pwrite", "writev", "pwritev", "fsync", "fdatasync", "ftruncate",
                "posix_fallocate", "sendfile", "copy_file_range")

    def __init__(self, folder: str, kill_at: int, log):
        self.folder, self.kill_at, self.log, self.seen = folder, kill_at, log, 0
        self.fds: dict[int, str] = {}  # fds open on a path in the folder -> its name

    def point(self, what: str) -> None:
        self.seen += 1
        self.log.send(("op", what))
        if self.seen == self.kill_at:
            os.kill(os.getpid(), SIGKILL)  # no finally, no flush

    def path_of(self, value) -> str | None:
        if isinstance(value, int):
            return self.fds.get(value)
        try:
            return os.path.realpath(os.fsdecode(os.fspath(value)))
        except TypeError:
            return None

    def inside(self, value) -> bool:
        path = self.path_of(value)
        return path is not None and (path == self.folder or path.startswith(self.folder + os.sep))

    def name(self, value) -> str:
        path = self.path_of(value)
        return "the folder" if path == self.folder else os.path.basename(path or "?")

    def install(self) -> None:
        hooks = self
        real_open, real_os_open = io.open, os.open

        def audit(event, args):
            paths = args[:1] if event == "open" else args[:2]  # open's 2nd is the mode
            if event == "open" and not _writes(args[1], args[2]):
                return
            if event in self.EVENTS and any(self.inside(a) for a in paths):
                self.point(f"{event.split('.')[-1]} {' to '.join(self.name(a) for a in paths if self.inside(a))}")

        def watched_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if not isinstance(file, int) and self.inside(file) and any(c in mode for c in "wax+"):
                hooks.fds[f.fileno()] = self.path_of(file)
                hooks.point(f"{self.name(file)} open{', empty' if 'w' in mode else ''}")
                return PointedFile(f, hooks, self.name(file))
            return f

        def watched_os_open(path, flags, *args, **kwargs):
            fd = real_os_open(path, flags, *args, **kwargs)
            if self.inside(path):
                hooks.fds[fd] = self.path_of(path)
                if flags & WRITE_FLAGS:
                    hooks.point(f"{self.name(path)} open{', empty' if flags & os.O_TRUNC else ''}")
            return fd

        def fd_call(name, real):
            def watched(fd, *args, **kwargs):
                if self.inside(fd):
                    hooks.point(f"{name} {self.name(fd)}")
                return real(fd, *args, **kwargs)
            return watched

        sys.addaudithook(audit)
        io.open = builtins.open = watched_open
        os.open = watched_os_open
        for name in self.FD_CALLS:
            if hasattr(os, name):
                setattr(os, name, fd_call(name, getattr(os, name)))


def _writes(mode, flags) -> bool:
    """Whether an audited open writes: by its mode (io.open) or its flags (os.open)."""
    if isinstance(mode, str):
        return any(c in mode for c in "wax+")
    return bool((flags or 0) & WRITE_FLAGS)


class PointedFile:
    """A file whose every write is a kill point and reaches the OS at once."""

    def __init__(self, f, points: PythonHooks, name: str):
        self._f, self._points, self._name = f, points, name

    def write(self, data):
        self._points.point(f"write to {self._name}")
        n = self._f.write(data)
        self._f.flush()
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __iter__(self):
        return iter(self._f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False
