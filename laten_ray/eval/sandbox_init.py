"""Runs inside the sandbox's process (see sandbox.py): enters fresh Linux namespaces, locks the
file system, sets limits, drops privileges, then execs `python -I main.py`.

    python -I -S sandbox_init.py SPEC_JSON

Stdlib only, since it runs with -I -S. Steps:
1. unshare: a new mount, network, PID, IPC and UTS namespace (as root), or the same inside a
   new user namespace that maps this user to root (as any other user).
2. fork: the child is PID 1 of the new PID namespace, so when it ends, every process it left
   (a fork bomb) is killed by the kernel; this parent only waits, enforces the wall clock and
   relays the exit status.
3. in the child: every mount read-only, empty tmpfs over /tmp, /var/tmp, /dev/shm and /run,
   a fresh /proc (only the sandbox's processes), a small tmpfs as the working directory,
   resource limits, then no privileges (an unprivileged uid as root, no capabilities otherwise).
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
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
HIDDEN = ("/tmp", "/var/tmp", "/dev/shm", "/run")  # writable places, replaced by empty tmpfs
OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}

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


def lock_file_system(workdir: str, disk_mb: int) -> None:
    mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates back out
    with open("/proc/self/mountinfo") as f:
        mounts = [(line.split()[4], line.split()[5]) for line in f]  # (mount point, options)
    for point, options in mounts:
        if point == "/proc" or point.startswith(("/proc/", "/sys/")) or point.startswith(HIDDEN):
            continue
        kept = sum(OPTION_FLAGS.get(o, 0) for o in options.split(","))  # locked flags must stay
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)
        except OSError:
            mount("none", point, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k")  # hide it
    for point in HIDDEN:
        if os.path.isdir(point):
            mount("none", point, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777")
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this PID namespace only
    os.makedirs(workdir, exist_ok=True)  # under a hidden /tmp it exists again only in here
    mount("none", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=0755")


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
    workdir = spec["workdir"]
    with open(os.path.join(workdir, "main.py"), "rb") as f:
        program = f.read()
    lock_file_system(workdir, spec["disk_mb"])
    with open(os.path.join(workdir, "main.py"), "wb") as f:
        f.write(program)
    os.chdir(workdir)
    os.setsid()  # its own process group: kill(0, ...) reaches nothing outside the sandbox
    drop_privileges(spec["as_root"], spec["uid"], workdir)
    set_limits(spec)
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONDONTWRITEBYTECODE": "1"}
    os.execve(spec["python"], [spec["python"], "-I", "main.py"], env)  # `report` closes on exec


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
