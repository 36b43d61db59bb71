/* osad collector, family "proc": process lifecycle. Forks, execs, signals received, the thread
 * count, and the birth and exit records user space needs to keep entities apart.
 *
 * Sources: tracepoints task:task_newtask (pid, clone_flags; the parent is current),
 * sched:sched_process_exec, signal:signal_deliver (the receiver is current), and the raw
 * tracepoint sched_process_exit (the exiting task is current; second argument group_dead).
 *
 * This family must be attached LAST: raw tracepoint programs run in the order they were attached,
 * so when user space sees an exit record here, every other family has already moved the exiting
 * entity's counters to its `dead` map.
 */
struct proc_stats {
    u32 tgid;
    u32 _pad;
    u64 forks;
    u64 execs;
    u64 signals_received;
};
#define OSAD_VALUE_T struct proc_stats
#include "common.h"

struct birth_t {
    u64 boot_ns;  /* bpf_ktime_get_boot_ns() when the task was created */
    u32 ppid;     /* creator's tgid */
    u32 _pad;
};
/* Processes created while the collector runs, by tgid (deleted at exit). */
BPF_HASH(births, u32, struct birth_t, OSAD_MAX_KEYS);
#if OSAD_PER_THREAD
/* Threads created while the collector runs, by tid (deleted at the thread's exit). */
BPF_HASH(thread_births, u32, struct birth_t, OSAD_MAX_THREADS);
#endif
/* Live thread count per tgid: set to 1 at process creation (or seeded by user space from /proc). */
BPF_HASH(nthreads, u32, s64, OSAD_MAX_KEYS);

struct exit_t {
    u32 tgid;
    u32 group_dead;
    u64 birth_ns;  /* from births/thread_births; 0 if born before the collector started */
    char comm[16];
};
/* Exits of watched entities, keyed by (id, exit time). Process mode: process exits only. */
BPF_HASH(exits, struct osad_dead_key, struct exit_t, OSAD_MAX_DEAD);

TRACEPOINT_PROBE(task, task_newtask)
{
    osad_event();
    u32 child = (u32)args->pid;
    u64 flags = args->clone_flags;
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = (u32)(id >> 32);
    osad_newtask(child, flags);  /* may add child to targets (--follow-children) */
    if (flags & OSAD_CLONE_THREAD) {
        s64 *n = nthreads.lookup(&tgid);
        if (n)
            __sync_fetch_and_add(n, 1);
#if OSAD_PER_THREAD
        if (osad_wanted(tgid)) {
            struct birth_t b = {};
            b.boot_ns = bpf_ktime_get_boot_ns();
            b.ppid = tgid;
            thread_births.update(&child, &b);
        }
#endif
        return 0;
    }
    if (osad_wanted(tgid)) {
        struct proc_stats *st = osad_stats(id);
        if (st)
            __sync_fetch_and_add(&st->forks, 1);
    }
    if (osad_wanted(child)) {
        struct birth_t b = {};
        b.boot_ns = bpf_ktime_get_boot_ns();
        b.ppid = tgid;
        births.update(&child, &b);
        s64 one = 1;
        nthreads.update(&child, &one);
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    struct proc_stats *st = osad_stats(id);
    if (st)
        __sync_fetch_and_add(&st->execs, 1);
    return 0;
}

TRACEPOINT_PROBE(signal, signal_deliver)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    struct proc_stats *st = osad_stats(id);
    if (st)
        __sync_fetch_and_add(&st->signals_received, 1);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_boot_ns();
    u32 tgid = (u32)(id >> 32);
    u32 tid = (u32)id;
    int group_dead = OSAD_GROUP_DEAD(ctx, id);
    s64 *n = nthreads.lookup(&tgid);
    if (n)
        __sync_fetch_and_add(n, -1);
    osad_exit_move(id, group_dead, now);
#if OSAD_PER_THREAD
    int record = 1;
    u32 key = tid;
#else
    int record = group_dead;
    u32 key = tgid;
#endif
    if (record && osad_wanted(tgid)) {
        struct exit_t e = {};
        e.tgid = tgid;
        e.group_dead = group_dead;
#if OSAD_PER_THREAD
        struct birth_t *b = thread_births.lookup(&tid);
        if (!b && tid == tgid)
            b = births.lookup(&tgid);
#else
        struct birth_t *b = births.lookup(&tgid);
#endif
        if (b)
            e.birth_ns = b->boot_ns;
        bpf_get_current_comm(&e.comm, sizeof(e.comm));
        struct osad_dead_key dk = {};
        dk.id = key;
        dk.ts = now;
        exits.update(&dk, &e);
    }
#if OSAD_PER_THREAD
    thread_births.delete(&tid);
#endif
    if (group_dead) {
        births.delete(&tgid);
        nthreads.delete(&tgid);
    }
    osad_exit_targets(id, group_dead);
    return 0;
}
