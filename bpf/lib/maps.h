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

static __always_inline void sl_count(__u32 which) {
    __u64 *v = bpf_map_lookup_elem(&sl_counters, &which);
    if (v) *v += 1;
}

/* True when the mesh admits only its registry's services (REGISTRY_ONLY). */
static __always_inline int sl_registry_only(void) {
    __u32 zero = 0;
    struct sl_config *cfg = bpf_map_lookup_elem(&sl_config, &zero);
    return cfg && (cfg->flags & SL_CONFIG_REGISTRY_ONLY);
}

/* True when the destination is on an exclusion list. */
static __always_inline int sl_excluded(__u32 addr, __u16 port) {
    if (bpf_map_lookup_elem(&sl_exclude_ports, &port)) return 1;
    struct sl_cidr_key k = {.prefixlen = 32, .addr = addr};
    return bpf_map_lookup_elem(&sl_exclude_cidrs, &k) != 0;
}

#endif
