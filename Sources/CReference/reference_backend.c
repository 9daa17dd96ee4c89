// A minimal blkif backend on Xen's own ring macros, serving a null device (reads return zeroes,
// writes are dropped, flush and discard succeed). It is the yardstick for SoftDev's Swift
// backend: per request it does the same protocol work (copy the request once out of the shared
// ring, validate the copy, validate and pin every segment's grant as LocalGrantTable does, load
// indirect segment lists, unpin) and nothing else, in the loop a careful C programmer writes:
// drain every request, push all responses, notify at most once, re-check before sleeping. No
// system call per request; one write to the event channel per batch that needs it. With
// poll_us it polls before sleeping exactly as SoftDev's ring threads do, so that the two are
// compared like for like with polling on or off.
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "creference.h"
#include "cref_grants.h"

// Segments per indirect page: 4096 / sizeof(struct blkif_request_segment) = 512.
#define SEGS_PER_INDIRECT_PAGE (LOCALXEN_PAGE_SIZE / sizeof(struct blkif_request_segment))
// The most indirect segments we accept (Linux blkback's default, and SoftDev's).
#define MAX_INDIRECT_SEGMENTS 256
// Persistent grants kept mapped per ring: Linux blkback's xen_blkif_max_pgrants, and SoftDev's.
#define MAX_PERSISTENT_GRANTS 1056
#define SECTORS_PER_PAGE (LOCALXEN_PAGE_SIZE / 512)

// One ring slot's 112 bytes seen as each of blkif's request structs. The request is copied
// whole with memcpy (as Linux blkback does), not as a struct: one view's padding is another's
// data (blkif_request_indirect.indirect_grefs lies over seg[0]'s padding).
union request {
    blkif_request_t rw;
    blkif_request_discard_t discard;
    blkif_request_indirect_t indirect;
};

struct cref_backend {
    struct cref_backend_config config;
    blkif_back_ring_t ring;
    struct cref_grant_mapper grants;
    pthread_t thread;
    int stop_fd;                       // an eventfd that wakes the thread to stop
    int stopping;                      // atomic
    // Persistent grants: the page of each ref we keep mapped (NULL: not kept), and the refs in
    // the order they were mapped, to unmap them at the end.
    void **persistent_page;
    uint32_t *persistent_refs;
    uint32_t persistent_count;
    // Per request, reused: the private copy of its segments, their pages, which were mapped for
    // this request only.
    struct blkif_request_segment segs[MAX_INDIRECT_SEGMENTS];
    uint8_t *pages[MAX_INDIRECT_SEGMENTS];
    uint8_t transient[MAX_INDIRECT_SEGMENTS];
    struct cref_backend_stats stats;   // updated with relaxed atomics
    struct cref_poller poller;         // the adaptive poll's state
};

// Only the ring thread writes the counters: a relaxed load and store (plain moves), no locked
// read-modify-write, so that counting costs nothing next to the work; readers see a recent value.
static void count(uint64_t *counter) {
    __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
}

// A buffer page for one segment: the persistent mapping (made now if there is room), else a
// mapping for this request only. NULL if the grant is not valid for this access.
static uint8_t *map_segment(struct cref_backend *b, uint32_t ref, int device_writes, uint8_t *transient) {
    *transient = 0;
    if (b->config.persistent && ref < LOCALXEN_GRANT_ENTRIES) {
        void *page = b->persistent_page[ref];
        if (page) return page;
        // Persistent grants are mapped writable once (as the Swift backend and Linux blkback
        // do); a read-only grant falls through to a mapping for this request.
        if (b->persistent_count < MAX_PERSISTENT_GRANTS && (page = cref_grant_map(&b->grants, ref, 1))) {
            b->persistent_page[ref] = page;
            b->persistent_refs[b->persistent_count++] = ref;
            return page;
        }
    }
    uint8_t *page = cref_grant_map(&b->grants, ref, device_writes);
    if (page) *transient = 1;
    return page;
}

// Copies an indirect request's segment list out of its granted pages, once.
static int load_indirect_segments(struct cref_backend *b, const blkif_request_indirect_t *req, unsigned n) {
    unsigned pages = (n + SEGS_PER_INDIRECT_PAGE - 1) / SEGS_PER_INDIRECT_PAGE;
    for (unsigned p = 0; p < pages; p++) {
        unsigned want = n - p * SEGS_PER_INDIRECT_PAGE;
        if (want > SEGS_PER_INDIRECT_PAGE) want = SEGS_PER_INDIRECT_PAGE;
        uint32_t ref = req->indirect_grefs[p];
        uint8_t transient;
        uint8_t *page = map_segment(b, ref, 0, &transient);
        if (!page) return -1;
        memcpy(&b->segs[p * SEGS_PER_INDIRECT_PAGE], page, want * sizeof(struct blkif_request_segment));
        if (transient) cref_grant_unmap(&b->grants, ref, 0);
    }
    return 0;
}

// READ or WRITE of the segments in b->segs[0..n): validate them all, map them all, do the
// null device's work, unmap.
static int16_t read_write(struct cref_backend *b, int is_write, uint64_t sector, unsigned n) {
    uint64_t total = 0;
    for (unsigned i = 0; i < n; i++) {
        const struct blkif_request_segment *s = &b->segs[i];
        if (s->first_sect > s->last_sect || s->last_sect >= SECTORS_PER_PAGE) return BLKIF_RSP_ERROR;
        total += s->last_sect - s->first_sect + 1u;
    }
    if (sector > b->config.sectors || total > b->config.sectors - sector) return BLKIF_RSP_ERROR;
    // A read makes the device write into the guest's pages: those must be granted writable.
    int device_writes = !is_write;
    for (unsigned i = 0; i < n; i++) {
        b->pages[i] = map_segment(b, b->segs[i].gref, device_writes, &b->transient[i]);
        if (!b->pages[i]) {
            for (unsigned j = 0; j < i; j++)
                if (b->transient[j]) cref_grant_unmap(&b->grants, b->segs[j].gref, device_writes);
            return BLKIF_RSP_ERROR;
        }
    }
    if (!is_write) {
        for (unsigned i = 0; i < n; i++) {
            const struct blkif_request_segment *s = &b->segs[i];
            memset(b->pages[i] + s->first_sect * 512u, 0, (s->last_sect - s->first_sect + 1u) * 512u);
        }
    }
    for (unsigned i = 0; i < n; i++)
        if (b->transient[i]) cref_grant_unmap(&b->grants, b->segs[i].gref, device_writes);
    return BLKIF_RSP_OKAY;
}

// Serves one request (its private copy); returns the status, sets the response's operation.
static int16_t serve(struct cref_backend *b, const union request *req, uint8_t *rsp_op) {
    *rsp_op = req->rw.operation;
    switch (req->rw.operation) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
    case BLKIF_OP_FLUSH_DISKCACHE:     // with segments: a write after a flush (Linux FUA)
    case BLKIF_OP_WRITE_BARRIER: {     // nothing is in flight in a synchronous null device
        unsigned n = req->rw.nr_segments;
        if (n == 0 && req->rw.operation != BLKIF_OP_READ && req->rw.operation != BLKIF_OP_WRITE)
            return BLKIF_RSP_OKAY;     // a bare flush or barrier: a null device is always durable
        if (n < 1 || n > BLKIF_MAX_SEGMENTS_PER_REQUEST) return BLKIF_RSP_ERROR;
        memcpy(b->segs, req->rw.seg, n * sizeof(struct blkif_request_segment));
        return read_write(b, req->rw.operation != BLKIF_OP_READ, req->rw.sector_number, n);
    }
    case BLKIF_OP_DISCARD: {
        const blkif_request_discard_t *d = &req->discard;
        // BLKIF_DISCARD_SECURE is "ignored if discard-secure=0" (blkif.h): we never offer it.
        if (d->nr_sectors == 0 || d->sector_number > b->config.sectors ||
            d->nr_sectors > b->config.sectors - d->sector_number) return BLKIF_RSP_ERROR;
        return BLKIF_RSP_OKAY;
    }
    case BLKIF_OP_INDIRECT: {
        const blkif_request_indirect_t *ind = &req->indirect;
        // Answered with the inner operation, as Linux blkback (and SoftDev's backend) do.
        *rsp_op = ind->indirect_op;
        unsigned n = ind->nr_segments;
        if (ind->indirect_op != BLKIF_OP_READ && ind->indirect_op != BLKIF_OP_WRITE) return BLKIF_RSP_ERROR;
        if (n < 1 || n > b->config.max_indirect_segments) return BLKIF_RSP_ERROR;
        if (load_indirect_segments(b, ind, n) != 0) return BLKIF_RSP_ERROR;
        return read_write(b, ind->indirect_op == BLKIF_OP_WRITE, ind->sector_number, n);
    }
    default:
        return BLKIF_RSP_EOPNOTSUPP;
    }
}

static void notify_frontend(struct cref_backend *b) {
    count(&b->stats.notifies);
    if (b->config.notify_fd >= 0) {
        uint64_t one = 1;
        ssize_t r = write(b->config.notify_fd, &one, sizeof one);
        (void)r;   // a full eventfd counter already means "notified"
    } else if (b->config.notify) {
        b->config.notify(b->config.notify_ctx);
    }
}

// Takes every request published so far and answers each; false if the frontend broke the ring.
static int drain(struct cref_backend *b) {
    blkif_back_ring_t *ring = &b->ring;
    RING_IDX rp = ring->sring->req_prod;
    xen_rmb();   // read the entries only after the producer index that covers them
    if (RING_REQUEST_PROD_OVERFLOW(ring, rp)) return 0;
    RING_IDX rc = ring->req_cons;
    while (rc != rp && !RING_REQUEST_CONS_OVERFLOW(ring, rc)) {
        union request req;
        // The one copy out of shared memory; everything below reads only the copy.
        memcpy(&req, RING_GET_REQUEST(ring, rc), sizeof(blkif_request_t));
        ring->req_cons = ++rc;
        uint8_t op;
        int16_t status = serve(b, &req, &op);
        blkif_response_t *rsp = RING_GET_RESPONSE(ring, ring->rsp_prod_pvt);
        rsp->id = req.rw.id;           // id is at offset 8 in every request view
        rsp->operation = op;
        rsp->status = status;
        ring->rsp_prod_pvt++;
        count(status == BLKIF_RSP_OKAY ? &b->stats.served : &b->stats.failed);
    }
    return 1;
}

// A request (or a stop) came.
static int ring_ready(void *ctx) {
    struct cref_backend *b = ctx;
    return __atomic_load_n(&b->ring.sring->req_prod, __ATOMIC_ACQUIRE) != b->ring.req_cons ||
           __atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE);
}

static void *run(void *arg) {
    struct cref_backend *b = arg;
    struct pollfd fds[2] = { { .fd = b->config.wait_fd, .events = POLLIN },
                             { .fd = b->stop_fd, .events = POLLIN } };
    int broken = 0;
    while (!__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE)) {
        if (!broken) {
            if (!drain(b)) {
                broken = 1;
                __atomic_store_n(&b->stats.broken, 1, __ATOMIC_RELAXED);
            }
            int notify;
            RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&b->ring, notify);
            if (notify) notify_frontend(b);
            if (!broken) {
                // Idle (a null device completes every request at once): poll first.
                if (cref_poll(&b->poller, b->config.poll_us, ring_ready, b)) continue;
                int more;
                // Ask for a notification of the next request, then look once more: a request
                // published before req_event was seen would otherwise never be noticed.
                RING_FINAL_CHECK_FOR_REQUESTS(&b->ring, more);
                if (more) continue;
            }
        }
        count(&b->stats.wakeups);
        fds[0].revents = fds[1].revents = 0;
        if (poll(fds, 2, -1) > 0 && (fds[0].revents & POLLIN)) {
            uint64_t v;
            ssize_t r = read(b->config.wait_fd, &v, sizeof v);   // clear pending, unmask
            (void)r;
        }
    }
    return NULL;
}

struct cref_backend *cref_backend_start(const struct cref_backend_config *config) {
    if (!config || !config->ring || config->ring_order > 4 || config->wait_fd < 0 ||
        (config->notify_fd < 0 && !config->notify)) { errno = EINVAL; return NULL; }
    struct cref_backend *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    int e;
    b->config = *config;
    b->poller.backoff = 1;
    if (b->config.max_indirect_segments > MAX_INDIRECT_SEGMENTS) b->config.max_indirect_segments = MAX_INDIRECT_SEGMENTS;
    b->stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    b->persistent_page = calloc(LOCALXEN_GRANT_ENTRIES, sizeof(void *));
    b->persistent_refs = calloc(MAX_PERSISTENT_GRANTS, sizeof(uint32_t));
    if (b->stop_fd < 0 || !b->persistent_page || !b->persistent_refs ||
        cref_grant_mapper_init(&b->grants, config->guest_memory, config->total_frames, config->domid) != 0) goto fail;
    // The frontend initialised the shared ring (SHARED_RING_INIT); we only attach to it.
    BACK_RING_INIT(&b->ring, (blkif_sring_t *)config->ring, LOCALXEN_PAGE_SIZE << config->ring_order);
    e = pthread_create(&b->thread, NULL, run, b);
    if (e != 0) { errno = e; goto fail; }
    return b;
fail:
    e = errno;
    cref_grant_mapper_destroy(&b->grants);
    if (b->stop_fd >= 0) close(b->stop_fd);
    free(b->persistent_page);
    free(b->persistent_refs);
    free(b);
    errno = e;
    return NULL;
}

void cref_backend_get_stats(const struct cref_backend *b, struct cref_backend_stats *stats) {
    stats->served = __atomic_load_n(&b->stats.served, __ATOMIC_RELAXED);
    stats->failed = __atomic_load_n(&b->stats.failed, __ATOMIC_RELAXED);
    stats->notifies = __atomic_load_n(&b->stats.notifies, __ATOMIC_RELAXED);
    stats->wakeups = __atomic_load_n(&b->stats.wakeups, __ATOMIC_RELAXED);
    stats->broken = __atomic_load_n(&b->stats.broken, __ATOMIC_RELAXED);
}

void cref_backend_stop(struct cref_backend *b, struct cref_backend_stats *stats) {
    if (!b) return;
    __atomic_store_n(&b->stopping, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    ssize_t r = write(b->stop_fd, &one, sizeof one);
    (void)r;
    pthread_join(b->thread, NULL);
    if (stats) cref_backend_get_stats(b, stats);
    for (uint32_t i = 0; i < b->persistent_count; i++) cref_grant_unmap(&b->grants, b->persistent_refs[i], 1);
    cref_grant_mapper_destroy(&b->grants);
    close(b->stop_fd);
    free(b->persistent_page);
    free(b->persistent_refs);
    free(b);
}
