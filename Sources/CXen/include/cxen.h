// The Xen ABI as the C compiler lays it out, for Swift.
#ifndef SOFTDEV_CXEN_H
#define SOFTDEV_CXEN_H

#include <stdint.h>
#include <malloc.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/uio.h>
#include <xenctrl.h>          // xen_mb/xen_rmb/xen_wmb, as ring.h expects them
#include <xengnttab.h>
#include <xenevtchn.h>
#include <xenstore.h>
#include <xen/grant_table.h>
#include <xen/io/ring.h>
#include <xen/io/blkif.h>
#include <xen/io/netif.h>
#include <xen/io/usbif.h>
#include <xen/io/xenbus.h>
#include <xen/io/xs_wire.h>
#include "localxen.h"

// Barriers for the shared ring protocol (io/ring.h's rules), callable from Swift.
// Full barrier: publish our index, then read the peer's event index.
static inline void cxen_mb(void) { xen_mb(); }
// Read barrier: read the producer index, then the entries it covers.
static inline void cxen_rmb(void) { xen_rmb(); }
// Write barrier: write entries, then the producer index that publishes them.
static inline void cxen_wmb(void) { xen_wmb(); }
/* A spin-wait hint (PAUSE): yields the core to a hyperthread sibling while polling. */
static inline void cxen_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

// Atomic compare-and-swap on a 16-bit grant entry flags word in shared memory.
static inline int cxen_cmpxchg16(volatile uint16_t *p, uint16_t expected, uint16_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
static inline uint16_t cxen_load16(const volatile uint16_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline uint32_t cxen_load32(const volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void cxen_store32(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// Ring sizes as __RING_SIZE computes them for a ring of `bytes` bytes.
static inline unsigned cxen_blkif_ring_size(size_t bytes) {
    return __CONST_RING_SIZE(blkif, bytes);
}

// Linux system calls the Glibc module does not show to Swift.
int cxen_eventfd(unsigned initval, int flags);
int cxen_memfd_create(const char *name, unsigned flags);
enum { CXEN_EFD_CLOEXEC = EFD_CLOEXEC, CXEN_EFD_NONBLOCK = EFD_NONBLOCK, CXEN_MFD_CLOEXEC = 1U };

// Atomics on words in shared or private memory (grant flags, pin counts).
static inline uint32_t cxen_fetch_add32(volatile uint32_t *p, uint32_t v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
static inline uint32_t cxen_fetch_sub32(volatile uint32_t *p, uint32_t v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
static inline uint16_t cxen_fetch_and16(volatile uint16_t *p, uint16_t v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }

// Seal a memfd so that it can no longer shrink or grow (see localxen.h).
int cxen_seal_size(int fd);

// Send and receive file descriptors with a message over a Unix socket (SCM_RIGHTS).
// Returns bytes sent/received or -1 with errno; *nfds is in/out for receive.
ssize_t cxen_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);
ssize_t cxen_recv_fds(int sock, void *buf, size_t len, int *fds, int *nfds);

// Grant copy segments for libxengnttab (the union inside is awkward from Swift): one segment
// between a granted page of `domid` and local memory, in the direction asked.
static inline void cxen_grant_copy_segment(xengnttab_grant_copy_segment_t *s, int to_guest, uint16_t domid,
                                           uint32_t ref, uint16_t offset, uint16_t len, void *local) {
    *s = (xengnttab_grant_copy_segment_t){0};
    if (to_guest) {
        s->source.virt = local;
        s->dest.foreign.ref = ref; s->dest.foreign.offset = offset; s->dest.foreign.domid = domid;
        s->flags = GNTCOPY_dest_gref;
    } else {
        s->source.foreign.ref = ref; s->source.foreign.offset = offset; s->source.foreign.domid = domid;
        s->dest.virt = local;
        s->flags = GNTCOPY_source_gref;
    }
    s->len = len;
}

// Grant operation status codes (grant_table.h's GNTST_*), as constants Swift can see.
enum {
    CXEN_GNTST_okay = GNTST_okay, CXEN_GNTST_general_error = GNTST_general_error, CXEN_GNTST_bad_domain = GNTST_bad_domain, CXEN_GNTST_bad_gntref = GNTST_bad_gntref,
    CXEN_GNTST_permission_denied = GNTST_permission_denied, CXEN_GNTST_bad_page = GNTST_bad_page,
    CXEN_GNTST_bad_copy_arg = GNTST_bad_copy_arg, CXEN_GNTST_address_too_big = GNTST_address_too_big,
};

// Keep freed heap memory instead of giving it back at once (FrameMemory.keepFreedMemory).
static inline void cxen_keep_freed_memory(int trim_threshold, int mmap_threshold) {
    mallopt(M_TRIM_THRESHOLD, trim_threshold);
    mallopt(M_MMAP_THRESHOLD, mmap_threshold);
}

// Names the calling thread for the system (15 bytes kept): top -H, ps -L, gdb.
static inline int cxen_name_thread(const char *name) {
    return prctl(PR_SET_NAME, (unsigned long)name, 0UL, 0UL, 0UL);
}

// The calling thread's id (gettid).
int cxen_gettid(void);
// The CPUs this process may run on, in order (at most `max` of them); -1 on error.
int cxen_allowed_cpus(int *cpus, int max);
// Lets thread `tid` of this process (0: the caller) run only on the `count` CPUs in `cpus`.
int cxen_set_thread_cpus(int tid, const int *cpus, int count);

#endif
