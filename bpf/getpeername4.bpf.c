// cgroup/getpeername4: a workload asking whom it is connected to sees the service address it dialled, not the
// backend the kernel chose or the agent's listener.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

SEC("cgroup/getpeername4")
int sl_getpeername4(struct bpf_sock_addr *ctx) {
    sl_restore_original4(ctx);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
