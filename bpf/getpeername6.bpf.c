// cgroup/getpeername6: the IPv6 twin of getpeername4.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

SEC("cgroup/getpeername6")
int sl_getpeername6(struct bpf_sock_addr *ctx) {
    sl_restore_original6(ctx);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
