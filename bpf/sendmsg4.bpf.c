// cgroup/sendmsg4: DNS queries sent with sendto() on an unconnected UDP socket go to the agent's DNS listener.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"
#include "lib/dns.h"

SEC("cgroup/sendmsg4")
int sl_sendmsg4(struct bpf_sock_addr *ctx) {
    sl_redirect_dns(ctx);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
