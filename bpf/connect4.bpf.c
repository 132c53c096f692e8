// cgroup/connect4: services dialled by the workloads of the cgroup are balanced here or sent to the agent.
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <asm-generic/errno.h>
#include "lib/maps.h"
#include "lib/balance.h"
#include "lib/dns.h"

#define SOCK_STREAM 1
#define SOCK_DGRAM 2

SEC("cgroup/connect4")
int sl_connect4(struct bpf_sock_addr *ctx) {
    if (ctx->type == SOCK_DGRAM) {
        // A resolver that connects its UDP socket (glibc does) talks to the agent's DNS listener instead.
        sl_redirect_dns(ctx);
        return 1;
    }
    if (ctx->type != SOCK_STREAM) return 1;
    sl_count(SL_COUNT_CONNECTS);
    if (sl_excluded(ctx->user_ip4, (__u16)ctx->user_port)) {
        sl_count(SL_COUNT_EXCLUDED);
        return 1;
    }
    struct sl_service_key key = {
        .addr = ctx->user_ip4,
        .port = (__u16)ctx->user_port,
        .proto = IPPROTO_TCP,
    };
    struct sl_service *found = bpf_map_lookup_elem(&sl_services, &key);
    if (!found) {
        // A workload of this node dialled directly: its AuthorizationPolicies decide.
        if (sl_l4_denied(bpf_get_current_cgroup_id(), ctx->user_ip4, (__u16)ctx->user_port)) {
            sl_count(SL_COUNT_AUTHZ);
            return 0;
        }
        // Not a mesh service: untouched, unless the mesh admits only its registry (loopback always passes).
        if (sl_registry_only() && (bpf_ntohl(ctx->user_ip4) >> 24) != 127) {
            sl_count(SL_COUNT_DENIED);
            return 0;
        }
        return 1;
    }

    // One copy: every field below comes from the same version of the entry.
    struct sl_service svc_copy = *found;
    const struct sl_service *svc = &svc_copy;
    __u64 cgroup_id = bpf_get_current_cgroup_id();
    struct sl_original_dst dst = {
        .addr = ctx->user_ip4,
        .port = (__u16)ctx->user_port,
        .cgroup_id = cgroup_id,
    };
    __u64 cookie = bpf_get_socket_cookie(ctx);
    if (svc->action == SL_ACTION_BALANCE) {
        struct sl_backend b;
        if (sl_pick_backend(svc, cgroup_id, &b) < 0) {
            sl_count(SL_COUNT_MISSES);
            return 1;
        }
        // A backend that is a workload of this node: its AuthorizationPolicies decide, here, with no proxy hop.
        if (sl_l4_denied(cgroup_id, b.addr, b.port)) {
            sl_count(SL_COUNT_AUTHZ);
            return 0;
        }
        // Remembered so that getpeername shows the service address the application dialled.
        dst.flags = SL_DST_BALANCED;
        bpf_map_update_elem(&sl_dst_by_cookie, &cookie, &dst, BPF_ANY);
        ctx->user_ip4 = b.addr;
        ctx->user_port = b.port;
        sl_count(SL_COUNT_BALANCED);
        return 1;
    }
    // The agent must see this connection: remember where it was going and send it to the agent.
    struct sl_config *cfg = sl_config_get();
    if (!cfg || cfg->agent_port == 0) {
        sl_count(SL_COUNT_MISSES);
        return 1;
    }
    dst.flags = SL_DST_REDIRECTED;
    bpf_map_update_elem(&sl_dst_by_cookie, &cookie, &dst, BPF_ANY);
    ctx->user_ip4 = cfg->agent_addr;
    ctx->user_port = cfg->agent_port;
    sl_count(SL_COUNT_REDIRECTED);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
