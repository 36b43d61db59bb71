"""Family "mem" (mem.c): user page faults, and RSS by kind from kmem:rss_stat."""

from __future__ import annotations

from .family import Family, delete_map_keys, read_map

# kmem:rss_stat member index -> metric name
RSS_KINDS = ("rss_file_bytes", "rss_anon_bytes", "rss_swap_bytes", "rss_shmem_bytes")


class Mem(Family):
    name = "mem"
    c_file = "mem.c"
    counters = ("page_faults_user",)

    def read_rss(self) -> dict[int, dict[str, int]]:
        """{tgid: {rss_*_bytes: latest value}} for the kinds the kernel has reported."""
        out = {}
        for k, v in read_map(self.bpf[b"rss"]):
            seen = int(v.seen)
            out[int(k)] = {name: max(0, int(v.bytes[i])) for i, name in enumerate(RSS_KINDS) if seen >> i & 1}
        return out

    def delete_rss(self, tgids) -> None:
        delete_map_keys(self.bpf[b"rss"], tgids)
