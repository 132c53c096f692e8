#define _GNU_SOURCE
#include "CSluiceLinux.h"
#include <errno.h>
#include <stdlib.h>
#include <pthread.h>
#include <fcntl.h>
#include <poll.h>
#include <string.h>
#include <openssl/x509v3.h>

struct io_uring_buf_ring *sl_setup_buf_ring(struct io_uring *ring, unsigned entries, int bgid, int *err) {
    size_t len = (size_t)entries * sizeof(struct io_uring_buf);
    void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (mem == MAP_FAILED) { *err = -errno; return NULL; }
    struct io_uring_buf_reg reg = { .ring_addr = (unsigned long)mem, .ring_entries = entries, .bgid = (unsigned short)bgid };
    int ret = io_uring_register_buf_ring(ring, &reg, 0);
    if (ret < 0) { munmap(mem, len); *err = ret; return NULL; }
    struct io_uring_buf_ring *br = mem;
    io_uring_buf_ring_init(br);
    *err = 0;
    return br;
}

void sl_free_buf_ring(struct io_uring *ring, struct io_uring_buf_ring *br, unsigned entries, int bgid) {
    io_uring_unregister_buf_ring(ring, bgid);
    munmap(br, (size_t)entries * sizeof(struct io_uring_buf));
}

uint32_t sl_setup_single_issuer(void) {
#ifdef IORING_SETUP_SINGLE_ISSUER
    return IORING_SETUP_SINGLE_ISSUER;
#else
    return 1U << 12;
#endif
}
uint32_t sl_setup_coop_taskrun(void) {
#ifdef IORING_SETUP_COOP_TASKRUN
    return IORING_SETUP_COOP_TASKRUN;
#else
    return 1U << 8;
#endif
}
uint32_t sl_setup_defer_taskrun(void) {
#ifdef IORING_SETUP_DEFER_TASKRUN
    return IORING_SETUP_DEFER_TASKRUN;
#else
    return 1U << 13;
#endif
}
uint32_t sl_setup_submit_all(void) {
#ifdef IORING_SETUP_SUBMIT_ALL
    return IORING_SETUP_SUBMIT_ALL;
#else
    return 1U << 7;
#endif
}

int sl_errno(void) { return errno; }

void sl_set_thread_name(const char *name) { pthread_setname_np(pthread_self(), name); }

long sl_splice_move(int fd_in, int fd_out, size_t len) {
    ssize_t n = splice(fd_in, NULL, fd_out, NULL, len, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    return n < 0 ? -errno : n;
}

int sl_pipe(int fds[2], int size) {
    if (pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0) return -errno;
    (void)fcntl(fds[1], F_SETPIPE_SZ, size);
    return 0;
}

unsigned sl_pollrdhup(void) { return POLLRDHUP; }

int sl_tls_configure(SSL_CTX *ctx, int min_version, int max_version, int server) {
    uint64_t options = SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION;
    if (server) options |= SSL_OP_CIPHER_SERVER_PREFERENCE;
    SSL_CTX_set_options(ctx, options);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (min_version && !SSL_CTX_set_min_proto_version(ctx, min_version)) return 0;
    if (max_version && !SSL_CTX_set_max_proto_version(ctx, max_version)) return 0;
    return 1;
}

void sl_tls_set_servername_callback(SSL_CTX *ctx, int (*cb)(SSL *ssl, int *alert, void *arg)) {
    SSL_CTX_set_tlsext_servername_callback(ctx, cb);
}

void sl_tls_mem_bio_retry_when_empty(BIO *bio) { BIO_set_mem_eof_return(bio, -1); }

int sl_tls_set_host_name(SSL *ssl, const char *name) { return (int)SSL_set_tlsext_host_name(ssl, name); }

int sl_tls_peer_uris(SSL *ssl, char *out, size_t cap) {
    if (cap == 0) return -1;
    out[0] = 0;
    X509 *cert = SSL_get1_peer_certificate(ssl);
    if (!cert) return 0;
    GENERAL_NAMES *names = X509_get_ext_d2i(cert, NID_subject_alt_name, NULL, NULL);
    int found = 0;
    size_t used = 0;
    for (int i = 0; names && i < sk_GENERAL_NAME_num(names); i++) {
        const GENERAL_NAME *n = sk_GENERAL_NAME_value(names, i);
        if (n->type != GEN_URI) continue;
        const unsigned char *uri = ASN1_STRING_get0_data(n->d.uniformResourceIdentifier);
        int len = ASN1_STRING_length(n->d.uniformResourceIdentifier);
        if (len < 0 || used + (size_t)len + 2 > cap) break;
        if (found) out[used++] = '\n';
        memcpy(out + used, uri, (size_t)len);
        used += (size_t)len;
        out[used] = 0;
        found++;
    }
    GENERAL_NAMES_free(names);
    X509_free(cert);
    return found;
}
