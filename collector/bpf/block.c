/* osad collector, family "block": bytes the process sends to block devices.
 *
 * Source: tracepoint block:block_bio_queue (dev, sector, nr_sector, rwbs), which fires when a bio
 * is submitted, in the submitting task's context: the process itself for direct I/O, for the
 * writeback its fsync/fdatasync/sync_file_range starts and for reads that miss the page cache;
 * the kernel's flusher threads for buffered writes written back later (those count for the
 * flusher, not for the writer). Bytes = nr_sector * 512; rwbs says the direction (R, W, after an
 * optional F for a preflush); discards and flush-only bios count nothing.
 */
struct block_stats {
    u32 tgid;
    u32 _pad;
    u64 block_read_bytes;
    u64 block_write_bytes;
};
#define OSAD_VALUE_T struct block_stats
#include "common.h"

TRACEPOINT_PROBE(block, block_bio_queue)
{
    osad_event();
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    u64 bytes = (u64)args->nr_sector << 9;
    if (!bytes)
        return 0;
    char c0 = args->rwbs[0], c1 = args->rwbs[1];
    char dir = c0 == 'F' ? c1 : c0;
    if (dir != 'R' && dir != 'W')
        return 0;
    struct block_stats *st = osad_stats(id);
    if (!st)
        return 0;
    if (dir == 'W')
        __sync_fetch_and_add(&st->block_write_bytes, bytes);
    else
        __sync_fetch_and_add(&st->block_read_bytes, bytes);
    return 0;
}

OSAD_LIFECYCLE(osad_no_exit_hook)
