#include <libaio.h>
#include <sys/types.h>
#include <sys/uio.h>

// preadv2 (glibc 2.26+) is declared only under _GNU_SOURCE, which Swift's Glibc module does
// not set: the file device needs it for RWF_NOWAIT reads from the page cache.
extern ssize_t preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags);

// fstatfs, for the file system type (memory file systems are served inline).
#include <sys/vfs.h>

// The eventfd a file device's iocbs signal on completion (io_set_eventfd), non-blocking.
#include <sys/eventfd.h>
static inline int caio_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

// Whether the kernel has posted completions not yet reaped, read from the completion ring it
// shares with this process (struct aio_ring in fs/aio.c: id, nr, head, tail, magic, ...), as
// QEMU's linux-aio poll does, without a system call. 0 when the ring is not the layout known
// here (its magic differs).
struct caio_ring { unsigned id, nr, head, tail, magic, compat_features, incompat_features, header_length; };
static inline int caio_has_events(io_context_t ctx) {
    struct caio_ring *r = (struct caio_ring *)ctx;
    if (__atomic_load_n(&r->magic, __ATOMIC_RELAXED) != 0xa10a10a1) return 0;
    return __atomic_load_n(&r->head, __ATOMIC_RELAXED) != __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
}
