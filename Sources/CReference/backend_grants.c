// The backend's side of the emulated grant table: the same checks and the same pinning as
// Core's LocalGrantTable.pin/unpin (type, grantee, read-only, compare-and-swap of
// GTF_reading/GTF_writing, frame range), so that the reference backend does per request the
// work SoftDev's Swift backend does, no more and no less. One thread uses a mapper: no lock.
#include <errno.h>
#include <stdlib.h>
#include "cref_grants.h"

int cref_grant_mapper_init(struct cref_grant_mapper *m, void *memory, uint32_t total_frames, uint16_t me) {
    if (!memory || total_frames <= LOCALXEN_FIRST_DATA_FRAME) { errno = EINVAL; return -1; }
    m->memory = memory;
    m->table = (grant_entry_v1_t *)((uint8_t *)memory + LOCALXEN_PAGE_SIZE);   // frames 1..128
    m->total_frames = total_frames;
    m->me = me;
    m->pins = calloc(LOCALXEN_GRANT_ENTRIES, sizeof(uint32_t));
    return m->pins ? 0 : -1;
}

void cref_grant_mapper_destroy(struct cref_grant_mapper *m) {
    free(m->pins);
    m->pins = NULL;
}

// Clears GTF_writing when no writable pin remains, GTF_reading when no pin remains.
static void unpin_flags(struct cref_grant_mapper *m, uint32_t ref) {
    uint32_t pins = m->pins[ref];
    uint16_t clear = 0;
    if ((pins >> 16) == 0) clear |= GTF_writing;
    if (pins == 0) clear |= GTF_reading;
    if (clear) __atomic_fetch_and(&m->table[ref].flags, (uint16_t)~clear, __ATOMIC_SEQ_CST);
}

void *cref_grant_map(struct cref_grant_mapper *m, uint32_t ref, int writable) {
    if (ref >= LOCALXEN_GRANT_ENTRIES) return NULL;
    grant_entry_v1_t *e = &m->table[ref];
    uint16_t busy = GTF_reading | (writable ? GTF_writing : 0);
    uint16_t flags = __atomic_load_n(&e->flags, __ATOMIC_ACQUIRE);
    do {
        if ((flags & GTF_type_mask) != GTF_permit_access) return NULL;
        if (__atomic_load_n(&e->domid, __ATOMIC_ACQUIRE) != m->me) return NULL;
        if (writable && (flags & GTF_readonly)) return NULL;
        // Marking the entry busy atomically against the flags we checked: if the guest revoked
        // or changed it meanwhile, the swap fails and we check again.
    } while (!__atomic_compare_exchange_n(&e->flags, &flags, flags | busy, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    // Read the frame only once the entry is busy: the guest may not change it now.
    uint32_t frame = __atomic_load_n(&e->frame, __ATOMIC_ACQUIRE);
    if (frame < LOCALXEN_FIRST_DATA_FRAME || frame >= m->total_frames) {
        unpin_flags(m, ref);
        return NULL;
    }
    m->pins[ref] += writable ? 0x10000u : 1u;
    return m->memory + (size_t)frame * LOCALXEN_PAGE_SIZE;
}

void cref_grant_unmap(struct cref_grant_mapper *m, uint32_t ref, int writable) {
    if (ref >= LOCALXEN_GRANT_ENTRIES) return;
    uint32_t dec = writable ? 0x10000u : 1u;
    if (m->pins[ref] < dec) return;
    m->pins[ref] -= dec;
    unpin_flags(m, ref);
}
