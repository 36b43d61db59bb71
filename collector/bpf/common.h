/* osad collector: code shared by every metric family.
 *
 * collector/bpf/family.py pastes this text where a family's C file says "#include "common.h"",
 * after the -D defines it computes (OSAD_FILTER, OSAD_FOLLOW, OSAD_PER_THREAD, OSAD_SELF_TGID,
 * OSAD_HAVE_GROUP_DEAD, OSAD_MAX_*). Only tracepoint arguments and BPF helpers are read here:
 * never a kernel struct, so a mismatched set of kernel headers cannot skew a field offset.
 *
 * Lifecycle of a family's per-entity counters (map `stats`, keyed by tgid, or by tid with
 * --threads; the value starts with `u32 tgid`):
 *   - counters are cumulative while the entity lives; user space reads them and takes deltas;
 *   - when the entity exits, its entry is moved to `dead`, keyed by (id, exit time), so a later
 *     process that reuses the pid starts from a fresh entry and never merges with it;
 *   - when a task is created, a stale entry under its id (written after an earlier exit) is dropped.
 */

#define OSAD_CLONE_THREAD 0x00010000ULL

struct osad_dead_key {
    u32 id;
    u32 pad;
    u64 ts;  /* bpf_ktime_get_boot_ns() at exit */
};

#if OSAD_FILTER
/* tgids being watched (--pid/--command, and their descendants with --follow-children). */
BPF_HASH(targets, u32, u8, OSAD_MAX_TARGETS);
#endif

/* Programs run (all events, filtered or not): the collector's own load figure. */
BPF_PERCPU_ARRAY(nevents, u64, 1);

static __always_inline void osad_event(void)
{
    int zero = 0;
    u64 *c = nevents.lookup(&zero);
    if (c)
        *c += 1;
}

static __always_inline int osad_wanted(u32 tgid)
{
    if (tgid == 0 || tgid == OSAD_SELF_TGID)
        return 0;
#if OSAD_FILTER
    return targets.lookup(&tgid) != 0;
#else
    return 1;
#endif
}

static __always_inline u32 osad_key(u64 id)
{
#if OSAD_PER_THREAD
    return (u32)id;
#else
    return (u32)(id >> 32);
#endif
}

/* group_dead of sched_process_exit: the raw tracepoint's second argument where the kernel has it
 * (6.x kernels whose tracepoint format lists group_dead); else the leader's exit stands for it. */
#if OSAD_HAVE_GROUP_DEAD
#define OSAD_GROUP_DEAD(ctx, id) ((int)((ctx)->args[1] & 1))
#else
#define OSAD_GROUP_DEAD(ctx, id) ((u32)(id) == (u32)((id) >> 32))
#endif

#ifdef OSAD_VALUE_T
BPF_HASH(stats, u32, OSAD_VALUE_T, OSAD_MAX_KEYS);
BPF_HASH(dead, struct osad_dead_key, OSAD_VALUE_T, OSAD_MAX_DEAD);

/* The current task's counters, created on first use. */
static __always_inline OSAD_VALUE_T *osad_stats(u64 id)
{
    u32 key = osad_key(id);
    OSAD_VALUE_T *v = stats.lookup(&key);
    if (v)
        return v;
    OSAD_VALUE_T zero = {};
    zero.tgid = (u32)(id >> 32);
    stats.insert(&key, &zero);
    return stats.lookup(&key);
}

/* At exit: move the exiting entity's counters to `dead`. */
static __always_inline void osad_exit_move(u64 id, int group_dead, u64 now_boot)
{
#if OSAD_PER_THREAD
    u32 key = (u32)id;
#else
    if (!group_dead)
        return;
    u32 key = (u32)(id >> 32);
#endif
    OSAD_VALUE_T *v = stats.lookup(&key);
    if (!v)
        return;
    struct osad_dead_key dk = {};
    dk.id = key;
    dk.ts = now_boot;
    dead.update(&dk, v);
    stats.delete(&key);
}
#endif /* OSAD_VALUE_T */

/* At exit of the last thread: stop watching the tgid (a later process may reuse it). */
static __always_inline void osad_exit_targets(u64 id, int group_dead)
{
#if OSAD_FILTER
    if (group_dead) {
        u32 tgid = (u32)(id >> 32);
        targets.delete(&tgid);
    }
#endif
}

/* At task creation (parent's context): drop stale counters under the new id; follow children. */
static __always_inline void osad_newtask(u32 child, u64 clone_flags)
{
#ifdef OSAD_VALUE_T
    stats.delete(&child);
#endif
#if OSAD_FILTER && OSAD_FOLLOW
    if (!(clone_flags & OSAD_CLONE_THREAD)) {
        u32 parent = (u32)(bpf_get_current_pid_tgid() >> 32);
        if (targets.lookup(&parent)) {
            u8 one = 1;
            targets.update(&child, &one);
        }
    }
#endif
}

#ifndef OSAD_VALUE_T
/* a family without a stats map (traces) has no counters to move at exit */
static __always_inline void osad_exit_move(u64 id, int group_dead, u64 now_boot) {}
#endif

/* The two lifecycle programs of a family (net, block, heap, syscalls, traces): task creation, and the exit that
 * moves a task's counters to `dead`. EXIT_HOOK: a function called first at exit with the task's id and whether
 * its whole group is gone (a family's per-thread scratch to drop; bcc allows no map call inside a macro), or
 * osad_no_exit_hook. */
static __always_inline void osad_no_exit_hook(u64 id, int group_dead) {}
#define OSAD_LIFECYCLE(EXIT_HOOK)                                                   \
TRACEPOINT_PROBE(task, task_newtask)                                                \
{                                                                                   \
    osad_event();                                                                   \
    osad_newtask((u32)args->pid, args->clone_flags);                                \
    return 0;                                                                       \
}                                                                                   \
RAW_TRACEPOINT_PROBE(sched_process_exit)                                            \
{                                                                                   \
    osad_event();                                                                   \
    u64 id = bpf_get_current_pid_tgid();                                            \
    int group_dead = OSAD_GROUP_DEAD(ctx, id);                                      \
    EXIT_HOOK(id, group_dead);                                                      \
    osad_exit_move(id, group_dead, bpf_ktime_get_boot_ns());                        \
    osad_exit_targets(id, group_dead);                                              \
    return 0;                                                                       \
}
