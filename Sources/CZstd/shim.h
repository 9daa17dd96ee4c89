// libzstd (libzstd-dev) for the `compress` device: one-shot compression of a chunk with a
// reusable context, and decompression into a buffer of the chunk's known size.
// And CRC-32C, the checksum of SoftDev's metadata blocks and of each stored chunk: with the
// SSE 4.2 instruction on x86-64 (every x86-64 CPU since 2008), else a table.
#include <zstd.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
__attribute__((target("sse4.2")))
static inline uint32_t softdev_crc32c(uint32_t crc, const void *data, size_t n) {
    const unsigned char *p = data;
    uint64_t c = ~crc;
    for (; n >= 8; n -= 8, p += 8) { uint64_t w; memcpy(&w, p, 8); c = __builtin_ia32_crc32di(c, w); }
    uint32_t c32 = (uint32_t)c;
    for (; n > 0; n--, p++) c32 = __builtin_ia32_crc32qi(c32, *p);
    return ~c32;
}
#else
static inline uint32_t softdev_crc32c(uint32_t crc, const void *data, size_t n) {
    const unsigned char *p = data;
    uint32_t c = ~crc;
    for (; n > 0; n--, p++) {
        c ^= *p;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & -(c & 1));
    }
    return ~c;
}
#endif
