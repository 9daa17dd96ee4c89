// OpenSSL's libcrypto (libssl-dev) for the `crypt` device and the `cas` store: AES-CBC and
// AES-ECB (ESSIV) through EVP, PBKDF2-HMAC, SHA digests, OPENSSL_cleanse; and libgcrypt
// (libgcrypt20-dev, cryptsetup's default backend) for AES-XTS, the LUKS payload's cipher. The
// loops below only call the library once per 512-byte sector with that sector's IV, as
// dm-crypt, qemu and nbdkit do; the cipher itself is the library's (AES-NI, VAES where the CPU
// has them).
#include <openssl/evp.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <openssl/err.h>
#include <gcrypt.h>
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

// libgcrypt, initialised once before its first use (its rule): no secure memory pool (the
// keys live in SecretBytes and in the cipher handles, which gcry_cipher_close wipes).
static inline int ccrypto_gcrypt_ready(void) {
    if (!gcry_control(GCRYCTL_INITIALIZATION_FINISHED_P)) {
        if (!gcry_check_version(GCRYPT_VERSION)) return 0;
        gcry_control(GCRYCTL_DISABLE_SECMEM, 0);
        gcry_control(GCRYCTL_INITIALIZATION_FINISHED, 0);
    }
    return 1;
}

// An AES-XTS handle of libgcrypt keyed with `key` (2 x 16 or 2 x 32 bytes); NULL if refused.
static inline gcry_cipher_hd_t ccrypto_gcrypt_xts(const unsigned char *key, size_t keylen) {
    gcry_cipher_hd_t h = NULL;
    int algo = keylen == 64 ? GCRY_CIPHER_AES256 : GCRY_CIPHER_AES128;
    if (gcry_cipher_open(&h, algo, GCRY_CIPHER_MODE_XTS, 0)) return NULL;
    if (gcry_cipher_setkey(h, key, keylen)) { gcry_cipher_close(h); return NULL; }
    return h;
}

static inline void ccrypto_gcrypt_close(gcry_cipher_hd_t h) { gcry_cipher_close(h); }

// XTS over `count` 512-byte sectors with plain64 tweaks through libgcrypt (VAES where the CPU
// has it): one data unit per sector. 1, or 0 if libgcrypt failed. in == out is allowed.
static inline int ccrypto_gcrypt_xts_sectors(gcry_cipher_hd_t h, int encrypt, const unsigned char *in,
                                             unsigned char *out, size_t count, uint64_t sector) {
    unsigned char iv[16];
    for (size_t i = 0; i < count; i++) {
        ccrypto_plain64(iv, sector + i);
        if (gcry_cipher_setiv(h, iv, 16)) return 0;
        gcry_error_t e = encrypt ? gcry_cipher_encrypt(h, out + 512 * i, 512, in + 512 * i, 512)
                                 : gcry_cipher_decrypt(h, out + 512 * i, 512, in + 512 * i, 512);
        if (e) return 0;
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

