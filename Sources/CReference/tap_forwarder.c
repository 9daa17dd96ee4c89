// A minimal forwarder between two Linux TAP interfaces: the yardstick for SoftDev's
// `tap(name=a) | tap(name=b)` link in `softdev bench --net`. Both TAPs are opened as SoftDev's
// TapDevice opens them (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, a 10-byte virtio_net_hdr,
// non-blocking descriptors, brought up) with the same TUNSETOFFLOAD bits, and one thread per
// direction reads a frame (header included) into a 64 KiB+ buffer and writes it, unchanged, to
// the other TAP: read until EAGAIN, then poll the descriptor and a stop eventfd. A write the
// kernel refuses (EAGAIN, EIO) loses the frame and counts it, as TapDevice does.
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>
#include "creference.h"

#define VNET_HDR_SIZE 10
#define BUFFER_SIZE (VNET_HDR_SIZE + 65536 + 1024)

struct direction {
    struct cref_tap_forwarder *forwarder;
    int from, to;
    pthread_t thread;
    int started;
    _Atomic uint64_t frames, bytes, drops;
};

struct cref_tap_forwarder {
    int fds[2];
    int stop_fd;
    struct direction directions[2];   // 0: a -> b, 1: b -> a
};

static int open_tap(const char *name, unsigned offloads, char *error, unsigned long error_len) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) { snprintf(error, error_len, "open /dev/net/tun: %s", strerror(errno)); return -1; }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    int size = VNET_HDR_SIZE;
    if (ioctl(fd, TUNSETIFF, &ifr) != 0) { snprintf(error, error_len, "%s: TUNSETIFF: %s", name, strerror(errno)); goto fail; }
    if (ioctl(fd, TUNSETVNETHDRSZ, &size) != 0) { snprintf(error, error_len, "%s: TUNSETVNETHDRSZ: %s", name, strerror(errno)); goto fail; }
    if (ioctl(fd, TUNSETOFFLOAD, (unsigned long)offloads) != 0) { snprintf(error, error_len, "%s: TUNSETOFFLOAD: %s", name, strerror(errno)); goto fail; }
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) { snprintf(error, error_len, "socket: %s", strerror(errno)); goto fail; }
    int ok = ioctl(s, SIOCGIFFLAGS, &ifr) == 0;
    ifr.ifr_flags |= IFF_UP;
    ok = ok && ioctl(s, SIOCSIFFLAGS, &ifr) == 0;
    if (!ok) snprintf(error, error_len, "%s: bringing it up: %s", name, strerror(errno));
    close(s);
    if (!ok) goto fail;
    return fd;
fail:
    close(fd);
    return -1;
}

static void *forward(void *arg) {
    struct direction *d = arg;
    uint8_t *buffer = malloc(BUFFER_SIZE);
    if (!buffer) return NULL;
    struct pollfd fds[2] = { { .fd = d->from, .events = POLLIN }, { .fd = d->forwarder->stop_fd, .events = POLLIN } };
    for (;;) {
        ssize_t n = read(d->from, buffer, BUFFER_SIZE);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno != EAGAIN) break;
            if (poll(fds, 2, -1) < 0 && errno != EINTR) break;
            if (fds[1].revents) break;
            continue;
        }
        if (n <= VNET_HDR_SIZE) continue;
        if (write(d->to, buffer, (size_t)n) < 0) {
            atomic_fetch_add_explicit(&d->drops, 1, memory_order_relaxed);
        } else {
            atomic_fetch_add_explicit(&d->frames, 1, memory_order_relaxed);
            atomic_fetch_add_explicit(&d->bytes, (uint64_t)(n - VNET_HDR_SIZE), memory_order_relaxed);
        }
    }
    free(buffer);
    return NULL;
}

struct cref_tap_forwarder *cref_tap_forwarder_start(const char *name_a, const char *name_b, unsigned offloads,
                                                    char *error, unsigned long error_len) {
    struct cref_tap_forwarder *f = calloc(1, sizeof *f);
    if (!f) { snprintf(error, error_len, "out of memory"); return NULL; }
    f->fds[0] = f->fds[1] = f->stop_fd = -1;
    if ((f->fds[0] = open_tap(name_a, offloads, error, error_len)) < 0) goto fail;
    if ((f->fds[1] = open_tap(name_b, offloads, error, error_len)) < 0) goto fail;
    if ((f->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0) { snprintf(error, error_len, "eventfd: %s", strerror(errno)); goto fail; }
    for (int i = 0; i < 2; i++) {
        struct direction *d = &f->directions[i];
        d->forwarder = f;
        d->from = f->fds[i];
        d->to = f->fds[1 - i];
        int e = pthread_create(&d->thread, NULL, forward, d);
        if (e != 0) { snprintf(error, error_len, "pthread_create: %s", strerror(e)); goto fail; }
        d->started = 1;
    }
    return f;
fail:
    cref_tap_forwarder_stop(f, NULL);
    return NULL;
}

void cref_tap_forwarder_get_stats(const struct cref_tap_forwarder *f, struct cref_tap_forwarder_stats *stats) {
    memset(stats, 0, sizeof *stats);
    for (int i = 0; i < 2; i++) {
        const struct direction *d = &f->directions[i];
        stats->frames[i] = atomic_load_explicit(&d->frames, memory_order_relaxed);
        stats->bytes[i] = atomic_load_explicit(&d->bytes, memory_order_relaxed);
        stats->drops[i] = atomic_load_explicit(&d->drops, memory_order_relaxed);
    }
}

void cref_tap_forwarder_stop(struct cref_tap_forwarder *f, struct cref_tap_forwarder_stats *stats) {
    if (!f) return;
    if (f->stop_fd >= 0) {
        uint64_t one = 1;
        if (write(f->stop_fd, &one, sizeof one) < 0) { /* the threads still see it pending */ }
    }
    for (int i = 0; i < 2; i++) if (f->directions[i].started) pthread_join(f->directions[i].thread, NULL);
    if (stats) cref_tap_forwarder_get_stats(f, stats);
    for (int i = 0; i < 2; i++) if (f->fds[i] >= 0) close(f->fds[i]);
    if (f->stop_fd >= 0) close(f->stop_fd);
    free(f);
}
