// cgroup/recvmsg4: a reply from the agent's DNS listener is shown as coming from the server the workload asked.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

SEC("cgroup/recvmsg4")
int sl_recvmsg4(struct bpf_sock_addr *ctx) {
    struct sl_config *cfg = sl_config_get();
    if (!cfg || cfg->dns_port == 0) return 1;
    if (ctx->user_ip4 != cfg->agent_addr || (__u16)ctx->user_port != cfg->dns_port) return 1;
    sl_restore_original4(ctx);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
