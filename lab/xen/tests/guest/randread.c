// randread DEVICE COUNT: COUNT reads of 4 KiB at random 4 KiB-aligned offsets of DEVICE with
// O_DIRECT, one at a time (queue depth 1), then one line: "N reads in S s: IOPS iops, R MB/s".
// The lab's domU has no fio, and a dd process per read would measure fork and exec, not the
// disk; test-softdev.sh builds this statically on the host and hands it to the guest.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <linux/fs.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: randread DEVICE COUNT\n"); return 2; }
    long count = atol(argv[2]);
    int fd = open(argv[1], O_RDONLY | O_DIRECT);
    if (fd < 0) { perror(argv[1]); return 1; }
    unsigned long long bytes = 0;
    // A block device's size, or a regular file's (to try it on the host).
    if (ioctl(fd, BLKGETSIZE64, &bytes) != 0) bytes = (unsigned long long)lseek(fd, 0, SEEK_END);
    if (bytes < 4096) { fprintf(stderr, "%s: smaller than 4 KiB\n", argv[1]); return 1; }
    unsigned long long blocks = bytes / 4096;
    void *buf;
    if (posix_memalign(&buf, 4096, 4096) != 0) return 1;
    unsigned long long x = 88172645463325252ULL;   // xorshift64: the same offsets on every backend
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < count; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        if (pread(fd, buf, 4096, (off_t)(x % blocks) * 4096) != 4096) { perror("pread"); return 1; }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%ld reads in %.2f s: %.0f iops, %.2f MB/s\n", count, s, count / s, count * 4096.0 / s / 1e6);
    return 0;
}
