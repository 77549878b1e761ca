"""The sandbox fork server ("zygote"): run as ``python -I -m ctpo.tir._zygote FD`` by ``SandboxPool``.

Process tree of one execution (see ``ctpo.tir.sandbox`` for the threat model)::

    caller (SandboxPool) ──unix socket──► zygote Z    started with an empty environment; imports the
         │  code, stdout/stderr,             │          math modules once, builds the sandbox's root
         │  status and control pipes         │          filesystem and the seccomp filter once, then
         │  (passed to Z as fds)             │          only forks; it never reads code or output
         │                                   ▼
         └────────────────────────────►  monitor M   per execution; host side, outside every sandbox
                                             │        namespace: enforces the wall clock, reports
                                             ▼        the exit status, kills the tree
                                         child C      pid 1 of a fresh pid namespace; hardens itself
                                                      (namespaces, uid, rlimits, Landlock, seccomp),
                                                      then reads the code from its stdin and runs it

The pool writes the code straight into C's stdin pipe and reads C's stdout/stderr itself, so Z (the
template every execution is forked from) never holds a request's code or output in its memory.
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

UID_BASE = 1_000_000_000  # unique host uid per execution = UID_BASE + the monitor's host pid
SETUP_TIMEOUT_S = 30.0
EXIT_SETUP_FAILED = 125
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
              "VECLIB_MAXIMUM_THREADS")
DEV_NODES = ("null", "zero", "full", "random", "urandom")
# Order matters: each step may rely on the ones before it.
CHILD_STEPS = ("mount_ns", "net_ns", "ipc_ns", "uts_ns", "unique_uid", "user_ns", "drop_caps",
               "no_new_privs", "rlimits", "landlock", "seccomp")


class Context:
    """Everything a forked monitor/child needs; built once in the zygote, never holds a request."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.root = os.getuid() == 0
        self.disable = set(cfg.get("disable", ()))
        self.plan: set[str] = set()
        self.ro_paths: list[str] = []
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
    devs = {d: os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC) for d in DEV_NODES if os.path.exists(f"/dev/{d}")}
    proc_fd = os.open("/proc", os.O_PATH | os.O_CLOEXEC)
    new = "/tmp"  # any existing folder: covered only inside our own mount namespace
    iso.mount("tmpfs", new, "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    for path, fd in sources.items():
        target = new + path
        os.makedirs(target, exist_ok=True)
        iso.mount(f"/proc/self/fd/{fd}", target, None, iso.MS_BIND | iso.MS_REC)
        iso.mount(None, target, None, iso.MS_BIND | iso.MS_REMOUNT | iso.MS_RDONLY | iso.MS_NOSUID | iso.MS_NODEV)
    os.makedirs(new + "/dev", exist_ok=True)
    for name, fd in devs.items():
        open(f"{new}/dev/{name}", "w").close()
        iso.mount(f"/proc/self/fd/{fd}", f"{new}/dev/{name}", None, iso.MS_BIND)
    for link, dest in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2"), ("shm", "/tmp")):
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


def _harden(ctx: Context, req: dict, plan: set[str], uid: int, scratch: str, strict: bool,
            errors: dict[str, str] | None = None) -> set[str]:
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

    def mount_ns() -> None:
        flags = iso.CLONE_NEWNS
        iso.unshare(flags)
        if "pid_ns" in plan:
            iso.mount("proc", "/proc", "proc", iso.MS_NOSUID | iso.MS_NODEV | iso.MS_NOEXEC)
        size = f"size={int(req['scratch_mb'])}m,nr_inodes={int(req['scratch_inodes'])},mode=1777"
        iso.mount("tmpfs", "/tmp", "tmpfs", iso.MS_NOSUID | iso.MS_NODEV, size)

    step("mount_ns", mount_ns)
    step("net_ns", lambda: iso.unshare(iso.CLONE_NEWNET))
    step("ipc_ns", lambda: iso.unshare(iso.CLONE_NEWIPC))

    def uts_ns() -> None:
        iso.unshare(iso.CLONE_NEWUTS)
        iso.sethostname("sandbox")

    step("uts_ns", uts_ns)

    def landlock_prepare() -> None:  # paths are opened now, while they are still reachable
        if "mount_ns" in plan:
            rules = [("/", iso.FS_READ_ONLY), ("/tmp", -1), ("/proc", iso.FS_READ_FILE | iso.FS_READ_DIR),
                     *((f"/dev/{d}", iso.FS_READ_FILE | iso.FS_WRITE_FILE) for d in DEV_NODES)]
        else:
            rules = [*((p, iso.FS_READ_ONLY) for p in ctx.ro_paths), (scratch, -1),
                     *((f"/dev/{d}", iso.FS_READ_FILE | iso.FS_WRITE_FILE) for d in DEV_NODES)]
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
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", write_through=True)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", write_through=True)
    sys.argv = ["-c"]
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
        if p.poll(0):  # the monitor already died (or wrote nothing: then this is just data)
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


# --- the per-execution monitor --------------------------------------------------------------------
def _kill_leftovers(ctx: Context, uid: int, pgid: int) -> None:
    """Without a pid namespace, kill whatever the execution left behind (orphans, daemons)."""
    if "pid_ns" in ctx.plan:
        return  # the kernel killed the namespace with its init
    if "unique_uid" in ctx.plan:
        pid = os.fork()
        if pid == 0:
            try:
                os.setresuid(uid, uid, uid)
                for _ in range(400):  # until no process of the uid is left (zombies: until reaped)
                    try:
                        os.kill(-1, signal.SIGKILL)
                    except ProcessLookupError:
                        break
                    time.sleep(0.005)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    else:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)


def _monitor(ctx: Context, req: dict, fds: list[int]) -> None:
    code_r, out_w, err_w, status_w, ctl_r = fds
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    plan = ctx.plan
    uid = UID_BASE + os.getpid() if "unique_uid" in plan else os.getuid()
    report: dict = {"event": "done", "exit_code": None, "signal": None, "timed_out": False,
                    "output_killed": False, "cancelled": False, "setup_error": None}
    scratch = "/tmp"
    report["t_monitor"] = time.monotonic()
    try:
        if "mount_ns" not in plan:
            scratch = tempfile.mkdtemp(prefix="ctpo-sandbox-", dir=ctx.cfg.get("scratch_base") or None)
            os.chown(scratch, uid, -1)
        if "pid_ns" in plan:
            iso.unshare(iso.CLONE_NEWPID)
        sp_m, sp_c = socket.socketpair()
        pid = os.fork()
        if pid == 0:
            sp_m.close()
            for fd, target in ((code_r, 0), (out_w, 1), (err_w, 2)):
                os.dup2(fd, target)
            spc = os.dup2(sp_c.detach(), 3)
            os.closerange(4, 1 << 20)
            _child(ctx, req, plan, uid, scratch, spc, strict=True)
        for fd in (code_r, out_w, err_w):
            os.close(fd)
        sp_c.close()
        report["t_forked"] = time.monotonic()
        _supervise(req, pid, sp_m, ctl_r, report)
        report["t_exited"] = time.monotonic()
        _kill_leftovers(ctx, uid, pid)
    except BaseException as e:
        report["setup_error"] = report["setup_error"] or f"monitor: {type(e).__name__}: {e}"
    finally:
        if scratch != "/tmp":
            shutil.rmtree(scratch, ignore_errors=True)
        try:
            os.write(status_w, (json.dumps(report) + "\n").encode())
        finally:
            os._exit(0)


def _supervise(req: dict, pid: int, sp_m: socket.socket, ctl_r: int, report: dict) -> None:
    pidfd = os.pidfd_open(pid)
    poll = select.poll()
    poll.register(pidfd, select.POLLIN)
    poll.register(ctl_r, select.POLLIN)
    poll.register(sp_m.fileno(), select.POLLIN)
    started = None
    deadline = time.monotonic() + SETUP_TIMEOUT_S
    setup_msg = b""
    exited = False
    while not exited:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            if started is None:
                report["setup_error"] = "sandbox setup did not finish in time"
            else:
                report["timed_out"] = True
            break
        for fd, _ev in poll.poll(left * 1000):
            if fd == pidfd:
                exited = True
            elif fd == ctl_r:
                why = os.read(ctl_r, 1)
                report["output_killed" if why == b"O" else "cancelled"] = True
                os.kill(pid, signal.SIGKILL)
                exited = True
            else:
                data = sp_m.recv(4096)
                if not data:
                    poll.unregister(sp_m.fileno())
                elif data.startswith(b"R") and started is None:
                    started = time.monotonic()
                    report["t_started"] = started
                    deadline = started + float(req["timeout_s"])
                else:
                    setup_msg += data
    _, status, ru = os.wait4(pid, 0)
    os.close(pidfd)
    if os.WIFSIGNALED(status):
        report["signal"] = os.WTERMSIG(status)
    else:
        report["exit_code"] = os.WEXITSTATUS(status)
    if started is None and not report["setup_error"]:
        report["setup_error"] = (setup_msg[1:] if setup_msg.startswith(b"E") else setup_msg).decode(
            "utf-8", "replace") or "sandbox child died during setup"
    report["cpu_s"] = round(ru.ru_utime + ru.ru_stime, 4)
    report["max_rss_mb"] = round(ru.ru_maxrss / 1024, 1)
    report["run_s"] = round(time.monotonic() - started, 4) if started else 0.0


# --- start-up probe and main loop -----------------------------------------------------------------
def _probe(ctx: Context, wanted: set[str]) -> set[str]:
    """Fork a throwaway child that tries every wanted step; return the ones that worked (and note
    why the others did not in ``ctx.notes``)."""
    req = {"timeout_s": 5, "memory_mb": 256, "max_procs": 16, "max_file_mb": 1, "max_open_files": 64,
           "scratch_mb": 1, "scratch_inodes": 64}
    got: set[str] = set()
    r, w = os.pipe()
    mpid = os.fork()
    if mpid == 0:
        os.close(r)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        res: set[str] = set()
        try:
            if "pid_ns" in wanted:
                try:
                    iso.unshare(iso.CLONE_NEWPID)
                    res.add("pid_ns")
                except OSError:
                    pass
            plan = wanted - {"pid_ns"} | res
            sp_m, sp_c = socket.socketpair()
            scratch = "/tmp" if "mount_ns" in plan else tempfile.mkdtemp(prefix="ctpo-probe-")
            uid = UID_BASE + os.getpid() if ctx.root else os.getuid()
            if scratch != "/tmp":
                os.chown(scratch, uid, -1)
            cpid = os.fork()
            if cpid == 0:
                sp_m.close()
                _child(ctx, req, plan, uid, scratch, sp_c.fileno(), strict=False)
            sp_c.close()
            os.waitpid(cpid, 0)
            data = sp_m.recv(1 << 16)
            if scratch != "/tmp":
                shutil.rmtree(scratch, ignore_errors=True)
            rep = json.loads(data.decode()) if data.startswith(b"{") else {"done": [], "errors": {
                "probe": data.decode("utf-8", "replace")}}
            rep["done"] = sorted(res | set(rep["done"]))
            os.write(w, json.dumps(rep).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 1 << 16):
        data += chunk
    os.close(r)
    os.waitpid(mpid, 0)
    if data:
        rep = json.loads(data.decode())
        got = set(rep["done"])
        ctx.notes += [f"{k}: {v}" for k, v in sorted(rep["errors"].items())]
    else:
        ctx.notes.append("the isolation probe died")
    return got


def _startup(sock: socket.socket) -> Context:
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
    ctx.seccomp_prog = iso.build_seccomp_filter(
        allow_unix_sockets={"mount_ns", "net_ns"} <= wanted, deny_session_change="pid_ns" not in wanted)
    ctx.plan = _probe(ctx, wanted)
    if ctx.plan != wanted:  # a step failed: rebuild the filter for what really holds
        ctx.seccomp_prog = iso.build_seccomp_filter(
            allow_unix_sockets={"mount_ns", "net_ns"} <= ctx.plan, deny_session_change="pid_ns" not in ctx.plan)
    hello = {"event": "ready", "plan": sorted(ctx.plan), "root": ctx.root, "landlock_abi": ctx.landlock_abi,
             "ro_paths": ctx.ro_paths, "preload_failed": failed, "base_vm_mb": ctx.base_vm_bytes >> 20,
             "notes": ctx.notes, "uid_base": UID_BASE if "unique_uid" in ctx.plan else None,
             "zygote_pid": os.getpid()}
    sock.sendall(json.dumps(hello).encode())
    return ctx


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C aimed at the caller is the caller's
    ctx = _startup(sock)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # monitors are reaped by the kernel
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 5)
        except OSError:
            return
        if not msg:
            return  # the pool closed its end
        try:
            req = json.loads(msg.decode())
            if len(fds) != 5:
                raise ValueError("expected 5 descriptors")
        except Exception:
            for fd in fds:
                os.close(fd)
            continue
        try:
            pid = os.fork()
        except OSError as e:
            os.write(fds[3], (json.dumps({"event": "done", "setup_error": f"fork: {e}"}) + "\n").encode())
            pid = -1
        if pid == 0:
            try:
                sock.close()
                for fd in fds:
                    os.set_inheritable(fd, False)
                _monitor(ctx, req, fds)
            finally:
                os._exit(0)
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    main()
