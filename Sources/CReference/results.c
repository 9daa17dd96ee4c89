// What the conformance frontends share: a suite's results, rule breaches, waiting for an event.
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <unistd.h>
#include "cref_grants.h"

void cref_record(struct cref_results *r, const char *name, int passed, const char *fmt, va_list ap) {
    if (r->count < r->max) {
        struct cref_check *c = &r->results[r->count];
        snprintf(c->name, sizeof c->name, "%s", name);
        c->passed = passed;
        vsnprintf(c->message, sizeof c->message, fmt, ap);
    }
    r->count++;
}

void cref_breach(int *count, char *buf, unsigned long len, const char *fmt, ...) {
    if ((*count)++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(buf, len, fmt, ap);
        va_end(ap);
    }
}

int cref_wait_event(int fd, uint32_t ms) {
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int r;
    do r = poll(&p, 1, (int)ms); while (r < 0 && errno == EINTR);
    if (r <= 0) return -1;
    uint64_t v;
    ssize_t got = read(fd, &v, sizeof v);   // clear pending, unmask
    (void)got;
    return 0;
}

void cref_recordf(struct cref_results *r, const char *name, int passed, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    cref_record(r, name, passed, fmt, ap);
    va_end(ap);
}
