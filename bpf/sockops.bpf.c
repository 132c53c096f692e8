// sockops: once a connection sent to the agent is established, file its original destination under the
// client's address, which is what the agent knows after accept (the verified pattern in LINUX-NOTES.md).
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "lib/maps.h"

SEC("sockops")
int sl_sockops(struct bpf_sock_ops *skops) {
    if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) return 1;
    __u64 cookie = bpf_get_socket_cookie(skops);
    if (skops->family == 10 /* AF_INET6 */) {
        struct sl_original_dst6 *dst6 = bpf_map_lookup_elem(&sl_dst6_by_cookie, &cookie);
        if (!dst6 || !(dst6->flags & SL_DST_REDIRECTED)) return 1;
        struct sl_peer_key6 key6 = {
            .addr = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2], skops->local_ip6[3]},
            .port = bpf_htons((__u16)skops->local_port),
        };
        struct sl_original_dst6 copy6 = *dst6;
        bpf_map_update_elem(&sl_dst6_by_peer, &key6, &copy6, BPF_ANY);
        return 1;
    }
    if (skops->family != 2 /* AF_INET */) return 1;
    struct sl_original_dst *dst = bpf_map_lookup_elem(&sl_dst_by_cookie, &cookie);
    if (!dst || !(dst->flags & SL_DST_REDIRECTED)) return 1;
    struct sl_peer_key key = {
        .addr = skops->local_ip4,
        .port = bpf_htons((__u16)skops->local_port),  // local_port is in host order here
    };
    struct sl_original_dst copy = *dst;
    bpf_map_update_elem(&sl_dst_by_peer, &key, &copy, BPF_ANY);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
