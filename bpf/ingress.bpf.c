// cgroup_skb/ingress: PeerAuthentication STRICT. A packet for a workload port whose mode is STRICT is dropped when
// it comes from outside the node; mesh traffic reaches the workload from its node's agent (which terminated the
// HBONE tunnel) or from a captured workload of the node, both over loopback. PERMISSIVE ports take anything.
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

#define SL_LOOPBACK_IFINDEX 1

static __always_inline __u8 sl_peer_mode(__u32 addr, __u16 port) {
    struct sl_inbound_key k = {.addr = addr, .port = port};
    __u8 *mode = bpf_map_lookup_elem(&sl_inbound, &k);
    if (mode) return *mode;
    k.port = 0;
    mode = bpf_map_lookup_elem(&sl_inbound, &k);
    return mode ? *mode : SL_PEER_PERMISSIVE;
}

SEC("cgroup_skb/ingress")
int sl_ingress(struct __sk_buff *skb) {
    if (skb->protocol != bpf_htons(ETH_P_IP) || skb->ingress_ifindex == SL_LOOPBACK_IFINDEX) return 1;
    struct iphdr ip;
    if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0 || ip.protocol != IPPROTO_TCP) return 1;
    __u16 port;
    if (bpf_skb_load_bytes(skb, ip.ihl * 4 + 2, &port, sizeof(port)) < 0) return 1;
    if (sl_peer_mode(ip.daddr, port) != SL_PEER_STRICT) return 1;
    sl_count(SL_COUNT_STRICT);
    return 0;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
