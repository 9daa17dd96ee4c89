// OpenSSL's libcrypto (libssl-dev) for the `crypt` device and the `cas` store: AES (XTS, CBC, ECB for ESSIV)
// through EVP, PBKDF2-HMAC, SHA digests, OPENSSL_cleanse. The loops below only call EVP once
// per 512-byte sector with that sector's IV, as dm-crypt, qemu and nbdkit do; the cipher itself
// is OpenSSL's (AES-NI where the CPU has it).
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <openssl/err.h>
#include <sys/random.h>
#include <sys/mman.h>
#include <stdint.h>
#include <string.h>

// The IV of `sector` as plain64 writes it: the sector number, little-endian, zero-padded.
static inline void ccrypto_plain64(unsigned char iv[16], uint64_t sector) {
    memset(iv, 0, 16);
    for (int b = 0; b < 8; b++) iv[b] = (unsigned char)(sector >> (8 * b));
}

// Encrypts or decrypts (whichever `ctx` was keyed for) `count` 512-byte sectors from `in` to
// `out` (the same pointer is allowed), numbered from `sector`, each with its plain64 IV; with
// `essiv` (an AES-ECB context keyed with the hash of the key), the IV is ESSIV's: the plain64
// block encrypted with it. Returns 1, or 0 if OpenSSL failed.
static inline int ccrypto_sectors(EVP_CIPHER_CTX *ctx, EVP_CIPHER_CTX *essiv, const unsigned char *in,
                                  unsigned char *out, size_t count, uint64_t sector) {
    unsigned char iv[16], eiv[16];
    for (size_t i = 0; i < count; i++) {
        ccrypto_plain64(iv, sector + i);
        const unsigned char *use = iv;
        if (essiv) {
            int n = 0;
            if (EVP_EncryptUpdate(essiv, eiv, &n, iv, 16) != 1 || n != 16) return 0;
            use = eiv;
        }
        if (EVP_CipherInit_ex(ctx, NULL, NULL, NULL, use, -1) != 1) return 0;
        int outl = 0;
        if (EVP_CipherUpdate(ctx, out + i * 512, &outl, in + i * 512, 512) != 1 || outl != 512) return 0;
    }
    return 1;
}

// The XTS tweak arithmetic on 128-bit values as clang's vector extensions have them (SSE2
// registers on x86-64, NEON on arm64): no intrinsics header, one path for every target.
typedef uint64_t ccrypto_u64x2 __attribute__((vector_size(16), aligned(16)));
typedef int32_t ccrypto_i32x4 __attribute__((vector_size(16), aligned(16)));

// T * x in GF(2^128), IEEE 1619's little-endian order: a shift left by one, the bit that
// leaves each 64-bit half carried into the other (into the low half as the polynomial 0x87).
static inline ccrypto_u64x2 ccrypto_xts_double(ccrypto_u64x2 t) {
    ccrypto_i32x4 top = (ccrypto_i32x4)t >> 31;   // each 32-bit lane: all ones if its top bit is set
    ccrypto_i32x4 carry = __builtin_shufflevector(top, top, 3, 0, 1, 0) & (ccrypto_i32x4){0x87, 0, 1, 0};
    return (t << 1) ^ (ccrypto_u64x2)carry;
}

static inline ccrypto_u64x2 ccrypto_load128(const unsigned char *p) { ccrypto_u64x2 v; memcpy(&v, p, 16); return v; }
static inline void ccrypto_store128(unsigned char *p, ccrypto_u64x2 v) { memcpy(p, &v, 16); }

// XTS (IEEE 1619) over whole 512-byte sectors with plain64 tweaks, built on OpenSSL's AES-ECB:
// C = E_K1(P ^ T) ^ T, T_j = E_K2(plain64(sector)) * x^j in GF(2^128). The same result as
// EVP_aes_*_xts with the sector's IV, but two EVP calls per 16 sectors instead of an
// EVP_CipherInit_ex (parameter lookups, ~1 us in OpenSSL 3) and an update per sector: that cost
// held AES-NI's 3 GB/s to 0.5 GB/s. `data` is AES-ECB keyed with K1 for the direction wanted,
// `tweak` AES-ECB keyed with K2 for encryption; both without padding. in == out is allowed.
// Four sectors' tweak chains are stepped side by side: one chain alone waits on each
// multiplication's latency, and the XORs around the AES cost as much as the AES did.
#define CCRYPTO_XTS_BATCH 16
static inline int ccrypto_xts_sectors(EVP_CIPHER_CTX *data, EVP_CIPHER_CTX *tweak, const unsigned char *in,
                                      unsigned char *out, size_t count, uint64_t sector) {
    unsigned char ivs[CCRYPTO_XTS_BATCH * 16];
    ccrypto_u64x2 tweaks[CCRYPTO_XTS_BATCH * 32];   // one tweak per AES block of the batch
    while (count > 0) {
        size_t n = count < CCRYPTO_XTS_BATCH ? count : CCRYPTO_XTS_BATCH;
        int len = 0;
        for (size_t i = 0; i < n; i++) ccrypto_plain64(ivs + 16 * i, sector + i);
        if (EVP_EncryptUpdate(tweak, ivs, &len, ivs, (int)(16 * n)) != 1 || len != (int)(16 * n)) return 0;
        size_t i = 0;
        for (; i + 4 <= n; i += 4) {
            ccrypto_u64x2 t0 = ccrypto_load128(ivs + 16 * i), t1 = ccrypto_load128(ivs + 16 * i + 16);
            ccrypto_u64x2 t2 = ccrypto_load128(ivs + 16 * i + 32), t3 = ccrypto_load128(ivs + 16 * i + 48);
            const unsigned char *s = in + 512 * i;
            unsigned char *o = out + 512 * i;
            ccrypto_u64x2 *kept = tweaks + 32 * i;
            for (size_t j = 0; j < 32; j++) {
                kept[j] = t0; kept[32 + j] = t1; kept[64 + j] = t2; kept[96 + j] = t3;
                ccrypto_store128(o + 16 * j, ccrypto_load128(s + 16 * j) ^ t0);
                ccrypto_store128(o + 512 + 16 * j, ccrypto_load128(s + 512 + 16 * j) ^ t1);
                ccrypto_store128(o + 1024 + 16 * j, ccrypto_load128(s + 1024 + 16 * j) ^ t2);
                ccrypto_store128(o + 1536 + 16 * j, ccrypto_load128(s + 1536 + 16 * j) ^ t3);
                t0 = ccrypto_xts_double(t0); t1 = ccrypto_xts_double(t1);
                t2 = ccrypto_xts_double(t2); t3 = ccrypto_xts_double(t3);
            }
        }
        for (; i < n; i++) {
            ccrypto_u64x2 t = ccrypto_load128(ivs + 16 * i);
            for (size_t j = 0; j < 32; j++) {
                tweaks[32 * i + j] = t;
                ccrypto_store128(out + 512 * i + 16 * j, ccrypto_load128(in + 512 * i + 16 * j) ^ t);
                t = ccrypto_xts_double(t);
            }
        }
        if (EVP_CipherUpdate(data, out, &len, out, (int)(512 * n)) != 1 || len != (int)(512 * n)) return 0;
        for (size_t k = 0; k < n * 32; k++) ccrypto_store128(out + 16 * k, ccrypto_load128(out + 16 * k) ^ tweaks[k]);
        in += 512 * n; out += 512 * n; sector += n; count -= n;
    }
    return 1;
}

// Wipes memory in a way the compiler cannot remove (OPENSSL_cleanse), for keys and passphrases.
static inline void ccrypto_wipe(void *p, size_t n) { if (p && n) OPENSSL_cleanse(p, n); }

// Fills `p` with `n` bytes from the kernel's CSPRNG (getrandom); 1 on success.
static inline int ccrypto_random(void *p, size_t n) {
    unsigned char *b = (unsigned char *)p;
    while (n > 0) {
        ssize_t r = getrandom(b, n, 0);
        if (r < 0) return 0;
        b += r; n -= (size_t)r;
    }
    return 1;
}

