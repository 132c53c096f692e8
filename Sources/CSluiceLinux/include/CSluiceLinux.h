#ifndef CSLUICE_LINUX_H
#define CSLUICE_LINUX_H

/* The one C target: Linux headers for liburing, libbpf, OpenSSL and nghttp2, plus tiny helpers for what
 * Swift cannot import (macros, flag constants, relaxed atomics). No logic lives here.
 *
 * Order matters: liburing.h defines _XOPEN_SOURCE, which redefines fd_set differently from Foundation's
 * view unless these system headers come first (see shared/LINUX-NOTES.md). */
#include <sys/types.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <signal.h>
#include <stdint.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <liburing.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include <openssl/ssl.h>
#include <openssl/err.h>
#include <nghttp2/nghttp2.h>
#include <sys/mount.h>
#include <sys/vfs.h>
#include <linux/magic.h>

/* Structs shared with the BPF programs: one definition, read by clang for both sides. */
#include "../../../bpf/lib/types.h"

/* ---- io_uring ---- */

static inline uint8_t sl_iosqe_buffer_select(void) { return IOSQE_BUFFER_SELECT; }
static inline uint8_t sl_iosqe_io_link(void) { return IOSQE_IO_LINK; }
static inline uint8_t sl_iosqe_cqe_skip_success(void) { return IOSQE_CQE_SKIP_SUCCESS; }
static inline uint32_t sl_cqe_f_buffer(void) { return IORING_CQE_F_BUFFER; }
static inline uint32_t sl_cqe_f_more(void) { return IORING_CQE_F_MORE; }
static inline uint32_t sl_cqe_buffer_shift(void) { return IORING_CQE_BUFFER_SHIFT; }

/* Allocates, registers and fills nothing: maps a buffer ring of `entries` slots for group `bgid`.
 * liburing 2.3 has no io_uring_setup_buf_ring; this is its documented by-hand equivalent.
 * Returns NULL and sets *err to -errno on failure. */
struct io_uring_buf_ring *sl_setup_buf_ring(struct io_uring *ring, unsigned entries, int bgid, int *err);
void sl_free_buf_ring(struct io_uring *ring, struct io_uring_buf_ring *br, unsigned entries, int bgid);

/* Setup flags known to this kernel's headers; 0 if the header predates them. */
uint32_t sl_setup_single_issuer(void);
uint32_t sl_setup_coop_taskrun(void);
uint32_t sl_setup_defer_taskrun(void);
uint32_t sl_setup_submit_all(void);

/* ---- relaxed single-writer atomics (per-worker metric shards read by the scrape thread) ---- */

static inline uint64_t sl_load_relaxed_u64(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void sl_store_relaxed_u64(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
/* Single writer: a plain load + store, no locked instruction. Readers may see a slightly stale value. */
static inline void sl_add_relaxed_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}
static inline uint8_t sl_load_relaxed_u8(const uint8_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
static inline void sl_store_relaxed_u8(uint8_t *p, uint8_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
static inline int64_t sl_fetch_add_i64(int64_t *p, int64_t v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
static inline int64_t sl_load_i64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

/* ---- splice (GNU extensions the Swift importer does not see without _GNU_SOURCE) ---- */
/* splice(2) with SPLICE_F_MOVE | SPLICE_F_NONBLOCK; returns bytes, 0 at EOF, or -errno. */
long sl_splice_move(int fd_in, int fd_out, size_t len);
/* A non-blocking, close-on-exec pipe of about `size` bytes; returns 0 or -errno. */
int sl_pipe(int fds[2], int size);
unsigned sl_pollrdhup(void);

/* ---- OpenSSL (the settings its headers expose only as macros) ---- */
/* Server defaults: no renegotiation, the server's cipher order, buffers released while idle, versions
 * [min_version, max_version] (0 = library default). Returns 1 on success. */
int sl_tls_configure(SSL_CTX *ctx, int min_version, int max_version, int server);
/* Calls `cb` with the ClientHello's server name before the certificate is chosen. */
void sl_tls_set_servername_callback(SSL_CTX *ctx, int (*cb)(SSL *ssl, int *alert, void *arg));
/* A memory BIO that reads "retry later" (not EOF) when empty: the peer's next bytes are still coming. */
void sl_tls_mem_bio_retry_when_empty(BIO *bio);
/* The URI SANs of the peer's certificate (SPIFFE IDs), newline-separated into `out` (NUL-terminated, truncated
 * at `cap`). Returns how many URIs there were, 0 with no certificate, -1 on error. */
int sl_tls_peer_uris(SSL *ssl, char *out, size_t cap);
/* Sends the server name in the ClientHello. Returns 1 on success. */
int sl_tls_set_host_name(SSL *ssl, const char *name);
static inline int sl_tls_nametype_host_name(void) { return TLSEXT_NAMETYPE_host_name; }
static inline int sl_tls_err_ok(void) { return SSL_TLSEXT_ERR_OK; }
static inline int sl_tls_err_noack(void) { return SSL_TLSEXT_ERR_NOACK; }
static inline int sl_tls_err_alert_fatal(void) { return SSL_TLSEXT_ERR_ALERT_FATAL; }
static inline int sl_tls_alert_unrecognized_name(void) { return SSL_AD_UNRECOGNIZED_NAME; }

/* ---- threads ---- */
void sl_set_thread_name(const char *name);
int sl_errno(void);

#endif
