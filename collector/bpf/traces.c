/* osad collector, family "traces" (--trace BINARY:FUNCTION|ENTRY|RETURN): a message per call of a user
 * function, formatted in user space from its arguments at entry and its return value at return.
 *
 * Sources: a uprobe and a uretprobe per traced function (traces.py appends one OSAD_TRACE(n) line per
 * trace). Each event (time, tgid, tid, trace, entry or return, arg1..arg6 or the return value) goes
 * to user space through the perf buffer trace_events. At most OSAD_TRACE_RATE events per process
 * per second are sent; the rest are counted in trace_dropped.
 */
#include <uapi/linux/ptrace.h>
#include "common.h"

struct trace_ev {
    u64 ts;        /* bpf_ktime_get_ns */
    u32 tgid;
    u32 tid;
    u32 probe;     /* index into the --trace list */
    u32 kind;      /* 0: entry, 1: return */
    s64 args[6];   /* entry: arg1..arg6; return: args[0] is the return value */
};
struct trace_budget {
    u64 window;    /* the second the count is for */
    u32 n;
    u32 _pad;
};
BPF_PERF_OUTPUT(trace_events);
BPF_HASH(budget, u32, struct trace_budget, OSAD_MAX_KEYS);
BPF_ARRAY(trace_dropped, u64, 1);

static __always_inline int trace_emit(struct pt_regs *ctx, u32 probe, u32 kind)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = (u32)(id >> 32);
    if (!osad_wanted(tgid))
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 window = now / 1000000000ULL;
    struct trace_budget *b = budget.lookup(&tgid);
    if (!b) {
        struct trace_budget fresh = {};
        fresh.window = window;
        budget.update(&tgid, &fresh);
        b = budget.lookup(&tgid);
        if (!b)
            return 0;
    }
    if (b->window != window) {
        b->window = window;
        b->n = 0;
    }
    if (b->n >= OSAD_TRACE_RATE) {
        u32 zero = 0;
        u64 *d = trace_dropped.lookup(&zero);
        if (d)
            __sync_fetch_and_add(d, 1);
        return 0;
    }
    b->n += 1;
    struct trace_ev ev = {};
    ev.ts = now;
    ev.tgid = tgid;
    ev.tid = (u32)id;
    ev.probe = probe;
    ev.kind = kind;
    if (kind == 0) {
        ev.args[0] = (s64)PT_REGS_PARM1(ctx);
        ev.args[1] = (s64)PT_REGS_PARM2(ctx);
        ev.args[2] = (s64)PT_REGS_PARM3(ctx);
        ev.args[3] = (s64)PT_REGS_PARM4(ctx);
        ev.args[4] = (s64)PT_REGS_PARM5(ctx);
        ev.args[5] = (s64)PT_REGS_PARM6(ctx);
    } else {
        ev.args[0] = (s64)PT_REGS_RC(ctx);
    }
    trace_events.perf_submit(ctx, &ev, sizeof(ev));
    return 0;
}

#define OSAD_TRACE(n) \
    int osad_trace_enter_##n(struct pt_regs *ctx) { return trace_emit(ctx, n, 0); } \
    int osad_trace_return_##n(struct pt_regs *ctx) { return trace_emit(ctx, n, 1); }

static __always_inline void trace_exit(u64 id, int group_dead)
{
    if (group_dead) {
        u32 tgid = (u32)(id >> 32);
        budget.delete(&tgid);
    }
}
OSAD_LIFECYCLE(trace_exit)

/* OSAD_TRACE(n) lines follow (added by traces.py). */
