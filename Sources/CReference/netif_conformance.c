// A netfront written with Xen's own io/ring.h and io/netif.h macros, and the conformance suite
// it runs against a netif backend (SoftDev's Swift NetTap) on the emulated hypervisor. It does
// on the wire what Linux's xen-netfront does: per queue a one-page tx ring and rx ring, tx data
// granted read-only per slot and revoked when its response comes, a ring's worth of rx buffers
// granted writable and reposted as they are answered (id = ring index & mask), frames in
// several slots, GSO extras, checksum flags. The endpoint below the backend (a Swift test
// device) is reached through two callbacks: what it took from the guest, and a frame to hand up.
#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "creference.h"
#include "cref_grants.h"

#define PAGE LOCALXEN_PAGE_SIZE
#define RING_SLOTS 256u                 // __CONST_RING_SIZE(netif_tx/rx, 4096)
#define MAX_FRAME 65536u
#define MAX_SLOTS 20                    // netback's fatal_skb_slots: we never send more
#define ETH_HLEN 14

// One tx id: a data page (tx_data + id pages), its grant while in flight, the response.
struct tx_id {
    uint8_t outstanding;
    uint8_t has_extra;                  // the first slot of a frame with an extra after it
    uint32_t ref;
    int16_t status;
};

struct queue {
    struct cref_net_queue_env env;
    int index;
    netif_tx_front_ring_t tx;
    netif_rx_front_ring_t rx;
    uint32_t tx_ring_ref, rx_ring_ref;
    uint16_t free_ids[RING_SLOTS];
    unsigned nfree;
    struct tx_id ids[RING_SLOTS];
    int expect_null;                    // the last response was a first slot with an extra
    int64_t rx_refs[RING_SLOTS];        // the grant of each posted buffer (-1: none)
    // The rx frame being assembled across calls.
    int rx_state;                       // 0: first slot next, 1: an extra, 2: more data
    uint16_t rx_first_flags;
    uint32_t rx_len;
    int rx_slots;
    int rx_error;
    netif_extra_info_t rx_gso;
    int rx_has_gso;
    uint8_t *rx_buf;                    // MAX_FRAME
};

struct cref_netfront {
    struct cref_netfront_env env;
    struct cref_guest_grants grants;
    struct queue q[CREF_NET_MAX_QUEUES];
    // Rule breaches seen on any response, over the suite.
    int tx_breaches, rx_breaches, busy_grants;
    char tx_breach[160], rx_breach[160];
    uint64_t tx_slots_sent, tx_responses, tx_extras_sent, tx_nulls;
    uint64_t rx_responses;
    uint8_t *frame, *taken;             // MAX_FRAME each: what we send, what the endpoint took
    struct cref_results out;
};

// MARK: Set-up

static int post_rx_buffer(struct cref_netfront *f, struct queue *q) {
    RING_IDX i = q->rx.req_prod_pvt;
    uint16_t id = (uint16_t)(i & (RING_SLOTS - 1));
    int64_t ref = cref_guest_grant(&f->grants, q->env.rx_data_frame + id, 0);
    if (ref < 0) return -1;
    q->rx_refs[id] = ref;
    netif_rx_request_t *req = RING_GET_REQUEST(&q->rx, i);
    req->id = id;
    req->gref = (grant_ref_t)ref;
    q->rx.req_prod_pvt = i + 1;
    return 0;
}

struct cref_netfront *cref_netfront_init(const struct cref_netfront_env *env, uint32_t *tx_refs, uint32_t *rx_refs) {
    if (!env || !env->grant_table || env->queues < 1 || env->queues > CREF_NET_MAX_QUEUES || !env->notify ||
        !env->endpoint_take || !env->endpoint_send || env->free_refs < env->queues * (2 + 2 * RING_SLOTS) + 64) {
        errno = EINVAL;
        return NULL;
    }
    for (uint32_t i = 0; i < env->queues; i++) {
        const struct cref_net_queue_env *e = &env->queue[i];
        if (!e->tx_ring || !e->rx_ring || !e->tx_data || !e->rx_data || e->tx_wait_fd < 0 || e->rx_wait_fd < 0) {
            errno = EINVAL;
            return NULL;
        }
    }
    struct cref_netfront *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->env = *env;
    if (!f->env.timeout_ms) f->env.timeout_ms = 5000;
    f->frame = malloc(MAX_FRAME);
    f->taken = malloc(MAX_FRAME);
    if (!f->frame || !f->taken ||
        cref_guest_grants_init(&f->grants, env->grant_table, env->backend_domid, env->first_free_ref, env->free_refs) != 0) {
        free(f->frame);
        free(f->taken);
        free(f);
        errno = ENOMEM;
        return NULL;
    }
    for (uint32_t i = 0; i < env->queues; i++) {
        struct queue *q = &f->q[i];
        q->env = env->queue[i];
        q->index = (int)i;
        q->rx_buf = malloc(MAX_FRAME);
        netif_tx_sring_t *txs = q->env.tx_ring;
        netif_rx_sring_t *rxs = q->env.rx_ring;
        SHARED_RING_INIT(txs);
        FRONT_RING_INIT(&q->tx, txs, PAGE);
        SHARED_RING_INIT(rxs);
        FRONT_RING_INIT(&q->rx, rxs, PAGE);
        q->tx_ring_ref = (uint32_t)cref_guest_grant(&f->grants, q->env.tx_ring_frame, 0);
        q->rx_ring_ref = (uint32_t)cref_guest_grant(&f->grants, q->env.rx_ring_frame, 0);
        tx_refs[i] = q->tx_ring_ref;
        rx_refs[i] = q->rx_ring_ref;
        for (unsigned id = 0; id < RING_SLOTS; id++) {
            q->free_ids[id] = (uint16_t)(RING_SLOTS - 1 - id);
            q->rx_refs[id] = -1;
        }
        q->nfree = RING_SLOTS;
        // A ring's worth of buffers, posted before the backend connects (xennet_alloc_rx_buffers).
        for (unsigned n = 0; n < RING_SLOTS; n++) post_rx_buffer(f, q);
        RING_PUSH_REQUESTS(&q->rx);
        if (!q->rx_buf) { cref_netfront_free(f); errno = ENOMEM; return NULL; }
    }
    return f;
}

int cref_netfront_free(struct cref_netfront *f) {
    if (!f) return 0;
    int busy = 0;
    for (uint32_t i = 0; i < f->env.queues; i++) {
        struct queue *q = &f->q[i];
        busy += cref_guest_end_access(&f->grants, q->tx_ring_ref) != 0;
        busy += cref_guest_end_access(&f->grants, q->rx_ring_ref) != 0;
        for (unsigned id = 0; id < RING_SLOTS; id++) {
            if (q->rx_refs[id] >= 0) busy += cref_guest_end_access(&f->grants, (uint32_t)q->rx_refs[id]) != 0;
            if (q->ids[id].outstanding) busy += cref_guest_end_access(&f->grants, q->ids[id].ref) != 0;
        }
        free(q->rx_buf);
    }
    cref_guest_grants_destroy(&f->grants);
    free(f->frame);
    free(f->taken);
    free(f);
    return busy;
}

// MARK: Results

#define check cref_check

#define tx_breach(f, ...) cref_breach(&(f)->tx_breaches, (f)->tx_breach, sizeof (f)->tx_breach, __VA_ARGS__)
#define rx_breach(f, ...) cref_breach(&(f)->rx_breaches, (f)->rx_breach, sizeof (f)->rx_breach, __VA_ARGS__)

// MARK: Events

// Waits for either of the queue's channels (one fd when not split); 0 on an event.
static int wait_queue(struct cref_netfront *f, struct queue *q, uint32_t timeout_ms) {
    struct pollfd p[2] = { { .fd = q->env.tx_wait_fd, .events = POLLIN }, { .fd = q->env.rx_wait_fd, .events = POLLIN } };
    int n = q->env.tx_wait_fd == q->env.rx_wait_fd ? 1 : 2;
    int r;
    (void)f;
    do r = poll(p, (nfds_t)n, (int)timeout_ms); while (r < 0 && errno == EINTR);
    if (r <= 0) return -1;
    for (int i = 0; i < n; i++) {
        if (p[i].revents & POLLIN) {
            uint64_t v;
            ssize_t got = read(p[i].fd, &v, sizeof v);   // clear pending, unmask
            (void)got;
        }
    }
    return 0;
}

// MARK: Frames

// An Ethernet + IPv4 + TCP (or UDP) frame of `len` bytes with a payload pattern from `seed`.
static void build_frame(uint8_t *b, uint32_t len, uint8_t proto, uint8_t seed) {
    memset(b, 0, len < 54 ? len : 54);
    static const uint8_t head[14] = { 0x00, 0x16, 0x3e, 0, 0, 2, 0x00, 0x16, 0x3e, 0, 0, 1, 0x08, 0x00 };
    memcpy(b, head, len < 14 ? len : 14);
    if (len >= 54) {
        uint32_t ip = len - 14;
        b[14] = 0x45;
        b[16] = (uint8_t)(ip >> 8);
        b[17] = (uint8_t)ip;
        b[22] = 64;
        b[23] = proto;
        b[26] = 10; b[29] = 1; b[30] = 10; b[33] = 2;
        b[34] = 0x30; b[35] = 0x39; b[37] = 80;
        if (proto == 6) { b[46] = 0x50; b[47] = 0x18; }
        else { b[38] = (uint8_t)((len - 34) >> 8); b[39] = (uint8_t)(len - 34); }
    }
    for (uint32_t i = 54; i < len; i++) b[i] = (uint8_t)(i * 7 + seed);
}

// A frame to send on a tx ring, and what became of it.
struct txframe {
    const uint8_t *bytes;
    uint32_t len;
    uint16_t first_offset;              // where the first slot's data starts in its page
    int first_own;                      // the first slot's own bytes (-1: as much as fits)
    uint16_t flags;                     // NETTXF_csum_blank / data_validated
    uint8_t gso_type;
    uint16_t gso_size;
    // Outcome.
    uint16_t ids[MAX_SLOTS];
    int nids;
    int16_t status;                     // the first slot's status
    int consistent;                     // every data slot answered with the same status
};

// Puts `t` on the ring (not pushed): its data slots and, after the first, its GSO extra.
static int put_frame(struct cref_netfront *f, struct queue *q, struct txframe *t) {
    uint32_t first = t->first_own >= 0 ? (uint32_t)t->first_own : PAGE - t->first_offset;
    if (first > t->len) first = t->len;
    int slots = 1 + (int)((t->len - first + PAGE - 1) / PAGE);
    int extra = t->gso_type != 0;
    if (slots > MAX_SLOTS || (unsigned)slots > q->nfree || RING_FREE_REQUESTS(&q->tx) < (unsigned)(slots + extra)) return -1;
    t->nids = 0;
    uint32_t done = 0;
    for (int s = 0; s < slots; s++) {
        uint16_t id = q->free_ids[--q->nfree];
        uint32_t offset = s == 0 ? t->first_offset : 0;
        uint32_t own = s == 0 ? first : (t->len - done < PAGE ? t->len - done : PAGE);
        memcpy((uint8_t *)q->env.tx_data + (size_t)id * PAGE + offset, t->bytes + done, own);
        int64_t ref = cref_guest_grant(&f->grants, q->env.tx_data_frame + id, 1);
        if (ref < 0) return -1;
        q->ids[id] = (struct tx_id){ .outstanding = 1, .has_extra = (uint8_t)(s == 0 && extra), .ref = (uint32_t)ref };
        netif_tx_request_t req = {
            .gref = (grant_ref_t)ref,
            .offset = (uint16_t)offset,
            .flags = (uint16_t)((s == 0 ? t->flags | (extra ? NETTXF_extra_info : 0) : 0) | (s + 1 < slots ? NETTXF_more_data : 0)),
            .id = id,
            .size = (uint16_t)(s == 0 ? t->len : own),   // the first slot's size is the frame's
        };
        *RING_GET_REQUEST(&q->tx, q->tx.req_prod_pvt) = req;
        q->tx.req_prod_pvt++;
        t->ids[t->nids++] = id;
        done += own;
        f->tx_slots_sent++;
        if (s == 0 && extra) {
            netif_tx_request_t *slot = RING_GET_REQUEST(&q->tx, q->tx.req_prod_pvt);
            memset(slot, 0, sizeof *slot);
            netif_extra_info_t *e = (netif_extra_info_t *)slot;
            e->type = XEN_NETIF_EXTRA_TYPE_GSO;
            e->flags = 0;
            e->u.gso.size = t->gso_size;
            e->u.gso.type = t->gso_type;
            q->tx.req_prod_pvt++;
            f->tx_slots_sent++;
            f->tx_extras_sent++;
        }
    }
    return 0;
}

// Takes one tx response: frees its id (revoking the grant, which the backend must have
// released) or checks that an RSP_NULL answers the extra after a first slot.
static void take_tx_response(struct cref_netfront *f, struct queue *q, const netif_tx_response_t *r) {
    f->tx_responses++;
    if (r->status == NETIF_RSP_NULL) {
        f->tx_nulls++;
        if (!q->expect_null) tx_breach(f, "queue %d: RSP_NULL that answers no extra-info slot", q->index);
        q->expect_null = 0;
        return;
    }
    if (q->expect_null) tx_breach(f, "queue %d: the extra-info slot after id %u not answered RSP_NULL next", q->index, r->id);
    q->expect_null = 0;
    if (r->id >= RING_SLOTS || !q->ids[r->id].outstanding) {
        tx_breach(f, "queue %d: response for id %u, which is not in flight", q->index, r->id);
        return;
    }
    struct tx_id *t = &q->ids[r->id];
    t->outstanding = 0;
    t->status = r->status;
    if (cref_guest_end_access(&f->grants, t->ref) != 0) {
        f->busy_grants++;   // netfront: "Grant still in use by backend domain"
    }
    q->free_ids[q->nfree++] = r->id;
    q->expect_null = t->has_extra;
}

// Takes every tx response published so far; 1 if any.
static int collect_tx(struct cref_netfront *f, struct queue *q) {
    int took = 0;
    for (;;) {
        RING_IDX rp = q->tx.sring->rsp_prod;
        xen_rmb();   // read the responses only after the producer index that covers them
        if (RING_RESPONSE_PROD_OVERFLOW(&q->tx, rp)) {
            tx_breach(f, "queue %d: rsp_prod %u with rsp_cons %u", q->index, rp, q->tx.rsp_cons);
            return took;
        }
        while (q->tx.rsp_cons != rp) {
            netif_tx_response_t r;
            RING_COPY_RESPONSE(&q->tx, q->tx.rsp_cons, &r);
            q->tx.rsp_cons++;
            take_tx_response(f, q, &r);
            took = 1;
        }
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&q->tx, more);
        if (!more) return took;
    }
}

// Sends `n` frames on queue `q` (one push, one notification at most) and waits until every
// slot is answered; fills each frame's status. 0 when all were answered.
static int send_frames(struct cref_netfront *f, struct queue *q, struct txframe *t, int n, char *why, size_t len) {
    for (int i = 0; i < n; i++) {
        if (put_frame(f, q, &t[i]) != 0) { snprintf(why, len, "no room on the tx ring for frame %d", i); return -1; }
    }
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->tx, notify);
    if (notify) f->env.notify(q->env.tx_notify_ctx);
    for (;;) {
        collect_tx(f, q);
        int pending = 0;
        for (int i = 0; i < n; i++)
            for (int k = 0; k < t[i].nids; k++) pending += q->ids[t[i].ids[k]].outstanding;
        if (!pending && !q->expect_null) break;
        if (wait_queue(f, q, f->env.timeout_ms) != 0) {
            snprintf(why, len, "timed out: %d tx slots unanswered", pending);
            return -1;
        }
    }
    for (int i = 0; i < n; i++) {
        t[i].status = q->ids[t[i].ids[0]].status;
        t[i].consistent = 1;
        for (int k = 1; k < t[i].nids; k++) t[i].consistent &= q->ids[t[i].ids[k]].status == t[i].status;
    }
    return 0;
}

// MARK: Receiving

struct rxframe {
    uint32_t len;
    uint16_t flags;                     // the first slot's
    int slots;                          // data slots
    int has_gso;
    netif_extra_info_t gso;
    int error;                          // a slot's status was negative
};

// One rx response slot at ring index `i`; 1 when it completes a frame (copied to *out).
static int take_rx_slot(struct cref_netfront *f, struct queue *q, RING_IDX i, struct rxframe *out) {
    uint16_t id = (uint16_t)(i & (RING_SLOTS - 1));
    int done = 0;
    f->rx_responses++;
    if (q->rx_state == 1) {
        netif_extra_info_t e;
        memcpy(&e, RING_GET_RESPONSE(&q->rx, i), sizeof e);
        if (e.type == XEN_NETIF_EXTRA_TYPE_GSO) { q->rx_gso = e; q->rx_has_gso = 1; }
        else if (e.type == XEN_NETIF_EXTRA_TYPE_NONE || e.type >= XEN_NETIF_EXTRA_TYPE_MAX)
            rx_breach(f, "queue %d: extra-info slot %u of type %u", q->index, i, e.type);
        if (!(e.flags & XEN_NETIF_EXTRA_FLAG_MORE)) {
            if (q->rx_first_flags & NETRXF_more_data) q->rx_state = 2;
            else done = 1;
        }
    } else {
        netif_rx_response_t r;
        RING_COPY_RESPONSE(&q->rx, i, &r);
        // netfront takes the buffer of the slot, not of the id: they must agree.
        if (r.id != id) rx_breach(f, "queue %d: rx response with id %u in the slot of request id %u", q->index, r.id, id);
        if (r.status < 0) q->rx_error = 1;
        else if ((uint32_t)r.offset + (uint32_t)r.status > PAGE)
            rx_breach(f, "queue %d: rx response offset %u + status %d > 4096", q->index, r.offset, r.status);
        else if (q->rx_len + (uint32_t)r.status > MAX_FRAME)
            rx_breach(f, "queue %d: rx frame longer than 64 KiB", q->index);
        else {
            memcpy(q->rx_buf + q->rx_len, (uint8_t *)q->env.rx_data + (size_t)id * PAGE + r.offset, (size_t)r.status);
            q->rx_len += (uint32_t)r.status;
        }
        q->rx_slots++;
        if (q->rx_state == 0) {
            q->rx_first_flags = r.flags;
            if (r.flags & NETRXF_extra_info) q->rx_state = 1;
            else if (r.flags & NETRXF_more_data) q->rx_state = 2;
            else done = 1;
        } else if (!(r.flags & NETRXF_more_data)) {
            done = 1;
        }
    }
    // The buffer's grant goes back (the backend must have released it), and it is posted
    // again at the next request index, which names this same page.
    if (q->rx_refs[id] >= 0 && cref_guest_end_access(&f->grants, (uint32_t)q->rx_refs[id]) != 0) f->busy_grants++;
    q->rx_refs[id] = -1;
    post_rx_buffer(f, q);
    if (done) {
        if (q->rx_slots > XEN_NETIF_NR_SLOTS_MIN + 1)
            rx_breach(f, "queue %d: an rx frame of %d data slots (netfront takes %d)", q->index, q->rx_slots, XEN_NETIF_NR_SLOTS_MIN);
        out->len = q->rx_len;
        out->flags = q->rx_first_flags;
        out->slots = q->rx_slots;
        out->has_gso = q->rx_has_gso;
        out->gso = q->rx_gso;
        out->error = q->rx_error;
        q->rx_state = 0;
        q->rx_len = 0;
        q->rx_slots = 0;
        q->rx_has_gso = 0;
        q->rx_error = 0;
    }
    return done;
}

// Waits up to timeout_ms for the next frame on queue q's rx ring; 1 if one came (its bytes in
// q->rx_buf), 0 if none.
static int receive_frame(struct cref_netfront *f, struct queue *q, struct rxframe *out, uint32_t timeout_ms) {
    for (;;) {
        RING_IDX rp = q->rx.sring->rsp_prod;
        xen_rmb();
        if (RING_RESPONSE_PROD_OVERFLOW(&q->rx, rp)) {
            rx_breach(f, "queue %d: rx rsp_prod %u with rsp_cons %u", q->index, rp, q->rx.rsp_cons);
            return 0;
        }
        int got = 0;
        while (q->rx.rsp_cons != rp && !got) {
            RING_IDX i = q->rx.rsp_cons++;
            got = take_rx_slot(f, q, i, out);
        }
        int notify;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&q->rx, notify);
        if (notify) f->env.notify(q->env.rx_notify_ctx);
        if (got) return 1;
        int more;
        RING_FINAL_CHECK_FOR_RESPONSES(&q->rx, more);
        if (more) continue;
        if (wait_queue(f, q, timeout_ms) != 0) return 0;
    }
}

// Throws away what a failed check may have left: frames at the endpoint and on rx rings.
static void drain(struct cref_netfront *f) {
    struct cref_net_meta m;
    while (f->env.endpoint_take(f->env.endpoint_ctx, f->taken, MAX_FRAME, &m, 0) >= 0) {}
    struct rxframe r;
    for (uint32_t i = 0; i < f->env.queues; i++)
        while (receive_frame(f, &f->q[i], &r, 0)) {}
}

// MARK: Checks

// The endpoint's next frame is `bytes` with metadata `want`; explains why not in `why`.
static int endpoint_got(struct cref_netfront *f, const uint8_t *bytes, uint32_t len, const struct cref_net_meta *want,
                        char *why, size_t wlen) {
    struct cref_net_meta m;
    memset(&m, 0, sizeof m);
    int64_t n = f->env.endpoint_take(f->env.endpoint_ctx, f->taken, MAX_FRAME, &m, f->env.timeout_ms);
    if (n < 0) { snprintf(why, wlen, "the endpoint got no frame of %u bytes", len); return 0; }
    if ((uint32_t)n != len || memcmp(f->taken, bytes, len) != 0) {
        uint32_t at = 0;
        while (at < len && at < (uint32_t)n && f->taken[at] == bytes[at]) at++;
        snprintf(why, wlen, "the endpoint got %lld bytes, %u sent; first difference at byte %u", (long long)n, len, at);
        return 0;
    }
    if (m.queue != want->queue) { snprintf(why, wlen, "%u-byte frame arrived from queue %u, sent on %u", len, m.queue, want->queue); return 0; }
    if (m.csum != want->csum || (want->csum == CREF_NET_CSUM_PARTIAL &&
                                 (m.csum_start != want->csum_start || m.csum_offset != want->csum_offset))) {
        snprintf(why, wlen, "%u-byte frame: checksum %u (%u, %u), expected %u (%u, %u)", len, m.csum, m.csum_start, m.csum_offset,
                 want->csum, want->csum_start, want->csum_offset);
        return 0;
    }
    if (m.gso_type != want->gso_type || (want->gso_type && m.gso_size != want->gso_size)) {
        snprintf(why, wlen, "%u-byte frame: GSO type %u size %u, expected type %u size %u", len, m.gso_type, m.gso_size,
                 want->gso_type, want->gso_size);
        return 0;
    }
    return 1;
}

// The guest's next frame on `q` is `bytes`; its first flags, slots and extra are left in *r.
static int guest_got(struct cref_netfront *f, struct queue *q, const uint8_t *bytes, uint32_t len, struct rxframe *r,
                     char *why, size_t wlen) {
    if (!receive_frame(f, q, r, f->env.timeout_ms)) { snprintf(why, wlen, "queue %d received no frame of %u bytes", q->index, len); return 0; }
    if (r->error) { snprintf(why, wlen, "a slot of the %u-byte frame has an error status", len); return 0; }
    if (r->len != len || memcmp(q->rx_buf, bytes, len) != 0) {
        uint32_t at = 0;
        while (at < len && at < r->len && q->rx_buf[at] == bytes[at]) at++;
        snprintf(why, wlen, "received %u bytes, %u sent; first difference at byte %u", r->len, len, at);
        return 0;
    }
    return 1;
}

static const struct cref_net_meta plain_meta = { 0 };

static int sent_ok(const struct txframe *t, int n, char *why, size_t len) {
    for (int i = 0; i < n; i++) {
        if (t[i].status != NETIF_RSP_OKAY || !t[i].consistent) {
            snprintf(why, len, "frame %d (%u bytes) answered %d%s", i, t[i].len, t[i].status, t[i].consistent ? "" : ", its slots differently");
            return 0;
        }
    }
    return 1;
}

static void check_ring_sizes(struct cref_netfront *f) {
    struct queue *q = &f->q[0];
    unsigned want = __CONST_RING_SIZE(netif_tx, PAGE);
    check(f, "ring-sizes", RING_SIZE(&q->tx) == 256 && RING_SIZE(&q->rx) == 256 && want == 256,
          "tx %u, rx %u entries per page", RING_SIZE(&q->tx), RING_SIZE(&q->rx));
}

// Frames of one slot, at several offsets in their page, byte-exact through the backend.
static void check_tx_single(struct cref_netfront *f) {
    char why[200];
    static const uint32_t lens[] = { 60, 1000, 1514 };
    static const uint16_t offsets[] = { 0, 100, 4096 - 1514 };
    uint8_t *bufs[3];
    struct txframe t[3];
    for (int i = 0; i < 3; i++) {
        bufs[i] = f->frame + i * 2048;
        build_frame(bufs[i], lens[i], 6, (uint8_t)(11 + i));
        t[i] = (struct txframe){ .bytes = bufs[i], .len = lens[i], .first_offset = offsets[i], .first_own = -1 };
    }
    if (send_frames(f, &f->q[0], t, 3, why, sizeof why) != 0 || !sent_ok(t, 3, why, sizeof why)) { check(f, "tx-single-slot", 0, "%s", why); return; }
    for (int i = 0; i < 3; i++)
        if (!endpoint_got(f, bufs[i], lens[i], &plain_meta, why, sizeof why)) { check(f, "tx-single-slot", 0, "%s", why); return; }
    check(f, "tx-single-slot", 1, "60, 1000 and 1514 bytes at page offsets 0, 100, 2582");
}

static void check_rx_single(struct cref_netfront *f) {
    char why[200];
    static const uint32_t lens[] = { 60, 1000, 1514 };
    for (int i = 0; i < 3; i++) {
        build_frame(f->frame + i * 2048, lens[i], 6, (uint8_t)(21 + i));
        f->env.endpoint_send(f->env.endpoint_ctx, f->frame + i * 2048, lens[i], &plain_meta);
    }
    for (int i = 0; i < 3; i++) {
        struct rxframe r;
        if (!guest_got(f, &f->q[0], f->frame + i * 2048, lens[i], &r, why, sizeof why)) { check(f, "rx-single-slot", 0, "%s", why); return; }
        if (r.slots != 1 || (r.flags & (NETRXF_more_data | NETRXF_extra_info | NETRXF_csum_blank | NETRXF_data_validated))) {
            check(f, "rx-single-slot", 0, "%u-byte frame in %d slots, flags 0x%x", lens[i], r.slots, r.flags);
            return;
        }
    }
    check(f, "rx-single-slot", 1, "60, 1000 and 1514 bytes, one slot each, no flags");
}

static void check_tx_multi(struct cref_netfront *f) {
    char why[200];
    uint8_t *a = f->frame, *b = f->frame + 9000;
    build_frame(a, 9000, 6, 31);
    build_frame(b, 9000, 6, 32);
    // 2048 + 4096 + 2856 bytes, and 4096 + 4096 + 808.
    struct txframe t[2] = { { .bytes = a, .len = 9000, .first_offset = 2048, .first_own = -1 },
                            { .bytes = b, .len = 9000, .first_offset = 0, .first_own = -1 } };
    if (send_frames(f, &f->q[0], t, 2, why, sizeof why) != 0 || !sent_ok(t, 2, why, sizeof why) ||
        !endpoint_got(f, a, 9000, &plain_meta, why, sizeof why) || !endpoint_got(f, b, 9000, &plain_meta, why, sizeof why)) {
        check(f, "tx-multi-slot-9000", 0, "%s", why);
        return;
    }
    check(f, "tx-multi-slot-9000", 1, "two 9000-byte frames in 3 slots each, one starting mid-page");
}

static void check_rx_multi(struct cref_netfront *f) {
    char why[200];
    build_frame(f->frame, 9000, 6, 41);
    f->env.endpoint_send(f->env.endpoint_ctx, f->frame, 9000, &plain_meta);
    struct rxframe r;
    if (!guest_got(f, &f->q[0], f->frame, 9000, &r, why, sizeof why)) { check(f, "rx-multi-slot-9000", 0, "%s", why); return; }
    if (r.slots < 3 || (r.flags & NETRXF_extra_info)) { check(f, "rx-multi-slot-9000", 0, "%d slots, flags 0x%x", r.slots, r.flags); return; }
    check(f, "rx-multi-slot-9000", 1, "9000 bytes in %d slots chained by more_data", r.slots);
}

#define GSO_LEN 65000u
#define MSS 1448

static void check_tx_gso(struct cref_netfront *f) {
    char why[200];
    build_frame(f->frame, GSO_LEN, 6, 51);
    uint64_t nulls = f->tx_nulls;
    struct txframe t = { .bytes = f->frame, .len = GSO_LEN, .first_offset = 0, .first_own = -1,
                         .flags = NETTXF_csum_blank | NETTXF_data_validated, .gso_type = XEN_NETIF_GSO_TYPE_TCPV4, .gso_size = MSS };
    if (send_frames(f, &f->q[0], &t, 1, why, sizeof why) != 0 || !sent_ok(&t, 1, why, sizeof why)) { check(f, "tx-gso-tcpv4-64k", 0, "%s", why); return; }
    if (f->tx_nulls != nulls + 1) { check(f, "tx-gso-tcpv4-64k", 0, "%llu RSP_NULL for the extra-info slot", (unsigned long long)(f->tx_nulls - nulls)); return; }
    struct cref_net_meta want = { .csum = CREF_NET_CSUM_PARTIAL, .csum_start = 34, .csum_offset = 16,
                                  .gso_type = XEN_NETIF_GSO_TYPE_TCPV4, .gso_size = MSS };
    if (!endpoint_got(f, f->frame, GSO_LEN, &want, why, sizeof why)) { check(f, "tx-gso-tcpv4-64k", 0, "%s", why); return; }
    check(f, "tx-gso-tcpv4-64k", 1, "%d data slots OKAY, the extra RSP_NULL; partial checksum and GSO tcpv4 %d arrived", t.nids, MSS);
}

static void check_rx_gso(struct cref_netfront *f) {
    char why[200];
    build_frame(f->frame, GSO_LEN, 6, 61);
    struct cref_net_meta m = { .csum = CREF_NET_CSUM_PARTIAL, .csum_start = 34, .csum_offset = 16,
                               .gso_type = XEN_NETIF_GSO_TYPE_TCPV4, .gso_size = MSS };
    f->env.endpoint_send(f->env.endpoint_ctx, f->frame, GSO_LEN, &m);
    struct rxframe r;
    if (!guest_got(f, &f->q[0], f->frame, GSO_LEN, &r, why, sizeof why)) { check(f, "rx-gso-tcpv4-64k", 0, "%s", why); return; }
    uint16_t want = NETRXF_csum_blank | NETRXF_data_validated | NETRXF_extra_info | NETRXF_more_data;
    if ((r.flags & want) != want) { check(f, "rx-gso-tcpv4-64k", 0, "first slot flags 0x%x, expected 0x%x", r.flags, want); return; }
    if (!r.has_gso || r.gso.u.gso.type != XEN_NETIF_GSO_TYPE_TCPV4 || r.gso.u.gso.size != MSS || (r.gso.flags & XEN_NETIF_EXTRA_FLAG_MORE)) {
        check(f, "rx-gso-tcpv4-64k", 0, "GSO extra %s: type %u size %u flags 0x%x", r.has_gso ? "present" : "missing",
              r.gso.u.gso.type, r.gso.u.gso.size, r.gso.flags);
        return;
    }
    check(f, "rx-gso-tcpv4-64k", 1, "%d data slots, GSO extra after the first (tcpv4, %d), csum_blank|data_validated", r.slots, MSS);
}

static void check_tx_checksum(struct cref_netfront *f) {
    char why[200];
    uint8_t *tcp = f->frame, *udp = f->frame + 2048, *val = f->frame + 4096;
    build_frame(tcp, 1000, 6, 71);
    build_frame(udp, 500, 17, 72);
    build_frame(val, 800, 6, 73);
    struct txframe t[3] = {
        { .bytes = tcp, .len = 1000, .first_own = -1, .flags = NETTXF_csum_blank | NETTXF_data_validated },
        { .bytes = udp, .len = 500, .first_own = -1, .flags = NETTXF_csum_blank },
        { .bytes = val, .len = 800, .first_own = -1, .flags = NETTXF_data_validated },
    };
    if (send_frames(f, &f->q[0], t, 3, why, sizeof why) != 0 || !sent_ok(t, 3, why, sizeof why)) { check(f, "tx-csum-blank-is-partial", 0, "%s", why); return; }
    struct cref_net_meta want_tcp = { .csum = CREF_NET_CSUM_PARTIAL, .csum_start = 34, .csum_offset = 16 };
    struct cref_net_meta want_udp = { .csum = CREF_NET_CSUM_PARTIAL, .csum_start = 34, .csum_offset = 6 };
    int ok = endpoint_got(f, tcp, 1000, &want_tcp, why, sizeof why) && endpoint_got(f, udp, 500, &want_udp, why, sizeof why);
    check(f, "tx-csum-blank-is-partial", ok, "%s", ok ? "TCP (34, 16) and UDP (34, 6)" : why);
    // data_validated alone: netback hands the frame on as CHECKSUM_UNNECESSARY.
    struct cref_net_meta want_val = { .csum = CREF_NET_CSUM_VALIDATED };
    ok = endpoint_got(f, val, 800, &want_val, why, sizeof why);
    check(f, "tx-data-validated-is-validated", ok, "%s", ok ? "validated" : why);
}

static void check_rx_checksum(struct cref_netfront *f) {
    char why[200];
    static const struct { uint8_t csum; uint16_t flags; } cases[] = {
        { CREF_NET_CSUM_PARTIAL, NETRXF_csum_blank | NETRXF_data_validated },
        { CREF_NET_CSUM_VALIDATED, NETRXF_data_validated },
        { CREF_NET_CSUM_NONE, 0 },
    };
    for (int i = 0; i < 3; i++) {
        uint8_t *b = f->frame + i * 2048;
        build_frame(b, 1200, 6, (uint8_t)(81 + i));
        struct cref_net_meta m = { .csum = cases[i].csum, .csum_start = 34, .csum_offset = 16 };
        f->env.endpoint_send(f->env.endpoint_ctx, b, 1200, &m);
    }
    for (int i = 0; i < 3; i++) {
        struct rxframe r;
        if (!guest_got(f, &f->q[0], f->frame + i * 2048, 1200, &r, why, sizeof why)) { check(f, "rx-checksum-flags", 0, "%s", why); return; }
        uint16_t got = r.flags & (NETRXF_csum_blank | NETRXF_data_validated);
        if (got != cases[i].flags) {
            check(f, "rx-checksum-flags", 0, "checksum %u handed up: flags 0x%x, expected 0x%x", cases[i].csum, got, cases[i].flags);
            return;
        }
    }
    check(f, "rx-checksum-flags", 1, "partial: csum_blank|data_validated; validated: data_validated; none: neither");
}

static void check_queues(struct cref_netfront *f) {
    char why[200];
    if (f->env.queues < 2) { check(f, "two-queues", 1, "skipped: %u queue", f->env.queues); return; }
    uint8_t *a = f->frame, *b = f->frame + 2048;
    build_frame(a, 300, 6, 91);
    build_frame(b, 400, 6, 92);
    struct txframe ta = { .bytes = a, .len = 300, .first_own = -1 }, tb = { .bytes = b, .len = 400, .first_own = -1 };
    struct cref_net_meta m1 = { .queue = 1 };
    if (send_frames(f, &f->q[1], &tb, 1, why, sizeof why) != 0 || !sent_ok(&tb, 1, why, sizeof why) ||
        !endpoint_got(f, b, 400, &m1, why, sizeof why) ||
        send_frames(f, &f->q[0], &ta, 1, why, sizeof why) != 0 || !sent_ok(&ta, 1, why, sizeof why) ||
        !endpoint_got(f, a, 300, &plain_meta, why, sizeof why)) {
        check(f, "two-queues", 0, "tx: %s", why);
        return;
    }
    // Up: a frame for queue 1 arrives there and not on queue 0.
    build_frame(b, 700, 6, 93);
    f->env.endpoint_send(f->env.endpoint_ctx, b, 700, &m1);
    struct rxframe r;
    if (!guest_got(f, &f->q[1], b, 700, &r, why, sizeof why)) { check(f, "two-queues", 0, "rx: %s", why); return; }
    if (receive_frame(f, &f->q[0], &r, 100)) { check(f, "two-queues", 0, "rx: queue 0 got a %u-byte frame meant for queue 1", r.len); return; }
    build_frame(a, 500, 6, 94);
    f->env.endpoint_send(f->env.endpoint_ctx, a, 500, &plain_meta);
    if (!guest_got(f, &f->q[0], a, 500, &r, why, sizeof why)) { check(f, "two-queues", 0, "rx: %s", why); return; }
    check(f, "two-queues", 1, "each queue's frames went out and came back on their own queue");
}

// A first slot shorter than an Ethernet header: every slot of the frame ERROR (netback drops
// it with xenvif_tx_err), and the vif goes on.
static void check_short_first_slot(struct cref_netfront *f) {
    char why[200];
    uint8_t *bad = f->frame, *good = f->frame + 2048;
    build_frame(bad, 100, 6, 101);
    build_frame(good, 200, 6, 102);
    struct txframe t[3] = {
        { .bytes = bad, .len = 10, .first_own = -1 },                 // one slot of 10 bytes
        { .bytes = bad, .len = 100, .first_offset = 4000, .first_own = 10 },   // 10 + 90 bytes
        { .bytes = good, .len = 200, .first_own = -1 },
    };
    if (send_frames(f, &f->q[0], t, 3, why, sizeof why) != 0) { check(f, "short-first-slot-refused", 0, "%s", why); return; }
    if (t[0].status != NETIF_RSP_ERROR || t[1].status != NETIF_RSP_ERROR || !t[1].consistent) {
        check(f, "short-first-slot-refused", 0, "answered %d and %d%s (expected ERROR, every slot)", t[0].status, t[1].status,
              t[1].consistent ? "" : ", the second frame's slots differently");
        return;
    }
    if (t[2].status != NETIF_RSP_OKAY || !endpoint_got(f, good, 200, &plain_meta, why, sizeof why)) {
        check(f, "short-first-slot-refused", 0, "the next frame: %s", t[2].status == NETIF_RSP_OKAY ? why : "not OKAY");
        return;
    }
    // And the vif still carries frames both ways.
    struct txframe again = { .bytes = good, .len = 200, .first_own = -1 };
    build_frame(good, 200, 6, 103);
    if (send_frames(f, &f->q[0], &again, 1, why, sizeof why) != 0 || !sent_ok(&again, 1, why, sizeof why) ||
        !endpoint_got(f, good, 200, &plain_meta, why, sizeof why)) {
        check(f, "short-first-slot-refused", 0, "afterwards: %s", why);
        return;
    }
    check(f, "short-first-slot-refused", 1, "10-byte frame and 10+90-byte frame ERROR; the vif goes on");
}

int cref_netfront_run_suite(struct cref_netfront *f, struct cref_check *results, int max) {
    f->out = (struct cref_results){ .results = results, .max = max };
    // netfront kicks every channel once it is connected (its posted buffers are waiting).
    for (uint32_t i = 0; i < f->env.queues; i++) {
        f->env.notify(f->q[i].env.tx_notify_ctx);
        if (f->q[i].env.rx_notify_ctx != f->q[i].env.tx_notify_ctx) f->env.notify(f->q[i].env.rx_notify_ctx);
    }
    void (*checks[])(struct cref_netfront *) = {
        check_ring_sizes, check_tx_single, check_rx_single, check_tx_multi, check_rx_multi, check_tx_gso, check_rx_gso,
        check_tx_checksum, check_rx_checksum, check_queues, check_short_first_slot,
    };
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        drain(f);
        checks[i](f);
    }
    drain(f);
    int tx_ok = f->tx_breaches == 0 && f->tx_responses == f->tx_slots_sent && f->tx_nulls == f->tx_extras_sent;
    if (f->tx_breaches) check(f, "tx-one-response-per-slot", 0, "%s", f->tx_breach);
    else check(f, "tx-one-response-per-slot", tx_ok, "%llu slots sent, %llu responses, %llu RSP_NULL for %llu extras",
               (unsigned long long)f->tx_slots_sent, (unsigned long long)f->tx_responses, (unsigned long long)f->tx_nulls,
               (unsigned long long)f->tx_extras_sent);
    if (f->rx_breaches) check(f, "rx-responses-in-their-slots", 0, "%s", f->rx_breach);
    else check(f, "rx-responses-in-their-slots", f->rx_responses > 0, "%llu responses: each in its request's slot, offset + status <= 4096",
               (unsigned long long)f->rx_responses);
    check(f, "grants-released-by-responses", f->busy_grants == 0, "%d grants still mapped when their response came", f->busy_grants);
    return f->out.count;
}
