// A blkfront written with Xen's own io/ring.h and io/blkif.h macros, and the conformance suite
// it runs against a blkif backend (SoftDev's Swift BlockTap) on the emulated hypervisor. It does
// on the wire what Linux's xen-blkfront does: one shared ring of 2^order pages, buffers granted
// once (persistent) or per request (read-only for writes), indirect segment lists in granted
// pages, and grants revoked after each response, which must succeed: the backend has unmapped.
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

#define SECTOR 512u
#define SECTORS_PER_PAGE (LOCALXEN_PAGE_SIZE / SECTOR)
#define SEGS_PER_INDIRECT_PAGE (LOCALXEN_PAGE_SIZE / sizeof(struct blkif_request_segment))
#define MAX_SEGS 512                    // the most segments a request of ours carries
#define MAX_REQUESTS 512                // the ring's size at order 4
#define MIN_DATA_PAGES 1040             // two halves of 512 buffers + an indirect page each
#define SENTINEL 0xEE                   // what read buffers hold outside their segments
// Response ids: a tag, the batch's generation and the request's index, so that a response to
// another request, another batch or nothing at all is recognised.
#define ID_TAG 0xC0DE000000000000ull
#define ID_GEN_SHIFT 20
#define ID_INDEX_MASK ((1ull << ID_GEN_SHIFT) - 1)

// How a hostile request's bad segment is granted (always per request, even when persistent).
enum {
    BAD_GRANT_READONLY = 1,     // read-only, for a read: the backend would write into it
    BAD_GRANT_FOREIGN,          // to another domain than the backend
    BAD_GRANT_REVOKED,          // granted, then revoked before the request is sent
};

// A buffer segment: a data page (index into env.data) and the sectors of it that carry data.
struct seg {
    uint32_t page;
    uint8_t first, last;
};

// One request to send, and what came back.
struct spec {
    uint8_t op;                 // BLKIF_OP_*: the (inner) operation
    uint8_t indirect;           // send as BLKIF_OP_INDIRECT
    uint16_t nsegs;             // nr_segments as sent (may lie: at most 11 direct segments are written)
    uint64_t sector;
    uint64_t nr_sectors;        // DISCARD
    uint8_t discard_flag;       // DISCARD
    uint32_t indirect_page;     // data page for the segment list (and the next ones)
    const struct seg *segs;
    int bad_segment;            // >= 0: this segment's grant is wrong (see bad_grant), else -1
    uint8_t bad_grant;          // BAD_GRANT_*
    // Outcome.
    uint64_t id;
    int answered;
    int16_t status;
    uint8_t rsp_op;
    int busy_grants;            // per-request grants the backend still held after answering
    uint32_t refs[MAX_SEGS + BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST];
    int nrefs;
};

struct cref_front {
    struct cref_front_env env;
    blkif_front_ring_t ring;
    struct cref_guest_grants grants;
    uint32_t ring_refs[16];
    int64_t *persistent_refs;           // per data page, when persistent
    struct spec *specs;                 // MAX_REQUESTS, reused by every batch
    uint64_t generation;
    uint64_t sectors;                   // the device's size
    uint32_t half;                      // data pages [0, half) are write buffers, [half, ...) read
    uint8_t seed;
    int wedged;                         // a batch timed out: the ring's state is unknown
    int busy_total;                     // grants still busy after a response, over the suite
    char error[160];                    // why the last batch failed
    // Results.
    struct cref_results out;
};

// MARK: Set-up

struct cref_front *cref_front_init(const struct cref_front_env *env, uint32_t *ring_refs) {
    if (!env || !env->ring || !env->grant_table || !env->data || env->ring_order > 4 || env->data_pages < MIN_DATA_PAGES ||
        !env->notify || env->wait_fd < 0 || env->free_refs < (1u << env->ring_order) + env->data_pages + 16) {
        errno = EINVAL;
        return NULL;
    }
    struct cref_front *f = calloc(1, sizeof *f);
    if (!f) return NULL;
    f->env = *env;
    if (!f->env.timeout_ms) f->env.timeout_ms = 10000;
    f->half = env->data_pages / 2;
    f->specs = calloc(MAX_REQUESTS, sizeof(struct spec));
    if (!f->specs || cref_guest_grants_init(&f->grants, env->grant_table, env->backend_domid, env->first_free_ref, env->free_refs) != 0) {
        free(f->specs);
        free(f);
        return NULL;
    }
    // The ring: SHARED_RING_INIT, then FRONT_RING_INIT for the whole 2^order pages (the
    // backend computes the same size from the same number of pages).
    blkif_sring_t *sring = env->ring;
    SHARED_RING_INIT(sring);
    FRONT_RING_INIT(&f->ring, sring, LOCALXEN_PAGE_SIZE << env->ring_order);
    for (uint32_t i = 0; i < (1u << env->ring_order); i++) {
        f->ring_refs[i] = (uint32_t)cref_guest_grant(&f->grants, env->ring_frame + i, 0);
        ring_refs[i] = f->ring_refs[i];
    }
    if (env->persistent) {
        // Persistent grants are made once, writable, whatever the request (as Linux blkfront).
        f->persistent_refs = malloc(sizeof(int64_t) * env->data_pages);
        for (uint32_t p = 0; f->persistent_refs && p < env->data_pages; p++)
            f->persistent_refs[p] = cref_guest_grant(&f->grants, env->data_frame + p, 0);
        if (!f->persistent_refs) { cref_front_free(f); errno = ENOMEM; return NULL; }
    }
    return f;
}

int cref_front_free(struct cref_front *f) {
    if (!f) return 0;
    int busy = 0;
    for (uint32_t i = 0; i < (1u << f->env.ring_order); i++)
        busy += cref_guest_end_access(&f->grants, f->ring_refs[i]) != 0;
    for (uint32_t p = 0; f->persistent_refs && p < f->env.data_pages; p++)
        busy += cref_guest_end_access(&f->grants, (uint32_t)f->persistent_refs[p]) != 0;
    cref_guest_grants_destroy(&f->grants);
    free(f->persistent_refs);
    free(f->specs);
    free(f);
    return busy;
}

static uint8_t *page(struct cref_front *f, uint32_t p) {
    return (uint8_t *)f->env.data + (size_t)p * LOCALXEN_PAGE_SIZE;
}

// MARK: Sending requests and taking responses

// The reference to put in a request for data page `p`: its persistent grant, or a grant made
// for this request (read-only when the backend only reads the page).
static int64_t grant_page(struct cref_front *f, struct spec *s, uint32_t p, int readonly) {
    if (f->persistent_refs) return f->persistent_refs[p];
    int64_t ref = cref_guest_grant(&f->grants, f->env.data_frame + p, readonly);
    if (ref >= 0) s->refs[s->nrefs++] = (uint32_t)ref;
    return ref;
}

// The wrong grant for segment page `p` (see BAD_GRANT_*).
static int64_t bad_grant(struct cref_front *f, struct spec *s, uint32_t p) {
    uint16_t backend = f->grants.domid;
    if (s->bad_grant == BAD_GRANT_FOREIGN) f->grants.domid = backend + 1;
    int64_t ref = cref_guest_grant(&f->grants, f->env.data_frame + p, s->bad_grant == BAD_GRANT_READONLY);
    f->grants.domid = backend;
    if (ref < 0) return ref;
    // Revoked without going back to the free refs (the next segment would get it again); it
    // is freed with the request's other grants after the response.
    if (s->bad_grant == BAD_GRANT_REVOKED) __atomic_store_n(&f->grants.table[ref].flags, 0, __ATOMIC_SEQ_CST);
    s->refs[s->nrefs++] = (uint32_t)ref;
    return ref;
}

// Writes `s` into the next free ring slot (not yet published).
static int put_request(struct cref_front *f, struct spec *s, uint64_t id) {
    s->id = id;
    s->answered = 0;
    s->nrefs = 0;
    s->busy_grants = 0;
    // The slot is written as a whole from a private copy: each request view's padding is
    // another view's data, and the backend copies all 112 bytes.
    union {
        blkif_request_t rw;
        blkif_request_discard_t discard;
        blkif_request_indirect_t indirect;
    } req;
    memset(&req, 0, sizeof req);
    int readonly = s->op != BLKIF_OP_READ;   // the backend reads our pages for writes
    if (s->op == BLKIF_OP_DISCARD) {
        req.discard.operation = BLKIF_OP_DISCARD;
        req.discard.id = id;
        req.discard.sector_number = s->sector;
        req.discard.nr_sectors = s->nr_sectors;
        req.discard.flag = s->discard_flag;
    } else if (s->indirect) {
        req.indirect.operation = BLKIF_OP_INDIRECT;
        req.indirect.indirect_op = s->op;
        req.indirect.nr_segments = s->nsegs;
        req.indirect.id = id;
        req.indirect.sector_number = s->sector;
        uint32_t pages = (s->nsegs + SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE;
        for (uint32_t p = 0; p < pages && p < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; p++) {
            struct blkif_request_segment *list = (void *)page(f, s->indirect_page + p);
            for (uint32_t i = p * SEGS_PER_INDIRECT_PAGE; i < s->nsegs && i < (p + 1) * SEGS_PER_INDIRECT_PAGE; i++) {
                int64_t ref = grant_page(f, s, s->segs[i].page, readonly);
                if (ref < 0) return -1;
                list[i % SEGS_PER_INDIRECT_PAGE] = (struct blkif_request_segment){
                    .gref = (grant_ref_t)ref, .first_sect = s->segs[i].first, .last_sect = s->segs[i].last };
            }
            // The segment list is only read by the backend.
            int64_t ref = grant_page(f, s, s->indirect_page + p, 1);
            if (ref < 0) return -1;
            req.indirect.indirect_grefs[p] = (grant_ref_t)ref;
        }
    } else {
        req.rw.operation = s->op;
        req.rw.nr_segments = (uint8_t)s->nsegs;
        req.rw.id = id;
        req.rw.sector_number = s->sector;
        for (uint32_t i = 0; i < s->nsegs && i < BLKIF_MAX_SEGMENTS_PER_REQUEST; i++) {
            int64_t ref = (int)i == s->bad_segment ? bad_grant(f, s, s->segs[i].page) : grant_page(f, s, s->segs[i].page, readonly);
            if (ref < 0) return -1;
            req.rw.seg[i] = (struct blkif_request_segment){
                .gref = (grant_ref_t)ref, .first_sect = s->segs[i].first, .last_sect = s->segs[i].last };
        }
    }
    memcpy(RING_GET_REQUEST(&f->ring, f->ring.req_prod_pvt), &req, sizeof(blkif_request_t));
    f->ring.req_prod_pvt++;
    return 0;
}

// Records one response against its request; revokes the request's grants. 1 if it answered a
// request of this batch for the first time.
static int take_response(struct cref_front *f, struct spec *specs, int n, const blkif_response_t *r) {
    uint64_t index = r->id & ID_INDEX_MASK;
    struct spec *s = index < (uint64_t)n ? &specs[index] : NULL;
    if (!s || s->id != r->id) {
        snprintf(f->error, sizeof f->error, "response with an id we did not send: 0x%llx", (unsigned long long)r->id);
        return 0;
    }
    if (s->answered) {
        snprintf(f->error, sizeof f->error, "second response to id 0x%llx", (unsigned long long)r->id);
        return 0;
    }
    s->answered = 1;
    s->status = r->status;
    s->rsp_op = r->operation;
    for (int i = 0; i < s->nrefs; i++) {
        if (cref_guest_end_access(&f->grants, s->refs[i]) != 0) {
            s->busy_grants++;
            f->busy_total++;
        }
    }
    return 1;
}

static int wait_for_event(struct cref_front *f) { return cref_wait_event(f->env.wait_fd, f->env.timeout_ms); }

// Sends the `n` requests (as many at once as the ring holds, one push and at most one
// notification per round) and takes their responses. 0 if every request was answered.
static int run_batch(struct cref_front *f, struct spec *specs, int n) {
    f->error[0] = 0;
    if (f->wedged) { snprintf(f->error, sizeof f->error, "not run: an earlier batch timed out"); return -1; }
    uint64_t gen = ++f->generation;
    int next = 0, answered = 0;
    while (answered < n) {
        while (next < n && !RING_FULL(&f->ring)) {
            if (put_request(f, &specs[next], ID_TAG | (gen << ID_GEN_SHIFT) | (uint64_t)next) != 0) {
                snprintf(f->error, sizeof f->error, "out of grant references");
                f->wedged = 1;
                return -1;
            }
            next++;
        }
        int notify;
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&f->ring, notify);
        if (notify) f->env.notify(f->env.notify_ctx);
        for (;;) {
            RING_IDX rp = f->ring.sring->rsp_prod;
            xen_rmb();   // read the responses only after the producer index that covers them
            if (RING_RESPONSE_PROD_OVERFLOW(&f->ring, rp)) {
                snprintf(f->error, sizeof f->error, "the backend published rsp_prod %u with rsp_cons %u", rp, f->ring.rsp_cons);
                f->wedged = 1;
                return -1;
            }
            int took = 0;
            while (f->ring.rsp_cons != rp) {
                blkif_response_t r;
                RING_COPY_RESPONSE(&f->ring, f->ring.rsp_cons, &r);
                f->ring.rsp_cons++;
                answered += take_response(f, specs, n, &r);
                took++;
            }
            if (answered == n) break;
            if (took && next < n && !RING_FULL(&f->ring)) break;    // room for more requests
            int more;
            RING_FINAL_CHECK_FOR_RESPONSES(&f->ring, more);
            if (more) continue;
            if (wait_for_event(f) != 0) {
                snprintf(f->error, sizeof f->error, "timed out after %u ms: %d of %d requests answered", f->env.timeout_ms, answered, n);
                f->wedged = 1;
                return -1;
            }
        }
    }
    return f->error[0] ? -1 : 0;
}

// MARK: Results

#define check cref_check

// A check whose message is `ok_message` if it passed, else why it failed.
static void verdict(struct cref_front *f, const char *name, int passed, const char *ok_message, const char *why) {
    check(f, name, passed, "%s", passed ? ok_message : why);
}

// Whether `s` was answered with `status` and its own operation (for an indirect request: its
// inner operation, as Linux blkback answers, or BLKIF_OP_INDIRECT). Explains why not in `why`.
static int answered_ok(struct cref_front *f, const struct spec *s, int16_t status, char *why, size_t len) {
    uint8_t sent = s->indirect ? BLKIF_OP_INDIRECT : s->op;
    if (!s->answered) { snprintf(why, len, "no response (%s)", f->error); return 0; }
    if (s->status != status) {
        snprintf(why, len, "op %u sector %llu: status %d, expected %d", sent, (unsigned long long)s->sector, s->status, status);
        return 0;
    }
    if (s->rsp_op != s->op && s->rsp_op != sent) {
        snprintf(why, len, "response operation %u to a request of operation %u", s->rsp_op, sent);
        return 0;
    }
    if (s->busy_grants) { snprintf(why, len, "%d grants still mapped by the backend after its response", s->busy_grants); return 0; }
    return 1;
}

// MARK: Data

// What a byte at disk offset `o` holds after a write with `seed`: a function of both, so that
// data at the wrong sector, from the wrong page or from another test is seen.
static uint8_t pattern(uint64_t o, uint8_t seed) {
    uint32_t x = (uint32_t)(o ^ (o >> 17)) * 0x9E3779B1u + seed * 0x85EBCA6Bu;
    return (uint8_t)(x >> 24);
}

// The expected contents of a range: the pattern, zero in [zero_from, zero_to) (discarded).
struct expect {
    uint8_t seed;
    uint64_t zero_from, zero_to;
};
static uint8_t expected(const struct expect *e, uint64_t o) {
    return o >= e->zero_from && o < e->zero_to ? 0 : pattern(o, e->seed);
}

static void fill_segments(struct cref_front *f, const struct seg *segs, int n, uint64_t sector, uint8_t seed) {
    uint64_t o = sector * SECTOR;
    for (int i = 0; i < n; i++) {
        uint8_t *p = page(f, segs[i].page) + segs[i].first * SECTOR;
        size_t len = (segs[i].last - segs[i].first + 1u) * SECTOR;
        for (size_t k = 0; k < len; k++) p[k] = pattern(o + k, seed);
        o += len;
    }
}

static void fill_sentinel(struct cref_front *f, const struct seg *segs, int n) {
    for (int i = 0; i < n; i++) memset(page(f, segs[i].page), SENTINEL, LOCALXEN_PAGE_SIZE);
}

// Compares read buffers with the expectation, and the bytes around their segments with the
// sentinel (a backend must not write outside first_sect..last_sect). 1 if all match.
static int verify_segments(struct cref_front *f, const struct seg *segs, int n, uint64_t sector, const struct expect *e,
                           char *why, size_t len) {
    uint64_t o = sector * SECTOR;
    for (int i = 0; i < n; i++) {
        const uint8_t *p = page(f, segs[i].page);
        size_t from = segs[i].first * SECTOR, to = (segs[i].last + 1u) * SECTOR;
        for (size_t k = 0; k < LOCALXEN_PAGE_SIZE; k++) {
            int inside = k >= from && k < to;
            uint8_t want = inside ? expected(e, o + (k - from)) : SENTINEL;
            if (p[k] != want) {
                snprintf(why, len, "segment %d byte %zu (%s, disk offset %llu): 0x%02x, expected 0x%02x", i, k,
                         inside ? "data" : "outside the segment", (unsigned long long)(o + k - from), p[k], want);
                return 0;
            }
        }
        o += to - from;
    }
    return 1;
}

// Compares the device's own bytes (when given) with the expectation.
static int verify_device(struct cref_front *f, uint64_t sector, uint64_t sectors, const struct expect *e, char *why, size_t len) {
    if (!f->env.device_bytes) return 1;
    for (uint64_t o = sector * SECTOR; o < (sector + sectors) * SECTOR; o++) {
        if (f->env.device_bytes[o] != expected(e, o)) {
            snprintf(why, len, "device byte at offset %llu: 0x%02x, expected 0x%02x", (unsigned long long)o,
                     f->env.device_bytes[o], expected(e, o));
            return 0;
        }
    }
    return 1;
}

static uint64_t segment_sectors(const struct seg *segs, int n) {
    uint64_t t = 0;
    for (int i = 0; i < n; i++) t += segs[i].last - segs[i].first + 1u;
    return t;
}

static struct spec *spec(struct cref_front *f, int i, uint8_t op, uint64_t sector, const struct seg *segs, int n) {
    struct spec *s = &f->specs[i];
    memset(s, 0, offsetof(struct spec, refs));
    s->bad_segment = -1;
    s->op = op;
    s->sector = sector;
    s->segs = segs;
    s->nsegs = (uint16_t)n;
    s->indirect = n > BLKIF_MAX_SEGMENTS_PER_REQUEST;
    s->indirect_page = op == BLKIF_OP_READ ? f->env.data_pages - 1 : f->half - 1;
    return s;
}

// MARK: The checks

// Writes `wsegs` at `sector`, reads the same sectors back through `rsegs` (a different layout),
// compares the read buffers, the sentinels around them and the device's bytes.
static void write_read(struct cref_front *f, const char *name, uint64_t sector, const struct seg *wsegs, int nw,
                       const struct seg *rsegs, int nr) {
    char why[200];
    struct expect e = { .seed = ++f->seed };
    fill_segments(f, wsegs, nw, sector, e.seed);
    struct spec *w = spec(f, 0, BLKIF_OP_WRITE, sector, wsegs, nw);
    run_batch(f, w, 1);
    if (!answered_ok(f, w, BLKIF_RSP_OKAY, why, sizeof why)) { check(f, name, 0, "write: %s", why); return; }
    uint8_t write_rsp_op = w->rsp_op;
    fill_sentinel(f, rsegs, nr);
    struct spec *r = spec(f, 1, BLKIF_OP_READ, sector, rsegs, nr);
    run_batch(f, r, 1);
    if (!answered_ok(f, r, BLKIF_RSP_OKAY, why, sizeof why)) { check(f, name, 0, "read: %s", why); return; }
    if (!verify_segments(f, rsegs, nr, sector, &e, why, sizeof why) ||
        !verify_device(f, sector, segment_sectors(wsegs, nw), &e, why, sizeof why)) {
        check(f, name, 0, "%s", why);
        return;
    }
    if (r->indirect)   // say which answer the backend gives (answered_ok accepts both)
        check(f, name, 1, "%d segments, indirect; answered with %s", nw,
              write_rsp_op == BLKIF_OP_WRITE && r->rsp_op == BLKIF_OP_READ ? "the inner operation, as Linux blkback"
              : write_rsp_op == BLKIF_OP_INDIRECT && r->rsp_op == BLKIF_OP_INDIRECT ? "BLKIF_OP_INDIRECT" : "a mix of both");
    else
        check(f, name, 1, "%d segments", nw);
}

// Whole-page segments over `n` pages from `first`.
static void whole_pages(struct seg *segs, int n, uint32_t first) {
    for (int i = 0; i < n; i++) segs[i] = (struct seg){ .page = first + i, .first = 0, .last = SECTORS_PER_PAGE - 1 };
}

static void check_direct(struct cref_front *f) {
    struct seg w[BLKIF_MAX_SEGMENTS_PER_REQUEST], r[BLKIF_MAX_SEGMENTS_PER_REQUEST];
    for (int n = 1; n <= BLKIF_MAX_SEGMENTS_PER_REQUEST; n++) {
        char name[64];
        snprintf(name, sizeof name, "write-read-%d-segments", n);
        whole_pages(w, n, 0);
        whole_pages(r, n, f->half);
        write_read(f, name, (uint64_t)n * 128, w, n, r, n);
    }
}

static void check_partial(struct cref_front *f) {
    // 18 sectors written through segments that start and end inside pages, read back through
    // another such layout, at an odd sector.
    const struct seg w[] = { { 0, 1, 3 }, { 1, 0, 7 }, { 2, 5, 5 }, { 3, 2, 6 }, { 4, 7, 7 } };
    const struct seg r[] = { { f->half, 3, 7 }, { f->half + 1, 0, 4 }, { f->half + 2, 6, 6 }, { f->half + 3, 1, 7 } };
    write_read(f, "partial-page-segments", 3001, w, 5, r, 4);
}

static void check_indirect(struct cref_front *f) {
    static const int counts[] = { 12, 32, 128, 256 };
    struct seg *w = malloc(sizeof(struct seg) * 256), *r = malloc(sizeof(struct seg) * 256);
    if (!w || !r) { check(f, "indirect", 0, "out of memory"); free(w); free(r); return; }
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        int n = counts[i];
        char name[64];
        snprintf(name, sizeof name, "indirect-%d-segments", n);
        if ((uint32_t)n > f->env.max_indirect_segments) {
            check(f, name, 1, "skipped: the backend offers %u indirect segments", f->env.max_indirect_segments);
            continue;
        }
        whole_pages(w, n, 0);
        whole_pages(r, n, f->half);
        write_read(f, name, 4096, w, n, r, n);
    }
    free(w);
    free(r);
}

static void check_flush_and_barrier(struct cref_front *f) {
    char why[200];
    struct spec *s = spec(f, 0, BLKIF_OP_FLUSH_DISKCACHE, 0, NULL, 0);
    run_batch(f, s, 1);
    verdict(f, "flush-diskcache", answered_ok(f, s, BLKIF_RSP_OKAY, why, sizeof why), "OKAY", why);

    // WRITE_BARRIER is obsolete (Linux blkfront no longer sends it; Linux blkback answers
    // EOPNOTSUPP): either answer is conformant, OKAY must mean the data is written.
    s = spec(f, 0, BLKIF_OP_WRITE_BARRIER, 0, NULL, 0);
    run_batch(f, s, 1);
    int16_t st = s->answered && s->status == BLKIF_RSP_EOPNOTSUPP ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_OKAY;
    verdict(f, "write-barrier", answered_ok(f, s, st, why, sizeof why), st == BLKIF_RSP_OKAY ? "OKAY" : "EOPNOTSUPP", why);

    struct seg w[2], r[2];
    whole_pages(w, 2, 0);
    whole_pages(r, 2, f->half);
    struct expect e = { .seed = ++f->seed };
    fill_segments(f, w, 2, 7000, e.seed);
    s = spec(f, 0, BLKIF_OP_WRITE_BARRIER, 7000, w, 2);
    run_batch(f, s, 1);
    st = s->answered && s->status == BLKIF_RSP_EOPNOTSUPP ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_OKAY;
    if (!answered_ok(f, s, st, why, sizeof why)) { check(f, "write-barrier-with-data", 0, "%s", why); return; }
    if (st == BLKIF_RSP_OKAY) {
        fill_sentinel(f, r, 2);
        s = spec(f, 0, BLKIF_OP_READ, 7000, r, 2);
        run_batch(f, s, 1);
        if (!answered_ok(f, s, BLKIF_RSP_OKAY, why, sizeof why) || !verify_segments(f, r, 2, 7000, &e, why, sizeof why) ||
            !verify_device(f, 7000, 16, &e, why, sizeof why)) {
            check(f, "write-barrier-with-data", 0, "%s", why);
            return;
        }
    }
    verdict(f, "write-barrier-with-data", 1, st == BLKIF_RSP_OKAY ? "OKAY, data written" : "EOPNOTSUPP", "");

    // FLUSH_DISKCACHE with segments: Linux blkfront's flush-with-data (FUA) write.
    fill_segments(f, w, 2, 7100, ++f->seed);
    e.seed = f->seed;
    s = spec(f, 0, BLKIF_OP_FLUSH_DISKCACHE, 7100, w, 2);
    run_batch(f, s, 1);
    int ok = answered_ok(f, s, BLKIF_RSP_OKAY, why, sizeof why) && verify_device(f, 7100, 16, &e, why, sizeof why);
    verdict(f, "flush-diskcache-with-data", ok, "data written", why);
}

static void check_discard(struct cref_front *f) {
    char why[200];
    if (!f->env.discard) { check(f, "discard", 1, "skipped: the backend does not offer feature-discard"); return; }
    const uint64_t sector = 8192;
    struct seg w[8], r[8];
    whole_pages(w, 8, 0);
    whole_pages(r, 8, f->half);
    struct expect e = { .seed = ++f->seed };
    fill_segments(f, w, 8, sector, e.seed);
    struct spec *s = spec(f, 0, BLKIF_OP_WRITE, sector, w, 8);
    run_batch(f, s, 1);
    if (!answered_ok(f, s, BLKIF_RSP_OKAY, why, sizeof why)) { check(f, "discard", 0, "write: %s", why); return; }
    s = spec(f, 0, BLKIF_OP_DISCARD, sector + 16, NULL, 0);
    s->nr_sectors = 24;
    run_batch(f, s, 1);
    if (!answered_ok(f, s, BLKIF_RSP_OKAY, why, sizeof why)) { check(f, "discard", 0, "discard: %s", why); return; }
    e.zero_from = (sector + 16) * SECTOR;
    e.zero_to = (sector + 40) * SECTOR;
    fill_sentinel(f, r, 8);
    s = spec(f, 0, BLKIF_OP_READ, sector, r, 8);
    run_batch(f, s, 1);
    int ok = answered_ok(f, s, BLKIF_RSP_OKAY, why, sizeof why) && verify_segments(f, r, 8, sector, &e, why, sizeof why) &&
             verify_device(f, sector, 64, &e, why, sizeof why);
    verdict(f, "discard", ok, "24 sectors read back as zeroes, the rest intact", why);

    // BLKIF_DISCARD_SECURE is "ignored if discard-secure=0" (blkif.h), as Linux blkback does:
    // a plain discard, OKAY. With discard-secure=1 the backend does the secure erase: OKAY too.
    fill_segments(f, w, 8, sector, ++f->seed);
    e = (struct expect){ .seed = f->seed, .zero_from = sector * SECTOR, .zero_to = (sector + 8) * SECTOR };
    s = spec(f, 0, BLKIF_OP_WRITE, sector, w, 8);
    run_batch(f, s, 1);
    s = spec(f, 0, BLKIF_OP_DISCARD, sector, NULL, 0);
    s->nr_sectors = 8;
    s->discard_flag = BLKIF_DISCARD_SECURE;
    run_batch(f, s, 1);
    ok = answered_ok(f, s, BLKIF_RSP_OKAY, why, sizeof why) && verify_device(f, sector, 64, &e, why, sizeof why);
    verdict(f, "discard-with-secure-flag", ok, f->env.discard_secure ? "OKAY (discard-secure=1)" : "OKAY: flag ignored, as discard-secure=0", why);

    s = spec(f, 0, BLKIF_OP_DISCARD, f->sectors - 4, NULL, 0);
    s->nr_sectors = 8;
    run_batch(f, s, 1);
    verdict(f, "discard-past-the-end", answered_ok(f, s, BLKIF_RSP_ERROR, why, sizeof why), "ERROR", why);
}

// Fills the ring: RING_SIZE one-page writes published at once, then as many reads.
static void check_full_ring(struct cref_front *f) {
    char why[200];
    int n = (int)RING_SIZE(&f->ring);
    const uint64_t base = 8192;
    if (base + (uint64_t)n * SECTORS_PER_PAGE > f->sectors) { check(f, "full-ring", 0, "device too small"); return; }
    struct seg *w = malloc(sizeof(struct seg) * n), *r = malloc(sizeof(struct seg) * n);
    if (!w || !r) { check(f, "full-ring", 0, "out of memory"); free(w); free(r); return; }
    whole_pages(w, n, 0);
    whole_pages(r, n, f->half);
    struct expect e = { .seed = ++f->seed };
    for (int i = 0; i < n; i++) {
        fill_segments(f, &w[i], 1, base + (uint64_t)i * SECTORS_PER_PAGE, e.seed);
        spec(f, i, BLKIF_OP_WRITE, base + (uint64_t)i * SECTORS_PER_PAGE, &w[i], 1);
    }
    run_batch(f, f->specs, n);
    int ok = 1;
    for (int i = 0; i < n && ok; i++) ok = answered_ok(f, &f->specs[i], BLKIF_RSP_OKAY, why, sizeof why);
    if (ok) {
        fill_sentinel(f, r, n);
        for (int i = 0; i < n; i++) spec(f, i, BLKIF_OP_READ, base + (uint64_t)i * SECTORS_PER_PAGE, &r[i], 1);
        run_batch(f, f->specs, n);
        for (int i = 0; i < n && ok; i++) ok = answered_ok(f, &f->specs[i], BLKIF_RSP_OKAY, why, sizeof why);
    }
    ok = ok && verify_segments(f, r, n, base, &e, why, sizeof why) && verify_device(f, base, (uint64_t)n * SECTORS_PER_PAGE, &e, why, sizeof why);
    if (ok) check(f, "full-ring", 1, "%d writes, then %d reads, in flight at once", n, n);
    else check(f, "full-ring", 0, "%s", why);
    free(w);
    free(r);
}

// Requests the backend must refuse, one batch: each answered, with its own id and operation.
static void check_errors(struct cref_front *f) {
    char why[200];
    uint64_t end = f->sectors;
    // Read buffers are granted writable, write buffers read-only: use each for its own kind.
    struct seg one = { 0, 0, 7 }, rone = { f->half, 0, 7 }, bad_order = { f->half, 5, 2 }, past_page = { f->half, 0, 8 };
    static struct seg many[BLKIF_MAX_SEGMENTS_PER_REQUEST];
    whole_pages(many, BLKIF_MAX_SEGMENTS_PER_REQUEST, 0);
    struct { const char *name; int16_t status; } cases[] = {
        { "read-across-the-end", BLKIF_RSP_ERROR },
        { "write-at-the-end", BLKIF_RSP_ERROR },
        { "sector-overflow", BLKIF_RSP_ERROR },
        { "first-sect-after-last-sect", BLKIF_RSP_ERROR },
        { "last-sect-past-the-page", BLKIF_RSP_ERROR },
        { "zero-segments", BLKIF_RSP_ERROR },
        { "12-direct-segments", BLKIF_RSP_ERROR },
        { "unknown-operation", BLKIF_RSP_EOPNOTSUPP },
        { "last-sector-of-the-device", BLKIF_RSP_OKAY },
    };
    int n = sizeof cases / sizeof cases[0];
    spec(f, 0, BLKIF_OP_READ, end - 4, &rone, 1);
    spec(f, 1, BLKIF_OP_WRITE, end, &one, 1);
    spec(f, 2, BLKIF_OP_READ, UINT64_MAX - 3, &rone, 1);
    spec(f, 3, BLKIF_OP_READ, 0, &bad_order, 1);
    spec(f, 4, BLKIF_OP_READ, 0, &past_page, 1);
    spec(f, 5, BLKIF_OP_READ, 0, NULL, 0);
    spec(f, 6, BLKIF_OP_WRITE, 0, many, BLKIF_MAX_SEGMENTS_PER_REQUEST)->nsegs = 12;   // lies: 11 written
    spec(f, 7, 0xEE, 0, NULL, 0);
    spec(f, 8, BLKIF_OP_READ, end - 8, &rone, 1);
    run_batch(f, f->specs, n);
    for (int i = 0; i < n; i++) {
        struct spec *s = &f->specs[i];
        int16_t want = cases[i].status;
        // An unknown operation may be refused either way.
        if (i == 7 && s->answered && s->status == BLKIF_RSP_ERROR) want = BLKIF_RSP_ERROR;
        int ok = answered_ok(f, s, want, why, sizeof why);
        if (ok && s->rsp_op != s->op) {
            ok = 0;
            snprintf(why, sizeof why, "response operation %u to operation %u", s->rsp_op, s->op);
        }
        if (ok) check(f, cases[i].name, 1, "status %d", s->status);
        else check(f, cases[i].name, 0, "%s", why);
    }
    // The indirect limit: one segment more than the backend offers.
    uint32_t over = f->env.max_indirect_segments + 1;
    if (f->env.max_indirect_segments && over <= MAX_SEGS) {
        struct seg *w = malloc(sizeof(struct seg) * over);
        if (!w) return;
        whole_pages(w, (int)over, 0);
        struct spec *s = spec(f, 0, BLKIF_OP_WRITE, 0, w, (int)over);
        run_batch(f, s, 1);
        verdict(f, "indirect-above-the-maximum", answered_ok(f, s, BLKIF_RSP_ERROR, why, sizeof why), "refused", why);
        free(w);
    }
    // BLKIF_OP_INDIRECT carries only READ or WRITE.
    if (f->env.max_indirect_segments >= 12) {
        struct seg w[12];
        whole_pages(w, 12, 0);
        struct spec *s = spec(f, 0, BLKIF_OP_FLUSH_DISKCACHE, 0, w, 12);
        run_batch(f, s, 1);
        verdict(f, "indirect-flush", answered_ok(f, s, BLKIF_RSP_ERROR, why, sizeof why), "refused", why);
    }
}

// Requests whose buffers are granted wrongly: refused with ERROR, and the segments of the same
// request that were granted right are released again (the map is unwound).
static void check_bad_grants(struct cref_front *f) {
    char why[200];
    static const struct { const char *name; uint8_t kind; uint8_t op; } cases[] = {
        { "read-into-a-read-only-grant", BAD_GRANT_READONLY, BLKIF_OP_READ },
        { "grant-to-another-domain", BAD_GRANT_FOREIGN, BLKIF_OP_WRITE },
        { "revoked-grant", BAD_GRANT_REVOKED, BLKIF_OP_READ },
    };
    struct seg w[3], r[3];
    whole_pages(w, 3, 0);
    whole_pages(r, 3, f->half);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct spec *s = spec(f, 0, cases[i].op, 64, cases[i].op == BLKIF_OP_READ ? r : w, 3);
        s->bad_segment = 1;
        s->bad_grant = cases[i].kind;
        run_batch(f, s, 1);
        verdict(f, cases[i].name, answered_ok(f, s, BLKIF_RSP_ERROR, why, sizeof why), "ERROR, other segments released", why);
    }
}

// Indirect requests whose segments start and end inside their pages.
static void check_indirect_partial(struct cref_front *f) {
    enum { N = 40 };
    if (f->env.max_indirect_segments < N) { check(f, "indirect-partial-segments", 1, "skipped: too few indirect segments"); return; }
    struct seg w[N], r[N];
    for (int i = 0; i < N; i++) {
        w[i] = (struct seg){ .page = (uint32_t)i, .first = (uint8_t)(i % 8), .last = (uint8_t)(i % 8 + (7 - i % 8) / 2) };
    }
    // Read the same number of sectors back through another layout: sector k of page i.
    uint64_t total = segment_sectors(w, N);
    int nr = 0;
    for (uint64_t k = 0; k < total && nr < N; nr++) {
        uint8_t first = (uint8_t)((nr * 3) % 8), last = (uint8_t)(first + (total - k > (uint64_t)(7 - first) ? 7 - first : total - k - 1));
        r[nr] = (struct seg){ .page = f->half + (uint32_t)nr, .first = first, .last = last };
        k += last - first + 1u;
    }
    write_read(f, "indirect-partial-segments", 5555, w, N, r, nr);
}

int cref_front_run_suite(struct cref_front *f, uint64_t sectors, struct cref_check *results, int max) {
    f->sectors = sectors;
    f->out = (struct cref_results){ .results = results, .max = max };
    unsigned want = __CONST_RING_SIZE(blkif, LOCALXEN_PAGE_SIZE << f->env.ring_order);
    check(f, "ring-size", RING_SIZE(&f->ring) == want && want == 32u << f->env.ring_order, "%u entries for %u pages",
          RING_SIZE(&f->ring), 1u << f->env.ring_order);
    check_direct(f);
    check_partial(f);
    check_indirect(f);
    check_flush_and_barrier(f);
    check_discard(f);
    check_full_ring(f);
    check_errors(f);
    check_bad_grants(f);
    check_indirect_partial(f);
    // With persistent grants only the bad-grant requests grant per request.
    check(f, "grants-revoked-after-responses", f->busy_total == 0, "%d grants stayed mapped after their response", f->busy_total);
    return f->out.count;
}
