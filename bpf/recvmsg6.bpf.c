// cgroup/recvmsg6: a reply from the agent's DNS listener on [::1] is shown as coming from the server asked.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "lib/maps.h"

SEC("cgroup/recvmsg6")
int sl_recvmsg6(struct bpf_sock_addr *ctx) {
    struct sl_config *cfg = sl_config_get();
    if (!cfg || cfg->dns_port == 0 || (__u16)ctx->user_port != cfg->dns_port) return 1;
    if (!sl_is_loopback6(ctx->user_ip6)) return 1;
    sl_restore_original6(ctx);
    return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
