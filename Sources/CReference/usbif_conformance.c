// A usbfront written with Xen's own io/ring.h and io/usbif.h macros, and the conformance suite
// it runs against a usbif backend (SoftDev's Swift USBTap) on the emulated hypervisor. It does
// on the wire what Linux's xen-hcd does: a one-page URB ring of 16 slots (id = slot) and a
// connection ring with all 512 requests posted before connecting, one event channel for both;
// each URB's buffer granted page by page (read-only for OUT, writable for IN, the first
// segment at the buffer's offset in its page) and revoked when its response comes (a grant
// still in use then is xen-hcd's "backend didn't release grant"); isochronous frame
// descriptors in writable pages after the buffer's; unlink as a request of its own. Above the
// wire it does what the USB core and usb-storage and usbhid do: enumeration at address 0,
// Bulk-Only commands, interrupt IN reports.
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
#define SLOTS 16u                       // USB_URB_RING_SIZE
#define SLOT_PAGES USBIF_MAX_SEGMENTS_PER_REQUEST
#define CONN_SLOTS 512u                 // USB_CONN_RING_SIZE
#define MAX_EVENTS 64

struct slot {
    int in_flight, done;
    int nrefs;
    uint32_t refs[SLOT_PAGES];
    uint32_t offset;                    // the buffer's offset in its first page
    usbif_urb_response_t rsp;
};

struct cref_usbfront {
    struct cref_usbfront_env env;
    struct cref_guest_grants grants;
    usbif_urb_front_ring_t urb;
    usbif_conn_front_ring_t conn;
    uint32_t urb_ring_ref, conn_ring_ref;
    struct slot slot[SLOTS];
    uint16_t free_ids[SLOTS];
    unsigned nfree;
    struct { uint8_t port, speed; } events[MAX_EVENTS];
    int nevents, events_seen;
    // Rule breaches seen on any response, over the suite.
    int breaches, busy_grants;
    char breach[160];
    uint64_t responses;
    uint32_t tag;
    struct cref_results out;
};

// MARK: Set-up

struct cref_usbfront *cref_usbfront_init(const struct cref_usbfront_env *env, uint32_t *urb_ring_ref, uint32_t *conn_ring_ref) {
    if (!env || !env->urb_ring || !env->conn_ring || !env->data || !env->grant_table || !env->notify || env->wait_fd < 0 ||
        env->free_refs < SLOTS * SLOT_PAGES + 2) {
        errno = EINVAL;
        return NULL;
    }
    struct cref_usbfront *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->env = *env;
    if (!f->env.timeout_ms) f->env.timeout_ms = 5000;
    if (cref_guest_grants_init(&f->grants, env->grant_table, env->backend_domid, env->first_free_ref, env->free_refs) != 0) {
        free(f);
        errno = ENOMEM;
        return NULL;
    }
    usbif_urb_sring_t *us = env->urb_ring;
    usbif_conn_sring_t *cs = env->conn_ring;
    SHARED_RING_INIT(us);
    FRONT_RING_INIT(&f->urb, us, PAGE);
    SHARED_RING_INIT(cs);
    FRONT_RING_INIT(&f->conn, cs, PAGE);
    f->urb_ring_ref = (uint32_t)cref_guest_grant(&f->grants, env->urb_ring_frame, 0);
    f->conn_ring_ref = (uint32_t)cref_guest_grant(&f->grants, env->conn_ring_frame, 0);
    *urb_ring_ref = f->urb_ring_ref;
    *conn_ring_ref = f->conn_ring_ref;
    for (unsigned i = 0; i < SLOTS; i++) f->free_ids[i] = (uint16_t)(SLOTS - 1 - i);
    f->nfree = SLOTS;
    // Every connection request posted at once (xenhcd_setup_rings).
    for (unsigned i = 0; i < RING_SIZE(&f->conn); i++) {
        RING_GET_REQUEST(&f->conn, f->conn.req_prod_pvt)->id = (uint16_t)i;
        f->conn.req_prod_pvt++;
    }
    RING_PUSH_REQUESTS(&f->conn);
    return f;
}

int cref_usbfront_free(struct cref_usbfront *f) {
    if (!f) return 0;
    int busy = 0;
    busy += cref_guest_end_access(&f->grants, f->urb_ring_ref) != 0;
    busy += cref_guest_end_access(&f->grants, f->conn_ring_ref) != 0;
    for (unsigned id = 0; id < SLOTS; id++) {
        for (int i = 0; i < f->slot[id].nrefs; i++) busy += cref_guest_end_access(&f->grants, f->slot[id].refs[i]) != 0;
        f->slot[id].nrefs = 0;
    }
    cref_guest_grants_destroy(&f->grants);
    free(f);
    return busy;
}

// MARK: Results

#define check cref_check

#define breach(f, ...) cref_breach(&(f)->breaches, (f)->breach, sizeof (f)->breach, __VA_ARGS__)

// MARK: The rings

static uint8_t *slot_page(struct cref_usbfront *f, unsigned id, unsigned p) {
    return (uint8_t *)f->env.data + ((size_t)id * SLOT_PAGES + p) * PAGE;
}

// The buffer of URB `id` (its bytes start at the slot's offset).
static uint8_t *slot_buffer(struct cref_usbfront *f, unsigned id) { return slot_page(f, id, 0) + f->slot[id].offset; }

// Takes every URB response (checking each as xen-hcd does: a known id in flight, every grant
// released) and every connection event (reposting its request).
static void collect_all(struct cref_usbfront *f) {
    int more;
    do {
        RING_IDX rp = f->urb.sring->rsp_prod;
        xen_rmb();
        if (rp - f->urb.rsp_cons > RING_SIZE(&f->urb)) {
            breach(f, "rsp_prod %u is more than a ring ahead of %u", rp, f->urb.rsp_cons);
            return;
        }
        for (RING_IDX i = f->urb.rsp_cons; i != rp; i++) {
            usbif_urb_response_t r = *RING_GET_RESPONSE(&f->urb, i);
            f->responses++;
            if (r.id >= SLOTS || !f->slot[r.id].in_flight) {
                breach(f, "a response for id %u, not in flight", r.id);
                continue;
            }
            struct slot *s = &f->slot[r.id];
            for (int k = 0; k < s->nrefs; k++) {
                if (cref_guest_end_access(&f->grants, s->refs[k]) != 0) {
                    f->busy_grants++;
                    breach(f, "URB %u answered with its grant %u still in use", r.id, s->refs[k]);
                }
            }
            s->nrefs = 0;
            s->rsp = r;
            s->in_flight = 0;
            s->done = 1;
        }
        f->urb.rsp_cons = rp;
        RING_FINAL_CHECK_FOR_RESPONSES(&f->urb, more);
    } while (more);

    int reposted = 0;
    do {
        RING_IDX rp = f->conn.sring->rsp_prod;
        xen_rmb();
        for (RING_IDX i = f->conn.rsp_cons; i != rp; i++) {
            usbif_conn_response_t r = *RING_GET_RESPONSE(&f->conn, i);
            if (r.portnum < 1 || r.portnum > f->env.layout.ports || r.speed > USBIF_SPEED_HIGH)
                breach(f, "a connection event for port %u speed %u", r.portnum, r.speed);
            if (f->nevents < MAX_EVENTS) {
                f->events[f->nevents].port = r.portnum;
                f->events[f->nevents].speed = r.speed;
                f->nevents++;
            }
            RING_GET_REQUEST(&f->conn, f->conn.req_prod_pvt)->id = r.id;
            f->conn.req_prod_pvt++;
            reposted++;
        }
        f->conn.rsp_cons = rp;
        RING_FINAL_CHECK_FOR_RESPONSES(&f->conn, more);
    } while (more);
    if (reposted) {
        int notify;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->conn, notify);
        if (notify) f->env.notify(f->env.notify_ctx);
    }
}

static int wait_event_channel(struct cref_usbfront *f, uint32_t ms) { return cref_wait_event(f->env.wait_fd, ms); }

// One URB as the USB core hands it to xen-hcd.
struct urb {
    uint8_t port, device, endpoint, type, in;
    uint8_t setup[8];                   // control
    uint32_t length;                    // buffer bytes
    uint32_t offset;                    // the buffer's offset in its first page
    const uint8_t *out;                 // OUT data (length bytes)
    uint16_t flags, interval;
    uint16_t unlink_id;                 // an unlink request when unlink is set
    int unlink;
    int packets;                        // isochronous: packets of iso_length at i * iso_length
    uint32_t iso_length;
};

// Puts `u` on the ring (grants, segments, pipe) and pushes it; its id, or -1 when no slot is
// free or it does not fit 16 pages.
static int submit(struct cref_usbfront *f, const struct urb *u) {
    if (f->nfree == 0) return -1;
    uint32_t data_pages = u->length ? (u->offset + u->length + PAGE - 1) / PAGE : 0;
    uint32_t desc_bytes = (uint32_t)u->packets * 16u;
    uint32_t desc_pages = (desc_bytes + PAGE - 1) / PAGE;
    if (data_pages + desc_pages > SLOT_PAGES || u->offset >= PAGE) return -1;
    unsigned id = f->free_ids[--f->nfree];
    struct slot *s = &f->slot[id];
    memset(s, 0, sizeof *s);
    s->offset = u->offset;
    if (!u->in && u->length) memcpy(slot_buffer(f, id), u->out, u->length);
    usbif_urb_request_t *req = RING_GET_REQUEST(&f->urb, f->urb.req_prod_pvt);
    memset(req, 0, sizeof *req);
    req->id = (uint16_t)id;
    uint32_t pipe = 0;
    pipe = usbif_setportnum_pipe(pipe, u->port);
    pipe |= ((uint32_t)u->device & USBIF_PIPE_DEV_MASK) << USBIF_PIPE_DEV_SHIFT;
    pipe |= ((uint32_t)u->endpoint & USBIF_PIPE_EP_MASK) << USBIF_PIPE_EP_SHIFT;
    pipe |= ((uint32_t)u->type & USBIF_PIPE_TYPE_MASK) << USBIF_PIPE_TYPE_SHIFT;
    if (u->in) pipe |= USBIF_PIPE_DIR;
    if (u->unlink) pipe = usbif_setunlink_pipe(pipe);
    req->pipe = pipe;
    req->transfer_flags = u->flags;
    req->buffer_length = (uint16_t)u->length;   // 65536 reads as 0, as in xen-hcd
    if (u->unlink) {
        req->u.unlink.unlink_id = u->unlink_id;
    } else if (u->type == USBIF_PIPE_TYPE_CTRL) {
        memcpy(req->u.ctrl, u->setup, 8);
    } else if (u->type == USBIF_PIPE_TYPE_INT) {
        req->u.intr.interval = u->interval;
    } else if (u->type == USBIF_PIPE_TYPE_ISOC) {
        req->u.isoc.interval = u->interval;
        req->u.isoc.start_frame = 0;
        req->u.isoc.number_of_packets = (uint16_t)u->packets;
        req->u.isoc.nr_frame_desc_segs = (uint16_t)desc_pages;
    }
    // The buffer, page by page: the first segment from the offset, the last to the end.
    uint32_t left = u->length, at = u->offset;
    for (uint32_t p = 0; p < data_pages; p++) {
        uint32_t n = PAGE - at < left ? PAGE - at : left;
        int64_t ref = cref_guest_grant(&f->grants, f->env.data_frame + id * SLOT_PAGES + p, !u->in);
        if (ref < 0) return -1;
        s->refs[s->nrefs++] = (uint32_t)ref;
        req->seg[p].gref = (grant_ref_t)ref;
        req->seg[p].offset = (uint16_t)at;
        req->seg[p].length = (uint16_t)n;
        left -= n;
        at = 0;
    }
    req->nr_buffer_segs = (uint16_t)data_pages;
    // The frame descriptors, writable, after the buffer's pages.
    if (u->packets) {
        uint8_t *d = slot_page(f, id, data_pages);
        for (int i = 0; i < u->packets; i++) {
            uint32_t fields[4] = { (uint32_t)i * u->iso_length, u->iso_length, 0xdeadbeefu, 0x7fffffffu };
            memcpy(d + 16 * i, fields, 16);
        }
        for (uint32_t p = 0; p < desc_pages; p++) {
            int64_t ref = cref_guest_grant(&f->grants, f->env.data_frame + id * SLOT_PAGES + data_pages + p, 0);
            if (ref < 0) return -1;
            s->refs[s->nrefs++] = (uint32_t)ref;
            uint32_t n = desc_bytes - p * PAGE < PAGE ? desc_bytes - p * PAGE : PAGE;
            req->seg[data_pages + p].gref = (grant_ref_t)ref;
            req->seg[data_pages + p].offset = 0;
            req->seg[data_pages + p].length = (uint16_t)n;
        }
    }
    s->in_flight = 1;
    f->urb.req_prod_pvt++;
    int notify;
    RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->urb, notify);
    if (notify) f->env.notify(f->env.notify_ctx);
    return (int)id;
}

// Waits for URB `id`'s response up to `ms`; 0 with *r filled, -1 on a timeout. The slot is free
// again afterwards (its IN data stays in its pages until the next submit).
static int wait_urb(struct cref_usbfront *f, int id, uint32_t ms, usbif_urb_response_t *r) {
    uint64_t deadline = cref_now_ns() + (uint64_t)ms * 1000000u;
    for (;;) {
        collect_all(f);
        if (f->slot[id].done) {
            f->slot[id].done = 0;
            if (r) *r = f->slot[id].rsp;
            f->free_ids[f->nfree++] = (uint16_t)id;
            return 0;
        }
        uint64_t now = cref_now_ns();
        if (now >= deadline) return -1;
        uint64_t left = (deadline - now) / 1000000u;
        wait_event_channel(f, left < 10 ? 10 : (uint32_t)left);
    }
}

// Submits and waits; 0 with *r filled, -1 if it could not be put or got no response.
static int transfer(struct cref_usbfront *f, const struct urb *u, usbif_urb_response_t *r, int *id_out) {
    int id = submit(f, u);
    if (id < 0) return -1;
    if (id_out) *id_out = id;
    return wait_urb(f, id, f->env.timeout_ms, r);
}

// Waits until a connection event for `port` beyond the first `*seen` arrives; its speed, or -1.
static int wait_conn_event(struct cref_usbfront *f, int port, int *seen) {
    uint64_t deadline = cref_now_ns() + (uint64_t)f->env.timeout_ms * 1000000u;
    for (;;) {
        collect_all(f);
        for (int i = *seen; i < f->nevents; i++) {
            if (f->events[i].port == port) {
                *seen = i + 1;
                return f->events[i].speed;
            }
        }
        if (cref_now_ns() >= deadline) return -1;
        wait_event_channel(f, 10);
    }
}

// MARK: Requests

static struct urb control(int port, int device, uint8_t type, uint8_t request, uint16_t value, uint16_t index, uint16_t length) {
    struct urb u = { .port = (uint8_t)port, .device = (uint8_t)device, .type = USBIF_PIPE_TYPE_CTRL, .in = (type & 0x80) != 0,
                     .length = length };
    uint8_t s[8] = { type, request, (uint8_t)value, (uint8_t)(value >> 8), (uint8_t)index, (uint8_t)(index >> 8),
                     (uint8_t)length, (uint8_t)(length >> 8) };
    memcpy(u.setup, s, 8);
    return u;
}

// A control transfer; its status (-1000 without a response), IN data copied to `in` (room for
// its wLength), *actual its actual_length.
static int ctrl(struct cref_usbfront *f, int port, int device, uint8_t type, uint8_t request, uint16_t value, uint16_t index,
                uint16_t length, uint8_t *in, int *actual) {
    struct urb u = control(port, device, type, request, value, index, length);
    usbif_urb_response_t r;
    int id;
    if (transfer(f, &u, &r, &id) != 0) return -1000;
    if (actual) *actual = r.actual_length;
    if (in && (type & 0x80) && r.actual_length > 0 && r.actual_length <= length) memcpy(in, slot_buffer(f, (unsigned)id), (size_t)r.actual_length);
    return r.status;
}

static uint16_t le16(const uint8_t *b) { return (uint16_t)(b[0] | b[1] << 8); }
static uint32_t le32(const uint8_t *b) { return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24; }
static void put_le32(uint8_t *b, uint32_t v) { for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (8 * i)); }
static void put_be32(uint8_t *b, uint32_t v) { for (int i = 0; i < 4; i++) b[i] = (uint8_t)(v >> (24 - 8 * i)); }

int cref_usbfront_enumerate(struct cref_usbfront *f, int port, uint8_t address) {
    uint8_t d[64];
    int n = 0;
    if (ctrl(f, port, 0, 0x80, 6, 0x0100, 0, 64, d, &n) != 0 || n != 18) return -1;
    if (ctrl(f, port, 0, 0x00, 5, address, 0, 0, NULL, NULL) != 0) return -1;
    uint8_t c[9];
    if (ctrl(f, port, address, 0x80, 6, 0x0200, 0, 9, c, &n) != 0 || n != 9) return -1;
    return ctrl(f, port, address, 0x00, 9, c[5], 0, 0, NULL, NULL) == 0 ? 0 : -1;
}

// MARK: Bulk-Only Transport

struct bot_result {
    int cbw_status, data_status, csw_status;
    uint32_t data_actual;
    uint8_t csw[13];
    int csw_length;
};

// One Bulk-Only command: the CBW on bulk OUT 2, the data (IN on 1 or OUT on 2) in URBs of at
// most `chunk` bytes, as many in flight as the ring holds (the first at `offset` in its page),
// the CSW on bulk IN 1. IN data lands in `in`. 0 if every URB got a response.
static int bot(struct cref_usbfront *f, uint8_t address, const uint8_t *cdb, int cdb_len, uint32_t length, int data_in,
               const uint8_t *out, uint8_t *in, uint32_t chunk, uint32_t offset, struct bot_result *res) {
    int port = f->env.layout.storage_port;
    memset(res, 0, sizeof *res);
    uint8_t cbw[31] = { 0 };
    put_le32(cbw, 0x43425355);
    put_le32(cbw + 4, ++f->tag);
    put_le32(cbw + 8, length);
    cbw[12] = data_in ? 0x80 : 0;
    cbw[14] = (uint8_t)cdb_len;
    memcpy(cbw + 15, cdb, (size_t)cdb_len);
    struct urb u = { .port = (uint8_t)port, .device = address, .endpoint = 2, .type = USBIF_PIPE_TYPE_BULK, .length = 31, .out = cbw };
    usbif_urb_response_t r;
    if (transfer(f, &u, &r, NULL) != 0) return -1;
    res->cbw_status = r.status;
    // As many data URBs in flight as the ring has slots (xen-hcd queues the rest); each
    // answered in order.
    enum { MAX_URBS = 256 };
    int ids[MAX_URBS];
    uint32_t starts[MAX_URBS];
    int nids = 0, waited = 0;
    if ((length + chunk - 1) / chunk > MAX_URBS) return -1;
    for (uint32_t at = 0; at < length || waited < nids;) {
        if (at < length && f->nfree > 0) {
            uint32_t n = length - at < chunk ? length - at : chunk;
            struct urb d = { .port = (uint8_t)port, .device = address, .endpoint = (uint8_t)(data_in ? 1 : 2), .type = USBIF_PIPE_TYPE_BULK,
                             .in = (uint8_t)data_in, .length = n, .offset = at == 0 ? offset : 0, .out = out ? out + at : NULL };
            int id = submit(f, &d);
            if (id < 0) return -1;
            starts[nids] = at;
            ids[nids++] = id;
            at += n;
            continue;
        }
        if (waited >= nids) return -1;   // no slot, and none of ours to wait for
        int i = waited++;
        if (wait_urb(f, ids[i], f->env.timeout_ms, &r) != 0) return -1;
        if (r.status != 0 && res->data_status == 0) res->data_status = r.status;
        res->data_actual += (uint32_t)(r.actual_length > 0 ? r.actual_length : 0);
        if (data_in && in && r.actual_length > 0) memcpy(in + starts[i], slot_buffer(f, (unsigned)ids[i]), (size_t)r.actual_length);
    }
    struct urb c = { .port = (uint8_t)port, .device = address, .endpoint = 1, .type = USBIF_PIPE_TYPE_BULK, .in = 1, .length = 13 };
    int id;
    if (transfer(f, &c, &r, &id) != 0) return -1;
    res->csw_status = r.status;
    res->csw_length = r.actual_length;
    if (r.actual_length == 13) memcpy(res->csw, slot_buffer(f, (unsigned)id), 13);
    return 0;
}

// Whether a command went through: every phase ok, a CSW with our tag, status 0, no residue.
static int bot_ok(struct cref_usbfront *f, const struct bot_result *r, uint32_t length, char *why, size_t len) {
    if (r->cbw_status || r->data_status || r->csw_status) {
        snprintf(why, len, "statuses CBW %d data %d CSW %d", r->cbw_status, r->data_status, r->csw_status);
        return 0;
    }
    if (r->data_actual != length) { snprintf(why, len, "%u data bytes moved, expected %u", r->data_actual, length); return 0; }
    if (r->csw_length != 13 || le32(r->csw) != 0x53425355 || le32(r->csw + 4) != f->tag || le32(r->csw + 8) != 0 || r->csw[12] != 0) {
        snprintf(why, len, "CSW of %d bytes: signature %08x tag %u (sent %u) residue %u status %u", r->csw_length, le32(r->csw),
                 le32(r->csw + 4), f->tag, le32(r->csw + 8), r->csw[12]);
        return 0;
    }
    return 1;
}

static void rw10(uint8_t *cdb, int write, uint32_t lba, uint16_t blocks) {
    memset(cdb, 0, 10);
    cdb[0] = write ? 0x2A : 0x28;
    put_be32(cdb + 2, lba);
    cdb[7] = (uint8_t)(blocks >> 8);
    cdb[8] = (uint8_t)blocks;
}

int64_t cref_usbfront_bench_bot(struct cref_usbfront *f, uint8_t address, uint32_t bytes, uint32_t chunk, int write, double seconds,
                                uint64_t *urbs) {
    if (bytes == 0 || bytes % 512 || bytes > 15u * 65536u || chunk == 0 || chunk > 65536u) return -1;
    uint8_t *buffer = malloc(bytes);
    if (!buffer) return -1;
    memset(buffer, 0xA5, bytes);
    uint64_t blocks = f->env.layout.storage_bytes / 512, span = bytes / 512;
    uint64_t deadline = cref_now_ns() + (uint64_t)(seconds * 1e9);
    uint64_t before = f->responses;
    int64_t done = 0;
    uint32_t lba = 0;
    uint8_t cdb[10];
    struct bot_result r;
    char why[160];
    while (cref_now_ns() < deadline) {
        if (lba + span > blocks) lba = 0;
        rw10(cdb, write, lba, (uint16_t)span);
        if (bot(f, address, cdb, 10, bytes, !write, write ? buffer : NULL, write ? NULL : buffer, chunk, 0, &r) != 0 ||
            !bot_ok(f, &r, bytes, why, sizeof why)) {
            done = -1;
            break;
        }
        lba += (uint32_t)span;
        done++;
    }
    if (urbs) *urbs = f->responses - before;
    free(buffer);
    return done;
}

int64_t cref_usbfront_bench_control(struct cref_usbfront *f, int port, uint8_t address, double seconds) {
    uint64_t deadline = cref_now_ns() + (uint64_t)(seconds * 1e9);
    int64_t done = 0;
    uint8_t d[18];
    while (cref_now_ns() < deadline) {
        int n = 0;
        if (ctrl(f, port, address, 0x80, 6, 0x0100, 0, 18, d, &n) != 0 || n != 18) return -1;
        done++;
    }
    return done;
}

// MARK: Checks

static int has_event(struct cref_usbfront *f, int port, int speed) {
    for (int i = 0; i < f->nevents; i++) if (f->events[i].port == port && f->events[i].speed == speed) return 1;
    return 0;
}

static void check_ring_sizes(struct cref_usbfront *f) {
    check(f, "ring-sizes", RING_SIZE(&f->urb) == USB_URB_RING_SIZE && RING_SIZE(&f->urb) == 16 && RING_SIZE(&f->conn) == USB_CONN_RING_SIZE &&
          RING_SIZE(&f->conn) == CONN_SLOTS, "URB ring %u slots, connection ring %u", RING_SIZE(&f->urb), RING_SIZE(&f->conn));
}

// QEMU and SoftDev announce every occupied port right after connecting.
static void check_initial_events(struct cref_usbfront *f) {
    const struct cref_usb_layout *l = &f->env.layout;
    int seen = 0;
    int s1 = wait_conn_event(f, l->storage_port, &seen);
    seen = 0;
    int s2 = wait_conn_event(f, l->keyboard_port, &seen);
    seen = 0;
    int s3 = wait_conn_event(f, l->iso_port, &seen);
    int others = 0;
    for (int i = 0; i < f->nevents; i++) {
        int p = f->events[i].port;
        if (p != l->storage_port && p != l->keyboard_port && p != l->iso_port) others++;
    }
    f->events_seen = f->nevents;
    check(f, "connect-events-with-speeds", s1 == USBIF_SPEED_HIGH && s2 == USBIF_SPEED_FULL && s3 == USBIF_SPEED_HIGH && others == 0 &&
          f->nevents == 3, "storage %d, keyboard %d, iso device %d (3 high, 2 full), %d events, %d for empty ports", s1, s2, s3,
          f->nevents, others);
}

// The USB core's enumeration of the stick: the device descriptor at address 0, SET_ADDRESS
// (the backend virtualises it: the old and other addresses are gone), the configuration,
// SET_CONFIGURATION.
static void check_enumeration(struct cref_usbfront *f) {
    int port = f->env.layout.storage_port;
    uint8_t d[64], d2[64], c[512];
    int n = 0, n2 = 0, total = 0;
    char why[200] = "";
    int st = ctrl(f, port, 0, 0x80, 6, 0x0100, 0, 64, d, &n);
    if (st != 0 || n != 18 || d[0] != 18 || d[1] != 1 || le16(d + 2) != 0x0200 || d[7] != 64 || d[17] < 1)
        snprintf(why, sizeof why, "GET_DESCRIPTOR(DEVICE) at 0: status %d, %d bytes, bLength %u type %u bcdUSB %04x ep0 %u", st, n, d[0], d[1],
                 le16(d + 2), d[7]);
    int bulk0 = 0;
    if (!*why) {
        struct urb u = { .port = (uint8_t)port, .device = 0, .endpoint = 1, .type = USBIF_PIPE_TYPE_BULK, .in = 1, .length = 512 };
        usbif_urb_response_t r;
        bulk0 = transfer(f, &u, &r, NULL) == 0 ? r.status : -1000;
        if (bulk0 != USBIF_STATUS_INVAL) snprintf(why, sizeof why, "a bulk URB to address 0: status %d, expected %d", bulk0, USBIF_STATUS_INVAL);
    }
    if (!*why && (st = ctrl(f, port, 0, 0x00, 5, 5, 0, 0, NULL, NULL)) != 0) snprintf(why, sizeof why, "SET_ADDRESS(5): %d", st);
    if (!*why && ((st = ctrl(f, port, 5, 0x80, 6, 0x0100, 0, 18, d2, &n2)) != 0 || n2 != 18 || memcmp(d, d2, 18) != 0))
        snprintf(why, sizeof why, "GET_DESCRIPTOR(DEVICE) at 5: status %d, %d bytes, %s", st, n2, n2 == 18 ? "different" : "");
    if (!*why && (st = ctrl(f, port, 6, 0x80, 6, 0x0100, 0, 18, d2, &n2)) != USBIF_STATUS_NODEV)
        snprintf(why, sizeof why, "a request to address 6 (not given): status %d, expected %d", st, USBIF_STATUS_NODEV);
    if (!*why && ((st = ctrl(f, port, 5, 0x80, 6, 0x0200, 0, 9, c, &n)) != 0 || n != 9 || c[1] != 2))
        snprintf(why, sizeof why, "GET_DESCRIPTOR(CONFIGURATION, 9): status %d, %d bytes", st, n);
    if (!*why) {
        total = le16(c + 2);
        if (total > (int)sizeof c || (st = ctrl(f, port, 5, 0x80, 6, 0x0200, 0, (uint16_t)total, c, &n)) != 0 || n != total)
            snprintf(why, sizeof why, "GET_DESCRIPTOR(CONFIGURATION, %d): status %d, %d bytes", total, st, n);
    }
    if (!*why) {
        // One interface 08/06/50 with bulk IN 0x81 and bulk OUT 0x02 of 512 bytes.
        int interfaces = 0, in_ep = 0, out_ep = 0;
        for (int i = 0; i + 2 <= n && c[i] >= 2; i += c[i]) {
            if (c[i + 1] == 4 && c[i + 5] == 0x08 && c[i + 6] == 0x06 && c[i + 7] == 0x50) interfaces++;
            if (c[i + 1] == 5 && c[i + 3] == 2 && le16(c + i + 4) == 512) {
                if (c[i + 2] == 0x81) in_ep++;
                if (c[i + 2] == 0x02) out_ep++;
            }
        }
        if (interfaces != 1 || in_ep != 1 || out_ep != 1 || c[4] != 1)
            snprintf(why, sizeof why, "configuration of %d bytes: %d mass-storage interfaces (of %u), bulk IN %d, OUT %d", n, interfaces, c[4],
                     in_ep, out_ep);
    }
    uint8_t value = c[5], got = 0xff;
    if (!*why && (st = ctrl(f, port, 5, 0x00, 9, value, 0, 0, NULL, NULL)) != 0) snprintf(why, sizeof why, "SET_CONFIGURATION(%u): %d", value, st);
    if (!*why && ((st = ctrl(f, port, 5, 0x80, 8, 0, 0, 1, &got, &n)) != 0 || n != 1 || got != value))
        snprintf(why, sizeof why, "GET_CONFIGURATION: status %d, %d bytes, %u (set %u)", st, n, got, value);
    check(f, "enumeration-address-virtualised", !*why, "%s", *why ? why : "descriptor at 0, SET_ADDRESS 5, configuration, SET_CONFIGURATION");
}

// Control requests beyond enumeration: the language list, the class request Get Max LUN, an
// unknown class request STALLs.
static void check_control(struct cref_usbfront *f) {
    int port = f->env.layout.storage_port;
    uint8_t b[8] = { 0 };
    int n = 0;
    char why[200] = "";
    int st = ctrl(f, port, 5, 0x80, 6, 0x0300, 0, 255, b, &n);
    if (st != 0 || n != 4 || b[0] != 4 || b[1] != 3 || le16(b + 2) != 0x0409)
        snprintf(why, sizeof why, "string descriptor 0: status %d, %d bytes", st, n);
    if (!*why && ((st = ctrl(f, port, 5, 0xA1, 0xFE, 0, 0, 1, b, &n)) != 0 || n != 1 || b[0] != 0))
        snprintf(why, sizeof why, "Get Max LUN: status %d, %d bytes, %u", st, n, b[0]);
    if (!*why && (st = ctrl(f, port, 5, 0x21, 0x55, 0, 0, 0, NULL, NULL)) != USBIF_STATUS_STALL)
        snprintf(why, sizeof why, "an unknown class request: status %d, expected a stall", st);
    if (!*why && ((st = ctrl(f, port, 5, 0x82, 0, 0, 0x81, 2, b, &n)) != 0 || n != 2 || b[0] != 0))
        snprintf(why, sizeof why, "GET_STATUS(endpoint 0x81): status %d, %d bytes, %u", st, n, b[0]);
    check(f, "control-standard-and-class", !*why, "%s", *why ? why : "language list, Get Max LUN 0, unknown class request stalled");
}

// Bulk: INQUIRY, then 64 KiB WRITE(10) (one 64 KiB OUT URB, so buffer_length reads 0) and
// READ(10) back in two 32 KiB IN URBs, the first at an odd offset in its page.
static void check_bulk(struct cref_usbfront *f) {
    char why[200] = "";
    struct bot_result r;
    uint8_t inquiry[36] = { 0 };
    uint8_t cdb[10] = { 0x12, 0, 0, 0, 36, 0 };
    if (bot(f, 5, cdb, 6, 36, 1, NULL, inquiry, 65536, 0, &r) != 0 || !bot_ok(f, &r, 36, why, sizeof why) ||
        (inquiry[0] & 0x1f) != 0 || inquiry[1] != 0x80 || inquiry[4] < 31) {
        if (!*why) snprintf(why, sizeof why, "INQUIRY: type %u, RMB %02x, additional length %u", inquiry[0] & 0x1f, inquiry[1], inquiry[4]);
    }
    check(f, "bulk-bot-inquiry", !*why, "INQUIRY: %s", *why ? why : "36 bytes, direct access, removable");
    *why = 0;
    enum { LEN = 65536 };
    uint8_t *out = malloc(LEN), *in = malloc(LEN), *zero = malloc(LEN);
    if (!out || !in || !zero) { free(out); free(in); free(zero); check(f, "bulk-bot-write-read-64k", 0, "no memory"); return; }
    for (int i = 0; i < LEN; i++) out[i] = (uint8_t)(i * 7 + (i >> 9));
    uint32_t lba = (uint32_t)(f->env.layout.storage_bytes / 512 / 2);
    rw10(cdb, 1, lba, LEN / 512);
    if (bot(f, 5, cdb, 10, LEN, 0, out, NULL, 65536, 0, &r) != 0) snprintf(why, sizeof why, "WRITE(10): no response");
    else if (!bot_ok(f, &r, LEN, why, sizeof why)) {}
    memset(in, 0, LEN);
    rw10(cdb, 0, lba, LEN / 512);
    if (!*why && bot(f, 5, cdb, 10, LEN, 1, NULL, in, 32768, 0x123, &r) != 0) snprintf(why, sizeof why, "READ(10): no response");
    else if (!*why && !bot_ok(f, &r, LEN, why, sizeof why)) {}
    if (!*why && memcmp(in, out, LEN) != 0) {
        int at = 0;
        while (in[at] == out[at]) at++;
        snprintf(why, sizeof why, "READ(10) gave back other bytes: first at %d: %02x, wrote %02x", at, in[at], out[at]);
    }
    // The blocks before were never written: zeros (the stick is over a fresh memory device).
    memset(zero, 0, LEN);
    rw10(cdb, 0, lba - LEN / 512, LEN / 512);
    if (!*why && (bot(f, 5, cdb, 10, LEN, 1, NULL, in, 65536, 0, &r) != 0 || !bot_ok(f, &r, LEN, why, sizeof why) || memcmp(in, zero, LEN) != 0))
        if (!*why) snprintf(why, sizeof why, "the unwritten blocks before read back non-zero");
    int ok = !*why;
    if (ok) snprintf(why, sizeof why, "64 KiB written at LBA %u in one URB, read back equal in 2 URBs, the blocks before zero", lba);
    check(f, "bulk-bot-write-read-64k", ok, "%s", why);
    free(out);
    free(in);
    free(zero);
}

// Interrupt: an IN URB on the keyboard waits until a key is typed, then carries its report;
// the next one the release.
static void check_interrupt(struct cref_usbfront *f) {
    int port = f->env.layout.keyboard_port;
    char why[200] = "";
    if (cref_usbfront_enumerate(f, port, 3) != 0) snprintf(why, sizeof why, "the keyboard did not enumerate");
    int st;
    if (!*why && (st = ctrl(f, port, 3, 0x21, 0x0A, 0, 0, 0, NULL, NULL)) != 0) snprintf(why, sizeof why, "SET_IDLE: %d", st);
    struct urb u = { .port = (uint8_t)port, .device = 3, .endpoint = 1, .type = USBIF_PIPE_TYPE_INT, .in = 1, .length = 8, .interval = 10 };
    usbif_urb_response_t r;
    int id = -1;
    if (!*why && (id = submit(f, &u)) < 0) snprintf(why, sizeof why, "no slot");
    if (!*why && wait_urb(f, id, 100, &r) == 0) snprintf(why, sizeof why, "the interrupt URB came back (%d) before a key was typed", r.status);
    if (!*why && f->env.type_text(f->env.test_ctx, "a") != 0) snprintf(why, sizeof why, "could not type");
    if (!*why) {
        if (wait_urb(f, id, f->env.timeout_ms, &r) != 0) snprintf(why, sizeof why, "no report after typing");
        else {
            uint8_t *b = slot_buffer(f, (unsigned)id);
            if (r.status != 0 || r.actual_length != 8 || b[0] != 0 || b[2] != 0x04 || b[3] != 0)
                snprintf(why, sizeof why, "the report: status %d, %d bytes, %02x %02x %02x %02x", r.status, r.actual_length, b[0], b[1], b[2], b[3]);
        }
    }
    if (!*why) {
        if (transfer(f, &u, &r, &id) != 0) snprintf(why, sizeof why, "no release report");
        else {
            uint8_t *b = slot_buffer(f, (unsigned)id);
            static const uint8_t zero[8] = { 0 };
            if (r.status != 0 || r.actual_length != 8 || memcmp(b, zero, 8) != 0) snprintf(why, sizeof why, "the release: status %d", r.status);
        }
    }
    check(f, "interrupt-keyboard-report", !*why, "%s", *why ? why : "waits, then 'a' (usage 0x04), then the release");
}

// Unlink: both the cancelled URB and the unlink get a response (else usb_kill_urb hangs); an
// unlink of an id not in flight is answered too.
static void check_unlink(struct cref_usbfront *f) {
    int port = f->env.layout.keyboard_port;
    char why[200] = "";
    struct urb u = { .port = (uint8_t)port, .device = 3, .endpoint = 1, .type = USBIF_PIPE_TYPE_INT, .in = 1, .length = 8, .interval = 10 };
    usbif_urb_response_t r, ur;
    int id = submit(f, &u);
    if (id < 0 || wait_urb(f, id, 50, &r) == 0) snprintf(why, sizeof why, "the interrupt URB did not wait");
    struct urb k = { .port = (uint8_t)port, .unlink = 1, .unlink_id = (uint16_t)id, .type = USBIF_PIPE_TYPE_CTRL };
    int kid = -1;
    if (!*why && (kid = submit(f, &k)) < 0) snprintf(why, sizeof why, "no slot for the unlink");
    if (!*why && wait_urb(f, kid, f->env.timeout_ms, &ur) != 0) snprintf(why, sizeof why, "no response to the unlink");
    if (!*why && wait_urb(f, id, f->env.timeout_ms, &r) != 0) snprintf(why, sizeof why, "no response to the unlinked URB");
    if (!*why && (ur.status != 0 || r.status != USBIF_STATUS_IOERROR || r.actual_length != 0))
        snprintf(why, sizeof why, "unlink status %d; the URB: status %d (QEMU: %d), %d bytes", ur.status, r.status, USBIF_STATUS_IOERROR,
                 r.actual_length);
    k.unlink_id = 9;   // nothing in flight there
    if (!*why && (transfer(f, &k, &ur, NULL) != 0 || ur.status != 0)) snprintf(why, sizeof why, "an unlink of nothing: no response or %d", ur.status);
    check(f, "unlink-answers-both", !*why, "%s", *why ? why : "unlink 0, the URB -EPROTO with 0 bytes");
}

// Isochronous: frame descriptors in their own granted page, filled in place.
static void check_isochronous(struct cref_usbfront *f) {
    int port = f->env.layout.iso_port;
    char why[200] = "";
    if (cref_usbfront_enumerate(f, port, 7) != 0) snprintf(why, sizeof why, "the iso device did not enumerate");
    enum { PACKETS = 8, PLEN = 1024 };
    struct urb u = { .port = (uint8_t)port, .device = 7, .endpoint = 4, .type = USBIF_PIPE_TYPE_ISOC, .in = 1, .length = PACKETS * PLEN,
                     .interval = 1, .packets = PACKETS, .iso_length = PLEN };
    usbif_urb_response_t r;
    int id = -1;
    if (!*why && transfer(f, &u, &r, &id) != 0) snprintf(why, sizeof why, "no response");
    if (!*why && (r.status != 0 || r.error_count != 0)) snprintf(why, sizeof why, "status %d, %d errors", r.status, r.error_count);
    if (!*why) {
        const uint8_t *b = slot_buffer(f, (unsigned)id);
        const uint8_t *d = slot_page(f, (unsigned)id, (PACKETS * PLEN + PAGE - 1) / PAGE);
        for (int i = 0; i < PACKETS && !*why; i++) {
            uint32_t off = le32(d + 16 * i), len = le32(d + 16 * i + 4), actual = le32(d + 16 * i + 8);
            int32_t status = (int32_t)le32(d + 16 * i + 12);
            if (off != (uint32_t)i * PLEN || len != PLEN || actual != PLEN / 2 || status != 0) {
                snprintf(why, sizeof why, "descriptor %d: offset %u length %u actual %u status %d", i, off, len, actual, status);
                break;
            }
            for (uint32_t k = 0; k < actual; k++) {
                if (b[off + k] != (uint8_t)(i * 16 + k)) {
                    snprintf(why, sizeof why, "packet %d byte %u: %02x, expected %02x", i, k, b[off + k], (uint8_t)(i * 16 + k));
                    break;
                }
            }
        }
    }
    check(f, "isochronous-descriptors-in-place", !*why, "%s", *why ? why : "8 packets: actual_length 512, status 0 each, data in place");
}

// Unplug and plug again while connected: events with speeds, URBs to the empty port -ENODEV,
// the new device enumerates from address 0.
static void check_hotplug(struct cref_usbfront *f) {
    int port = f->env.layout.keyboard_port;
    char why[200] = "";
    int seen = f->nevents;
    int speed;
    if (f->env.set_port(f->env.test_ctx, port, "") != 0) snprintf(why, sizeof why, "could not unplug");
    if (!*why && (speed = wait_conn_event(f, port, &seen)) != USBIF_SPEED_NONE) snprintf(why, sizeof why, "unplug event: speed %d", speed);
    int st;
    uint8_t d[18];
    int n = 0;
    if (!*why && (st = ctrl(f, port, 3, 0x80, 6, 0x0100, 0, 18, d, &n)) != USBIF_STATUS_NODEV)
        snprintf(why, sizeof why, "a request to the empty port: %d, expected %d", st, USBIF_STATUS_NODEV);
    if (!*why && f->env.set_port(f->env.test_ctx, port, "keyboard2") != 0) snprintf(why, sizeof why, "could not plug");
    if (!*why && (speed = wait_conn_event(f, port, &seen)) != USBIF_SPEED_FULL) snprintf(why, sizeof why, "plug event: speed %d", speed);
    if (!*why && (st = ctrl(f, port, 3, 0x80, 6, 0x0100, 0, 18, d, &n)) != USBIF_STATUS_NODEV)
        snprintf(why, sizeof why, "the new device answered the old address: %d", st);
    if (!*why && ((st = ctrl(f, port, 0, 0x80, 6, 0x0100, 0, 18, d, &n)) != 0 || n != 18 || d[1] != 1))
        snprintf(why, sizeof why, "the new device at address 0: %d, %d bytes", st, n);
    if (!*why && (st = ctrl(f, port, 0, 0x00, 5, 4, 0, 0, NULL, NULL)) != 0) snprintf(why, sizeof why, "SET_ADDRESS: %d", st);
    if (!*why && (has_event(f, f->env.layout.storage_port, 0) || has_event(f, f->env.layout.iso_port, 0)))
        snprintf(why, sizeof why, "another port saw an unplug");
    check(f, "unplug-and-plug-events", !*why, "%s", *why ? why : "speed 0, -ENODEV, speed full, enumerates again");
}

static void check_rules(struct cref_usbfront *f) {
    int in_flight = 0;
    for (unsigned i = 0; i < SLOTS; i++) in_flight += f->slot[i].in_flight;
    check(f, "responses-and-grants", f->breaches == 0 && in_flight == 0, "%llu responses; %d breaches%s%s; %d URBs unanswered",
          (unsigned long long)f->responses, f->breaches, f->breaches ? ": " : "", f->breach, in_flight);
}

int cref_usbfront_run_suite(struct cref_usbfront *f, struct cref_check *results, int max) {
    f->out = (struct cref_results){ .results = results, .count = 0, .max = max };
    check_ring_sizes(f);
    check_initial_events(f);
    check_enumeration(f);
    check_control(f);
    check_bulk(f);
    check_interrupt(f);
    check_unlink(f);
    check_isochronous(f);
    check_hotplug(f);
    check_rules(f);
    return f->out.count;
}
