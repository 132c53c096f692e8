// cgroup/sendmsg6: IPv6 DNS queries sent with sendto() go to the agent's DNS listener on [::1].
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"
#include "lib/dns.h"

SEC("cgroup/sendmsg6")
int sl_sendmsg6(struct bpf_sock_addr *ctx) {
    sl_redirect_dns6(ctx);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
