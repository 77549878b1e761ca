"""Linux isolation primitives for the sandbox, through ctypes and raw syscalls only.

Nothing here shells out or needs a package beyond the standard library: namespaces (``unshare``),
mounts and ``pivot_root``, capability dropping, ``PR_SET_NO_NEW_PRIVS``, Landlock (with ABI
detection) and a seccomp deny-list assembled as classic BPF in Python. The zygote
(``ctpo.tir._zygote``) strings these together; ``ctpo.tir.sandbox`` documents the threat model.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

# --- namespaces ---------------------------------------------------------------------------------
CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
ALL_NAMESPACE_FLAGS = (
    CLONE_NEWTIME
    | CLONE_NEWNS
    | CLONE_NEWCGROUP
    | CLONE_NEWUTS
    | CLONE_NEWIPC
    | CLONE_NEWUSER
    | CLONE_NEWPID
    | CLONE_NEWNET
)

# --- mount flags --------------------------------------------------------------------------------
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# --- prctl --------------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2


def _check(ret: int, what: str) -> int:
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(fd, nstype), f"setns({nstype:#x})")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def sethostname(name: str) -> None:
    b = name.encode()
    _check(_libc.sethostname(b, len(b)), "sethostname")


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(_libc.prctl(option, a2, a3, a4, a5), f"prctl({option})")


def _syscall(nr: int, *args) -> int:
    return _check(_libc.syscall(nr, *args), f"syscall({nr})")


# --- architecture tables (x86_64 and aarch64; other machines get no seccomp) ---------------------
_MACHINE = platform.machine()
_AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(_MACHINE)
_SYS = {
    "x86_64": dict(
        pivot_root=155,
        ptrace=101,
        process_vm_readv=310,
        process_vm_writev=311,
        kexec_load=246,
        kexec_file_load=320,
        init_module=175,
        finit_module=313,
        delete_module=176,
        reboot=169,
        swapon=167,
        swapoff=168,
        mount=165,
        umount2=166,
        chroot=161,
        unshare=272,
        setns=308,
        bpf=321,
        perf_event_open=298,
        keyctl=250,
        add_key=248,
        request_key=249,
        userfaultfd=323,
        acct=163,
        syslog=103,
        settimeofday=164,
        clock_settime=227,
        clock_adjtime=305,
        adjtimex=159,
        iopl=172,
        ioperm=173,
        quotactl=179,
        lookup_dcookie=212,
        open_by_handle_at=304,
        name_to_handle_at=303,
        fanotify_init=300,
        kcmp=312,
        pidfd_getfd=438,
        io_uring_setup=425,
        io_uring_enter=426,
        io_uring_register=427,
        open_tree=428,
        move_mount=429,
        fsopen=430,
        fsconfig=431,
        fsmount=432,
        fspick=433,
        mount_setattr=442,
        vhangup=153,
        uselib=134,
        nfsservctl=180,
        quotactl_fd=443,
        modify_ldt=154,
        clone=56,
        clone3=435,
        socket=41,
        setsid=112,
        setpgid=109,
    ),
    "aarch64": dict(
        pivot_root=41,
        ptrace=117,
        process_vm_readv=270,
        process_vm_writev=271,
        kexec_load=104,
        kexec_file_load=294,
        init_module=105,
        finit_module=273,
        delete_module=106,
        reboot=142,
        swapon=224,
        swapoff=225,
        mount=40,
        umount2=39,
        chroot=51,
        unshare=97,
        setns=268,
        bpf=280,
        perf_event_open=241,
        keyctl=219,
        add_key=217,
        request_key=218,
        userfaultfd=282,
        acct=89,
        syslog=116,
        settimeofday=170,
        clock_settime=112,
        clock_adjtime=266,
        adjtimex=171,
        quotactl=60,
        lookup_dcookie=18,
        open_by_handle_at=265,
        name_to_handle_at=264,
        fanotify_init=262,
        kcmp=272,
        pidfd_getfd=438,
        io_uring_setup=425,
        io_uring_enter=426,
        io_uring_register=427,
        open_tree=428,
        move_mount=429,
        fsopen=430,
        fsconfig=431,
        fsmount=432,
        fspick=433,
        mount_setattr=442,
        vhangup=58,
        quotactl_fd=443,
        clone=220,
        clone3=435,
        socket=198,
        setsid=157,
        setpgid=154,
    ),
}.get(_MACHINE, {})

# Syscalls that contained code never needs: kernel attack surface, other processes' memory,
# namespaces/mounts (escaping the layout), io_uring (bypasses seccomp per operation), keyrings.
SECCOMP_DENY = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare",
    "setns",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "acct",
    "syslog",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "quotactl",
    "quotactl_fd",
    "lookup_dcookie",
    "open_by_handle_at",
    "name_to_handle_at",
    "fanotify_init",
    "kcmp",
    "pidfd_getfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "vhangup",
    "uselib",
    "nfsservctl",
    "modify_ldt",
)

# --- seccomp: classic BPF assembled in Python, once per zygote ------------------------------------
_BPF_LD_W_ABS = 0x20
_BPF_JEQ = 0x15
_BPF_JGE = 0x35
_BPF_JSET = 0x45
_BPF_RET = 0x06
_RET_KILL_PROCESS = 0x80000000
_RET_ALLOW = 0x7FFF0000
_RET_ERRNO = 0x00050000
_AF_UNIX = 1


class _Asm:
    """A tiny classic-BPF assembler with forward labels (jump offsets are 8-bit)."""

    def __init__(self) -> None:
        self.ins: list[tuple[int, object, object, int]] = []
        self.labels: dict[str, int] = {}

    def ld(self, off: int) -> None:
        self.ins.append((_BPF_LD_W_ABS, 0, 0, off))

    def jump(self, code: int, k: int, jt: object = 0, jf: object = 0) -> None:
        self.ins.append((code, jt, jf, k))

    def ret(self, k: int) -> None:
        self.ins.append((_BPF_RET, 0, 0, k))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.ins)

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, jt, jf, k) in enumerate(self.ins):
            offs = []
            for j in (jt, jf):
                off = j if isinstance(j, int) else self.labels[j] - (i + 1)
                if not 0 <= off <= 255:
                    raise ValueError("seccomp filter jump out of range")
                offs.append(off)
            out += struct.pack("=HBBI", code, offs[0], offs[1], k & 0xFFFFFFFF)
        return bytes(out)


def build_seccomp_filter(*, allow_unix_sockets: bool, deny_session_change: bool) -> bytes | None:
    """Compile the deny-list filter to BPF bytes (``None`` on an unsupported architecture).

    Denied calls fail with EPERM (``clone3`` with ENOSYS so libc falls back to ``clone``, whose flags
    are checked: no new namespaces); ``socket`` is refused for every family except AF_UNIX, and for
    AF_UNIX too unless the execution has private mount and network namespaces.
    ``deny_session_change`` also refuses ``setsid``/``setpgid`` so that, without a pid namespace,
    the whole tree stays in one process group.
    """
    if _AUDIT_ARCH is None or not _SYS:
        return None
    eperm, enosys = _RET_ERRNO | errno.EPERM, _RET_ERRNO | errno.ENOSYS
    a = _Asm()
    a.ld(4)  # seccomp_data.arch
    a.jump(_BPF_JEQ, _AUDIT_ARCH, jt=1)
    a.ret(_RET_KILL_PROCESS)
    a.ld(0)  # seccomp_data.nr
    if _MACHINE == "x86_64":
        a.jump(_BPF_JGE, 0x40000000, jt="eperm")  # the x32 ABI
    deny = [n for n in SECCOMP_DENY if n in _SYS]
    if deny_session_change:
        deny += ["setsid", "setpgid"]
    for name in deny:
        a.jump(_BPF_JEQ, _SYS[name], jt="eperm")
    a.jump(_BPF_JEQ, _SYS["clone3"], jt="enosys")
    a.jump(_BPF_JEQ, _SYS["clone"], jt="clone")
    a.jump(_BPF_JEQ, _SYS["socket"], jt="socket")
    a.ret(_RET_ALLOW)
    a.label("clone")
    a.ld(16)  # low 32 bits of args[0] (little-endian): the clone flags
    a.jump(_BPF_JSET, ALL_NAMESPACE_FLAGS, jt="eperm")
    a.ret(_RET_ALLOW)
    a.label("socket")
    a.ld(16)  # domain
    if allow_unix_sockets:
        a.jump(_BPF_JEQ, _AF_UNIX, jt="allow")
    a.ret(_RET_ERRNO | errno.EACCES)
    a.label("allow")
    a.ret(_RET_ALLOW)
    a.label("eperm")
    a.ret(eperm)
    a.label("enosys")
    a.ret(enosys)
    return a.assemble()


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_seccomp(program: bytes) -> None:
    """Load a filter built by :func:`build_seccomp_filter` (needs no_new_privs or CAP_SYS_ADMIN)."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0), "seccomp")


# --- Landlock -----------------------------------------------------------------------------------
_SYS_LANDLOCK_CREATE_RULESET = 444
_SYS_LANDLOCK_ADD_RULE = 445
_SYS_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_TRUNCATE = 1 << 14
FS_IOCTL_DEV = 1 << 15
_FS_ABI1 = (1 << 13) - 1
FS_READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
_FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV
_NET_BIND_TCP = 1 << 0
_NET_CONNECT_TCP = 1 << 1
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
    if _MACHINE not in ("x86_64", "aarch64"):
        return 0
    ret = _libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(ret), 0)


def landlock_fs_rights(abi: int) -> int:
    rights = _FS_ABI1
    if abi >= 2:
        rights |= 1 << 13  # REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def landlock_ruleset(abi: int, rules: list[tuple[str, int]]) -> int:
    """Create a ruleset allowing only ``rules`` = [(path, rights)]; return its fd.

    Handles every filesystem right the ABI knows, TCP bind/connect (ABI >= 4: no rule, so all
    denied) and, from ABI 6, scopes signals and abstract unix sockets to the sandbox itself.
    Paths that do not exist are skipped. Build it before dropping privileges (the paths are opened
    now), enforce it with :func:`landlock_restrict_self`.
    """
    fs = landlock_fs_rights(abi)
    net = (_NET_BIND_TCP | _NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (_SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL) if abi >= 6 else 0
    attr = struct.pack("=QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    abuf = ctypes.create_string_buffer(attr, len(attr))
    fd = _syscall(_SYS_LANDLOCK_CREATE_RULESET, abuf, len(attr), 0)
    try:
        for path, rights in rules:
            try:
                pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                allowed = rights & fs
                if not os.path.isdir(path):
                    allowed &= _FS_FILE_RIGHTS
                rbuf = ctypes.create_string_buffer(struct.pack("=Qi", allowed, pfd), 12)
                _syscall(_SYS_LANDLOCK_ADD_RULE, fd, _LANDLOCK_RULE_PATH_BENEATH, rbuf, 0)
            finally:
                os.close(pfd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def landlock_restrict_self(ruleset_fd: int) -> None:
    """Enforce a ruleset on this process and its future children (needs no_new_privs)."""
    try:
        _syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset_fd, 0)
    finally:
        os.close(ruleset_fd)


# --- capabilities and credentials ----------------------------------------------------------------
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}.get(_MACHINE)
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_bounding_set() -> None:
    """Empty the capability bounding set (needs CAP_SETPCAP; a no-op when already empty)."""
    cap = 0
    while True:
        held = _libc.prctl(PR_CAPBSET_READ, cap, 0, 0, 0)
        if held < 0:
            break  # past the last capability this kernel knows
        if held and _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP({cap})")
        cap += 1


def drop_all_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable capability sets."""
    drop_bounding_set()
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if _SYS_CAPSET is None:
        raise OSError(errno.ENOSYS, "capset: unknown architecture")
    hdr = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)
    data = ctypes.create_string_buffer(bytes(24), 24)
    _syscall(_SYS_CAPSET, hdr, data)


def write_id_maps(uid: int, gid: int) -> None:
    """Identity-map our own uid/gid in a user namespace we just created (unprivileged rule)."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def set_hard_limits(limits: dict[int, int]) -> None:
    """Set soft = hard for each rlimit; lowering a hard limit cannot be undone without privilege."""
    for res, value in limits.items():
        resource.setrlimit(res, (value, value))
