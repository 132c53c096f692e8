// cgroup/recvmsg6: a reply from the agent's DNS listener on [::1] is shown as coming from the server asked.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"
#include "lib/dns.h"

SEC("cgroup/recvmsg6")
int sl_recvmsg6(struct bpf_sock_addr *ctx) {
    __u32 zero = 0;
    struct sl_config *cfg = bpf_map_lookup_elem(&sl_config, &zero);
    if (!cfg || cfg->dns_port == 0 || (__u16)ctx->user_port != cfg->dns_port) return 1;
    if (ctx->user_ip6[0] || ctx->user_ip6[1] || ctx->user_ip6[2] || ctx->user_ip6[3] != SL_LOOPBACK6_W3) return 1;
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
