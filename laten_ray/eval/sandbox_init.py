"""Runs inside the sandbox's process (see sandbox.py): enters fresh Linux namespaces, moves into
a minimal root, sets limits, drops privileges, then execs `python -I judge.py`.

    python -I -S sandbox_init.py SPEC_JSON

Stdlib only, since it runs with -I -S. Steps:
1. unshare: a new mount, network, PID, IPC and UTS namespace (as root), or the same inside a
   new user namespace that maps this user to root (as any other user).
2. fork: the child is PID 1 of the new PID namespace, so when it ends, every process it left
   (a fork bomb) is killed by the kernel; this parent only waits, enforces the wall clock and
   relays the exit status.
3. in the child: a new root on an empty tmpfs holding only the interpreter's files (read-only
   binds of the paths the host lists), /dev/null, zero, random and urandom, an empty /tmp and
   /dev/shm, and a small tmpfs as the working directory /sandbox; pivot_root into it and drop
   the old root, so the project's files, the benchmarks and /proc are out of sight. Then resource
   limits, then no privileges (an unprivileged uid as root, no capabilities otherwise).
"""
import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
# statvfs flag -> mount flag: a bind mount in a user namespace must keep these when remounted
LOCKED_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
                os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}
DEVICES = ("null", "zero", "random", "urandom")
WORKDIR = "/sandbox"

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {target}")


def write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(as_root: bool) -> None:
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if as_root:
        check(libc.unshare(flags), "unshare")
        return
    uid, gid = os.getuid(), os.getgid()
    check(libc.unshare(flags | CLONE_NEWUSER), "unshare")
    write("/proc/self/setgroups", "deny")
    write("/proc/self/uid_map", f"0 {uid} 1")
    write("/proc/self/gid_map", f"0 {gid} 1")


def bind_read_only(source: str, target: str) -> None:
    mount(source, target, None, MS_BIND | MS_REC)
    kept = sum(ms for st, ms in LOCKED_FLAGS.items() if os.statvfs(source).f_flag & st)
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


def build_root(root: str, visible: list, disk_mb: int) -> None:
    """An empty tmpfs at `root` with read-only binds of `visible` (symlinks recreated), device
    nodes, /tmp, /dev/shm and the working directory; then pivot_root into it."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back out
    mount("none", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
    for path in visible:  # parents before children; a path inside a bound one is already there
        inside = root + path
        if os.path.islink(path):
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            if not os.path.lexists(inside):
                os.symlink(os.readlink(path), inside)
        elif os.path.isdir(path):
            if not os.path.isdir(inside):
                os.makedirs(inside)
                bind_read_only(path, inside)
        elif os.path.isfile(path) and not os.path.exists(inside):
            os.makedirs(os.path.dirname(inside), exist_ok=True)
            open(inside, "w").close()
            bind_read_only(path, inside)
    os.makedirs(root + "/dev")
    for name in DEVICES:
        open(f"{root}/dev/{name}", "w").close()
        mount(f"/dev/{name}", f"{root}/dev/{name}", None, MS_BIND)
    for point, size, mode in (("/tmp", 16, "1777"), ("/dev/shm", 16, "1777"), (WORKDIR, disk_mb, "0755")):
        os.makedirs(root + point, exist_ok=True)
        mount("none", root + point, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size}m,mode={mode}")
    os.chdir(root)
    check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b"."), "pivot_root")
    check(libc.umount2(b".", MNT_DETACH), "detach the old root")  # the old root was stacked below
    os.chdir("/")


def drop_privileges(as_root: bool, uid: int, workdir: str) -> None:
    if as_root:
        os.chown(workdir, uid, uid)
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)  # an ordinary user: RLIMIT_NPROC applies, other users' processes are safe
    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()                  # no effective, permitted or inheritable caps
    check(libc.capset(header, data), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")


def set_limits(spec: dict) -> None:
    mb = 1 << 20
    for which, value in ((resource.RLIMIT_CPU, spec["cpu_s"]), (resource.RLIMIT_AS, spec["memory_mb"] * mb),
                         (resource.RLIMIT_NPROC, spec["processes"]), (resource.RLIMIT_FSIZE, spec["file_mb"] * mb),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))


def child(spec: dict, report) -> None:
    files = {}  # the judge, its job, the solution and the tests, carried into the new root
    for name in os.listdir(spec["workdir"]):
        with open(os.path.join(spec["workdir"], name), "rb") as f:
            files[name] = f.read()
    build_root(spec["root"], spec["visible"], spec["disk_mb"])
    for name, data in files.items():
        with open(os.path.join(WORKDIR, name), "wb") as f:
            f.write(data)
    os.chdir(WORKDIR)
    os.setsid()  # its own process group: kill(0, ...) reaches nothing outside the sandbox
    drop_privileges(spec["as_root"], spec["uid"], WORKDIR)
    set_limits(spec)
    env = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1"}
    # `report` closes on exec; the secret and verdict pipes (inheritable) stay open for the judge
    os.execve(spec["python"], [spec["python"], "-I", "judge.py", *spec["judge_args"]], env)


def main() -> None:
    spec = json.loads(sys.argv[1])
    # Setup errors go to a file the program cannot reach (not inherited, and hidden by the
    # mounts), so a program cannot pass itself off as a broken sandbox.
    report = open(spec["error_file"], "w")
    try:
        enter_namespaces(spec["as_root"])
    except OSError as e:
        report.write(f"cannot isolate: {e}")
        report.close()
        sys.exit(125)
    pid = os.fork()
    if pid != 0:
        for fd in spec["pass_fds"]:  # only the judge keeps these
            os.close(fd)
    if pid == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            child(spec, report)
        except BaseException as e:  # noqa: BLE001 - reported, then a distinct exit code
            report.write(f"setup failed: {e}")
            report.close()
        os._exit(125)
    report.close()
    # The parent: wall clock. Killing PID 1 of the namespace kills everything inside it.
    timed_out = []

    def kill_child(signum, _frame) -> None:
        timed_out.append(signum)
        os.kill(pid, signal.SIGKILL)
    signal.signal(signal.SIGTERM, kill_child)
    signal.signal(signal.SIGALRM, kill_child)
    signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
    _, status = os.waitpid(pid, 0)
    if timed_out:
        sys.exit(124)
    sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

if __name__ == "__main__":
    main()
