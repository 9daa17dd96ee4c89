// evkeys DEVICE SECONDS [READY]: reads key events from an evdev node (/dev/input/eventN) and
// prints the text they type (US layout, lower case, digits, space, '-' and '.'; other keys as
// <code>) up to Enter, then exits 0; exits 1 if no Enter comes within SECONDS. Once the node is
// open it creates the file READY, so that the test types only when the reader is there. The
// kernel drops a reader's unread events when its buffer (64 events for a keyboard) fills: that
// shows as <dropped> (SYN_DROPPED), not as a silent gap. The lab's USB test runs it in a guest
// while dom0 types on a soft keyboard (`softdev type`); test-softdev.sh builds it statically on
// the host, like randread.
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static const char *map[64] = {
    [KEY_1] = "1", [KEY_2] = "2", [KEY_3] = "3", [KEY_4] = "4", [KEY_5] = "5", [KEY_6] = "6",
    [KEY_7] = "7", [KEY_8] = "8", [KEY_9] = "9", [KEY_0] = "0", [KEY_MINUS] = "-", [KEY_DOT] = ".",
    [KEY_Q] = "q", [KEY_W] = "w", [KEY_E] = "e", [KEY_R] = "r", [KEY_T] = "t", [KEY_Y] = "y",
    [KEY_U] = "u", [KEY_I] = "i", [KEY_O] = "o", [KEY_P] = "p", [KEY_A] = "a", [KEY_S] = "s",
    [KEY_D] = "d", [KEY_F] = "f", [KEY_G] = "g", [KEY_H] = "h", [KEY_J] = "j", [KEY_K] = "k",
    [KEY_L] = "l", [KEY_Z] = "z", [KEY_X] = "x", [KEY_C] = "c", [KEY_V] = "v", [KEY_B] = "b",
    [KEY_N] = "n", [KEY_M] = "m", [KEY_SPACE] = " ",
};

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) { fprintf(stderr, "usage: evkeys DEVICE SECONDS [READY]\n"); return 2; }
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror(argv[1]); return 2; }
    if (argc == 4) {
        int ready = open(argv[3], O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (ready < 0) { perror(argv[3]); return 2; }
        close(ready);
    }
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long limit = atol(argv[2]) * 1000;
    int presses = 0;
    for (;;) {
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = limit - ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
        if (left <= 0) break;
        struct pollfd p = { .fd = fd, .events = POLLIN };
        if (poll(&p, 1, (int)left) <= 0) continue;
        // Everything there is in one read: fewer system calls, so the reader keeps up.
        struct input_event evs[64];
        ssize_t n = read(fd, evs, sizeof evs);
        if (n < (ssize_t)sizeof evs[0] || n % sizeof evs[0]) { perror("read"); return 2; }
        for (size_t i = 0; i < n / sizeof evs[0]; i++) {
            const struct input_event *ev = &evs[i];
            if (ev->type == EV_SYN && ev->code == SYN_DROPPED) { printf("<dropped>"); fflush(stdout); continue; }
            if (ev->type != EV_KEY || ev->value != 1) continue;   // presses only (not releases, repeats)
            presses++;
            if (ev->code == KEY_ENTER) { printf("\n"); fflush(stdout); return 0; }
            if (ev->code < 64 && map[ev->code]) printf("%s", map[ev->code]); else printf("<%d>", ev->code);
            fflush(stdout);
        }
    }
    fprintf(stderr, "evkeys: no Enter within %s s (%d key presses)\n", argv[2], presses);
    return 1;
}
