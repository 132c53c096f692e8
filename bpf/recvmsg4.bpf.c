// cgroup/recvmsg4: a reply from the agent's DNS listener is shown as coming from the server the workload asked.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

SEC("cgroup/recvmsg4")
int sl_recvmsg4(struct bpf_sock_addr *ctx) {
    __u32 zero = 0;
    struct sl_config *cfg = bpf_map_lookup_elem(&sl_config, &zero);
    if (!cfg || cfg->dns_port == 0) return 1;
    if (ctx->user_ip4 != cfg->agent_addr || (__u16)ctx->user_port != cfg->dns_port) return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct sl_original_dst *dst = bpf_map_lookup_elem(&sl_dst_by_cookie, &cookie);
    if (!dst) return 1;
    ctx->user_ip4 = dst->addr;
    ctx->user_port = dst->port;
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
