"""Runs inside the sandbox's process (see sandbox.py): enters fresh Linux namespaces, moves into
a minimal root, sets limits, drops privileges, then runs the two processes of the judge
(judge.py): the solution process and the test process.

    python -I -S sandbox_init.py SPEC_JSON

Stdlib only, since it runs with -I -S. Steps:
1. unshare: a new mount, network, PID, IPC and UTS namespace (as root), or the same inside a
   new user namespace that maps this user to root (as any other user).
2. fork: the child is PID 1 of the new PID namespace, so when it ends, every process it left
   (a fork bomb) is killed by the kernel; this parent only waits, enforces the wall clock and
   relays the exit status.
3. in the child: read the job (the tests and the item's helpers) and load the judge (judge.py,
   plain.py) into memory, then a new root on an empty tmpfs holding only the interpreter's files (read-only
   binds of the paths the host lists), /dev/null, zero, random and urandom, an empty /tmp and
   /dev/shm, and a small tmpfs as the working directory /sandbox holding solution.py and the
   judge's two files; pivot_root into it and drop the old root, so the project's files, the tests, the
   benchmarks and /proc are out of sight.
4. the solution process: forked into a PID namespace of its own (it can name no other
   process), with only its two ends of the channel besides stdin, stdout and stderr; its own
   uid (as root), resource limits, no privileges, the seccomp filter below, then exec
   `python -s -B -c SOLUTION_MAIN NAME...` (judge.solution_main on descriptors 3 and 4). A fresh
   image: nothing of this process's memory (the tests) survives the exec.
5. the test process is this child itself, PID 1: not dumpable, another uid (as root), the same
   limits and filter; it runs the tests in this interpreter (judge.run_tests) and writes the
   verdict on the one descriptor that no other process holds.

Whole-program budget: where the host made a cgroup for the run (spec "cgroups"), this process
joins it first, before anything else, so everything it starts is inside: the kernel bounds the
memory and the processes of all of them together. Otherwise (spec "poll_memory") the waiting
parent polls every POLL_S seconds the anonymous resident memory (RssAnon; pages shared after a
fork count in each process) of the child and all its descendants and kills the sandbox when the
sum passes memory_mb, counting with it the most that the kernel buffers of their open pipes and
sockets can hold (each once), and setting aside up front room for the descriptors they may
have in flight (RLIMIT_NOFILE of them). That bound is a poll: it can overshoot by what the
program allocates between two polls; its files in /sandbox, /tmp and /dev/shm (tmpfs, each of a
fixed size) are bounded by their own sizes.

The seccomp filter (plain classic BPF, built here with struct) refuses with EPERM:
- the kernel keyrings (add_key, request_key, keyctl): a key outlives the program and a later
  program with the same uid could read it;
- socket() of any family but AF_INET and AF_INET6 (the network namespace is empty): so no
  AF_UNIX socket (seccomp cannot see the path in a sockaddr, so no connect or bind to any Unix
  socket of the host, not even one inside the program's own directory; multiprocessing's
  Manager and forkserver need one and so do not work), no AF_VSOCK, netlink, AF_ALG or packet
  sockets; socketpair() only as an AF_UNIX SOCK_STREAM pair (multiprocessing's pipes; a
  connected pair cannot be connected elsewhere), not SOCK_DGRAM or SOCK_SEQPACKET (a datagram
  socket could be connected to a host socket later);
- unshare() and clone() with any namespace flag (CLONE_NEWUSER above all), setns;
- other processes' memory: ptrace, process_vm_readv/writev, process_madvise, kcmp, pidfd_getfd;
- io_uring (its operations bypass seccomp), bpf, perf_event_open, userfaultfd;
- mounts and the root (mount, umount2, pivot_root, chroot, the new mount API), kernel modules,
  kexec, reboot, swap, acct, quotas, syslog, hostnames, open_by_handle_at, fanotify, and on
  x86_64 iopl, ioperm, modify_ldt and uselib (most need capabilities the program lacks:
  defense in depth);
- memfd_create, memfd_secret, SysV shmget and msgget: memory a process can hold without mapping
  it, which the fallback's poll would not see (POSIX shared memory lives in the small /dev/shm);
- larger kernel buffers: setsockopt SO_SNDBUF, SO_RCVBUF and their FORCE forms, fcntl
  F_SETPIPE_SZ; a socket keeps net.core.wmem_default and a pipe 16 pages, what the poll counts;
- on x86_64, every x32 syscall number.
clone3 gets ENOSYS, so glibc falls back to clone, whose flags the filter can read. A syscall
of another ABI (i386 on x86_64, arm32 on aarch64) kills the process. Only x86_64 and aarch64
have a table: elsewhere the filter cannot be made, setup fails and nothing runs.
"""
import ctypes
import json
import os
import resource
import select
import signal
import struct
import sys
import time

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 32, 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 24, 38
MNT_DETACH = 2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
# statvfs flag -> mount flag: a bind mount in a user namespace must keep these when remounted
LOCKED_FLAGS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC,
                os.ST_NOATIME: MS_NOATIME, os.ST_NODIRATIME: MS_NODIRATIME, os.ST_RELATIME: MS_RELATIME}
DEVICES = ("null", "zero", "random", "urandom")
WORKDIR = "/sandbox"
POLL_S = 0.02  # the fallback's memory poll
NOFILE = 64    # open files of each process
# the solution process's program: the judge's side of it, from the copies in its directory
SOLUTION_MAIN = "import sys; sys.path[:0] = ['/sandbox']; import judge; judge.solution_main(3, 4, sys.argv[1:])"

# seccomp: classic BPF over struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6]}
LD_ABS, JEQ, JSET, AND, RET = 0x20, 0x15, 0x45, 0x54, 0x06  # BPF_LD|W|ABS, JMP|JEQ|K, JMP|JSET|K, ALU|AND|K, RET|K
NR, ARCH, ARG0, ARG1, ARG2 = 0, 4, 16, 24, 32  # offsets; an arg's low 32 bits (little-endian): all the kernel reads of those checked
RET_ALLOW, RET_ERRNO, RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
SECCOMP_MODE_FILTER, X32_BIT = 2, 0x40000000
EPERM, ENOSYS = 1, 38
AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_STREAM, SOCK_NONBLOCK, SOCK_CLOEXEC = 1, 0o4000, 0o2000000
SOL_SOCKET, F_SETPIPE_SZ = 1, 1031
BUFFER_OPTIONS = (7, 8, 32, 33)  # SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE
CLONE_NEWCGROUP, CLONE_NEWTIME = 0x02000000, 0x80
NAMESPACES = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
# machine -> its AUDIT_ARCH_* and its column in SPECIAL and REFUSED
ARCHES = {"x86_64": (0xC000003E, 0), "aarch64": (0xC00000B7, 1)}
# name: (x86_64, aarch64) numbers; None where the arch has no such syscall
SPECIAL = {"socket": (41, 198), "socketpair": (53, 199), "unshare": (272, 97), "clone": (56, 220),
           "setsockopt": (54, 208), "fcntl": (72, 25),
           "clone3": (435, 435)}
REFUSED = {
    "add_key": (248, 217), "request_key": (249, 218), "keyctl": (250, 219),
    "setns": (308, 268), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "process_madvise": (440, 440), "kcmp": (312, 272),
    "pidfd_getfd": (438, 438), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "bpf": (321, 280), "perf_event_open": (298, 241),
    "userfaultfd": (323, 282), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433), "mount_setattr": (442, 442),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105),
    "finit_module": (313, 273), "delete_module": (176, 106), "reboot": (169, 142),
    "swapon": (167, 224), "swapoff": (168, 225), "acct": (163, 89), "quotactl": (179, 60),
    "quotactl_fd": (443, 443), "syslog": (103, 116), "sethostname": (170, 161),
    "setdomainname": (171, 162), "name_to_handle_at": (303, 264), "open_by_handle_at": (304, 265),
    "fanotify_init": (300, 262), "lookup_dcookie": (212, 18),
    "iopl": (172, None), "ioperm": (173, None), "modify_ldt": (154, None), "uselib": (134, None),
    # memory that no process maps, out of the fallback poll's sight
    "memfd_create": (319, 279), "memfd_secret": (447, 447), "shmget": (29, 194), "msgget": (68, 186),
}

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


def drop_privileges(as_root: bool, uid: int, workdir: str | None) -> None:
    if as_root:
        if workdir:
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


def syscall_filter(machine: str) -> bytes:
    """The seccomp program (see the docstring) for this machine's syscall table."""
    if machine not in ARCHES:
        raise OSError(ENOSYS, f"seccomp: no syscall table for {machine}")
    arch, column = ARCHES[machine]
    number = {name: nrs[column] for name, nrs in {**SPECIAL, **REFUSED}.items()}
    prog, labels = [], {}

    def emit(code: int, k: int = 0, yes: str = "", no: str = "") -> None:  # "": the next instruction
        prog.append((code, k, yes, no))
    emit(LD_ABS, ARCH)
    emit(JEQ, arch, no="kill")  # another ABI numbers its syscalls differently
    emit(LD_ABS, NR)
    if machine == "x86_64":
        emit(JSET, X32_BIT, yes="eperm")
    for name in REFUSED:
        if number[name] is not None:
            emit(JEQ, number[name], yes="eperm")
    emit(JEQ, number["clone3"], yes="enosys")  # its flags sit in memory, out of the filter's sight
    for name in ("socket", "socketpair", "unshare", "clone", "setsockopt", "fcntl"):
        emit(JEQ, number[name], yes=name)
    emit(RET, RET_ALLOW)
    labels["socket"] = len(prog)
    emit(LD_ABS, ARG0)
    emit(JEQ, AF_INET, yes="allow")
    emit(JEQ, AF_INET6, yes="allow", no="eperm")
    labels["socketpair"] = len(prog)
    emit(LD_ABS, ARG0)
    emit(JEQ, AF_UNIX, no="eperm")
    emit(LD_ABS, ARG1)
    emit(AND, ~(SOCK_NONBLOCK | SOCK_CLOEXEC) & 0xFFFFFFFF)
    emit(JEQ, SOCK_STREAM, yes="allow", no="eperm")
    labels["unshare"] = len(prog)
    emit(LD_ABS, ARG0)
    emit(JSET, NAMESPACES | CLONE_NEWTIME, yes="eperm", no="allow")
    labels["clone"] = len(prog)  # flags are arg 0 on x86_64 and aarch64
    emit(LD_ABS, ARG0)
    emit(JSET, NAMESPACES, yes="eperm", no="allow")
    labels["setsockopt"] = len(prog)  # no bigger socket buffers: kernel memory the poll cannot see
    emit(LD_ABS, ARG1)
    emit(JEQ, SOL_SOCKET, no="allow")
    emit(LD_ABS, ARG2)
    for option in BUFFER_OPTIONS:
        emit(JEQ, option, yes="eperm")
    emit(RET, RET_ALLOW)
    labels["fcntl"] = len(prog)  # no bigger pipes, likewise
    emit(LD_ABS, ARG1)
    emit(JEQ, F_SETPIPE_SZ, yes="eperm", no="allow")
    for name, value in (("allow", RET_ALLOW), ("eperm", RET_ERRNO | EPERM), ("enosys", RET_ERRNO | ENOSYS),
                        ("kill", RET_KILL_PROCESS)):
        labels[name] = len(prog)
        emit(RET, value)
    # jumps are forward offsets from the next instruction, at most 255 (struct refuses more)
    return b"".join(struct.pack("=HBBI", code, labels[yes] - i - 1 if yes else 0,
                                labels[no] - i - 1 if no else 0, k)
                    for i, (code, k, yes, no) in enumerate(prog))


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def install_filter() -> None:
    """Needs no_new_privs (drop_privileges); the filter stays through execve and every fork."""
    code = syscall_filter(os.uname().machine)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = SockFprog(len(code) // 8, ctypes.addressof(buf))
    check(libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog),
                     ctypes.c_ulong(0), ctypes.c_ulong(0)), "seccomp")


def set_limits(spec: dict) -> None:
    mb = 1 << 20
    for which, value in ((resource.RLIMIT_CPU, spec["cpu_s"]), (resource.RLIMIT_AS, spec["memory_mb"] * mb),
                         (resource.RLIMIT_NPROC, spec["processes"]), (resource.RLIMIT_FSIZE, spec["file_mb"] * mb),
                         (resource.RLIMIT_NOFILE, NOFILE), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(which, (value, value))


def load_judge(folder: str):
    """plain.py and judge.py as modules of this interpreter: the test process's code."""
    import importlib.util
    for name in ("plain", "judge"):  # judge imports plain
        module_spec = importlib.util.spec_from_file_location(name, os.path.join(folder, f"{name}.py"))
        sys.modules[name] = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(sys.modules[name])
    return sys.modules["judge"]


def child(spec: dict, report) -> None:
    files = {}  # the solution and the judge, carried into the new root
    for name in os.listdir(spec["workdir"]):
        with open(os.path.join(spec["workdir"], name), "rb") as f:
            files[name] = f.read()
    with open(spec["job"], encoding="utf-8") as f:
        job = json.load(f)  # the tests: in this process's memory only, never in the new root
    judge = load_judge(spec["judge"])
    build_root(spec["root"], spec["visible"], spec["disk_mb"])
    for name, data in files.items():
        with open(os.path.join(WORKDIR, name), "wb") as f:
            f.write(data)
    os.chdir(WORKDIR)
    os.setsid()  # its own process group: kill(0, ...) reaches nothing outside the sandbox
    to_solution = os.pipe()    # read: the solution's descriptor 3; write: the tests'
    from_solution = os.pipe()  # read: the tests'; write: the solution's descriptor 4
    check(libc.unshare(CLONE_NEWPID), "unshare the solution's PID namespace")
    pid = os.fork()
    if pid == 0:
        solution_process(spec, job, to_solution[0], from_solution[1])
    os.close(to_solution[0])
    os.close(from_solution[1])
    test_process(spec, job, judge, report, to_solution[1], from_solution[0])


def solution_process(spec: dict, job: dict, channel_in: int, channel_out: int) -> None:
    """Becomes the solution process: descriptors 0-2 and the channel as 3 and 4, nothing else."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    os.setsid()  # a session and process group of its own: kill(0, ...) reaches only its processes
    kept = (os.dup(channel_in), os.dup(channel_out))
    os.dup2(kept[0], 3)
    os.dup2(kept[1], 4)
    highest = os.sysconf("SC_OPEN_MAX")  # before RLIMIT_NOFILE lowers what it reports
    drop_privileges(spec["as_root"], spec["uid"], WORKDIR)
    set_limits(spec)
    install_filter()
    os.closerange(5, highest)  # the verdict pipe, the setup report, the tests' ends
    # The environment is entirely this one (so no -E): a fixed hash seed makes set and dict
    # orders, and so a program's output, the same in every run. -s: no user site-packages.
    env = {"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
    try:
        os.execve(spec["python"], [spec["python"], "-s", "-B", "-c", SOLUTION_MAIN, *job["calls"]], env)
    except OSError as e:  # the report is closed: the tests see the channel close and fail
        os.write(2, f"sandbox: cannot start the solution process: {e}\n".encode())
        os._exit(125)


def test_process(spec: dict, job: dict, judge, report, into: int, out: int) -> None:
    """This process becomes the test process: the tests, then the verdict, then the end of the
    sandbox (PID 1 ending ends every process in it)."""
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # no ptrace, no /proc/PID/mem, no core
    drop_privileges(spec["as_root"], spec["test_uid"], None)
    set_limits(spec)
    install_filter()
    report.close()
    verdict = judge.run_tests(job, into, out)
    os.write(spec["verdict_fd"], verdict.encode("utf-8", "replace")[:500] + b"\n")
    for stream in (sys.stdout, sys.stderr):  # the solution flushed its own before each answer
        stream.flush()
    os._exit(0)


def read_at(proc: int, path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY, dir_fd=proc)
    try:
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def memory_in_use(proc: int, pid: int, buffers: dict[str, int]) -> int:
    """Bytes the sandbox holds: the anonymous resident memory of `pid` and all its descendants,
    through the host's /proc opened as `proc` (orphans in the PID namespace are re-parented to
    `pid`, so this is every process of the sandbox), plus the most that the kernel buffers of
    its open pipes and sockets can hold (`buffers`: kind -> bytes; each counted once, however
    many processes share it)."""
    total, stack, page, objects = 0, [pid], os.sysconf("SC_PAGE_SIZE"), set()
    while stack:
        p = stack.pop()
        try:
            _, resident, shared = read_at(proc, f"{p}/statm").split()[:3]
            total += (int(resident) - int(shared)) * page
        except (OSError, ValueError):
            continue  # it has just ended
        try:  # (the test process is not dumpable: its descriptors, the judge's, are not listed)
            fds = os.open(f"{p}/fd", os.O_RDONLY | os.O_DIRECTORY, dir_fd=proc)
            try:
                objects.update(os.readlink(fd, dir_fd=fds) for fd in os.listdir(fds))  # pipe:[inode], ...
            finally:
                os.close(fds)
        except OSError:
            pass
        try:
            tasks = os.open(f"{p}/task", os.O_RDONLY | os.O_DIRECTORY, dir_fd=proc)
            try:
                tids = os.listdir(tasks)
            finally:
                os.close(tasks)
            for tid in tids:  # each thread has its own children
                stack.extend(int(c) for c in read_at(proc, f"{p}/task/{tid}/children").split())
        except (OSError, ValueError):
            pass
    return total + sum(buffers.get(o.split(":")[0], 0) for o in objects)


def kernel_buffers(proc: int) -> dict[str, int]:
    """The most one pipe and one socket can hold in kernel memory, as the filter leaves them
    (no larger buffer can be asked for): a pipe its default 16 pages; a socket's send queue
    net.core.wmem_default, which one more message can pass, so twice that (a connected
    stream pair is all a program can make: the receiving side is charged to the sender)."""
    try:
        wmem = int(read_at(proc, "sys/net/core/wmem_default"))
    except (OSError, ValueError):
        wmem = 212992
    return {"pipe": 16 * os.sysconf("SC_PAGE_SIZE"), "socket": 2 * wmem}


def wait_polling(pid: int, proc: int, spec: dict, report) -> int:
    """waitpid, checking the sandbox's memory every POLL_S seconds; over budget, kill it. The
    descriptors a process may have in flight (passed over a socket, in no process's table) are
    bounded by RLIMIT_NOFILE: their buffers are set aside from the budget up front."""
    try:
        pidfd = os.pidfd_open(pid)  # readable when the child ends: no wait for the next poll
    except (AttributeError, OSError):
        pidfd = None
    buffers = kernel_buffers(proc)
    budget = (spec["memory_mb"] << 20) - NOFILE * max(buffers.values())
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if memory_in_use(proc, pid, buffers) > budget:
            report.write(f"memory budget of {spec['memory_mb']} MB exceeded (polling)")
            report.flush()
            os.kill(pid, signal.SIGKILL)
            return os.waitpid(pid, 0)[1]
        if pidfd is None:
            time.sleep(POLL_S)
        else:
            select.select([pidfd], [], [], POLL_S)


def main() -> None:
    spec = json.loads(sys.argv[1])
    # Setup errors go to a file the program cannot reach (not inherited, and hidden by the
    # mounts), so a program cannot pass itself off as a broken sandbox.
    report = open(spec["error_file"], "w")
    try:
        for cgroup in spec["cgroups"]:  # first: everything started from here on is inside
            write(os.path.join(cgroup, "cgroup.procs"), str(os.getpid()))
        enter_namespaces(spec["as_root"])
    except OSError as e:
        report.write(f"cannot isolate: {e}")
        report.close()
        sys.exit(125)
    # the host's /proc, for the memory poll: the child's pivot_root hides it from this process too
    proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY) if spec["poll_memory"] else -1
    pid = os.fork()
    if pid != 0:
        for fd in spec["pass_fds"]:  # only the judge keeps these
            os.close(fd)
    if pid == 0:
        try:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if proc >= 0:
                os.close(proc)
            child(spec, report)
        except BaseException as e:  # noqa: BLE001 - reported, then a distinct exit code
            report.write(f"setup failed: {e}")
            report.close()
        os._exit(125)
    # The parent: wall clock. Killing PID 1 of the namespace kills everything inside it.
    timed_out = []

    def kill_child(signum, _frame) -> None:
        timed_out.append(signum)
        os.kill(pid, signal.SIGKILL)
    signal.signal(signal.SIGTERM, kill_child)
    signal.signal(signal.SIGALRM, kill_child)
    signal.setitimer(signal.ITIMER_REAL, spec["timeout_s"])
    status = wait_polling(pid, proc, spec, report) if proc >= 0 else os.waitpid(pid, 0)[1]
    report.close()
    if timed_out:
        sys.exit(124)
    sys.exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))

if __name__ == "__main__":
    main()
