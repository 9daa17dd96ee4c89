// The guest's side of the grant table: what Linux's gnttab_grant_foreign_access_ref and
// gnttab_end_foreign_access_ref do on a v1 table.
#include <errno.h>
#include <stdlib.h>
#include "cref_grants.h"

int cref_guest_grants_init(struct cref_guest_grants *g, grant_entry_v1_t *table, uint16_t domid,
                           uint32_t first_ref, uint32_t count) {
    if ((uint64_t)first_ref + count > LOCALXEN_GRANT_ENTRIES) { errno = EINVAL; return -1; }
    g->table = table;
    g->domid = domid;
    g->free_refs = malloc(sizeof(uint32_t) * (count ? count : 1));
    if (!g->free_refs) return -1;
    // Hand out low refs first: pushed in reverse.
    for (uint32_t i = 0; i < count; i++) g->free_refs[i] = first_ref + count - 1 - i;
    g->free_count = count;
    g->capacity = count;
    return 0;
}

void cref_guest_grants_destroy(struct cref_guest_grants *g) {
    free(g->free_refs);
    g->free_refs = NULL;
}

int64_t cref_guest_grant(struct cref_guest_grants *g, uint32_t frame, int readonly) {
    if (g->free_count == 0) return -1;
    uint32_t ref = g->free_refs[--g->free_count];
    grant_entry_v1_t *e = &g->table[ref];
    e->frame = frame;
    e->domid = g->domid;
    // The backend may look at the entry at any time: it must see domid and frame before the
    // flags that make the entry valid.
    xen_wmb();
    e->flags = GTF_permit_access | (readonly ? GTF_readonly : 0);
    return ref;
}

int cref_guest_end_access(struct cref_guest_grants *g, uint32_t ref) {
    volatile uint16_t *flags = &g->table[ref].flags;
    uint16_t f = __atomic_load_n(flags, __ATOMIC_ACQUIRE);
    do {
        // Mapped (GTF_reading) or writable-mapped (GTF_writing) by the backend: not ours yet.
        if (f & (GTF_reading | GTF_writing)) return -1;
        // Clearing the flags with a compare-and-swap loses no concurrent pin by the backend.
    } while (!__atomic_compare_exchange_n(flags, &f, 0, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    g->free_refs[g->free_count++] = ref;
    return 0;
}
