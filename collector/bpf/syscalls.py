"""Family "syscalls" (syscalls.c): syscalls, failed syscalls, time in syscalls, bytes read/written, and
syscalls by class (descriptors, read/write, memory mapping, synchronisation, processes, network, time, other)."""

from __future__ import annotations

import platform

from .family import Family

# Syscall numbers of the read and write families, per architecture (native ABI only).
_IO_NRS = {
    # read, pread64, readv, preadv, preadv2 / write, pwrite64, writev, pwritev, pwritev2
    "x86_64": ((0, 17, 19, 295, 327), (1, 18, 20, 296, 328)),
    "aarch64": ((63, 67, 65, 69, 286), (64, 68, 66, 70, 287)),
}


#: system calls by class: a fixed small set, so that the featurizer's feature set stays fixed (metric
#: ``syscalls_<class>``). Index 0, "other", is what a number not listed (or not known here) counts as.
SYSCALL_CLASSES = ("other", "fd", "rw", "mmap", "sync", "proc", "net", "time")
_CLASS_NAMES = {
    # descriptors and the file system: open/close and friends, metadata, directories
    "fd": "open openat openat2 creat close close_range dup dup2 dup3 fcntl ioctl pipe pipe2 eventfd eventfd2 "
          "epoll_create epoll_create1 epoll_ctl signalfd signalfd4 timerfd_create inotify_init inotify_init1 "
          "inotify_add_watch inotify_rm_watch memfd_create fanotify_init pidfd_open pidfd_getfd userfaultfd "
          "stat fstat lstat newfstatat statx statfs fstatfs access faccessat faccessat2 lseek getdents getdents64 "
          "readlink readlinkat unlink unlinkat rename renameat renameat2 mkdir mkdirat rmdir link linkat symlink "
          "symlinkat chmod fchmod fchmodat fchmodat2 chown fchown lchown fchownat truncate ftruncate utime utimes "
          "utimensat futimesat chdir fchdir getcwd flock fallocate fadvise64 mknod mknodat umask getxattr lgetxattr "
          "fgetxattr setxattr lsetxattr fsetxattr listxattr llistxattr flistxattr removexattr lremovexattr "
          "fremovexattr name_to_handle_at open_by_handle_at fanotify_mark",
    # moving bytes through descriptors
    "rw": "read write pread64 pwrite64 readv writev preadv pwritev preadv2 pwritev2 sendfile splice tee vmsplice "
          "copy_file_range fsync fdatasync sync syncfs sync_file_range readahead io_setup io_destroy io_submit "
          "io_getevents io_pgetevents io_cancel io_uring_setup io_uring_enter io_uring_register",
    # the address space
    "mmap": "mmap munmap mremap mprotect madvise process_madvise brk msync mlock mlock2 munlock mlockall "
            "munlockall mincore remap_file_pages pkey_mprotect pkey_alloc pkey_free mbind set_mempolicy "
            "get_mempolicy migrate_pages move_pages memfd_secret shmget shmat shmdt shmctl",
    # waiting for each other or for events
    "sync": "futex futex_waitv futex_wake futex_wait futex_requeue set_robust_list get_robust_list sched_yield "
            "semop semtimedop semget semctl msgsnd msgrcv msgget msgctl poll ppoll select pselect6 epoll_wait "
            "epoll_pwait epoll_pwait2 membarrier rseq",
    # processes, threads and signals
    "proc": "clone clone3 fork vfork execve execveat exit exit_group wait4 waitid kill tkill tgkill "
            "rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait rt_sigqueueinfo "
            "rt_tgsigqueueinfo rt_sigsuspend sigaltstack pidfd_send_signal getpid getppid gettid getuid geteuid "
            "getgid getegid setuid setgid setsid setpgid getpgid getpgrp getsid prctl arch_prctl set_tid_address "
            "sched_setaffinity sched_getaffinity sched_setscheduler sched_getscheduler sched_setparam "
            "sched_getparam setpriority getpriority prlimit64 getrlimit setrlimit getrusage capget capset "
            "ptrace unshare setns process_vm_readv process_vm_writev",
    # sockets
    "net": "socket socketpair connect accept accept4 bind listen shutdown sendto recvfrom sendmsg recvmsg "
           "sendmmsg recvmmsg getsockopt setsockopt getsockname getpeername",
    # clocks, timers and sleeping
    "time": "nanosleep clock_nanosleep clock_gettime clock_getres clock_settime gettimeofday settimeofday time "
            "alarm pause setitimer getitimer timer_create timer_settime timer_gettime timer_getoverrun "
            "timer_delete timerfd_settime timerfd_gettime times adjtimex clock_adjtime",
}
CLASS_OF = {name: SYSCALL_CLASSES.index(cls) for cls, names in _CLASS_NAMES.items() for name in names.split()}
#: numbers given to new system calls since Linux 5.1 are the same on every architecture; bcc's table stops before
_COMMON_NRS = {424: "pidfd_send_signal", 425: "io_uring_setup", 426: "io_uring_enter", 427: "io_uring_register",
               434: "pidfd_open", 435: "clone3", 436: "close_range", 437: "openat2", 438: "pidfd_getfd",
               439: "faccessat2", 440: "process_madvise", 441: "epoll_pwait2", 447: "memfd_secret",
               449: "futex_waitv", 452: "fchmodat2", 454: "futex_wake", 455: "futex_wait", 456: "futex_requeue"}
MAX_NR = 512  # size of the kernel's class table


def class_table() -> dict[int, int]:
    """{syscall number: class index} for this machine (numbers from bcc's table for the running architecture,
    plus the common new ones); numbers not in it count as "other"."""
    from bcc.syscall import syscalls  # noqa: PLC0415 - bcc only on the eBPF path

    names = {int(nr): n.decode() for nr, n in syscalls.items()}
    names.update(_COMMON_NRS)
    return {nr: CLASS_OF[n] for nr, n in names.items() if n in CLASS_OF and 0 <= nr < MAX_NR}


def _expr(nrs) -> str:
    return "(" + " || ".join(f"(nr) == {n}" for n in nrs) + ")"


CLASS_COUNTERS = tuple(f"syscalls_{c}" for c in SYSCALL_CLASSES)


class Syscalls(Family):
    name = "syscalls"
    c_file = "syscalls.c"

    def __init__(self, settings):
        super().__init__(settings)
        self.io = _IO_NRS.get(platform.machine())
        base = ("syscalls", "syscalls_failed", "syscall_time_ns")
        # Where this architecture's numbers are not known, bytes read/written are absent.
        self.counters = base + (("read_bytes", "write_bytes") if self.io else ()) + CLASS_COUNTERS

    def counters_of(self, v) -> dict[str, int]:
        """The counters of one stats value; ``syscalls`` is the sum of the classes (the kernel keeps no total)."""
        out = {name: int(getattr(v, name)) for name in self.counters if name != "syscalls"}
        out["syscalls"] = sum(out[c] for c in CLASS_COUNTERS)
        return out

    def attach(self) -> None:
        """Fill the kernel's syscall-number -> class table (until then every call counts as "other")."""
        import ctypes as ct

        table = self.bpf[b"sc_class"]
        for nr, cls in class_table().items():
            table[ct.c_int(nr)] = ct.c_uint8(cls)

    def read_live(self):
        live = super().read_live()
        self._note_syscalls(sum(v["syscalls"] for _, v in live.values()), final=False)
        return live

    def read_dead(self):
        dead = super().read_dead()
        self._note_syscalls(sum(v["syscalls"] for _, _, _, v in dead), final=True)
        return dead

    # The syscall programs do not count their runs (the hottest path; a per-CPU counter costs
    # ~10 ns per syscall): each syscall counted in the maps is two events, entry and exit.
    _cum_live = 0
    _dead_total = 0

    def _note_syscalls(self, n: int, final: bool) -> None:
        if final:
            self._dead_total += n
        else:
            self._cum_live = n

    def events_since_last(self) -> int:
        other = super().events_since_last()  # task creation and exit
        total = 2 * (self._cum_live + self._dead_total)
        d = max(0, total - getattr(self, "_sc_seen", 0))
        self._sc_seen = total
        return other + d

    def extra_defines(self) -> dict[str, str]:
        if not self.io:
            return {"OSAD_IO_BYTES": "0"}
        return {"OSAD_IO_BYTES": "1", "OSAD_IS_READ(nr)": _expr(self.io[0]),
                "OSAD_IS_WRITE(nr)": _expr(self.io[1])}
