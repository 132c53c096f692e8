// cgroup/connect6: the IPv6 twin of connect4. Connections that need the agent go to its listener on [::1].
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <asm-generic/errno.h>
#include "lib/maps.h"
#include "lib/balance.h"
#include "lib/dns.h"

#define SOCK_STREAM 1
#define SOCK_DGRAM 2

SEC("cgroup/connect6")
int sl_connect6(struct bpf_sock_addr *ctx) {
    if (ctx->type == SOCK_DGRAM) {
        sl_redirect_dns6(ctx);
        return 1;
    }
    if (ctx->type != SOCK_STREAM) return 1;
    sl_count(SL_COUNT_CONNECTS);
    if (sl_port_excluded((__u16)ctx->user_port)) {
        sl_count(SL_COUNT_EXCLUDED);
        return 1;
    }
    struct sl_service_key6 key = {
        .addr = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]},
        .port = (__u16)ctx->user_port,
        .proto = IPPROTO_TCP,
    };
    struct sl_service *found = bpf_map_lookup_elem(&sl_services6, &key);
    if (!found) {
        if (sl_registry_only() && !sl_is_loopback6(key.addr)) {
            sl_count(SL_COUNT_DENIED);
            return 0;
        }
        return 1;
    }
    // One copy: every field below comes from the same version of the entry.
    struct sl_service svc_copy = *found;
    const struct sl_service *svc = &svc_copy;
    __u64 cgroup_id = bpf_get_current_cgroup_id();
    struct sl_original_dst6 dst = {
        .addr = {key.addr[0], key.addr[1], key.addr[2], key.addr[3]},
        .port = key.port,
        .cgroup_id = cgroup_id,
    };
    __u64 cookie = bpf_get_socket_cookie(ctx);
    if (svc->action != SL_ACTION_BALANCE) {
        struct sl_config *cfg = sl_config_get();
        if (!cfg || cfg->agent_port == 0) {
            sl_count(SL_COUNT_MISSES);
            return 1;
        }
        dst.flags = SL_DST_REDIRECTED;
        bpf_map_update_elem(&sl_dst6_by_cookie, &cookie, &dst, BPF_ANY);
        sl_to_loopback6(ctx, cfg->agent_port);
        sl_count(SL_COUNT_REDIRECTED);
        return 1;
    }
    struct sl_backend6 b;
    if (sl_pick_backend6(svc, cgroup_id, &b) < 0) {
        sl_count(SL_COUNT_MISSES);
        return 1;
    }
    dst.flags = SL_DST_BALANCED;
    bpf_map_update_elem(&sl_dst6_by_cookie, &cookie, &dst, BPF_ANY);
    ctx->user_ip6[0] = b.addr[0];
    ctx->user_ip6[1] = b.addr[1];
    ctx->user_ip6[2] = b.addr[2];
    ctx->user_ip6[3] = b.addr[3];
    ctx->user_port = b.port;
    sl_count(SL_COUNT_BALANCED);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
