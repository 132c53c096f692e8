// cgroup/getpeername4: a workload asking whom it is connected to sees the service address it dialled, not the
// backend the kernel chose or the agent's listener.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

SEC("cgroup/getpeername4")
int sl_getpeername4(struct bpf_sock_addr *ctx) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct sl_original_dst *dst = bpf_map_lookup_elem(&sl_dst_by_cookie, &cookie);
    if (!dst) return 1;
    ctx->user_ip4 = dst->addr;
    ctx->user_port = dst->port;
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
