/* osad collector, family "net": socket bytes sent and received by the process.
 *
 * Sources: tracepoints sock:sock_send_length and sock:sock_recv_length (family, ret, flags),
 * which fire in the sending/receiving task's context for every sendmsg/recvmsg on a socket
 * (write/read/send/recv/sendto/sendmsg/... and splice to a socket all end there).
 * Internet sockets (AF_INET, AF_INET6) count as net_*; Unix-domain sockets as unix_*.
 * Peeks (MSG_PEEK) and errors are not counted.
 */
struct net_stats {
    u32 tgid;
    u32 _pad;
    u64 net_tx_bytes;
    u64 net_rx_bytes;
    u64 unix_tx_bytes;
    u64 unix_rx_bytes;
};
#define OSAD_VALUE_T struct net_stats
#include "common.h"

#define OSAD_AF_UNIX 1
#define OSAD_AF_INET 2
#define OSAD_AF_INET6 10
#define OSAD_MSG_PEEK 2

static __always_inline int on_sock(u32 family, s64 ret, int rx)
{
    osad_event();
    if (ret <= 0)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!osad_wanted((u32)(id >> 32)))
        return 0;
    struct net_stats *st = osad_stats(id);
    if (!st)
        return 0;
    if (family == OSAD_AF_INET || family == OSAD_AF_INET6) {
        if (rx)
            __sync_fetch_and_add(&st->net_rx_bytes, (u64)ret);
        else
            __sync_fetch_and_add(&st->net_tx_bytes, (u64)ret);
    } else if (family == OSAD_AF_UNIX) {
        if (rx)
            __sync_fetch_and_add(&st->unix_rx_bytes, (u64)ret);
        else
            __sync_fetch_and_add(&st->unix_tx_bytes, (u64)ret);
    }
    return 0;
}

TRACEPOINT_PROBE(sock, sock_send_length)
{
    return on_sock(args->family, args->ret, 0);
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    if (args->flags & OSAD_MSG_PEEK) {
        osad_event();
        return 0;
    }
    return on_sock(args->family, args->ret, 1);
}

OSAD_LIFECYCLE(osad_no_exit_hook)
