/* Preloaded into the SIPp root that build_tls_root.sh makes (etc/ld.so.preload).
 *
 * Debian trixie's SIPp (sip-tester 1:3.7.3-2) is linked with wolfSSL 5.7.2.
 * SIPp hands each TLS connection its socket with SSL_set_bio() and, before
 * every write, asks for it back with SSL_get_fd().  wolfSSL answers -1 for a
 * connection set up that way, so SIPp gives up on each message without
 * writing a byte ("Unable to send TLS message"): the handshake completes and
 * nothing follows.  This answers with the read BIO's descriptor instead,
 * which is what OpenSSL's SSL_get_fd() does.  Nothing else of SIPp or of
 * wolfSSL is changed.  Every symbol is looked up at run time, so the other
 * programs of the root, which do not link wolfSSL, load this harmlessly.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>

typedef struct WOLFSSL WOLFSSL;
typedef struct WOLFSSL_BIO WOLFSSL_BIO;

int wolfSSL_get_fd(const WOLFSSL *ssl)
{
    static int (*get_fd)(const WOLFSSL *);
    static WOLFSSL_BIO *(*get_rbio)(const WOLFSSL *);
    static long (*bio_get_fd)(WOLFSSL_BIO *, int *);
    WOLFSSL_BIO *bio;
    int fd;

    if (get_fd == NULL) {
        get_fd = (int (*)(const WOLFSSL *))dlsym(RTLD_NEXT, "wolfSSL_get_fd");
        get_rbio = (WOLFSSL_BIO *(*)(const WOLFSSL *))dlsym(RTLD_DEFAULT, "wolfSSL_SSL_get_rbio");
        bio_get_fd = (long (*)(WOLFSSL_BIO *, int *))dlsym(RTLD_DEFAULT, "wolfSSL_BIO_get_fd");
    }
    fd = get_fd ? get_fd(ssl) : -1;
    if (fd < 0 && get_rbio && bio_get_fd && (bio = get_rbio(ssl)) != NULL)
        bio_get_fd(bio, &fd);
    return fd;
}
