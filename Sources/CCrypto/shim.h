// OpenSSL's libcrypto (libssl-dev) for the `crypt` device: AES (XTS, CBC, ECB for ESSIV)
// through EVP, PBKDF2-HMAC, SHA digests, OPENSSL_cleanse. The loops below only call EVP once
// per 512-byte sector with that sector's IV, as dm-crypt, qemu and nbdkit do; the cipher itself
// is OpenSSL's (AES-NI where the CPU has it).
#include <openssl/evp.h>
#include <openssl/crypto.h>
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
