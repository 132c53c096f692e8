/* Maps shared by the programs. Each program object declares them; user space pins them under
 * /sys/fs/bpf/sluice/ so every object and every agent restart uses the same ones. */
#ifndef SLUICE_BPF_MAPS_H
#define SLUICE_BPF_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "types.h"

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, SL_MAX_SERVICES);
    __type(key, struct sl_service_key);
    __type(value, struct sl_service);
    /* Not preallocated: a replaced element is freed after an RCU grace period, so a reader never sees it
     * reused by a later update mid-read. */
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_services SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, SL_MAX_SLOTS);
    __type(key, __u32);
    __type(value, struct sl_backend);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_slots SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, 1);
    __type(key, __u32);
    __type(value, struct sl_config);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_config SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct sl_original_dst);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_dst_by_cookie SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct sl_peer_key);
    __type(value, struct sl_original_dst);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_dst_by_peer SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
    __uint(max_entries, SL_COUNT_MAX);
    __type(key, __u32);
    __type(value, __u64);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_counters SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, SL_MAX_SERVICES);
    __type(key, struct sl_service_key6);
    __type(value, struct sl_service);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_services6 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_ARRAY);
    __uint(max_entries, SL_MAX_SLOTS6);
    __type(key, __u32);
    __type(value, struct sl_backend6);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_slots6 SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, __u64);
    __type(value, struct sl_original_dst6);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_dst6_by_cookie SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_LRU_HASH);
    __uint(max_entries, 65536);
    __type(key, struct sl_peer_key6);
    __type(value, struct sl_original_dst6);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_dst6_by_peer SEC(".maps");

/* Destinations never touched: the control plane, configured CIDRs, and ports such as the agent's own. */
struct {
    __uint(type, BPF_MAP_TYPE_LPM_TRIE);
    __uint(max_entries, SL_MAX_EXCLUSIONS);
    __type(key, struct sl_cidr_key);
    __type(value, __u8);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_exclude_cidrs SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, SL_MAX_EXCLUSIONS);
    __type(key, __u16);
    __type(value, __u8);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_exclude_ports SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, SL_MAX_INBOUND);
    __type(key, struct sl_inbound_key);
    __type(value, __u8);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_inbound SEC(".maps");

/* Workload addresses of this node that AuthorizationPolicies guard (their callers are looked up in sl_l4_authz). */
struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, SL_MAX_INBOUND);
    __type(key, __u32);
    __type(value, __u8);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_guarded SEC(".maps");

struct {
    __uint(type, BPF_MAP_TYPE_HASH);
    __uint(max_entries, SL_MAX_AUTHZ);
    __type(key, struct sl_authz_key);
    __type(value, __u8);
    __uint(map_flags, BPF_F_NO_PREALLOC);
    __uint(pinning, LIBBPF_PIN_BY_NAME);
} sl_l4_authz SEC(".maps");

static __always_inline void sl_count(__u32 which) {
    __u64 *v = bpf_map_lookup_elem(&sl_counters, &which);
    if (v) *v += 1;
}

/* The agent's settings (one entry), or 0 before the agent wrote them. */
static __always_inline struct sl_config *sl_config_get(void) {
    __u32 zero = 0;
    return bpf_map_lookup_elem(&sl_config, &zero);
}

/* True when the mesh admits only its registry's services (REGISTRY_ONLY). */
static __always_inline int sl_registry_only(void) {
    struct sl_config *cfg = sl_config_get();
    return cfg && (cfg->flags & SL_CONFIG_REGISTRY_ONLY);
}

/* ::1 in the four 32-bit words of bpf_sock_addr.user_ip6 (network order). */
#define SL_LOOPBACK6_W3 0x01000000

static __always_inline int sl_is_loopback6(const __u32 *a) {
    return !a[0] && !a[1] && !a[2] && a[3] == SL_LOOPBACK6_W3;
}

/* Rewrites the destination to [::1]:port (the agent's IPv6 listeners; port in network order). */
static __always_inline void sl_to_loopback6(struct bpf_sock_addr *ctx, __u16 port) {
    ctx->user_ip6[0] = 0;
    ctx->user_ip6[1] = 0;
    ctx->user_ip6[2] = 0;
    ctx->user_ip6[3] = SL_LOOPBACK6_W3;
    ctx->user_port = port;
}

/* Shows the socket's recorded original destination in place of the address in ctx (getpeername, recvmsg).
 * Returns 1 when one was recorded. */
static __always_inline int sl_restore_original4(struct bpf_sock_addr *ctx) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct sl_original_dst *dst = bpf_map_lookup_elem(&sl_dst_by_cookie, &cookie);
    if (!dst) return 0;
    ctx->user_ip4 = dst->addr;
    ctx->user_port = dst->port;
    return 1;
}

static __always_inline int sl_restore_original6(struct bpf_sock_addr *ctx) {
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct sl_original_dst6 *dst = bpf_map_lookup_elem(&sl_dst6_by_cookie, &cookie);
    if (!dst) return 0;
    ctx->user_ip6[0] = dst->addr[0];
    ctx->user_ip6[1] = dst->addr[1];
    ctx->user_ip6[2] = dst->addr[2];
    ctx->user_ip6[3] = dst->addr[3];
    ctx->user_port = dst->port;
    return 1;
}

/* Whether a connect from `cgroup_id` to a workload of this node at addr:port is refused by its AuthorizationPolicies:
 * the caller's own decision, else the one for a caller that is no workload; a guarded workload without a decision
 * refuses (fail closed). */
static __always_inline int sl_l4_denied(__u64 cgroup_id, __u32 addr, __u16 port) {
    if (!bpf_map_lookup_elem(&sl_guarded, &addr)) return 0;
    struct sl_authz_key k = {.cgroup_id = cgroup_id, .addr = addr, .port = port};
    __u8 *v = bpf_map_lookup_elem(&sl_l4_authz, &k);
    if (!v) {
        k.port = 0;
        v = bpf_map_lookup_elem(&sl_l4_authz, &k);
    }
    if (!v) {
        k.cgroup_id = 0;
        k.port = port;
        v = bpf_map_lookup_elem(&sl_l4_authz, &k);
    }
    if (!v) {
        k.port = 0;
        v = bpf_map_lookup_elem(&sl_l4_authz, &k);
    }
    return v ? *v != SL_AUTHZ_ALLOW : 1;
}

/* True when connects to this destination port are never touched. */
static __always_inline int sl_port_excluded(__u16 port) {
    return bpf_map_lookup_elem(&sl_exclude_ports, &port) != 0;
}

/* True when the destination is on an exclusion list. */
static __always_inline int sl_excluded(__u32 addr, __u16 port) {
    if (sl_port_excluded(port)) return 1;
    struct sl_cidr_key k = {.prefixlen = 32, .addr = addr};
    return bpf_map_lookup_elem(&sl_exclude_cidrs, &k) != 0;
}

#endif
