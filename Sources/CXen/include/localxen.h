// The emulated hypervisor's shared memory layout: what a local frontend (Swift or C) and a
// backend in another process agree on. A domain's memory is one sealed memfd of 4 KiB frames:
//   frame 0                       header (informational; backends never trust it)
//   frames 1 .. GRANT_FRAMES      the grant table: grant_entry_v1[], 512 per frame, as Xen's v1
//   frames GRANT_FRAMES+1 ..      the domain's pages (rings, data buffers)
// The broker seals the memfd against shrinking and growing, so a backend's mapping of it can
// never fault (SIGBUS) because a guest truncated its memory.
#ifndef SOFTDEV_LOCALXEN_H
#define SOFTDEV_LOCALXEN_H

#include <stdint.h>
#include <xen/grant_table.h>

#define LOCALXEN_PAGE_SIZE 4096u
#define LOCALXEN_MAGIC 0x304d4f445446534full  /* "OSFTDOM0" */
#define LOCALXEN_GRANT_FRAMES 128u             /* 65536 grant entries */
#define LOCALXEN_GRANT_ENTRIES 65536u   /* LOCALXEN_GRANT_FRAMES * 512 entries of 8 bytes */
#define LOCALXEN_FIRST_DATA_FRAME (1u + LOCALXEN_GRANT_FRAMES)

struct localxen_domain_header {
    uint64_t magic;
    uint32_t domid;
    uint32_t total_frames;
    char name[64];
};

#endif
