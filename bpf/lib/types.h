/* Structs shared by the BPF programs and Swift (SluiceBPF reads this file through the CSluiceLinux shim).
 * Fixed-width types only; every struct has a layout check here and a MemoryLayout test in Swift.
 * Addresses and ports are in network byte order, as the kernel hands them to cgroup/connect4. */
#ifndef SLUICE_BPF_TYPES_H
#define SLUICE_BPF_TYPES_H

#ifdef __bpf__
#include <linux/types.h>
typedef __u8 sl_u8;
typedef __u16 sl_u16;
typedef __u32 sl_u32;
typedef __u64 sl_u64;
#else
#include <stdint.h>
typedef uint8_t sl_u8;
typedef uint16_t sl_u16;
typedef uint32_t sl_u32;
typedef uint64_t sl_u64;
#endif

/* What a service entry tells connect4 to do. */
enum sl_action {
    SL_ACTION_BALANCE = 1, /* pick a backend from the service's slot table and rewrite the destination */
    SL_ACTION_PROXY = 2,   /* remember the destination, rewrite to the agent's outbound listener */
};

/* How a backend is picked from the slot table. */
enum sl_lb {
    SL_LB_RANDOM = 1, /* a random slot: weighted random, weights quantised into the slot counts */
    SL_LB_MAGLEV = 2, /* slot = hash(client cgroup) % slots: the same client workload keeps its backend */
};

/* Per-CPU counters, indexes into the counters array. */
enum sl_counter {
    SL_COUNT_CONNECTS = 0, /* connects the program saw */
    SL_COUNT_BALANCED = 1, /* rewritten to a backend in the kernel */
    SL_COUNT_REDIRECTED = 2, /* rewritten to the agent */
    SL_COUNT_MISSES = 3,     /* a service whose slot table was missing (an update in flight or a bug) */
    SL_COUNT_EXCLUDED = 4,   /* destination on the exclusion list */
    SL_COUNT_DNS = 5,        /* DNS queries (UDP to port 53) sent to the agent's DNS listener */
    SL_COUNT_DENIED = 6,     /* connects refused: not a service while the mesh is REGISTRY_ONLY */
    SL_COUNT_STRICT = 7,     /* packets from outside the node to a STRICT (mTLS only) workload port, dropped */
    SL_COUNT_AUTHZ = 8,      /* connects to a workload of the node refused by its AuthorizationPolicies (EPERM) */
    SL_COUNT_MAX = 16,
};

/* services map key: the destination as the application dialled it. */
struct sl_service_key {
    sl_u32 addr;  /* IPv4 */
    sl_u16 port;
    sl_u8 proto;  /* IPPROTO_TCP or IPPROTO_UDP */
    sl_u8 pad;
};

/* services map value. Replaced whole by one map update, so a connect sees either the old or the new
 * [slot_base, slot_base + slots) range, never a half-written one: user space fills a fresh range of the slots
 * array first, then flips this entry to it, then frees the old range. */
struct sl_service {
    sl_u32 slot_base;
    sl_u16 slots;   /* 0 with SL_ACTION_PROXY */
    sl_u8 action;   /* enum sl_action */
    sl_u8 lb;       /* enum sl_lb */
    sl_u32 id;      /* the agent's service number, for logs and metrics */
    sl_u32 pad;
};

/* slots array value: one backend. */
struct sl_backend {
    sl_u32 addr;
    sl_u16 port;
    sl_u16 pad;
};

/* config array (one entry): where captured connections go. */
/* The agent's IPv6 listeners are on ::1 with the same ports. */
struct sl_config {
    sl_u32 agent_addr; /* the agent's outbound listener, e.g. 127.0.0.1 */
    sl_u16 agent_port; /* e.g. 15001 */
    sl_u16 dns_port;   /* the agent's DNS listener on agent_addr, e.g. 15053; 0: DNS is not captured */
    sl_u32 flags;      /* enum sl_config_flags */
};

enum sl_config_flags {
    /* Istio's outboundTrafficPolicy REGISTRY_ONLY: TCP connects to anything but a service, an excluded
     * destination or loopback are refused (EPERM) and counted as denied. */
    SL_CONFIG_REGISTRY_ONLY = 1,
};

/* How a connection's destination was rewritten (sl_original_dst.flags). */
enum sl_dst_flags {
    SL_DST_BALANCED = 1,   /* to a backend, in the kernel */
    SL_DST_REDIRECTED = 2, /* to the agent */
};

/* Saved original destination of a rewritten connection, keyed by socket cookie (getpeername answers from it);
 * for connections sent to the agent, copied once established to a map keyed by the client's address, where the
 * agent finds it after accept. */
struct sl_original_dst {
    sl_u32 addr;
    sl_u16 port;
    sl_u16 flags;  /* enum sl_dst_flags */
    sl_u64 cgroup_id;
};

/* sl_dst_by_peer key: the client's address as the agent's accept sees it (network byte order). */
struct sl_peer_key {
    sl_u32 addr;
    sl_u16 port;
    sl_u16 pad;
};

/* IPv6: the same three maps with 16-byte addresses (sl_services6, sl_slots6, sl_dst6_by_cookie). */
struct sl_service_key6 {
    sl_u32 addr[4];
    sl_u16 port;
    sl_u8 proto;
    sl_u8 pad;
};

struct sl_backend6 {
    sl_u32 addr[4];
    sl_u16 port;
    sl_u16 pad;
};

struct sl_original_dst6 {
    sl_u32 addr[4];
    sl_u16 port;
    sl_u16 flags;
    sl_u32 pad;
    sl_u64 cgroup_id;
};

/* sl_dst6_by_peer key: an IPv6 client's address as the agent's accept sees it. */
struct sl_peer_key6 {
    sl_u32 addr[4];
    sl_u16 port;
    sl_u16 pad;
};

/* sl_exclude_cidrs key (an LPM trie key: prefix length, then the address). */
struct sl_cidr_key {
    sl_u32 prefixlen;
    sl_u32 addr;
};

/* PeerAuthentication of a workload port: `port` 0 is the workload's own mode, a port's entry overrides it. */
enum sl_peer_mode {
    SL_PEER_PERMISSIVE = 1, /* plaintext from outside the mesh accepted (Istio's default) */
    SL_PEER_STRICT = 2,     /* only through the agent (HBONE, or a captured connection of this node) */
};

struct sl_inbound_key {
    sl_u32 addr;
    sl_u16 port;
    sl_u16 pad;
};

/* AuthorizationPolicy for calls between workloads of one node, decided by the agent for every (caller's cgroup,
 * workload address, port) and checked at connect(): `port` 0 is any port the agent did not list, `cgroup_id` 0 a
 * caller that is no workload. */
enum sl_authz_verdict {
    SL_AUTHZ_ALLOW = 1,
    SL_AUTHZ_DENY = 2,
};

struct sl_authz_key {
    sl_u64 cgroup_id;
    sl_u32 addr;
    sl_u16 port;
    sl_u16 pad;
};

/* Capacities, shared so that user space can refuse an update that would not fit. */
#define SL_MAX_SERVICES 65536
#define SL_MAX_SLOTS (1 << 20)
#define SL_MAX_SLOTS_PER_SERVICE 65521
#define SL_MAX_EXCLUSIONS 1024
#define SL_MAX_SLOTS6 (1 << 18)
#define SL_MAX_INBOUND 65536
#define SL_MAX_AUTHZ 262144

#define SL_STATIC_ASSERT(c, m) _Static_assert(c, m)
SL_STATIC_ASSERT(sizeof(struct sl_service_key) == 8, "sl_service_key layout");
SL_STATIC_ASSERT(sizeof(struct sl_service) == 16, "sl_service layout");
SL_STATIC_ASSERT(sizeof(struct sl_backend) == 8, "sl_backend layout");
SL_STATIC_ASSERT(sizeof(struct sl_config) == 12, "sl_config layout");
SL_STATIC_ASSERT(sizeof(struct sl_original_dst) == 16, "sl_original_dst layout");
SL_STATIC_ASSERT(sizeof(struct sl_peer_key) == 8, "sl_peer_key layout");
SL_STATIC_ASSERT(sizeof(struct sl_cidr_key) == 8, "sl_cidr_key layout");
SL_STATIC_ASSERT(sizeof(struct sl_inbound_key) == 8, "sl_inbound_key layout");
SL_STATIC_ASSERT(sizeof(struct sl_authz_key) == 16, "sl_authz_key layout");
SL_STATIC_ASSERT(sizeof(struct sl_service_key6) == 20, "sl_service_key6 layout");
SL_STATIC_ASSERT(sizeof(struct sl_backend6) == 20, "sl_backend6 layout");
SL_STATIC_ASSERT(sizeof(struct sl_original_dst6) == 32, "sl_original_dst6 layout");
SL_STATIC_ASSERT(sizeof(struct sl_peer_key6) == 20, "sl_peer_key6 layout");

#endif
