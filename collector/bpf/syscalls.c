/* osad collector, family "syscalls": syscalls, failed syscalls, time in syscalls, bytes read/written.
 *
 * Sources: raw tracepoints sys_enter (args: regs, id) and sys_exit (args: regs, ret). The entry
 * time and syscall number wait per thread in `inflight`; at exit the thread's counters grow.
 * A syscall counts when it returns (exit/exit_group never do). Failed = returned -4095..-1.
 * Bytes read/written = positive return values of the read and write families (OSAD_IS_READ /
 * OSAD_IS_WRITE, numbers for this architecture, defined by syscalls.py), on any file descriptor.
 * By class: the call's number, through the table sc_class, picks one of eight counters; a call whose
 * entry was not seen (the collector started during it) counts as "other". There is no total counter:
 * syscalls.py sums the classes (one atomic add fewer per system call).
 */
struct sc_stats {
    u32 tgid;
    u32 _pad;
    u64 syscalls_failed;
    u64 syscall_time_ns;
    u64 read_bytes;
    u64 write_bytes;
    /* by class, in syscalls.py's SYSCALL_CLASSES order (sc_class maps a number to its index) */
    u64 syscalls_other;
    u64 syscalls_fd;
    u64 syscalls_rw;
    u64 syscalls_mmap;
    u64 syscalls_sync;
    u64 syscalls_proc;
    u64 syscalls_net;
    u64 syscalls_time;
};
#define OSAD_VALUE_T struct sc_stats
#include "common.h"

struct inflight_t {
    u64 ts;  /* 0: no syscall in flight */
    s64 nr;
};
BPF_HASH(inflight, u32, struct inflight_t, OSAD_MAX_THREADS);
BPF_ARRAY(sc_class, u8, 512);  /* syscall number -> class index (0: other), filled by syscalls.py */

/* No osad_event() here: this is the hottest path; syscalls.py counts 2 events per syscall. */
RAW_TRACEPOINT_PROBE(sys_enter)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    u32 tid = (u32)id;
    struct inflight_t *p = inflight.lookup(&tid);
    if (p) {  /* the thread's slot exists after its first syscall: write it in place */
        p->ts = bpf_ktime_get_ns();
        p->nr = (s64)ctx->args[1];
        return 0;
    }
    struct inflight_t f = {};
    f.ts = bpf_ktime_get_ns();
    f.nr = (s64)ctx->args[1];
    inflight.update(&tid, &f);
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit)
{
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    s64 ret = (s64)ctx->args[1];
    struct sc_stats *st = osad_stats(id);
    if (!st)
        return 0;
    if (ret < 0 && ret >= -4095)
        __sync_fetch_and_add(&st->syscalls_failed, 1);
    u32 tid = (u32)id;
    u32 k = 0;  /* the call's class */
    struct inflight_t *f = inflight.lookup(&tid);
    if (f && f->ts) {
        u64 now = bpf_ktime_get_ns();
        if (now > f->ts)
            __sync_fetch_and_add(&st->syscall_time_ns, now - f->ts);
#if OSAD_IO_BYTES
        if (ret > 0) {
            s64 nr = f->nr;
            if (OSAD_IS_READ(nr))
                __sync_fetch_and_add(&st->read_bytes, (u64)ret);
            else if (OSAD_IS_WRITE(nr))
                __sync_fetch_and_add(&st->write_bytes, (u64)ret);
        }
#endif
        /* the class of the call (its number from the entry; the exit's own id is the same) */
        s64 nr = f->nr;
        if (nr >= 0 && nr < 512) {
            u32 idx = (u32)nr;
            u8 *c = sc_class.lookup(&idx);
            if (c)
                k = *c & 7;
        }
        f->ts = 0;
    }
    __sync_fetch_and_add(&st->syscalls_other + k, 1);
    return 0;
}

static __always_inline void sc_exit(u64 id, int group_dead) { u32 tid = (u32)id; inflight.delete(&tid); }
OSAD_LIFECYCLE(sc_exit)
