// The Xen ABI as the C compiler lays it out, for Swift.
#ifndef SOFTDEV_CXEN_H
#define SOFTDEV_CXEN_H

#include <stdint.h>
#include <sys/eventfd.h>
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

// Barriers for the shared ring protocol (io/ring.h's rules), callable from Swift.
// Full barrier: publish our index, then read the peer's event index.
static inline void cxen_mb(void) { xen_mb(); }
// Read barrier: read the producer index, then the entries it covers.
static inline void cxen_rmb(void) { xen_rmb(); }
// Write barrier: write entries, then the producer index that publishes them.
static inline void cxen_wmb(void) { xen_wmb(); }

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

#endif
