// A minimal netif backend on Xen's own ring macros, serving one queue as a sink and a source:
// tx frames are grant-copied out of the guest and dropped; rx buffers the guest posts are
// filled with frames of a fixed size from a template. It is the yardstick for SoftDev's Swift
// backend: per sweep it does the same protocol work (copy each request once out of the ring,
// validate the copy as netback does, one batch of grant copies for the whole sweep, checked
// and pinned per segment as LocalGrantTable does, one response per slot, push once, notify at
// most once) and nothing else. With poll_us it polls before sleeping exactly as SoftDev's ring
// threads do (cref_poll, AdaptivePoller's rules).
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "creference.h"
#include "cref_grants.h"

#define PAGE LOCALXEN_PAGE_SIZE
#define RING_SLOTS 256u
#define LEGACY_SLOTS_MAX XEN_NETIF_NR_SLOTS_MIN   // more data slots: the frame is dropped
#define FATAL_SLOTS 20                            // this many: the frontend is broken
#define ETH_HLEN 14

// One grant copy: `len` bytes between the guest's page (ref, offset) and `local`.
struct copy_op {
    uint32_t ref;
    uint16_t offset, len;
    uint8_t *local;
    uint8_t to_guest;
    uint8_t failed;
};

// A tx packet of the current sweep.
struct tx_packet {
    RING_IDX first_slot;
    int slots;                  // extras included
    int16_t status;
    int copies_from, copies_to;
    uint32_t bytes;
};

struct cref_net_backend {
    struct cref_net_backend_config config;
    netif_tx_back_ring_t tx;
    netif_rx_back_ring_t rx;
    struct cref_grant_mapper grants;
    pthread_t thread;
    int stop_fd;
    int stopping;
    struct cref_net_backend_stats stats;
    struct cref_poller poller;
    // Sweep state, allocated once.
    struct copy_op copies[2 * RING_SLOTS];
    struct tx_packet packets[RING_SLOTS];
    uint16_t slot_ids[RING_SLOTS];            // each consumed tx slot's id
    uint8_t slot_extra[RING_SLOTS];           // ... and whether it is an extra-info slot
    uint8_t *staging;                         // RING_SLOTS pages: the sweep's tx frames
    uint8_t *template;                        // the rx frame
    uint32_t rx_slots_per_frame;              // data slots + the GSO extra
    // cref_net_backend_set_rx's request, taken by the thread at its next turn.
    uint32_t next_rx_size;
    uint16_t next_rx_gso;
    uint32_t rx_generation, rx_seen;          // atomic
};

static void count(uint64_t *counter, uint64_t n) {
    __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

static void notify(struct cref_net_backend *b, void *ctx) {
    count(&b->stats.notifies, 1);
    b->config.notify(ctx);
}

// The batch of grant copies: each segment checked and pinned, copied, unpinned.
static void grant_copy(struct cref_net_backend *b, int n) {
    for (int i = 0; i < n; i++) {
        struct copy_op *c = &b->copies[i];
        uint8_t *page = (uint32_t)c->offset + c->len <= PAGE ? cref_grant_map(&b->grants, c->ref, c->to_guest) : NULL;
        c->failed = page == NULL;
        if (!page) continue;
        if (c->to_guest) memcpy(page + c->offset, c->local, c->len);
        else memcpy(c->local, page + c->offset, c->len);
        cref_grant_unmap(&b->grants, c->ref, c->to_guest);
    }
}

// MARK: Tx

// Takes one packet's slots from the ring (each request copied once); queues its copies into
// the staging area at *staged. 0 if the frontend broke the ring.
static int take_packet(struct cref_net_backend *b, RING_IDX end, int *ncopies, uint32_t *staged, struct tx_packet *p) {
    netif_tx_back_ring_t *ring = &b->tx;
    netif_tx_request_t first, r;
    RING_COPY_REQUEST(ring, ring->req_cons, &first);
    p->first_slot = ring->req_cons++;
    p->slots = 1;
    p->status = NETIF_RSP_OKAY;
    p->copies_from = p->copies_to = *ncopies;
    p->bytes = 0;
    b->slot_ids[p->first_slot & (RING_SLOTS - 1)] = first.id;
    b->slot_extra[p->first_slot & (RING_SLOTS - 1)] = 0;
    if (first.flags & NETTXF_extra_info) {
        int more = 1;
        while (more) {
            if (ring->req_cons == end) return 0;
            netif_extra_info_t e;
            RING_COPY_REQUEST(ring, ring->req_cons, &r);
            memcpy(&e, &r, sizeof e);
            b->slot_extra[ring->req_cons & (RING_SLOTS - 1)] = 1;
            b->slot_ids[ring->req_cons & (RING_SLOTS - 1)] = 0;
            ring->req_cons++;
            p->slots++;
            if (e.type == XEN_NETIF_EXTRA_TYPE_NONE || e.type >= XEN_NETIF_EXTRA_TYPE_MAX) return 0;
            if (e.type == XEN_NETIF_EXTRA_TYPE_GSO &&
                (e.u.gso.size == 0 || (e.u.gso.type != XEN_NETIF_GSO_TYPE_TCPV4 && e.u.gso.type != XEN_NETIF_GSO_TYPE_TCPV6))) return 0;
            more = e.flags & XEN_NETIF_EXTRA_FLAG_MORE;
        }
    }
    // Further data slots: each no larger than what is left of the frame.
    netif_tx_request_t further[FATAL_SLOTS];
    int nfurther = 0, drop = 0;
    uint32_t first_own = first.size;
    int more = first.flags & NETTXF_more_data;
    while (more) {
        if (ring->req_cons == end || nfurther + 1 >= FATAL_SLOTS) return 0;
        RING_COPY_REQUEST(ring, ring->req_cons, &r);
        b->slot_ids[ring->req_cons & (RING_SLOTS - 1)] = r.id;
        b->slot_extra[ring->req_cons & (RING_SLOTS - 1)] = 0;
        ring->req_cons++;
        p->slots++;
        if ((uint32_t)r.offset + r.size > PAGE) return 0;
        if (nfurther + 1 >= LEGACY_SLOTS_MAX || r.size > first_own) drop = 1;
        if (!drop) first_own -= r.size;
        further[nfurther++] = r;
        more = r.flags & NETTXF_more_data;
    }
    if (!drop && (uint32_t)first.offset + first_own > PAGE) return 0;
    if (drop || first_own < ETH_HLEN) {
        p->status = NETIF_RSP_ERROR;
        return 1;
    }
    uint8_t *frame = b->staging + *staged;
    uint32_t at = 0;
    for (int s = -1; s < nfurther; s++) {
        const netif_tx_request_t *q = s < 0 ? &first : &further[s];
        uint32_t len = s < 0 ? first_own : q->size;
        if (len == 0) continue;   // a zero-length slot carries nothing (XSA-448)
        b->copies[(*ncopies)++] = (struct copy_op){ .ref = q->gref, .offset = q->offset, .len = (uint16_t)len, .local = frame + at };
        at += len;
    }
    p->copies_to = *ncopies;
    p->bytes = first.size;
    *staged += (first.size + 63u) & ~63u;
    return 1;
}

// One sweep of the tx ring: every packet taken, one batch of copies, a response per slot.
// 1 if there was work, -1 if the frontend broke the ring.
static int tx_sweep(struct cref_net_backend *b) {
    netif_tx_back_ring_t *ring = &b->tx;
    RING_IDX rp = ring->sring->req_prod;
    xen_rmb();   // read the entries only after the producer index that covers them
    if (RING_REQUEST_PROD_OVERFLOW(ring, rp) || rp - ring->req_cons > RING_SLOTS) return -1;
    if (rp == ring->req_cons) return 0;
    int npackets = 0, ncopies = 0;
    uint32_t staged = 0;
    while (ring->req_cons != rp) {
        // The staging area holds a ring of slots' pages: room for any packet left.
        if (!take_packet(b, rp, &ncopies, &staged, &b->packets[npackets])) return -1;
        npackets++;
    }
    grant_copy(b, ncopies);
    uint64_t frames = 0, bytes = 0, errors = 0;
    for (int i = 0; i < npackets; i++) {
        struct tx_packet *p = &b->packets[i];
        for (int c = p->copies_from; c < p->copies_to; c++)
            if (b->copies[c].failed) p->status = NETIF_RSP_ERROR;
        for (int s = 0; s < p->slots; s++) {
            RING_IDX slot = (p->first_slot + (RING_IDX)s) & (RING_SLOTS - 1);
            netif_tx_response_t *rsp = RING_GET_RESPONSE(ring, ring->rsp_prod_pvt);
            rsp->id = b->slot_ids[slot];
            rsp->status = b->slot_extra[slot] ? NETIF_RSP_NULL : p->status;
            ring->rsp_prod_pvt++;
        }
        // The sink: the frame's bytes are out of the guest; drop them.
        if (p->status == NETIF_RSP_OKAY) { frames++; bytes += p->bytes; } else errors++;
    }
    int n;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(ring, n);
    if (n) notify(b, b->config.tx_notify_ctx);
    count(&b->stats.tx_frames, frames);
    count(&b->stats.tx_bytes, bytes);
    if (errors) count(&b->stats.tx_errors, errors);
    return 1;
}

// MARK: Rx

// Fills as many frames as the posted buffers hold, one batch of copies. 1 if there was work,
// -1 if the frontend broke the ring.
static int rx_sweep(struct cref_net_backend *b) {
    netif_rx_back_ring_t *ring = &b->rx;
    RING_IDX rp = ring->sring->req_prod;
    xen_rmb();
    if (RING_REQUEST_PROD_OVERFLOW(ring, rp) || rp - ring->req_cons > RING_SLOTS) return -1;
    uint32_t size = b->config.rx_frame_size;
    int gso = b->rx_slots_per_frame > (size + PAGE - 1) / PAGE;
    int ncopies = 0;
    uint64_t frames = 0;
    RING_IDX first_response = ring->rsp_prod_pvt;
    while (rp - ring->req_cons >= b->rx_slots_per_frame) {
        uint32_t at = 0;
        int first = 1;
        while (at < size || first) {
            netif_rx_request_t req;
            RING_COPY_REQUEST(ring, ring->req_cons, &req);
            ring->req_cons++;
            uint32_t len = size - at < PAGE ? size - at : PAGE;
            b->copies[ncopies++] = (struct copy_op){ .ref = req.gref, .offset = 0, .len = (uint16_t)len,
                                                      .local = b->template + at, .to_guest = 1 };
            netif_rx_response_t *rsp = RING_GET_RESPONSE(ring, ring->rsp_prod_pvt++);
            rsp->id = req.id;
            rsp->offset = 0;
            rsp->status = (int16_t)len;
            rsp->flags = (uint16_t)((at + len < size ? NETRXF_more_data : 0) |
                                    (first && gso ? NETRXF_csum_blank | NETRXF_data_validated | NETRXF_extra_info : 0));
            at += len;
            if (first && gso) {
                // The GSO extra in the slot after the first.
                ring->req_cons++;
                netif_extra_info_t *e = (netif_extra_info_t *)RING_GET_RESPONSE(ring, ring->rsp_prod_pvt++);
                memset(e, 0, sizeof *e);
                e->type = XEN_NETIF_EXTRA_TYPE_GSO;
                e->u.gso.type = XEN_NETIF_GSO_TYPE_TCPV4;
                e->u.gso.size = b->config.rx_gso_size;
            }
            first = 0;
        }
        frames++;
    }
    if (!frames) return 0;
    grant_copy(b, ncopies);
    // A failed copy: the first slot of its frame says so (netfront drops the frame).
    for (int i = 0; i < ncopies; i++) {
        if (!b->copies[i].failed) continue;
        // Slots per frame are fixed: find the frame's first response.
        RING_IDX slot = first_response + (RING_IDX)(i / (int)((size + PAGE - 1) / PAGE)) * b->rx_slots_per_frame;
        RING_GET_RESPONSE(ring, slot)->status = NETIF_RSP_ERROR;
    }
    int n;
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(ring, n);
    if (n) notify(b, b->config.rx_notify_ctx);
    count(&b->stats.rx_frames, frames);
    count(&b->stats.rx_bytes, frames * size);
    return 1;
}

// Makes the rx frames `size` bytes (0: none), with a GSO extra of `gso` MSS when the frontend
// takes GSO and the frame is larger than an MTU: the template (Ethernet + IPv4 + TCP headers
// and a payload pattern) and the slots each frame takes.
static void use_rx(struct cref_net_backend *b, uint32_t size, uint16_t gso) {
    b->config.rx_frame_size = size;
    b->config.rx_gso_size = gso;
    static const uint8_t head[14] = { 0x00, 0x16, 0x3e, 0, 0, 1, 0x00, 0x16, 0x3e, 0, 0, 2, 0x08, 0x00 };
    memset(b->template, 0, 54);
    memcpy(b->template, head, sizeof head);
    if (size >= 54) {
        b->template[14] = 0x45;
        b->template[16] = (uint8_t)((size - 14) >> 8);
        b->template[17] = (uint8_t)(size - 14);
        b->template[22] = 64;
        b->template[23] = 6;
        b->template[46] = 0x50;
    }
    for (uint32_t i = 54; i < size; i++) b->template[i] = (uint8_t)(i * 7);
    b->rx_slots_per_frame = (size + PAGE - 1) / PAGE + (b->config.gso && gso && size > 1514 ? 1 : 0);
    if (b->rx_slots_per_frame == 0) b->rx_slots_per_frame = 1;
}

void cref_net_backend_set_rx(struct cref_net_backend *b, uint32_t size, uint16_t gso_size) {
    if (size > 65535 || (size && size < ETH_HLEN)) return;
    b->next_rx_size = size;
    b->next_rx_gso = gso_size;
    __atomic_fetch_add(&b->rx_generation, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t r = write(b->stop_fd, &one, sizeof one);   // wakes the thread
    (void)r;
}

// MARK: The thread

// Work waiting: tx requests, or rx buffers for a whole frame.
static int has_work(struct cref_net_backend *b) {
    if (__atomic_load_n(&b->tx.sring->req_prod, __ATOMIC_ACQUIRE) != b->tx.req_cons) return 1;
    return b->config.rx_frame_size &&
           __atomic_load_n(&b->rx.sring->req_prod, __ATOMIC_ACQUIRE) - b->rx.req_cons >= b->rx_slots_per_frame;
}

// Work waiting, the rx frame size changed, or a stop.
static int rings_ready(void *ctx) {
    struct cref_net_backend *b = ctx;
    return has_work(b) || __atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE) ||
           __atomic_load_n(&b->rx_generation, __ATOMIC_ACQUIRE) != b->rx_seen;
}

static void *run(void *arg) {
    struct cref_net_backend *b = arg;
    struct pollfd fds[3] = { { .fd = b->stop_fd, .events = POLLIN }, { .fd = b->config.tx_wait_fd, .events = POLLIN },
                             { .fd = b->config.rx_wait_fd, .events = POLLIN } };
    nfds_t nfds = b->config.rx_wait_fd == b->config.tx_wait_fd ? 2 : 3;
    int broken = 0;
    while (!__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE)) {
        uint32_t generation = __atomic_load_n(&b->rx_generation, __ATOMIC_ACQUIRE);
        if (generation != b->rx_seen) {
            b->rx_seen = generation;
            use_rx(b, b->next_rx_size, b->next_rx_gso);
        }
        if (!broken) {
            int t = tx_sweep(b);
            int r = b->config.rx_frame_size ? rx_sweep(b) : 0;
            if (t < 0 || r < 0) {
                broken = 1;
                __atomic_store_n(&b->stats.broken, 1, __ATOMIC_RELAXED);
                continue;
            }
            if (t > 0 || r > 0) continue;
            if (cref_poll(&b->poller, b->config.poll_us, rings_ready, b)) continue;
            // Ask for a notification of the next tx request and of the next rx buffer, then
            // look once more: what was published before the event index was seen counts.
            int more;
            RING_FINAL_CHECK_FOR_REQUESTS(&b->tx, more);
            if (more) continue;
            if (b->config.rx_frame_size) {
                b->rx.sring->req_event = b->rx.sring->req_prod + 1;
                xen_mb();
                if (has_work(b)) continue;
            }
        }
        count(&b->stats.wakeups, 1);
        for (nfds_t i = 0; i < nfds; i++) fds[i].revents = 0;
        if (poll(fds, nfds, -1) > 0) {
            for (nfds_t i = 0; i < nfds; i++) {
                if (fds[i].revents & POLLIN) {
                    uint64_t v;
                    ssize_t got = read(fds[i].fd, &v, sizeof v);   // clear pending, unmask
                    (void)got;
                }
            }
        }
    }
    return NULL;
}

struct cref_net_backend *cref_net_backend_start(const struct cref_net_backend_config *config) {
    if (!config || !config->tx_ring || !config->rx_ring || config->tx_wait_fd < 0 || config->rx_wait_fd < 0 || !config->notify ||
        config->rx_frame_size > 65535 || (config->rx_frame_size && config->rx_frame_size < ETH_HLEN)) {
        errno = EINVAL;
        return NULL;
    }
    struct cref_net_backend *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    int e;
    b->config = *config;
    b->poller.backoff = 1;
    b->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    b->staging = malloc((size_t)RING_SLOTS * PAGE);
    b->template = calloc(1, 65536);
    if (b->stop_fd < 0 || !b->staging || !b->template ||
        cref_grant_mapper_init(&b->grants, config->guest_memory, config->total_frames, config->domid) != 0) goto fail;
    use_rx(b, config->rx_frame_size, config->rx_gso_size);
    // The frontend initialised the shared rings (SHARED_RING_INIT); we only attach to them.
    BACK_RING_INIT(&b->tx, (netif_tx_sring_t *)config->tx_ring, PAGE);
    BACK_RING_INIT(&b->rx, (netif_rx_sring_t *)config->rx_ring, PAGE);
    e = pthread_create(&b->thread, NULL, run, b);
    if (e != 0) { errno = e; goto fail; }
    return b;
fail:
    e = errno;
    cref_grant_mapper_destroy(&b->grants);
    if (b->stop_fd >= 0) close(b->stop_fd);
    free(b->staging);
    free(b->template);
    free(b);
    errno = e;
    return NULL;
}

void cref_net_backend_get_stats(const struct cref_net_backend *b, struct cref_net_backend_stats *stats) {
    stats->tx_frames = __atomic_load_n(&b->stats.tx_frames, __ATOMIC_RELAXED);
    stats->tx_bytes = __atomic_load_n(&b->stats.tx_bytes, __ATOMIC_RELAXED);
    stats->tx_errors = __atomic_load_n(&b->stats.tx_errors, __ATOMIC_RELAXED);
    stats->rx_frames = __atomic_load_n(&b->stats.rx_frames, __ATOMIC_RELAXED);
    stats->rx_bytes = __atomic_load_n(&b->stats.rx_bytes, __ATOMIC_RELAXED);
    stats->notifies = __atomic_load_n(&b->stats.notifies, __ATOMIC_RELAXED);
    stats->wakeups = __atomic_load_n(&b->stats.wakeups, __ATOMIC_RELAXED);
    stats->broken = __atomic_load_n(&b->stats.broken, __ATOMIC_RELAXED);
}

void cref_net_backend_stop(struct cref_net_backend *b, struct cref_net_backend_stats *stats) {
    if (!b) return;
    __atomic_store_n(&b->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t r = write(b->stop_fd, &one, sizeof one);
    (void)r;
    pthread_join(b->thread, NULL);
    if (stats) cref_net_backend_get_stats(b, stats);
    cref_grant_mapper_destroy(&b->grants);
    close(b->stop_fd);
    free(b->staging);
    free(b->template);
    free(b);
}
