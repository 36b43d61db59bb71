/* osad collector, family "sched": on-CPU time, run-queue wait, voluntary and involuntary switches.
 *
 * Sources: raw tracepoint sched_switch (arguments preempt and prev_state; the task switching out
 * is the current task; the sched:sched_switch tracepoint on kernels before 5.18), tracepoints sched:sched_wakeup / sched_wakeup_new (pid of the woken task),
 * and a per-CPU software clock at OSAD_TICK_HZ that credits the running task's on-CPU time so far,
 * so a task that never switches out is still counted in the interval it runs.
 *
 * Everything is credited in the context of the task it belongs to: a per-CPU slot remembers when
 * the current task got the CPU; when it leaves (or at a tick) the elapsed time is added to it.
 * Run-queue wait = time the task got the CPU - time it became runnable (woken, or preempted),
 * settled lazily at the task's first event after getting the CPU.
 */
struct sched_stats {
    u32 tgid;
    u32 _pad;
    u64 on_cpu_ns;
    u64 runq_wait_ns;
    u64 ctx_switches_voluntary;
    u64 ctx_switches_involuntary;
};
#define OSAD_VALUE_T struct sched_stats
#include "common.h"

struct cpu_slot {
    u64 start;        /* when the current task got this CPU (0: unknown) */
    u32 checked;      /* run-queue wait of the current task already settled */
    u32 exiting_tid;  /* the current task passed sched_process_exit: its counters are gone */
};
BPF_PERCPU_ARRAY(slot, struct cpu_slot, 1);
/* tid -> when it became runnable (0: it has run since). One slot per thread, written in place
 * (no allocation, no lock once it exists), deleted when the thread exits. */
BPF_HASH(runnable_since, u32, u64, OSAD_MAX_THREADS);

static __always_inline void set_runnable(u32 tid, u64 now)
{
    u64 *r = runnable_since.lookup(&tid);
    if (r)
        *r = now;
    else
        runnable_since.update(&tid, &now);
}

#define OSAD_TICK 0
#define OSAD_VOLUNTARY 1
#define OSAD_INVOLUNTARY 2

static __always_inline void account(struct cpu_slot *s, u64 id, u64 now, int kind)
{
    u32 tid = (u32)id;
    if (tid == 0 || tid == s->exiting_tid || !osad_wanted((u32)(id >> 32)))
        return;
    struct sched_stats *st = osad_stats(id);
    if (!st)
        return;
    if (s->start && now > s->start)
        __sync_fetch_and_add(&st->on_cpu_ns, now - s->start);
    if (!s->checked) {
        s->checked = 1;
        u64 *r = runnable_since.lookup(&tid);
        if (r) {
            u64 since = *r;
            *r = 0;
            if (s->start && since && since <= s->start)
                __sync_fetch_and_add(&st->runq_wait_ns, s->start - since);
        }
    }
    if (kind == OSAD_VOLUNTARY)
        __sync_fetch_and_add(&st->ctx_switches_voluntary, 1);
    else if (kind == OSAD_INVOLUNTARY)
        __sync_fetch_and_add(&st->ctx_switches_involuntary, 1);
}

static __always_inline int on_switch(int voluntary)
{
    osad_event();
    int zero = 0;
    struct cpu_slot *s = slot.lookup(&zero);
    if (!s)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();  /* the task switching out */
    account(s, id, now, voluntary ? OSAD_VOLUNTARY : OSAD_INVOLUNTARY);
    u32 tid = (u32)id;
    if (!voluntary && tid != 0 && tid != s->exiting_tid && osad_wanted((u32)(id >> 32)))
        set_runnable(tid, now);  /* preempted: waits on the run queue from now */
    s->start = now;
    s->checked = 0;
    s->exiting_tid = 0;
    return 0;
}

#if OSAD_RAW_SWITCH
/* Kernels >= 5.18: TP_PROTO(bool preempt, struct task_struct *prev, struct task_struct *next,
 * unsigned int prev_state). As the kernel counts nvcsw/nivcsw: voluntary = not preempted and
 * leaving in a sleeping state. */
RAW_TRACEPOINT_PROBE(sched_switch)
{
    int preempt = ctx->args[0] & 1;
    u32 prev_state = (u32)ctx->args[3];
    return on_switch(!preempt && prev_state != 0);
}
#else
/* Older kernels: the tracepoint's prev_state is a report mask, TASK_REPORT_MAX (no low bits)
 * when preempted, 0 when still running. */
TRACEPOINT_PROBE(sched, sched_switch)
{
    return on_switch((args->prev_state & 0xff) != 0);
}
#endif

static __always_inline int on_wakeup(u32 tid)
{
    osad_event();
    set_runnable(tid, bpf_ktime_get_ns());
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    return on_wakeup((u32)args->pid);
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    return on_wakeup((u32)args->pid);
}

/* Per-CPU clock: credit the running task's time so far. */
int osad_tick(struct bpf_perf_event_data *ctx)
{
    osad_event();
    int zero = 0;
    struct cpu_slot *s = slot.lookup(&zero);
    if (!s)
        return 0;
    u64 now = bpf_ktime_get_ns();
    account(s, bpf_get_current_pid_tgid(), now, OSAD_TICK);
    s->start = now;
    s->checked = 1;
    return 0;
}

TRACEPOINT_PROBE(task, task_newtask)
{
    osad_event();
    osad_newtask((u32)args->pid, args->clone_flags);
    return 0;
}

RAW_TRACEPOINT_PROBE(sched_process_exit)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    u64 now = bpf_ktime_get_ns();
    int group_dead = OSAD_GROUP_DEAD(ctx, id);
    int zero = 0;
    struct cpu_slot *s = slot.lookup(&zero);
    if (s) {
        account(s, id, now, OSAD_TICK);  /* the last slice, before the counters move */
        s->start = now;
        s->checked = 1;
        s->exiting_tid = (u32)id;
    }
    u32 tid = (u32)id;
    runnable_since.delete(&tid);
    osad_exit_move(id, group_dead, bpf_ktime_get_boot_ns());
    osad_exit_targets(id, group_dead);
    return 0;
}
