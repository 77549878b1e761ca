"""The sandbox fork server ("zygote"), started by ``SandboxPool`` as ``python -I`` with an empty environment.

Processes (see ``ctpo.tir.sandbox`` for the threat model)::

    caller (SandboxPool) ──unix socket──► zygote Z    started with an empty environment; imports the
         │  per execution: the child's        │         math modules once, builds the read-only root
         │  stdin/stdout/stderr pipes, a      │         filesystem and the seccomp filter once, then
         │  status pipe and a control pipe    │         waits; its death takes everything below
         │  (sent to the server as fds)       ▼
         │                                server S   pid 1 of a pid namespace of its own; for each
         │                                    │       request: unshare(CLONE_NEWPID), fork, setns
         │                                    │       back; one poll loop enforces every wall clock
         │                                    ▼       and writes each exit status to its status pipe
         └──── code in, output out ─────► child C    pid 1 of a fresh nested pid namespace; hardens
                                                     itself (namespaces, uid, rlimits, Landlock,
                                                     seccomp), reads the code from stdin, runs it

The pool writes the code straight into C's stdin pipe and reads C's stdout/stderr itself, so S (the
template every execution is forked from) never holds a request's code or output in its memory.
Without pid namespaces (a weaker tier) Z is the server and C an ordinary child.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

from ctpo.tir import _isolation as iso

# Each execution runs as host uid UID_BASE + zygote_pid * UID_SLOTS + slot: unique host-wide while
# the zygote lives (pids <= 2**22 keep it below 2**32 - 1), at most UID_SLOTS executions per zygote.
UID_BASE = 1_000_000_000
UID_SLOTS = 512
SETUP_TIMEOUT_S = 30.0
REQUEST_KEYS = (
    "timeout_s",
    "memory_mb",
    "max_procs",
    "max_file_mb",
    "max_open_files",
    "scratch_mb",
    "scratch_inodes",
)
EXIT_SETUP_FAILED = 125
THREAD_ENV = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)
DEV_NODES = ("null", "zero", "full", "random", "urandom")
# Order matters: each step may rely on the ones before it.
CHILD_STEPS = (
    "mount_ns",
    "net_ns",
    "ipc_ns",
    "uts_ns",
    "unique_uid",
    "user_ns",
    "drop_caps",
    "no_new_privs",
    "rlimits",
    "landlock",
    "seccomp",
)


class Context:
    """Everything a forked child needs; built once in the zygote, never holds a request."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.root = os.getuid() == 0
        self.disable = set(cfg.get("disable", ()))
        self.plan: set[str] = set()
        self.ro_paths: list[str] = []
        self.tmp_binds: list[tuple[str, str]] = []  # (parked copy, path under /tmp)
        self.seccomp_prog: bytes | None = None
        self.landlock_abi = 0
        self.base_vm_bytes = 0
        self.notes: list[str] = []


# --- zygote start-up ------------------------------------------------------------------------------
def _preload(modules: list[str], warmup: str) -> list[str]:
    for var in THREAD_ENV:  # putenv only: /proc/self/environ of every execution stays empty
        os.environ[var] = "1"
    failed = []
    for name in modules:
        try:
            __import__(name)
        except Exception as e:  # a missing optional module is reported, not fatal
            failed.append(f"{name}: {type(e).__name__}: {e}")
    if warmup:  # the pool's own trusted code: primes lazy imports and caches once for every child
        try:
            exec(compile(warmup, "<sandbox-warmup>", "exec"), {"__name__": "__warmup__"})
        except Exception as e:
            failed.append(f"warmup: {type(e).__name__}: {e}")
    # What the child's runner uses, imported here so the child needs no file access for it.
    import atexit  # noqa: F401
    import builtins  # noqa: F401
    import io  # noqa: F401
    import linecache  # noqa: F401
    import threading  # noqa: F401
    import types  # noqa: F401

    # At most two malloc arenas per child: each extra thread would otherwise reserve 64 MB of
    # address space, which RLIMIT_AS (the memory limit) counts.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX
    # Move everything imported so far out of the collector's reach: a child's garbage collection
    # then never walks (and copy-on-write faults) the template's objects.
    gc.collect()
    gc.freeze()
    return failed


def _python_paths() -> list[str]:
    """Read-only host paths Python needs: the interpreter's stdlib and site-packages, the folders
    of the shared libraries it has mapped. Not the caller's cwd, not the project (an editable
    install's source folder is reachable only through an import hook and is deliberately left out)."""
    import sysconfig

    roots = set()
    for scheme_key in ("stdlib", "platstdlib", "purelib", "platlib"):
        p = sysconfig.get_paths().get(scheme_key)
        if p:
            roots.add(os.path.realpath(p))
    for base in (sys.base_prefix, sys.base_exec_prefix):
        for key in ("stdlib", "platstdlib", "purelib", "platlib"):
            p = sysconfig.get_paths(vars={"base": base, "platbase": base, "installed_base": base}).get(key)
            if p:
                roots.add(os.path.realpath(p))
    paths = {p for p in roots if os.path.isdir(p)}
    for entry in sys.path:
        rp = os.path.realpath(entry) if entry else ""
        if rp and os.path.isdir(rp) and any(rp == r or rp.startswith(r + os.sep) for r in roots):
            paths.add(rp)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/") and ".so" in parts[5]:
                p = os.path.dirname(os.path.realpath(parts[5].strip()))
                if os.path.isdir(p):
                    paths.add(p)
    out: list[str] = []
    for p in sorted(paths, key=len):
        if p != "/" and not any(p == q or p.startswith(q + os.sep) for q in out):
            out.append(p)
    return out


def _build_root(ctx: Context) -> None:
    """Give the zygote a private mount namespace whose root is a read-only tmpfs holding only
    read-only binds of ``ctx.ro_paths``, a few device nodes and empty /proc and /tmp mount points.
    Every execution copies this namespace and mounts its own /proc and size-capped /tmp."""
    if ctx.root:
        iso.unshare(iso.CLONE_NEWNS)
    else:
        uid, gid = os.getuid(), os.getgid()
        iso.unshare(iso.CLONE_NEWUSER | iso.CLONE_NEWNS)
        iso.write_id_maps(uid, gid)
    iso.mount(None, "/", None, iso.MS_REC | iso.MS_PRIVATE)
    sources = {p: os.open(p, os.O_PATH | os.O_CLOEXEC) for p in ctx.ro_paths}
    devs = {
        d: os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC) for d in DEV_NODES if os.path.exists(f"/dev/{d}")
    }
    proc_fd = os.open("/proc", os.O_PATH | os.O_CLOEXEC)
    new = "/tmp"  # any existing folder: covered only inside our own mount namespace
    iso.mount("tmpfs", new, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    ro_flags = iso.MS_BIND | iso.MS_REMOUNT | iso.MS_RDONLY | iso.MS_NOSUID | iso.MS_NODEV
    for i, (path, fd) in enumerate(sources.items()):
        if path == "/tmp" or path.startswith("/tmp/"):
            # Each execution mounts its scratch over /tmp: park this one aside, re-bound per execution.
            ctx.tmp_binds.append((f"/.ro{i}", path))
            target = f"{new}/.ro{i}"
        else:
            target = new + path
        os.makedirs(target, exist_ok=True)
        iso.mount(f"/proc/self/fd/{fd}", target, None, iso.MS_BIND | iso.MS_REC)
        iso.mount(None, target, None, ro_flags)
    os.makedirs(new + "/dev", exist_ok=True)
    for name, fd in devs.items():
        open(f"{new}/dev/{name}", "w").close()
        iso.mount(f"/proc/self/fd/{fd}", f"{new}/dev/{name}", None, iso.MS_BIND)
    for link, dest in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("shm", "/tmp"),
    ):
        os.symlink(dest, f"{new}/dev/{link}")
    os.makedirs(new + "/proc")
    os.makedirs(new + "/tmp")
    os.chmod(new + "/tmp", 0o1777)
    if not ctx.root:
        # An unprivileged user namespace may mount a new procfs only where a full one is already
        # visible: keep the host's, covered by each execution's own /proc.
        iso.mount(f"/proc/self/fd/{proc_fd}", new + "/proc", None, iso.MS_BIND | iso.MS_REC)
    for fd in (*sources.values(), *devs.values(), proc_fd):
        os.close(fd)
    os.chdir(new)
    iso._syscall(iso._SYS["pivot_root"], b".", b".")
    iso.umount2(".", iso.MNT_DETACH)
    os.chdir("/")
    iso.mount(None, "/", None, iso.MS_REMOUNT | iso.MS_RDONLY | iso.MS_NOSUID | iso.MS_NODEV)


# --- the per-execution child ----------------------------------------------------------------------
def _limits(ctx: Context, req: dict) -> dict[int, int]:
    cpu = int(req["timeout_s"]) + 2
    return {
        resource.RLIMIT_CPU: cpu,
        resource.RLIMIT_AS: ctx.base_vm_bytes + int(req["memory_mb"]) * 2**20,
        resource.RLIMIT_NPROC: int(req["max_procs"]),
        resource.RLIMIT_FSIZE: int(req["max_file_mb"]) * 2**20,
        resource.RLIMIT_NOFILE: int(req["max_open_files"]),
        resource.RLIMIT_CORE: 0,
    }


def _harden(
    ctx: Context,
    req: dict,
    plan: set[str],
    uid: int,
    scratch: str,
    strict: bool,
    errors: dict[str, str] | None = None,
) -> set[str]:
    """Apply the isolation steps in ``plan`` to this process; return the ones that took effect.
    ``strict``: any failure raises (a real execution); otherwise record it in ``errors`` and go on
    (the start-up probe)."""
    done: set[str] = set()

    def step(name: str, fn) -> None:
        if name not in plan:
            return
        try:
            fn()
            done.add(name)
        except Exception as e:
            if strict:
                raise
            if errors is not None:
                errors[name] = f"{type(e).__name__}: {e}"

    def mount_ns() -> None:  # a copy of the zygote's read-only root, plus a fresh /proc and /tmp
        iso.unshare(iso.CLONE_NEWNS)
        if "pid_ns" in plan:
            # Only the namespace's own pid folders where the kernel allows it (5.8+): no /proc/sys,
            # /proc/kcore, /proc/sysrq-trigger, ... to poke at.
            proc_flags = iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC
            try:
                iso.mount("proc", "/proc", "proc", proc_flags, "subset=pid")
            except OSError:
                iso.mount("proc", "/proc", "proc", proc_flags)
        size = f"size={int(req['scratch_mb'])}m,nr_inodes={int(req['scratch_inodes'])},mode=1777"
        iso.mount("tmpfs", "/tmp", "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, size)
        for src, dst in ctx.tmp_binds:  # Python installed under /tmp (a CI checkout's venv, say)
            os.makedirs(dst, mode=0o755, exist_ok=True)
            iso.mount(src, dst, None, iso.MS_BIND | iso.MS_REC)
            iso.mount(
                None, dst, None, iso.MS_BIND | iso.MS_REMOUNT | iso.MS_RDONLY | iso.MS_NOSUID | iso.MS_NODEV
            )

    step("mount_ns", mount_ns)
    step("net_ns", lambda: iso.unshare(iso.CLONE_NEWNET))
    step("ipc_ns", lambda: iso.unshare(iso.CLONE_NEWIPC))

    def uts_ns() -> None:
        iso.unshare(iso.CLONE_NEWUTS)
        iso.sethostname("sandbox")

    step("uts_ns", uts_ns)

    def landlock_prepare() -> None:  # paths are opened now, while they are still reachable
        if "mount_ns" in plan:
            rules = [
                ("/", iso.FS_READ_ONLY),
                ("/tmp", -1),
                ("/proc", iso.FS_READ_FILE | iso.FS_READ_DIR),
                *((f"/dev/{d}", iso.FS_READ_FILE | iso.FS_WRITE_FILE) for d in DEV_NODES),
            ]
        else:
            rules = [
                *((p, iso.FS_READ_ONLY) for p in ctx.ro_paths),
                (scratch, -1),
                *((f"/dev/{d}", iso.FS_READ_FILE | iso.FS_WRITE_FILE) for d in DEV_NODES),
            ]
        ruleset.append(iso.landlock_ruleset(ctx.landlock_abi, rules))

    ruleset: list[int] = []
    if ctx.landlock_abi:
        step("landlock", landlock_prepare)

    def unique_uid() -> None:
        iso.drop_bounding_set()  # while we still may
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        # Changing uid made us non-dumpable, which hands /proc/self to host root; only processes of
        # this uid (this execution's own) could use dumpability, and ptrace is denied by seccomp.
        iso.prctl(iso.PR_SET_DUMPABLE, 1)

    step("unique_uid", unique_uid)

    def user_ns() -> None:
        u, g = os.getuid(), os.getgid()
        iso.unshare(iso.CLONE_NEWUSER)
        iso.write_id_maps(u, g)

    step("user_ns", user_ns)
    step("drop_caps", iso.drop_all_capabilities)
    step("no_new_privs", lambda: iso.prctl(iso.PR_SET_NO_NEW_PRIVS, 1))
    step("rlimits", lambda: iso.set_hard_limits(_limits(ctx, req)))
    if ruleset:
        done.discard("landlock")
        step("landlock", lambda: iso.landlock_restrict_self(ruleset.pop()))

    def seccomp() -> None:
        if ctx.seccomp_prog is None:
            raise OSError(errno.ENOSYS, "no seccomp filter for this architecture")
        iso.install_seccomp(ctx.seccomp_prog)

    step("seccomp", seccomp)
    return done


def _run_user_code(timeout_fd: int) -> None:
    """In the hardened child: read the code from stdin, run it as ``python -c`` would, exit."""
    import atexit
    import builtins
    import io
    import linecache
    import threading
    import types

    chunks = []
    while True:
        b = os.read(0, 1 << 16)
        if not b:
            break
        chunks.append(b)
    code = b"".join(chunks).decode("utf-8", "replace")
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.write(timeout_fd, b"R")  # the wall clock starts now
    os.close(timeout_fd)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="replace")
    sys.stdout = io.TextIOWrapper(
        io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", write_through=True
    )
    sys.argv = ["-c"]
    sys.path[:] = [p for p in sys.path if os.path.isdir(p)]  # what is visible in here
    os.environ.clear()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins
    sys.modules["__main__"] = main
    linecache.cache["<string>"] = (len(code), None, code.splitlines(True), "<string>")
    rc = 0
    try:
        exec(compile(code, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        rc = _exit_code(e)
    except BaseException as e:
        rc = 1
        try:
            traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        except BaseException:
            os.write(2, f"{type(e).__name__}\n".encode())
    try:
        threading._shutdown()  # like interpreter exit: wait for non-daemon threads
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except SystemExit as e:
        rc = _exit_code(e)
    except BaseException:
        pass
    os._exit(rc & 0xFF)


def _exit_code(e: SystemExit) -> int:
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    with contextlib.suppress(BaseException):
        print(e.code, file=sys.stderr)
    return 1


def _child(ctx: Context, req: dict, plan: set[str], uid: int, scratch: str, sp: int, strict: bool) -> None:
    try:
        os.setpgid(0, 0)
        errors: dict[str, str] = {}
        done = _harden(ctx, req, plan, uid, scratch, strict, errors)
        os.chdir(scratch)
        iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the last credential change
        p = select.poll()
        p.register(sp, select.POLLIN)
        if p.poll(0):  # the server already died (it never writes to this socket)
            os._exit(EXIT_SETUP_FAILED)
        if not strict:
            os.write(sp, json.dumps({"done": sorted(done), "errors": errors}).encode())
            os._exit(0)
    except BaseException as e:
        try:
            os.write(sp, b"E" + f"{type(e).__name__}: {e}".encode()[:2000])
        finally:
            os._exit(EXIT_SETUP_FAILED)
    _run_user_code(sp)


# --- the server: one event loop supervising every execution -------------------------------------
def _kill_leftovers(ctx: Context, uid: int, pgid: int) -> None:
    """Without a pid namespace, kill whatever an execution left behind (orphans, daemons)."""
    if "unique_uid" in ctx.plan:
        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(uid, uid, uid)
                # One pass reaches every process of the uid (the task list is locked while it runs,
                # and a fork racing with it is aborted by the pending SIGKILL). Then wait, up to a
                # second, until they are really gone, so none outlives the execution's report.
                deadline = time.monotonic() + 1.0
                while True:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(-1, signal.SIGKILL)
                    if not _live_pids_of(uid) or time.monotonic() > deadline:
                        break
                    time.sleep(0.002)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    else:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


def _live_pids_of(uid: int) -> list[int]:
    """Pids of non-zombie processes of ``uid`` other than ourselves ([] where /proc is not visible)."""
    out = []
    with contextlib.suppress(OSError):
        # Ourselves as this /proc numbers us: in the server's pid namespace (no private root, so the
        # host's /proc) getpid() is a namespace pid and never matches, and we would wait out the
        # deadline for our own process on every execution.
        me = os.readlink("/proc/self")
        for d in os.listdir("/proc"):
            if d.isdigit() and d != me:
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{d}/status") as f:
                        status = f.read()
                    state = status.split("\nState:", 1)[1].split()[0]
                    real_uid = int(status.split("\nUid:", 1)[1].split()[0])
                    if real_uid == uid and state != "Z":
                        out.append(int(d))
    return out


class _Exec:
    """A live execution as the server sees it: descriptors, limits and times; never code or output."""

    def __init__(self, req: dict, fds: list[int], slot: int) -> None:
        self.req = req
        self.code_r, self.out_w, self.err_w, self.status_w, self.ctl_r = fds
        self.slot = slot
        self.pid = -1
        self.pidfd = -1
        self.helper_pid = -1  # weaker tiers: the clean-up helper forked when it exited
        self.sp: socket.socket | None = None
        self.scratch = "/tmp"
        self.uid = -1
        self.started: float | None = None
        self.deadline = time.monotonic() + SETUP_TIMEOUT_S
        self.killed = False
        self.setup_msg = b""
        self.report: dict = {
            "event": "done",
            "exit_code": None,
            "signal": None,
            "timed_out": False,
            "output_killed": False,
            "cancelled": False,
            "setup_error": None,
        }


class Server:
    """Forks one hardened child per request and supervises all of them from a single poll loop.

    With a pid namespace the server itself is pid 1 of a namespace of its own (so it may re-enter
    it with ``setns`` after each ``unshare(CLONE_NEWPID)``): every child is then pid 1 of a fresh
    nested namespace, with the server as its parent, one fork per execution.
    """

    def __init__(self, ctx: Context, sock: socket.socket, uid_base: int) -> None:
        self.ctx, self.sock, self.uid_base = ctx, sock, uid_base
        self.poll = select.poll()
        self.fds: dict[int, tuple[str, _Exec]] = {}
        self.live: set[_Exec] = set()
        self.free_slots = list(range(UID_SLOTS - 1, -1, -1))
        self.self_pidfd = os.pidfd_open(os.getpid()) if "pid_ns" in ctx.plan else -1

    # A child of the server: unshare a pid namespace for it, fork, and come back to our own.
    def _fork_child(self) -> int:
        if self.self_pidfd < 0:
            return os.fork()
        iso.unshare(iso.CLONE_NEWPID)
        try:
            pid = os.fork()
        except BaseException:
            iso.setns(self.self_pidfd, iso.CLONE_NEWPID)
            raise
        if pid:  # (never in the child: its children must stay inside its namespace)
            iso.setns(self.self_pidfd, iso.CLONE_NEWPID)
        return pid

    def probe(self, wanted: set[str]) -> set[str]:
        """Try every wanted step in a throwaway child; return those that worked (reasons in notes)."""
        ctx = self.ctx
        req = {
            "timeout_s": 5,
            "memory_mb": 256,
            "max_procs": 16,
            "max_file_mb": 1,
            "max_open_files": 64,
            "scratch_mb": 1,
            "scratch_inodes": 64,
        }
        plan = set(wanted)
        scratch = "/tmp" if "mount_ns" in plan else tempfile.mkdtemp(prefix="ctpo-probe-")
        uid = self.uid_base if "unique_uid" in plan else os.getuid()
        if scratch != "/tmp":
            os.chown(scratch, uid, -1)
        sp_m, sp_c = socket.socketpair()
        pid = self._fork_child() if "pid_ns" in plan else os.fork()
        if pid == 0:
            try:
                sp_m.close()
                _child(ctx, req, plan, uid, scratch, sp_c.fileno(), strict=False)
            finally:
                os._exit(EXIT_SETUP_FAILED)
        sp_c.close()
        os.waitpid(pid, 0)
        data = sp_m.recv(1 << 16)
        sp_m.close()
        if scratch != "/tmp":
            shutil.rmtree(scratch, ignore_errors=True)
        if not data.startswith(b"{"):
            ctx.notes.append(f"the isolation probe failed: {data.decode('utf-8', 'replace')}")
            return set()
        rep = json.loads(data.decode())
        ctx.notes += [f"{k}: {v}" for k, v in sorted(rep["errors"].items())]
        return set(rep["done"]) | ({"pid_ns"} & plan)

    # --- the loop ---------------------------------------------------------------------------------
    def serve(self) -> None:
        self.poll.register(self.sock.fileno(), select.POLLIN)
        while True:
            now = time.monotonic()
            timeout = min((e.deadline for e in self.live if not e.killed), default=None)
            events = self.poll.poll(None if timeout is None else max(0.0, timeout - now) * 1000 + 1)
            # New requests last: a request accepted now may reuse the number of an fd released by an
            # earlier event of this same batch.
            events.sort(key=lambda ev: ev[0] == self.sock.fileno())
            for fd, _ev in events:
                if fd == self.sock.fileno():
                    if not self._accept():
                        self._shutdown()
                        return
                    continue
                kind, e = self.fds.get(fd, ("gone", None))
                if e is None:
                    continue
                try:
                    self._event(kind, fd, e)
                except Exception as exc:  # keep serving the others; this one reports what happened
                    print(f"sandbox server: {kind} event: {type(exc).__name__}: {exc}", file=sys.stderr)
                    e.report["setup_error"] = (
                        e.report["setup_error"] or f"server: {type(exc).__name__}: {exc}"
                    )
                    self._kill(e)
                    if kind == "pid":  # the child is gone: report now, or the pool would wait on it
                        with contextlib.suppress(Exception):
                            self._release(e, report=True)
            now = time.monotonic()
            for e in list(self.live):
                if not e.killed and now >= e.deadline:
                    if e.started is None:
                        self._drain_setup(e)  # an "R" that arrived since the poll moves the deadline
                        if e.deadline > now:
                            continue
                        e.report["setup_error"] = "sandbox setup did not finish in time"
                    else:
                        e.report["timed_out"] = True
                    self._kill(e)

    def _event(self, kind: str, fd: int, e: _Exec) -> None:
        if kind == "pid":
            self._finish(e)
        elif kind == "helper":  # a weaker tier's clean-up is over: its uid slot may be reused now
            self._unwatch(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(e.helper_pid, 0)
            self.free_slots.append(e.slot)
        elif kind == "ctl":
            try:
                why = os.read(fd, 1)
            except BlockingIOError:
                return
            e.report["output_killed" if why == b"O" else "cancelled"] = True
            self._unwatch(fd)
            self._kill(e)
        elif kind == "sp":
            data = e.sp.recv(4096) if e.sp else b""
            if not data:
                self._unwatch(fd)
            else:
                self._setup_data(e, data)

    def _setup_data(self, e: _Exec, data: bytes) -> None:
        """What the child said on its setup socket: ``R`` (hardened, code read: the wall clock
        starts) or, before that, a setup error."""
        if data.startswith(b"R") and e.started is None:
            e.started = time.monotonic()
            e.deadline = e.started + e.req["timeout_s"]
        else:
            e.setup_msg += data

    def _drain_setup(self, e: _Exec) -> None:
        """Take in whatever is still queued on the setup socket. The child writes there before it
        exits, so once its exit is seen all of it is queued, but the poll batch that reports the
        exit may list the pidfd ahead of the socket (and a fast snippet exits within microseconds
        of its ``R``): judge an exit, or a setup timeout, only after this."""
        while e.sp is not None:
            try:
                data = e.sp.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            self._setup_data(e, data)

    def _watch(self, fd: int, kind: str, e: _Exec) -> None:
        self.fds[fd] = (kind, e)
        self.poll.register(fd, select.POLLIN)

    def _unwatch(self, fd: int) -> None:
        if self.fds.pop(fd, None) is not None:
            self.poll.unregister(fd)

    def _kill(self, e: _Exec) -> None:
        e.killed = True
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(e.pidfd, signal.SIGKILL)

    def _accept(self) -> bool:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.sock, 1 << 16, 5)
        except OSError:
            return False
        if not msg:
            return False  # the pool closed its end
        try:
            raw = json.loads(msg.decode())
            req = {k: float(raw[k]) if k == "timeout_s" else int(raw[k]) for k in REQUEST_KEYS}
            if len(fds) != 5 or req["timeout_s"] <= 0:
                raise ValueError("bad request")
        except Exception:
            for fd in fds:
                os.close(fd)
            return True
        if not self.free_slots:
            os.write(
                fds[3], (json.dumps({"event": "done", "setup_error": "too many executions"}) + "\n").encode()
            )
            for fd in fds:
                os.close(fd)
            return True
        e = _Exec(req, fds, self.free_slots.pop())
        try:
            self._start(e)
        except Exception as exc:
            e.report["setup_error"] = f"{type(exc).__name__}: {exc}"
            self._report(e)
        return True

    def _start(self, e: _Exec) -> None:
        ctx, plan = self.ctx, self.ctx.plan
        e.uid = self.uid_base + e.slot if "unique_uid" in plan else os.getuid()
        if "mount_ns" not in plan:
            e.scratch = tempfile.mkdtemp(prefix="ctpo-sandbox-", dir=ctx.cfg.get("scratch_base") or None)
            os.chown(e.scratch, e.uid, -1)
        sp_m, sp_c = socket.socketpair()
        pid = self._fork_child()
        if pid == 0:  # the child: keep only its stdin/stdout/stderr pipes and the setup socket
            try:
                sp_m.close()
                for fd, target in ((e.code_r, 0), (e.out_w, 1), (e.err_w, 2)):
                    os.dup2(fd, target)
                spc = os.dup2(sp_c.detach(), 3)
                os.closerange(4, 1 << 20)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            except BaseException:
                os._exit(EXIT_SETUP_FAILED)
            try:
                _child(ctx, e.req, plan, e.uid, e.scratch, spc, strict=True)
            finally:  # whatever the code did, the child never returns into the server's loop
                os._exit(EXIT_SETUP_FAILED)
        e.pid = pid
        sp_c.close()
        for fd in (e.code_r, e.out_w, e.err_w):
            os.close(fd)
        e.sp = sp_m
        e.pidfd = os.pidfd_open(pid)
        os.set_blocking(e.status_w, False)
        os.set_blocking(e.ctl_r, False)
        self.live.add(e)
        self._watch(e.pidfd, "pid", e)
        self._watch(e.ctl_r, "ctl", e)
        self._watch(sp_m.fileno(), "sp", e)

    def _finish(self, e: _Exec) -> None:
        pid, status, ru = os.wait4(e.pid, os.WNOHANG)
        if pid == 0:
            return  # not exited after all
        self._drain_setup(e)  # its "R" (or setup error) may be queued behind the exit in this batch
        if os.WIFSIGNALED(status):
            e.report["signal"] = os.WTERMSIG(status)
        else:
            e.report["exit_code"] = os.WEXITSTATUS(status)
        if e.started is None and not e.report["setup_error"]:
            msg = e.setup_msg[1:] if e.setup_msg.startswith(b"E") else e.setup_msg
            e.report["setup_error"] = msg.decode("utf-8", "replace") or "sandbox child died during setup"
        e.report["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 4)
        e.report["max_rss_mb"] = round(ru.ru_maxrss / 1024, 1)
        e.report["run_s"] = round(time.monotonic() - e.started, 4) if e.started else 0.0
        if "pid_ns" not in self.ctx.plan or e.scratch != "/tmp":
            # Weaker tiers: leftover processes and a host scratch folder to clean, off the loop.
            helper = os.fork()
            if helper == 0:
                try:
                    os.closerange(3, e.status_w)  # hold no other execution's pipes open
                    os.closerange(e.status_w + 1, 1 << 20)
                    os.set_blocking(e.status_w, True)
                    _kill_leftovers(self.ctx, e.uid, e.pid)
                    shutil.rmtree(e.scratch, ignore_errors=True)
                    os.write(e.status_w, (json.dumps(e.report) + "\n").encode())
                finally:
                    os._exit(0)
            # The slot (the uid the helper kills by) stays taken until the helper is gone: the
            # next execution given it would run as that uid and be killed along with the leftovers.
            self._release(e, report=False, free_slot=False)
            e.helper_pid = helper
            try:
                self._watch(os.pidfd_open(helper), "helper", e)
            except OSError:  # (no fd to spare) wait for it here, up to its one-second clean-up
                os.waitpid(helper, 0)
                self.free_slots.append(e.slot)
            return
        self._release(e, report=True)

    def _report(self, e: _Exec) -> None:
        with contextlib.suppress(OSError):
            os.write(e.status_w, (json.dumps(e.report) + "\n").encode())

    def _release(self, e: _Exec, report: bool, free_slot: bool = True) -> None:
        if e not in self.live and e.pidfd >= 0:
            return  # already released
        if report:
            self._report(e)
        for fd in (e.pidfd, e.ctl_r, e.sp.fileno() if e.sp else -1):
            self._unwatch(fd)
        for fd in (e.pidfd, e.ctl_r, e.status_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        if e.sp:
            e.sp.close()
        self.live.discard(e)
        if free_slot:
            self.free_slots.append(e.slot)

    def _shutdown(self) -> None:
        for e in list(self.live):
            self._kill(e)


# --- start-up --------------------------------------------------------------------------------------
def _startup(sock: socket.socket) -> tuple[Context, list[str], set[str]]:
    cfg = json.loads(sock.recv(1 << 20).decode())
    ctx = Context(cfg)
    os.chdir("/")
    failed = _preload(list(cfg.get("preload", ())), cfg.get("warmup") or "")
    with open("/proc/self/statm") as f:
        ctx.base_vm_bytes = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    ctx.ro_paths = _python_paths()
    ctx.landlock_abi = 0 if "landlock" in ctx.disable else iso.landlock_abi()
    wanted = {"pid_ns", *CHILD_STEPS} - ctx.disable
    if not ctx.root:
        wanted.discard("unique_uid")
    if "mount_ns" in wanted:
        try:
            _build_root(ctx)
        except OSError as e:
            ctx.notes.append(f"private root filesystem unavailable: {e}")
            wanted.discard("mount_ns")
    if not ctx.landlock_abi:
        wanted.discard("landlock")
    return ctx, failed, wanted


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C aimed at the caller is the caller's
    ctx, failed, wanted = _startup(sock)
    uid_base = UID_BASE + os.getpid() * UID_SLOTS  # host-unique while this zygote lives
    if "pid_ns" in wanted:
        # Become pid 1 of a namespace of our own (see Server); the outer process only waits, and
        # its death (the pool killing it) takes the server and every execution with it.
        alive_r, alive_w = os.pipe()
        try:
            iso.unshare(iso.CLONE_NEWPID)
            server = os.fork()
        except OSError as e:
            ctx.notes.append(f"pid_ns: {e}")
            wanted.discard("pid_ns")
            server = 0
        if server:
            sock.close()
            os.close(alive_r)
            _, status = os.waitpid(server, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        os.close(alive_w)
        if "pid_ns" in wanted:
            iso.prctl(iso.PR_SET_PDEATHSIG, signal.SIGKILL)
            p = select.poll()
            p.register(alive_r, select.POLLIN)
            if p.poll(0):  # the outer process died before we armed the death signal
                os._exit(1)
        os.close(alive_r)
    ctx.plan = wanted
    ctx.seccomp_prog = iso.build_seccomp_filter(
        allow_unix_sockets={"mount_ns", "net_ns"} <= wanted, deny_session_change="pid_ns" not in wanted
    )
    srv = Server(ctx, sock, uid_base)
    ctx.plan = srv.probe(wanted)
    if ctx.plan != wanted:  # a step failed: the filter must match what really holds
        ctx.seccomp_prog = iso.build_seccomp_filter(
            allow_unix_sockets={"mount_ns", "net_ns"} <= ctx.plan,
            deny_session_change="pid_ns" not in ctx.plan,
        )
        if "pid_ns" not in ctx.plan:
            srv.self_pidfd = -1
    hello = {
        "event": "ready",
        "plan": sorted(ctx.plan),
        "root": ctx.root,
        "landlock_abi": ctx.landlock_abi,
        "ro_paths": ctx.ro_paths,
        "preload_failed": failed,
        "base_vm_mb": ctx.base_vm_bytes >> 20,
        "notes": ctx.notes,
        "uid_base": uid_base if "unique_uid" in ctx.plan else None,
    }
    sock.sendall(json.dumps(hello).encode())
    srv.serve()


if __name__ == "__main__":
    main()
