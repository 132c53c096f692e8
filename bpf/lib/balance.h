/* Backend choice. Helpers return -errno; only the entry points turn results into verdicts. */
#ifndef SLUICE_BPF_BALANCE_H
#define SLUICE_BPF_BALANCE_H

#include "maps.h"

/* A 32-bit mix of the client's cgroup id (murmur3 finaliser): Maglev's key in the kernel. The client's source
 * address is not bound yet at connect time; its workload (cgroup) is what "same client" means here. */
static __always_inline __u32 sl_hash64(__u64 x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (__u32)x;
}

/* Picks a backend of `svc` into *out. -ENOENT when the slot is missing. */
static __always_inline int sl_pick_backend(const struct sl_service *svc, __u64 cgroup_id, struct sl_backend *out) {
    if (svc->slots == 0) return -ENOENT;
    __u32 r = svc->lb == SL_LB_MAGLEV ? sl_hash64(cgroup_id) : bpf_get_prandom_u32();
    __u32 slot = svc->slot_base + r % svc->slots;
    struct sl_backend *b = bpf_map_lookup_elem(&sl_slots, &slot);
    if (!b || b->addr == 0) return -ENOENT;
    *out = *b;
    return 0;
}

/* The IPv6 twin of sl_pick_backend. */
static __always_inline int sl_pick_backend6(const struct sl_service *svc, __u64 cgroup_id, struct sl_backend6 *out) {
    if (svc->slots == 0) return -ENOENT;
    __u32 r = svc->lb == SL_LB_MAGLEV ? sl_hash64(cgroup_id) : bpf_get_prandom_u32();
    __u32 slot = svc->slot_base + r % svc->slots;
    struct sl_backend6 *b = bpf_map_lookup_elem(&sl_slots6, &slot);
    if (!b || b->port == 0) return -ENOENT;
    *out = *b;
    return 0;
}

#endif
