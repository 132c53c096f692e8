/* DNS capture: UDP to port 53 goes to the agent's DNS listener, and replies appear to come from the server the
 * workload asked. The original server is remembered per socket (cookie) in sl_dst_by_cookie. */
#ifndef SLUICE_BPF_DNS_H
#define SLUICE_BPF_DNS_H

#include "maps.h"

#define SL_DNS_PORT_BE 0x3500 /* htons(53) */

/* Rewrites a UDP destination of port 53 to the agent's DNS listener. Returns 1 when rewritten. */
static __always_inline int sl_redirect_dns(struct bpf_sock_addr *ctx) {
    if ((__u16)ctx->user_port != SL_DNS_PORT_BE) return 0;
    struct sl_config *cfg = sl_config_get();
    if (!cfg || cfg->dns_port == 0) return 0;
    if (sl_excluded(ctx->user_ip4, (__u16)ctx->user_port)) return 0;
    struct sl_original_dst dst = {
        .addr = ctx->user_ip4,
        .port = (__u16)ctx->user_port,
        .flags = SL_DST_REDIRECTED,
        .cgroup_id = bpf_get_current_cgroup_id(),
    };
    __u64 cookie = bpf_get_socket_cookie(ctx);
    bpf_map_update_elem(&sl_dst_by_cookie, &cookie, &dst, BPF_ANY);
    ctx->user_ip4 = cfg->agent_addr;
    ctx->user_port = cfg->dns_port;
    sl_count(SL_COUNT_DNS);
    return 1;
}

/* The IPv6 twin of sl_redirect_dns: to [::1]:dns_port. */
static __always_inline int sl_redirect_dns6(struct bpf_sock_addr *ctx) {
    if ((__u16)ctx->user_port != SL_DNS_PORT_BE) return 0;
    struct sl_config *cfg = sl_config_get();
    if (!cfg || cfg->dns_port == 0) return 0;
    if (sl_port_excluded((__u16)ctx->user_port)) return 0;
    struct sl_original_dst6 dst = {
        .addr = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]},
        .port = (__u16)ctx->user_port,
        .flags = SL_DST_REDIRECTED,
        .cgroup_id = bpf_get_current_cgroup_id(),
    };
    __u64 cookie = bpf_get_socket_cookie(ctx);
    bpf_map_update_elem(&sl_dst6_by_cookie, &cookie, &dst, BPF_ANY);
    sl_to_loopback6(ctx, cfg->dns_port);
    sl_count(SL_COUNT_DNS);
    return 1;
}

#endif
