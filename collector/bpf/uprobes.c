/* osad collector, family "uprobes": calls and time in user functions (--probe BINARY:FUNCTION).
 *
 * Sources: a uprobe (entry) and a uretprobe (return) per probed function. uprobes.py appends one
 * OSAD_PROBE(n) line per probe, which defines the pair of programs for probe n. A call counts at
 * entry; its latency (return time - entry time of the same thread) at return. For a recursive
 * function only the innermost call's latency is known, so outer calls add no time.
 * Keys are (entity, probe) pairs, with the same lifecycle as the other families (common.h), done
 * here per probe because the key has two parts.
 */
#include "common.h"

struct up_key {
    u32 id;     /* tgid, or tid with --threads */
    u32 probe;  /* index into the --probe list */
};
struct up_val {
    u32 tgid;
    u32 _pad;
    u64 calls;
    u64 time_ns;
};
struct up_dead_key {
    u32 id;
    u32 probe;
    u64 ts;
};
BPF_HASH(stats, struct up_key, struct up_val, OSAD_MAX_KEYS);
BPF_HASH(dead, struct up_dead_key, struct up_val, OSAD_MAX_DEAD);
/* (tid, probe) -> entry time of the call in progress */
BPF_HASH(entry_ts, struct up_key, u64, OSAD_MAX_THREADS);

static __always_inline struct up_val *up_stats(u64 id, u32 probe)
{
    struct up_key k = {};
    k.id = osad_key(id);
    k.probe = probe;
    struct up_val *v = stats.lookup(&k);
    if (v)
        return v;
    struct up_val zero = {};
    zero.tgid = (u32)(id >> 32);
    stats.insert(&k, &zero);
    return stats.lookup(&k);
}

static __always_inline int up_enter(u32 probe)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    struct up_val *v = up_stats(id, probe);
    if (v)
        __sync_fetch_and_add(&v->calls, 1);
    struct up_key t = {};
    t.id = (u32)id;
    t.probe = probe;
    u64 now = bpf_ktime_get_ns();
    entry_ts.update(&t, &now);
    return 0;
}

static __always_inline int up_return(u32 probe)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    struct up_key t = {};
    t.id = (u32)id;
    t.probe = probe;
    u64 *start = entry_ts.lookup(&t);
    if (!start)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 d = now > *start ? now - *start : 0;
    entry_ts.delete(&t);
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    struct up_val *v = up_stats(id, probe);
    if (!v)
        return 0;
    __sync_fetch_and_add(&v->time_ns, d);
    return 0;
}

#define OSAD_PROBE(n) \
    int osad_uprobe_##n(struct pt_regs *ctx) { return up_enter(n); } \
    int osad_uretprobe_##n(struct pt_regs *ctx) { return up_return(n); }

TRACEPOINT_PROBE(task, task_newtask)
{
    osad_event();
    u32 child = (u32)args->pid;
    osad_newtask(child, args->clone_flags);
#pragma unroll
    for (u32 p = 0; p < OSAD_NPROBES; p++) {
        struct up_key k = {};
        k.id = child;
        k.probe = p;
        stats.delete(&k);
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    int group_dead = OSAD_GROUP_DEAD(ctx, id);
    u64 now = bpf_ktime_get_boot_ns();
#if OSAD_PER_THREAD
    int move = 1;
#else
    int move = group_dead;
#endif
#pragma unroll
    for (u32 p = 0; p < OSAD_NPROBES; p++) {
        struct up_key t = {};
        t.id = (u32)id;
        t.probe = p;
        entry_ts.delete(&t);
        if (move) {
            struct up_key k = {};
            k.id = osad_key(id);
            k.probe = p;
            struct up_val *v = stats.lookup(&k);
            if (v) {
                struct up_dead_key dk = {};
                dk.id = k.id;
                dk.probe = p;
                dk.ts = now;
                dead.update(&dk, v);
                stats.delete(&k);
            }
        }
    }
    osad_exit_targets(id, group_dead);
    return 0;
}

/* OSAD_PROBE(n) lines follow (added by uprobes.py). */
