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
