// Grant tables of the emulated hypervisor (localxen.h), from C, for both sides:
//  - the guest's side (guest_grants.c): grant a frame to a domain and revoke it, writing the
//    grant_entry_v1 exactly as a guest kernel does (gnttab_grant_foreign_access_ref,
//    gnttab_end_foreign_access_ref);
//  - the backend's side (backend_grants.c): validate and pin an entry when "mapping" it, exactly
//    as Core's LocalGrantTable does, and unpin it.
#ifndef CREFERENCE_GRANTS_H
#define CREFERENCE_GRANTS_H

#include <stdint.h>
#include "cxen.h"
#include "creference.h"

// MARK: Guest side

struct cref_guest_grants {
    grant_entry_v1_t *table;
    uint16_t domid;              // the domain every grant is made to (the backend)
    uint32_t *free_refs;         // a stack of unused refs
    uint32_t free_count;
    uint32_t capacity;
};

int cref_guest_grants_init(struct cref_guest_grants *g, grant_entry_v1_t *table, uint16_t domid,
                           uint32_t first_ref, uint32_t count);
void cref_guest_grants_destroy(struct cref_guest_grants *g);
// Grants `frame`; returns the ref, or -1 when no ref is free.
int64_t cref_guest_grant(struct cref_guest_grants *g, uint32_t frame, int readonly);
// Revokes `ref` and frees it; returns -1 (keeping the grant) while the backend has it mapped.
int cref_guest_end_access(struct cref_guest_grants *g, uint32_t ref);

// MARK: Backend side

struct cref_grant_mapper {
    grant_entry_v1_t *table;     // the guest's grant table, in its memory
    uint8_t *memory;             // the guest's memory, frame 0
    uint32_t total_frames;
    uint16_t me;                 // grants must be made to this domain
    // Our pins, per ref: low 16 bits read pins, high 16 bits write pins. Kept here, not in
    // the guest's memory, so that a guest cannot forge them (as LocalGrantTable).
    uint32_t *pins;
};

int cref_grant_mapper_init(struct cref_grant_mapper *m, void *memory, uint32_t total_frames, uint16_t me);
void cref_grant_mapper_destroy(struct cref_grant_mapper *m);
// Validates and pins `ref`; returns its page, or NULL if the guest did not grant it to us (with
// write access when `writable`) or it names a frame outside the guest's data frames.
void *cref_grant_map(struct cref_grant_mapper *m, uint32_t ref, int writable);
void cref_grant_unmap(struct cref_grant_mapper *m, uint32_t ref, int writable);

// MARK: Shared by the C files: results of a suite, the adaptive poll

#include <stdarg.h>
#include <time.h>

// A suite's results: up to `max` written, `count` counts every check.
struct cref_results {
    struct cref_check *results;
    int count, max;
};
void cref_record(struct cref_results *r, const char *name, int passed, const char *fmt, va_list ap);
void cref_recordf(struct cref_results *r, const char *name, int passed, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
// One check's result in a frontend `f` that keeps its results in `f->out`.
#define cref_check(f, name, passed, ...) cref_recordf(&(f)->out, name, passed, __VA_ARGS__)
// Counts a rule breach in *count and keeps the first one's message in buf.
void cref_breach(int *count, char *buf, unsigned long len, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
// Waits up to `ms` for the event channel `fd` (poll for POLLIN), then clears it (reads 8
// bytes); 0 on an event, -1 on a timeout.
int cref_wait_event(int fd, uint32_t ms);

static inline uint64_t cref_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

// SoftDev's AdaptivePoller, rule for rule: watch `ready` for up to window_us before the thread
// sleeps; after a miss skip the next 1, 2, 4 ... 256 polls. 1 if ready() became true.
struct cref_poller {
    uint32_t skip, backoff;     // backoff starts at 1
};
static inline int cref_poll(struct cref_poller *p, uint32_t window_us, int (*ready)(void *), void *ctx) {
    if (window_us == 0) return 0;
    if (p->skip > 0) { p->skip--; return 0; }
    uint64_t deadline = cref_now_ns() + (uint64_t)window_us * 1000u;
    unsigned turn = 0;
    do {
        if (ready(ctx)) {
            p->backoff = 1;
            return 1;
        }
        cxen_cpu_relax();
        turn++;
    } while ((turn & 7) != 0 || cref_now_ns() < deadline);
    p->skip = p->backoff;
    if (p->backoff < 256) p->backoff *= 2;
    return 0;
}

#endif
