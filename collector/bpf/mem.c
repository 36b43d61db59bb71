/* osad collector, family "mem": user page faults (counter) and RSS by kind (gauges).
 *
 * Sources: tracepoint exceptions:page_fault_user (the faulting task is current), and
 * kmem:rss_stat (mm_id, curr, member, size in bytes), which fires whenever an mm's RSS counter
 * of one kind changes. When curr = 1 the mm is the current task's, so the mm_id -> tgid pair is
 * learnt; when curr = 0 (reclaim, or the mm torn down after exit_mm) that pair attributes it.
 * Members: 0 MM_FILEPAGES, 1 MM_ANONPAGES, 2 MM_SWAPENTS, 3 MM_SHMEMPAGES.
 * `rss` is keyed by tgid in every mode (an mm belongs to a process) and holds the latest value of
 * each kind the kernel reported (bit i of `seen` set once kind i was reported).
 */
struct mem_stats {
    u32 tgid;
    u32 _pad;
    u64 page_faults_user;
};
#define OSAD_VALUE_T struct mem_stats
#include "common.h"

struct rss_val {
    s64 bytes[4];
    u32 seen;
    u32 _pad;
};
BPF_HASH(rss, u32, struct rss_val, OSAD_MAX_KEYS);
BPF_TABLE("lru_hash", u32, u32, mm_owner, OSAD_MAX_KEYS);

TRACEPOINT_PROBE(exceptions, page_fault_user)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    struct mem_stats *st = osad_stats(id);
    if (st)
        __sync_fetch_and_add(&st->page_faults_user, 1);
    return 0;
}

TRACEPOINT_PROBE(kmem, rss_stat)
{
    osad_event();
    u32 member = (u32)args->member;
    if (member > 3)
        return 0;
    u32 mm = args->mm_id;
    u32 tgid;
    if (args->curr) {
        tgid = (u32)(bpf_get_current_pid_tgid() >> 32);
        u32 *owner = mm_owner.lookup(&mm);
        if (!owner || *owner != tgid)
            mm_owner.update(&mm, &tgid);
    } else {
        u32 *owner = mm_owner.lookup(&mm);
        if (!owner)
            return 0;
        tgid = *owner;
    }
    if (!osad_wanted(tgid))
        return 0;
    struct rss_val *r = rss.lookup(&tgid);
    if (!r) {
        struct rss_val zero = {};
        rss.insert(&tgid, &zero);
        r = rss.lookup(&tgid);
        if (!r)
            return 0;
    }
    member &= 3;
    r->bytes[member] = args->size;
    r->seen |= 1u << member;
    return 0;
}

TRACEPOINT_PROBE(task, task_newtask)
{
    osad_event();
    u32 child = (u32)args->pid;
    osad_newtask(child, args->clone_flags);
    if (!(args->clone_flags & OSAD_CLONE_THREAD))
        rss.delete(&child);  /* stale gauges of an earlier process with this pid */
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    int group_dead = OSAD_GROUP_DEAD(ctx, id);
    osad_exit_move(id, group_dead, bpf_ktime_get_boot_ns());
    if (group_dead) {
        u32 tgid = (u32)(id >> 32);
        rss.delete(&tgid);
    }
    osad_exit_targets(id, group_dead);
    return 0;
}
