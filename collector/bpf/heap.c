/* osad collector, family "heap" (opt-in, --heap): the process's heap through libc's allocator.
 *
 * Sources: uprobes on libc malloc, calloc, realloc and free, uretprobes on the three allocators
 * (attached by heap.py). At an allocator's entry the requested size waits per thread in `req`; at
 * its return a non-NULL pointer is recorded in `live` ((tgid, pointer) -> size) and counted as an
 * allocation. free (and realloc of a non-NULL pointer) looks the pointer up in `live`: one osad saw
 * allocated counts as freed and leaves the map; one allocated before osad watched counts nothing,
 * so allocated - freed is the memory allocated since watching began that is still outstanding
 * (what memleak-style tools report). `live` is bounded (OSAD_HEAP_MAX); when it is full new
 * allocations are still counted but their frees are not, and heap.py says so.
 */
#include <uapi/linux/ptrace.h>

struct heap_stats {
    u32 tgid;
    u32 _pad;
    u64 heap_allocs;
    u64 heap_alloc_bytes;
    u64 heap_frees;
    u64 heap_free_bytes;
};
#define OSAD_VALUE_T struct heap_stats
#include "common.h"

struct heap_key {
    u64 ptr;
    u32 tgid;
    u32 _pad;
};
BPF_HASH(req, u32, u64, OSAD_MAX_THREADS);              /* tid -> size requested, in flight */
BPF_HASH(live, struct heap_key, u64, OSAD_HEAP_MAX);    /* outstanding allocations osad saw */
BPF_ARRAY(live_full, u64, 1);                           /* allocations not recorded: `live` was full */

static __always_inline int heap_request(u64 size)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    u32 tid = (u32)id;
    req.update(&tid, &size);
    return 0;
}

static __always_inline void heap_release(u64 id, u64 ptr)
{
    if (!ptr)
        return;
    struct heap_key k = {};
    k.ptr = ptr;
    k.tgid = (u32)(id >> 32);
    u64 *size = live.lookup(&k);
    if (!size)
        return;
    struct heap_stats *st = osad_stats(id);
    if (st) {
        __sync_fetch_and_add(&st->heap_frees, 1);
        __sync_fetch_and_add(&st->heap_free_bytes, *size);
    }
    live.delete(&k);
}

int heap_malloc(struct pt_regs *ctx) { return heap_request((u64)PT_REGS_PARM1(ctx)); }

int heap_calloc(struct pt_regs *ctx)
{
    return heap_request((u64)PT_REGS_PARM1(ctx) * (u64)PT_REGS_PARM2(ctx));
}

int heap_realloc(struct pt_regs *ctx)
{
    u64 id = bpf_get_current_pid_tgid();
    if (osad_wanted((u32)(id >> 32)))
        heap_release(id, (u64)PT_REGS_PARM1(ctx));
    return heap_request((u64)PT_REGS_PARM2(ctx));
}

int heap_allocated(struct pt_regs *ctx)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    u32 tid = (u32)id;
    u64 *size = req.lookup(&tid);
    if (!size)
        return 0;
    u64 n = *size;
    req.delete(&tid);
    u64 ptr = (u64)PT_REGS_RC(ctx);
    if (!ptr)
        return 0;
    struct heap_stats *st = osad_stats(id);
    if (!st)
        return 0;
    __sync_fetch_and_add(&st->heap_allocs, 1);
    __sync_fetch_and_add(&st->heap_alloc_bytes, n);
    struct heap_key k = {};
    k.ptr = ptr;
    k.tgid = (u32)(id >> 32);
    if (live.update(&k, &n) != 0) {
        u32 zero = 0;
        u64 *full = live_full.lookup(&zero);
        if (full)
            __sync_fetch_and_add(full, 1);
    }
    return 0;
}

int heap_free(struct pt_regs *ctx)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    heap_release(id, (u64)PT_REGS_PARM1(ctx));
    return 0;
}

static __always_inline void heap_exit(u64 id, int group_dead) { u32 tid = (u32)id; req.delete(&tid); }
OSAD_LIFECYCLE(heap_exit)
