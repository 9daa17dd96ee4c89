// A suite's results, for both conformance frontends.
#include <stdio.h>
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
