"""The collector's metrics: name, unit, kind, source and meaning. docs/metrics.md documents the
same list (a test checks that they agree)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MetricDef:
    name: str
    unit: str
    kind: str      # counter (delta over the interval) | gauge (value at the end of the interval)
    family: str    # the BPF program that measures it
    source: str
    meaning: str


METRICS: tuple[MetricDef, ...] = (
    MetricDef("on_cpu_ns", "ns", "counter", "sched", "raw tp sched_switch + per-CPU cpu-clock perf event",
              "Time the process's threads ran on a CPU."),
    MetricDef("runq_wait_ns", "ns", "counter", "sched", "tp sched:sched_wakeup(_new), raw tp sched_switch",
              "Time its threads were runnable but waiting for a CPU (woken or preempted until run)."),
    MetricDef("ctx_switches_voluntary", "switches", "counter", "sched", "raw tp sched_switch (preempt, prev_state)",
              "Times a thread gave up the CPU to sleep (blocked, waited, slept)."),
    MetricDef("ctx_switches_involuntary", "switches", "counter", "sched", "raw tp sched_switch (preempt, prev_state)",
              "Times a thread left the CPU while still runnable (preempted, or yielded)."),
    MetricDef("syscalls", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit",
              "System calls that returned during the interval."),
    MetricDef("syscalls_failed", "calls", "counter", "syscalls", "raw tp sys_exit (ret)",
              "System calls that returned an error (-4095..-1), interrupted ones included."),
    MetricDef("syscall_time_ns", "ns", "counter", "syscalls", "raw tp sys_enter / sys_exit",
              "Time from entry to return of those system calls, blocking included."),
    MetricDef("read_bytes", "bytes", "counter", "syscalls", "raw tp sys_exit of read, pread64, readv, preadv(2)",
              "Bytes returned by read-family system calls on any file descriptor (files, pipes, sockets)."),
    MetricDef("write_bytes", "bytes", "counter", "syscalls", "raw tp sys_exit of write, pwrite64, writev, pwritev(2)",
              "Bytes accepted by write-family system calls on any file descriptor."),
    MetricDef("syscalls_other", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls of no class below (xattrs aside: mount, keys, bpf, ...; also numbers unknown to osad)."),
    MetricDef("syscalls_fd", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls that open, close, duplicate or query descriptors and files (open*, close, dup*, fcntl, ioctl, pipe*, stat*, lseek, getdents, unlink, rename, ...)."),
    MetricDef("syscalls_rw", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls that move bytes through descriptors (read*/write* families, sendfile, splice, fsync, io_uring, AIO)."),
    MetricDef("syscalls_mmap", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls on the address space (mmap, munmap, mremap, mprotect, madvise, brk, mlock*, NUMA policy, SysV shm)."),
    MetricDef("syscalls_sync", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls that wait for or wake others (futex*, SysV semaphores and queues, poll/select/epoll_wait, sched_yield, membarrier)."),
    MetricDef("syscalls_proc", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls on processes, threads and signals (clone*, fork, execve*, wait*, kill, rt_sig*, get*id, sched_* settings, prctl, rlimits)."),
    MetricDef("syscalls_net", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls on sockets (socket, connect, accept*, bind, listen, send*/recv*, sockopt, ...)."),
    MetricDef("syscalls_time", "calls", "counter", "syscalls", "raw tp sys_enter / sys_exit, class of the number",
              "System calls on clocks, timers and sleeping (nanosleep, clock_*, timer_*, alarm, setitimer; vDSO clock reads make none)."),
    MetricDef("page_faults_user", "faults", "counter", "mem", "tp exceptions:page_fault_user",
              "Page faults taken while running user code (minor and major)."),
    MetricDef("rss_anon_bytes", "bytes", "gauge", "mem", "tp kmem:rss_stat (MM_ANONPAGES)",
              "Resident anonymous memory (heap, stacks, private mappings)."),
    MetricDef("rss_file_bytes", "bytes", "gauge", "mem", "tp kmem:rss_stat (MM_FILEPAGES)",
              "Resident file-backed memory (binaries, libraries, mapped files)."),
    MetricDef("rss_shmem_bytes", "bytes", "gauge", "mem", "tp kmem:rss_stat (MM_SHMEMPAGES)",
              "Resident shared memory (tmpfs, shared anonymous mappings, SysV shm)."),
    MetricDef("rss_swap_bytes", "bytes", "gauge", "mem", "tp kmem:rss_stat (MM_SWAPENTS)",
              "Memory swapped out: swap entries times the page size."),
    MetricDef("vm_size_bytes", "bytes", "gauge", "procfs", "/proc/<pid>/status VmSize",
              "Virtual address space mapped (touched or not)."),
    MetricDef("vm_data_bytes", "bytes", "gauge", "procfs", "/proc/<pid>/status VmData",
              "Private writable mappings, heap included (the data segment)."),
    MetricDef("vm_stack_bytes", "bytes", "gauge", "procfs", "/proc/<pid>/status VmStk",
              "The main thread's stack mapping."),
    MetricDef("page_tables_bytes", "bytes", "gauge", "procfs", "/proc/<pid>/status VmPTE",
              "Memory the kernel holds for the process's page tables."),
    MetricDef("huge_pages_bytes", "bytes", "gauge", "procfs", "/proc/<pid>/status HugetlbPages",
              "hugetlbfs huge pages mapped (transparent huge pages are part of rss_anon_bytes)."),
    MetricDef("open_fds", "descriptors", "gauge", "procfs", "entries of /proc/<pid>/fd",
              "Open file descriptors (files, sockets, pipes, ...): a descriptor leak shows here."),
    MetricDef("net_tx_bytes", "bytes", "counter", "net", "tp sock:sock_send_length (AF_INET, AF_INET6)",
              "Bytes sent on TCP/UDP/raw internet sockets (loopback included)."),
    MetricDef("net_rx_bytes", "bytes", "counter", "net", "tp sock:sock_recv_length (AF_INET, AF_INET6)",
              "Bytes received on internet sockets (peeks excluded)."),
    MetricDef("unix_tx_bytes", "bytes", "counter", "net", "tp sock:sock_send_length (AF_UNIX)",
              "Bytes sent on Unix-domain sockets."),
    MetricDef("unix_rx_bytes", "bytes", "counter", "net", "tp sock:sock_recv_length (AF_UNIX)",
              "Bytes received on Unix-domain sockets."),
    MetricDef("block_read_bytes", "bytes", "counter", "block", "tp block:block_bio_queue (R), submitting task",
              "Bytes the process submitted to block devices for reading (page-cache misses, direct I/O)."),
    MetricDef("block_write_bytes", "bytes", "counter", "block", "tp block:block_bio_queue (W), submitting task",
              "Bytes the process submitted to block devices for writing: direct I/O and the writeback its own "
              "fsync/fdatasync starts; buffered writes flushed later count for the kernel's flusher threads."),
    MetricDef("forks", "processes", "counter", "proc", "tp task:task_newtask without CLONE_THREAD",
              "Child processes created."),
    MetricDef("execs", "execs", "counter", "proc", "tp sched:sched_process_exec",
              "Successful execve/execveat calls."),
    MetricDef("signals_received", "signals", "counter", "proc", "tp signal:signal_deliver",
              "Signals delivered to the process (handled or default action)."),
    MetricDef("threads", "threads", "gauge", "proc", "tp task:task_newtask / raw tp sched_process_exit",
              "Live threads (seeded from /proc/<pid>/stat for processes older than the collector)."),
)

# Metrics of a --probe BINARY:FUNCTION, with <label> the function name in snake case.
PROBE_METRICS: tuple[MetricDef, ...] = (
    MetricDef("uprobe_<label>_calls", "calls", "counter", "uprobes", "uprobe on the function's entry",
              "Calls of the function."),
    MetricDef("uprobe_<label>_time_ns", "ns", "counter", "uprobes", "uprobe + uretprobe",
              "Total time inside the function (entry to return), of the calls that returned."),
    MetricDef("uprobe_<label>_latency_mean_ns", "ns", "derived", "uprobes", "time_ns / calls",
              "Mean latency of the interval's calls; absent in an interval without calls."),
)

#: with --heap (family heap, uprobes on libc's allocator)
HEAP_METRICS: tuple[MetricDef, ...] = (
    MetricDef("heap_allocs", "calls", "counter", "heap", "uretprobes of libc malloc, calloc, realloc (non-NULL)",
              "Allocations that succeeded."),
    MetricDef("heap_alloc_bytes", "bytes", "counter", "heap", "uprobes of libc malloc, calloc, realloc (size)",
              "Bytes those allocations asked for."),
    MetricDef("heap_frees", "calls", "counter", "heap", "uprobes of libc free, realloc (old pointer)",
              "Frees of allocations made while the process was watched (older ones are not known)."),
    MetricDef("heap_free_bytes", "bytes", "counter", "heap", "uprobes of libc free, realloc",
              "Bytes of those allocations given back."),
    MetricDef("heap_outstanding_bytes", "bytes", "gauge", "heap", "heap_alloc_bytes - heap_free_bytes, summed",
              "Allocated since the process was first watched and not freed yet (memleak-style)."),
)

BY_NAME = {m.name: m for m in METRICS}
GAUGES = tuple(m.name for m in METRICS if m.kind == "gauge")
