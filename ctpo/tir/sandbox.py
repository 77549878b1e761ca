"""Isolated, fast execution of model-written Python (the TIR tool).

```python
from ctpo.tir.sandbox import SandboxPool, run_code
r = run_code("print(1+1)", timeout_s=5.0, memory_mb=1024)      # one-off (a shared default pool)
with SandboxPool(workers=2) as pool:
    pool.isolation.to_dict()                                      # what is enforced: log it to MLflow
    results = pool.map(codes, timeout_s=5.0)                      # also pool.run(code)
```

Threat model
------------
The code comes from a policy being optimised for reward. Assume it will, by accident or by
search, read files, open sockets, fork, allocate without bound, print forever, inspect or kill its
parent and other executions, and try to leave processes behind. It is *not* assumed to carry a
kernel exploit: the kernel is the trusted base, and the layers below shrink the surface it exposes
(a seccomp deny-list, no capabilities, Landlock) rather than replace a VM. What an execution can
reach (full isolation):

* **processes** — pid 1 of its own pid namespace: the caller, the zygote, the server and other
  executions do not exist for it (no pids to signal or ``ptrace``; its own ``/proc``, mounted with
  ``subset=pid`` where the kernel allows: no ``/proc/sys``, ``kcore``, ``sysrq-trigger``). When it
  exits or is killed, the kernel kills everything left in the namespace (orphans, daemons,
  threads). A unique unprivileged host uid per execution (``>= 1000000000``; never host root)
  plus ``RLIMIT_NPROC`` bounds fork bombs; ``PR_SET_PDEATHSIG`` ties it to the server.
* **files** — a private mount namespace whose root is a read-only tmpfs holding read-only binds of
  what Python needs (the stdlib, site-packages, the folders of mapped shared libraries) and
  ``/dev/{null,zero,full,random,urandom}``. Not the caller's cwd, not the project, not ``/etc``.
  The only writable place is ``/tmp``: a per-execution tmpfs capped in bytes and inodes, gone when
  the execution ends. Landlock repeats the rule inside the kernel's LSM layer.
* **network** — an empty network namespace (not even loopback is up), Landlock TCP rules (ABI ≥ 4)
  and seccomp allowing ``socket()`` for AF_UNIX only (which, in a private mount and network
  namespace, reaches nothing of the host). Landlock scoping (ABI ≥ 6) also blocks abstract unix
  sockets and signals across the sandbox boundary.
* **privilege** — private user namespace, every capability dropped (bounding set included),
  ``PR_SET_NO_NEW_PRIVS``, seccomp deny-list (ptrace, process_vm_*, mount, unshare/setns,
  namespace-creating clone flags, bpf, perf, keyrings, io_uring, kexec, modules, ...). IPC and UTS
  namespaces are private, so executions share no SysV IPC, abstract socket or hostname either.
* **resources** — wall clock (enforced by the server outside the sandbox: SIGKILL of the
  namespace's init), ``RLIMIT_CPU``, ``RLIMIT_AS`` (``memory_mb`` beyond the preloaded interpreter),
  ``RLIMIT_NPROC``, ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``, ``RLIMIT_CORE = 0``; set as hard limits, so
  they cannot be raised from inside. Output is read while it streams: ``max_output_bytes`` are kept
  (head and tail), past ``kill_output_bytes`` the execution is killed (status ``output_limit``).
* **secrets** — the zygote is started with an empty environment (``/proc/self/environ`` is empty
  too), never sees a request's code, and forks each execution from that clean template, so an
  execution cannot find the caller's environment, memory, or other executions' code. No file
  descriptor is inherited beyond its stdin/stdout/stderr pipes.

Tiers
-----
At start-up the zygote probes each layer (in a throwaway child) and ``pool.isolation`` says what
holds. ``tier == "full"`` means every layer above. Anything less (an old kernel without Landlock,
a container that forbids new namespaces, a non-root run where no distinct uid exists — the last is
recorded but does not lower the tier, because the user namespace plus the pid namespace already
separate the execution from the caller) is ``"weaker"``: ``SandboxPool`` then refuses to start
with :class:`SandboxIsolationError` naming what is missing, unless the caller passes
``allow_weaker_isolation=True``; it then warns (``warnings.warn`` and the log) and sets
``isolation.weaker_allowed``. The weakest tier (no namespaces at all) still applies Landlock (the
Python installation read-only, a per-execution scratch folder under the host's temp dir
read-write, nothing else, ``/proc`` included), seccomp (which then also denies ``setsid``/``setpgid``
and every ``socket()``), rlimits and, as root, a distinct uid; the server kills leftover processes
by uid (or process group) and removes the scratch folder. It cannot cap the scratch folder's total
size (only each file's), and a distinct uid must be able to read the Python installation (not so
for one under ``/root``: lazy imports then fail). Record ``pool.isolation.to_dict()`` with each run.

How it is fast
--------------
One zygote per pool imports sympy/numpy/... once and runs a short warm-up (first-call caches, lazy
imports), freezes its objects out of the garbage collector, and builds the read-only root and the
seccomp filter once. An execution is then one ``fork`` of that template (into a fresh pid
namespace) plus ~40 syscalls of hardening: milliseconds instead of a fresh interpreter's import
time. One event loop in the server supervises all executions; each in-flight execution is served
by one caller thread reading its pipes; ``workers`` executions run at a time.

Semantics to know
-----------------
The code runs as ``python -c`` would (``__name__ == "__main__"``, exit status from ``sys.exit``,
traceback on stderr, non-daemon threads joined at exit), with unbuffered stdout/stderr so that
output printed before a timeout is kept. It is pid 1 of its namespace: like any init it ignores
signals it sends itself whose action is the default (``os.kill(os.getpid(), SIGTERM)``), while
faults (a segfault) and the limits still end it. Orphans are re-parented to it, and when it exits
everything else in the namespace is killed. There are no executables (no shell) inside.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

STATUSES = ("ok", "error", "timeout", "memory", "killed", "output_limit")
MAX_WORKERS = 512  # concurrent executions per pool (each gets its own uid slot)
DEFAULT_PRELOAD = (
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "random",
    "statistics",
    "re",
    "string",
    "json",
    "heapq",
    "bisect",
    "operator",
    "numpy",
    "sympy",
)
# Run once in the zygote (trusted code, never a request's): sympy imports some modules and fills
# caches on first use, which every forked child would otherwise redo (~0.1 s for a first solve()).
DEFAULT_WARMUP = """
import sympy as sp
x, y = sp.symbols('x y')
sp.solve(x**2 - 5*x + 6, x); sp.solve([x + y - 3, x - y - 1], [x, y]); sp.factor(x**4 - 1)
sp.simplify(sp.sin(x)**2 + sp.cos(x)**2); sp.expand((x + 1)**5); sp.diff(sp.exp(x) * x, x)
sp.integrate(x**2, (x, 0, 1)); sp.Rational(3, 7) + sp.Rational(2, 5); sp.nsimplify(0.5); sp.isprime(97)
sp.N(sp.pi, 20); sp.Matrix([[1, 2], [3, 4]]).det(); sp.binomial(10, 3); sp.factorint(360); sp.gcd(12, 18)
sp.latex(sp.sqrt(x) / 2); sp.sympify('x**2 + 1')
import numpy as np
np.linalg.solve(np.eye(2), np.ones(2)); np.arange(10).sum()
"""
# Layers that make up "full" isolation, in the words ``pool.isolation.missing`` uses.
FULL = (
    "user_ns",
    "pid_ns",
    "mount_ns",
    "net_ns",
    "ipc_ns",
    "uts_ns",
    "drop_caps",
    "no_new_privs",
    "rlimits",
    "landlock",
    "seccomp",
)
_DESCRIBE = {
    "user_ns": "a user namespace",
    "pid_ns": "a pid namespace",
    "mount_ns": "a private mount namespace (read-only root, size-capped /tmp)",
    "net_ns": "a network namespace",
    "ipc_ns": "an IPC namespace",
    "uts_ns": "a UTS namespace",
    "drop_caps": "dropping capabilities",
    "no_new_privs": "PR_SET_NO_NEW_PRIVS",
    "rlimits": "resource limits",
    "landlock": "Landlock",
    "seccomp": "a seccomp filter",
    "unique_uid": "a distinct unprivileged uid",
}


class SandboxIsolationError(RuntimeError):
    """The kernel does not allow full isolation and weaker isolation was not explicitly allowed."""


class SandboxError(RuntimeError):
    """The sandbox server could not be started."""


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """The outcome of one execution.

    ``status``: ``ok`` (exit 0), ``error`` (non-zero exit, uncaught exception: the traceback's tail is
    in ``stderr``), ``timeout`` (wall clock or CPU time), ``memory`` (MemoryError / allocation
    failure under ``memory_mb``), ``killed`` (ended by a signal), ``output_limit`` (printed more than
    ``kill_output_bytes``). ``stdout``/``stderr`` are ``str`` with undecodable bytes replaced, at most
    ``max_output_bytes`` each (head and tail kept; ``truncated`` says bytes were dropped).
    ``exit_code`` is the process's exit status, ``-signum`` when a signal ended it.
    """

    status: str
    stdout: str
    stderr: str
    exit_code: int | None
    duration_s: float
    truncated: bool = False
    cpu_s: float = 0.0
    max_rss_mb: float = 0.0
    output_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What a pool enforces, detected at start-up. ``to_dict()`` is flat and JSON/MLflow friendly."""

    tier: str  # "full" or "weaker"
    layers: tuple[str, ...]  # the layers that hold (names as in ``FULL`` plus ``unique_uid``)
    missing: tuple[str, ...]  # layers of ``FULL`` that do not
    unique_uid: bool  # each execution runs as its own unprivileged host uid (root only)
    landlock_abi: int
    weaker_allowed: bool
    kernel: str
    running_as_root: bool
    ro_paths: tuple[str, ...]  # host paths visible read-only inside the sandbox
    preload_failed: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = {
            f"sandbox/{k}": v
            for k, v in dataclasses.asdict(self).items()
            if k not in ("layers", "missing", "ro_paths", "notes", "preload_failed")
        }
        d["sandbox/layers"] = ",".join(self.layers)
        d["sandbox/missing"] = ",".join(self.missing) or "none"
        d["sandbox/ro_paths"] = ",".join(self.ro_paths)
        d["sandbox/preload_failed"] = ",".join(self.preload_failed) or "none"
        return d

    def describe_missing(self) -> str:
        return ", ".join(_DESCRIBE.get(m, m) for m in self.missing)


@dataclasses.dataclass(frozen=True)
class _Limits:
    timeout_s: float
    memory_mb: int
    max_procs: int
    max_file_mb: int
    max_open_files: int
    scratch_mb: int
    scratch_inodes: int


# ``-I``: no PYTHON* variables, no user site, no cwd on sys.path. ctpo's own folder goes last on the
# path only so that an uninstalled checkout works too.
_BOOT = "import sys; sys.path.append(sys.argv[2]); from ctpo.tir._zygote import main; main()"
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Zygote:
    """The fork-server process and the control socket to it."""

    def __init__(self, cfg: dict, start_timeout_s: float) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = parent
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, str(child.fileno()), _PACKAGE_PARENT],
                env={},
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(child.fileno(),),
                start_new_session=True,
            )
        finally:
            child.close()
        self._stderr_tail: list[bytes] = []
        threading.Thread(target=self._drain_stderr, daemon=True, name="sandbox-zygote-stderr").start()
        self.sock.settimeout(start_timeout_s)
        try:
            self.sock.sendall(json.dumps(cfg).encode())
            msg = self.sock.recv(1 << 20)
        except OSError:
            msg = b""
        self.sock.settimeout(None)
        if not msg:
            self.kill()
            tail = b"".join(self._stderr_tail).decode("utf-8", "replace")[-2000:]
            raise SandboxError(f"the sandbox server did not start (exit {self.proc.poll()}): {tail}")
        self.hello = json.loads(msg.decode())

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr_tail = [*self._stderr_tail[-20:], line]
            log.warning("sandbox zygote: %s", line.decode("utf-8", "replace").rstrip())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)


class SandboxPool:
    """A zygote plus up to ``workers`` concurrent executions; thread-safe; use as a context manager.

    Args:
        workers: executions in flight at once (each one CPU-bound child; match the cores you give it).
        timeout_s / memory_mb: defaults for :meth:`run`/:meth:`map` (wall clock; address space beyond
            the preloaded interpreter).
        max_output_bytes: bytes of stdout and of stderr returned (head and tail kept).
        kill_output_bytes: total output after which the execution is killed (``output_limit``).
        max_procs, max_file_mb, max_open_files: RLIMIT_NPROC / RLIMIT_FSIZE / RLIMIT_NOFILE.
        scratch_mb, scratch_inodes: size of the private writable ``/tmp``.
        preload: modules the zygote imports once (missing ones are listed in ``isolation``).
        warmup: trusted code the zygote runs once after the imports to prime lazy imports and caches
            (the default exercises common sympy/numpy calls); ``None`` to skip.
        allow_weaker_isolation: run even when the kernel does not allow full isolation (warns and
            records ``weaker_allowed`` in ``isolation``). Without it such a pool refuses to start.
        disable: isolation layers to leave out on purpose (names as in ``FULL``), to test the weaker
            tiers; needs ``allow_weaker_isolation=True``.
    """

    def __init__(
        self,
        workers: int = 2,
        *,
        timeout_s: float = 5.0,
        memory_mb: int = 1024,
        max_output_bytes: int = 8192,
        kill_output_bytes: int = 1 << 20,
        max_procs: int = 64,
        max_file_mb: int = 16,
        max_open_files: int = 256,
        scratch_mb: int = 64,
        scratch_inodes: int = 4096,
        preload: Sequence[str] = DEFAULT_PRELOAD,
        warmup: str | None = DEFAULT_WARMUP,
        allow_weaker_isolation: bool = False,
        disable: Iterable[str] = (),
        start_timeout_s: float = 120.0,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in 1..{MAX_WORKERS}, got {workers}")
        unknown = set(disable) - {*FULL, "unique_uid"}
        if unknown:
            raise ValueError(
                f"unknown isolation layers in disable: {sorted(unknown)}; known: {[*FULL, 'unique_uid']}"
            )
        if sys.platform != "linux":
            raise SandboxIsolationError(f"the sandbox needs Linux, this is {sys.platform}")
        self.workers = workers
        self.defaults = _Limits(
            timeout_s, memory_mb, max_procs, max_file_mb, max_open_files, scratch_mb, scratch_inodes
        )
        self.max_output_bytes = max_output_bytes
        self.kill_output_bytes = kill_output_bytes
        self.allow_weaker_isolation = allow_weaker_isolation
        self._cfg = {"preload": list(preload), "warmup": warmup or "", "disable": sorted(set(disable))}
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # guards the zygote handle and the control socket
        self._slots = threading.BoundedSemaphore(workers)
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._pid = os.getpid()
        self.restarts = 0
        self._zygote = self._start_zygote()
        self.isolation = self._check_isolation(self._zygote.hello)

    # --- start-up and isolation check -----------------------------------------------------------
    def _start_zygote(self) -> _Zygote:
        return _Zygote(self._cfg, self._start_timeout_s)

    def _check_isolation(self, hello: dict) -> Isolation:
        layers = tuple(hello["plan"])
        missing = tuple(m for m in FULL if m not in layers)
        iso = Isolation(
            tier="full" if not missing else "weaker",
            layers=layers,
            missing=missing,
            unique_uid="unique_uid" in layers,
            landlock_abi=int(hello["landlock_abi"]),
            weaker_allowed=bool(missing) and self.allow_weaker_isolation,
            kernel=platform.release(),
            running_as_root=bool(hello["root"]),
            ro_paths=tuple(hello["ro_paths"]),
            preload_failed=tuple(hello["preload_failed"]),
            notes=tuple(hello["notes"]),
        )
        if hello["root"] and not iso.unique_uid and "unique_uid" not in self._cfg["disable"]:
            missing = (*missing, "unique_uid")
            iso = dataclasses.replace(
                iso, tier="weaker", missing=missing, weaker_allowed=self.allow_weaker_isolation
            )
        if iso.missing:
            msg = (
                f"sandbox isolation is weaker than full on this machine (kernel {iso.kernel}): missing "
                f"{iso.describe_missing()}"
            )
            if iso.notes:
                msg += f" ({'; '.join(iso.notes)})"
            if not self.allow_weaker_isolation:
                self._zygote.kill()
                raise SandboxIsolationError(
                    f"{msg}. Refusing to run model-written code like this. Run on a host that allows "
                    "these (not inside an unprivileged container), or pass allow_weaker_isolation=True "
                    "to SandboxPool to accept the weaker tier (it is then recorded in pool.isolation)."
                )
            warnings.warn(
                msg + "; running anyway because allow_weaker_isolation=True", RuntimeWarning, stacklevel=3
            )
            log.warning("%s; running anyway because allow_weaker_isolation=True", msg)
        if iso.preload_failed:
            log.info("sandbox: modules not preloaded: %s", "; ".join(iso.preload_failed))
        return iso

    # --- public API -----------------------------------------------------------------------------
    def run(self, code: str, timeout_s: float | None = None, memory_mb: int | None = None) -> ExecResult:
        """Run one snippet; blocks while ``workers`` executions are already in flight."""
        if self._closed:
            raise RuntimeError("SandboxPool is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("a SandboxPool cannot be used from a forked child; create one there")
        limits = dataclasses.replace(
            self.defaults,
            timeout_s=self.defaults.timeout_s if timeout_s is None else float(timeout_s),
            memory_mb=self.defaults.memory_mb if memory_mb is None else int(memory_mb),
        )
        if limits.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {limits.timeout_s}")
        if limits.memory_mb < 16:
            raise ValueError(
                f"memory_mb must be >= 16 (MB of address space beyond the preloaded interpreter), "
                f"got {limits.memory_mb}"
            )
        with self._slots:
            for _ in range(3):
                res, zygote = self._execute(code, limits)
                if res is not None:
                    return res
                self._respawn(zygote)
        raise SandboxError("the sandbox server keeps dying; giving up")

    def map(
        self, codes: Iterable[str], timeout_s: float | None = None, memory_mb: int | None = None
    ) -> list[ExecResult]:
        """Run many snippets, ``workers`` at a time; results in input order."""
        codes = list(codes)
        if not codes:
            return []
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="sandbox")
            ex = self._executor
        return list(ex.map(lambda c: self.run(c, timeout_s, memory_mb), codes))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._lock:
            self._zygote.kill()

    def __enter__(self) -> SandboxPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._closed and os.getpid() == self._pid:
                self._zygote.kill()

    @property
    def zygote_pid(self) -> int:
        return self._zygote.proc.pid

    # --- one execution ---------------------------------------------------------------------------
    def _respawn(self, failed: _Zygote) -> None:
        """Replace the zygote ``failed`` if it is dead and still the current one (threads race here)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("SandboxPool is closed")
            if failed is not self._zygote or failed.alive():
                return
            log.warning("sandbox: the zygote died (exit %s); starting a new one", failed.proc.poll())
            failed.kill()
            self._zygote = self._start_zygote()
            self.restarts += 1
            new = self._check_isolation(self._zygote.hello)
            if new.layers != self.isolation.layers:
                log.warning(
                    "sandbox: the restarted zygote enforces %s (was %s)", new.layers, self.isolation.layers
                )
                self.isolation = new

    def _execute(self, code: str, lim: _Limits) -> tuple[ExecResult | None, _Zygote]:
        """One execution; ``None`` when the zygote died before reporting (then retry on a new one)."""
        t0 = time.monotonic()
        code_r, code_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        ctl_r, ctl_w = os.pipe()
        req = dataclasses.asdict(lim)
        fds = {"code": code_w, "out": out_r, "err": err_r, "status": st_r, "ctl": ctl_w}
        zygote = self._zygote
        try:
            try:
                with self._lock:
                    zygote = self._zygote
                    socket.send_fds(
                        zygote.sock, [json.dumps(req).encode()], [code_r, out_w, err_w, st_w, ctl_r]
                    )
            except OSError:
                return None, zygote
            finally:
                for fd in (code_r, out_w, err_w, st_w, ctl_r):
                    os.close(fd)
            return self._stream(code, fds, lim, t0, zygote), zygote
        finally:
            for fd in fds.values():  # each closed exactly once: fd numbers are reused across threads
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _stream(
        self, code: str, fds: dict[str, int], lim: _Limits, t0: float, zygote: _Zygote
    ) -> ExecResult | None:
        import selectors

        code_w, out_r, err_r, st_r = fds["code"], fds["out"], fds["err"], fds["status"]

        # The code goes straight to the child's stdin (never through the zygote). A write blocks
        # until the child reads, which it does as soon as it is hardened; it exits on a broken pipe.
        with contextlib.suppress(BrokenPipeError):
            data = code.encode("utf-8", "surrogatepass")
            view = memoryview(data)
            while view:
                n = os.write(code_w, view[: 1 << 16])
                view = view[n:]
        os.close(fds.pop("code"))
        out, err = _Capture(self.max_output_bytes), _Capture(self.max_output_bytes)
        status_buf = b""
        sel = selectors.DefaultSelector()
        for fd, what in ((out_r, out), (err_r, err), (st_r, None)):
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ, what)
        open_fds = 3
        output_killed = False
        backstop = t0 + lim.timeout_s + 30.0  # the server enforces the real limit; this guards the server
        while open_fds:
            left = backstop - time.monotonic()
            if left <= 0:
                log.error(
                    "sandbox: no report from the sandbox server %.0fs past the deadline; cancelling", 30.0
                )
                os.close(fds.pop("ctl"))
                break
            for key, _ in sel.select(timeout=min(left, 1.0)):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    open_fds -= 1
                    continue
                if key.data is None:
                    status_buf += chunk
                    continue
                key.data.add(chunk)
                if not output_killed and out.total + err.total > self.kill_output_bytes:
                    output_killed = True
                    with contextlib.suppress(OSError):
                        os.write(fds["ctl"], b"O")
        sel.close()
        reports = [
            json.loads(line) for line in status_buf.decode("utf-8", "replace").splitlines() if line.strip()
        ]
        report = reports[-1] if reports else None
        duration = time.monotonic() - t0
        if report is None:
            # The server died with this execution in flight (killed from outside): the execution
            # died with it, so run it again on a new zygote.
            with contextlib.suppress(subprocess.TimeoutExpired):
                zygote.proc.wait(timeout=2)
            if not zygote.alive():
                return None
            report = {
                "exit_code": None,
                "signal": signal.SIGKILL,
                "setup_error": "no report from the sandbox server",
            }
        return _result(report, out, err, duration, output_killed)


def pool_from_config(config: Mapping[str, Any]) -> SandboxPool:
    """A study's pool: its config's ``sandbox:`` section as `SandboxPool` keyword arguments (2 workers
    unless it says otherwise), the same for the warm-up, training, evaluation and the probe."""
    return SandboxPool(**{"workers": 2, **(config.get("sandbox") or {})})


class _Capture:
    """Keeps the first and last ``cap // 2`` bytes of a stream and counts the rest."""

    def __init__(self, cap: int) -> None:
        self.cap, self.total = cap, 0
        self.head = bytearray()
        self.tail = bytearray()

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap // 2 - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        if chunk:
            self.tail += chunk
            keep = self.cap - self.cap // 2
            if len(self.tail) > keep:
                del self.tail[: len(self.tail) - keep]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head) + len(self.tail)

    def text(self) -> str:
        if not self.truncated:
            return (self.head + self.tail).decode("utf-8", "replace")
        dropped = self.total - len(self.head) - len(self.tail)
        return (
            self.head.decode("utf-8", "replace")
            + f"\n... [{dropped} bytes truncated] ...\n"
            + self.tail.decode("utf-8", "replace")
        )


def _result(report: dict, out: _Capture, err: _Capture, duration: float, output_killed: bool) -> ExecResult:
    stderr = err.text()
    sig, code = report.get("signal"), report.get("exit_code")
    exit_code = -sig if sig else code
    last_err = stderr.rstrip().rsplit("\n", 1)[-1]
    if report.get("setup_error"):
        status, stderr = "error", (stderr + f"\n[sandbox] setup failed: {report['setup_error']}").lstrip()
    elif output_killed or report.get("output_killed"):
        status = "output_limit"
    elif report.get("timed_out") or sig == signal.SIGXCPU:
        status = "timeout"
    elif (code or sig) and ("MemoryError" in last_err or (sig and "MemoryError" in stderr[-4000:])):
        status = "memory"
    elif sig:
        status = "killed"
    elif code:
        status = "error"
    else:
        status = "ok"
    return ExecResult(
        status=status,
        stdout=out.text(),
        stderr=stderr,
        exit_code=exit_code,
        duration_s=round(duration, 6),
        truncated=out.truncated or err.truncated,
        cpu_s=float(report.get("cpu_s", 0.0)),
        max_rss_mb=float(report.get("max_rss_mb", 0.0)),
        output_bytes=out.total + err.total,
    )


# --- one-off convenience -------------------------------------------------------------------------
_default_pools: dict[bool, SandboxPool] = {}
_default_lock = threading.Lock()


def run_code(
    code: str, timeout_s: float = 5.0, memory_mb: int = 1024, *, allow_weaker_isolation: bool = False
) -> ExecResult:
    """Run one snippet in a process-wide shared pool (started on first use, closed at exit)."""
    with _default_lock:
        pool = _default_pools.get(allow_weaker_isolation)
        if pool is None or pool._closed or pool._pid != os.getpid():
            pool = SandboxPool(
                workers=max(1, min(4, os.cpu_count() or 1)), allow_weaker_isolation=allow_weaker_isolation
            )
            _default_pools[allow_weaker_isolation] = pool
    return pool.run(code, timeout_s=timeout_s, memory_mb=memory_mb)


@atexit.register
def _close_default_pools() -> None:
    for pool in _default_pools.values():
        with contextlib.suppress(Exception):
            if pool._pid == os.getpid():
                pool.close()
