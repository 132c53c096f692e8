// cgroup/getpeername6: the IPv6 twin of getpeername4.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

SEC("cgroup/getpeername6")
int sl_getpeername6(struct bpf_sock_addr *ctx) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct sl_original_dst6 *dst = bpf_map_lookup_elem(&sl_dst6_by_cookie, &cookie);
    if (!dst) return 1;
    ctx->user_ip6[0] = dst->addr[0];
    ctx->user_ip6[1] = dst->addr[1];
    ctx->user_ip6[2] = dst->addr[2];
    ctx->user_ip6[3] = dst->addr[3];
    ctx->user_port = dst->port;
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
