#define _GNU_SOURCE
#include <fcntl.h>
#include <sched.h>
#include <unistd.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include "cxen.h"

int cxen_eventfd(unsigned initval, int flags) { return eventfd(initval, flags); }
int cxen_memfd_create(const char *name, unsigned flags) { return memfd_create(name, flags | MFD_ALLOW_SEALING); }

int cxen_seal_size(int fd) {
    return fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
}

#define CXEN_MAX_FDS 8

ssize_t cxen_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    char control[CMSG_SPACE(sizeof(int) * CXEN_MAX_FDS)];
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > CXEN_MAX_FDS) { errno = EINVAL; return -1; }
    if (nfds > 0) {
        memset(control, 0, sizeof(control));
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t r;
    do { r = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
    return r;
}

ssize_t cxen_recv_fds(int sock, void *buf, size_t len, int *fds, int *nfds) {
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    char control[CMSG_SPACE(sizeof(int) * CXEN_MAX_FDS)];
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof(control) };
    int want = *nfds;
    *nfds = 0;
    ssize_t r;
    do { r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (r < 0 && errno == EINTR);
    if (r < 0) return r;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int got[CXEN_MAX_FDS];
        memcpy(got, CMSG_DATA(c), sizeof(int) * n);
        for (int i = 0; i < n; i++) {
            if (*nfds < want) fds[(*nfds)++] = got[i];
            else close(got[i]);   // more than asked for: never leak them
        }
    }
    return r;
}
_Static_assert(LOCALXEN_GRANT_ENTRIES == LOCALXEN_GRANT_FRAMES * (LOCALXEN_PAGE_SIZE / sizeof(grant_entry_v1_t)), "grant table size");

int cxen_gettid(void) { return (int)gettid(); }

int cxen_allowed_cpus(int *cpus, int max) {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0) return -1;
    int n = 0;
    for (int c = 0; c < CPU_SETSIZE && n < max; c++)
        if (CPU_ISSET(c, &set)) cpus[n++] = c;
    return n;
}

int cxen_set_thread_cpus(int tid, const int *cpus, int count) {
    cpu_set_t set;
    CPU_ZERO(&set);
    for (int i = 0; i < count; i++)
        if (cpus[i] >= 0 && cpus[i] < CPU_SETSIZE) CPU_SET(cpus[i], &set);
    return sched_setaffinity(tid, sizeof set, &set);
}
