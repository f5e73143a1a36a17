/*
 * The C reference helper: the Rust reference helper's request format
 * (helper/reference/src/reference.rs, helper/reference/src/redo.rs) served
 * through the C runtime (helper/capi/include/sandpool_helper.h), so the
 * same tests can check its answers and its sandbox.
 *
 * A request is one op byte, then its body:
 *
 *   0x01 echo      the body, unchanged
 *   0x02 redo      an 8 KiB base page, then records (u16 LE offset, u16 LE
 *                  length, that many bytes); the page with each applied
 *
 * and, only with --test-ops (like the Rust helper):
 *
 *   0x10 open      read the file named by the body (forbidden: openat)
 *   0x11 socket    create a TCP socket (forbidden: socket)
 *   0x12 fork      fork (forbidden: clone)
 *   0x13 "panic"   C has none: fail with an empty response, so the
 *                  runtime's own text ("handler failed (returned -1)")
 *   0x14 fail      fail with the body as the error text
 *   0x15 sleep     sleep the body's u32 LE milliseconds, then echo the rest
 *   0x16 stderr    write the body to stderr, then echo it
 *   0x17 exec      execve /bin/true (forbidden: execve)
 *   0x30 grow      allocate and touch the body's u32 LE MiB, kept for the
 *                  helper's life; answer the MiB kept in all (u32 LE), or
 *                  fail (an Error frame) when malloc refuses
 *   0x31 seed      the 16 bytes the --init-urandom init hook read; with
 *                  --keep-urandom, 16 bytes read now from the /dev/urandom
 *                  fd the init hook kept open and declared
 *   0x40 tenant    C helper only: the bound tenant, or an error if none
 *   0x41 fill      C helper only: append 64 KiB chunks until the runtime
 *                  refuses one; answer the bytes it took (u64 LE)
 *
 * Usage: sandpool-c-helper [--test-ops] [--init-urandom | --keep-urandom]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "sandpool_helper.h"

#define PAGE_SIZE_REDO 8192
#define RECORD_HEADER 4

struct options {
    int test_ops;
    int init_urandom;
    int keep_urandom;
    int kept_fd;
    uint8_t seed[16];
};

/* --init-urandom: the init hook reads a seed before the filter closes
 * (open, read, close: nothing may stay open). */
static int init(void *ctx) {
    struct options *options = ctx;
    if (options->keep_urandom) {
        /* --keep-urandom: kept open and declared, read while serving. */
        options->kept_fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
        if (options->kept_fd < 0 || sandpool_keep_fd(options->kept_fd) != 0) {
            return 1;
        }
        return 0;
    }
    if (!options->init_urandom) {
        return 0;
    }
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return 1;
    }
    ssize_t got = read(fd, options->seed, sizeof options->seed);
    close(fd);
    return got == (ssize_t)sizeof options->seed ? 0 : 1;
}

/* Fails the request with a formatted text. */
static int fail(sandpool_buf *out, const char *format, ...)
    __attribute__((format(printf, 2, 3)));

static int fail(sandpool_buf *out, const char *format, ...) {
    char text[512];
    va_list args;
    va_start(args, format);
    int n = vsnprintf(text, sizeof text, format, args);
    va_end(args);
    if (n < 0) {
        n = 0;
    }
    if ((size_t)n >= sizeof text) {
        n = (int)sizeof text - 1;
    }
    sandpool_buf_clear(out);
    (void)sandpool_buf_append(out, (const uint8_t *)text, (size_t)n);
    return 1;
}

static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) |
           ((uint32_t)p[3] << 24);
}

/* The page redo workload, with the Rust RedoError texts. */
static int redo(const uint8_t *body, size_t len, sandpool_buf *out) {
    if (len < PAGE_SIZE_REDO) {
        return fail(out,
                    "redo request of %zu bytes is shorter than the %d-byte base page",
                    len, PAGE_SIZE_REDO);
    }
    if (sandpool_buf_append(out, body, PAGE_SIZE_REDO) != 0) {
        return fail(out, "out of memory");
    }
    uint8_t *page = sandpool_buf_data(out);
    size_t at = PAGE_SIZE_REDO;
    while (at < len) {
        if (len - at < RECORD_HEADER) {
            return fail(out, "redo record at byte %zu is truncated", at);
        }
        size_t offset = le16(body + at);
        size_t n = le16(body + at + 2);
        if (len - at - RECORD_HEADER < n) {
            return fail(out, "redo record at byte %zu is truncated", at);
        }
        if (offset + n > PAGE_SIZE_REDO) {
            return fail(out,
                        "redo record at byte %zu writes %zu bytes at offset %zu, past the page end",
                        at, n, offset);
        }
        memcpy(page + offset, body + at + RECORD_HEADER, n);
        at += RECORD_HEADER + n;
    }
    return 0;
}

static int handle(void *ctx, const uint8_t *request, size_t len, sandpool_buf *out) {
    const struct options *options = ctx;
    if (len == 0) {
        return fail(out, "empty request: no op byte");
    }
    uint8_t op = request[0];
    const uint8_t *body = request + 1;
    size_t body_len = len - 1;
    if (op >= 0x10 && !options->test_ops) {
        return fail(out, "test op 0x%02x refused: helper not launched with --test-ops", op);
    }
    switch (op) {
    case 0x01:
        return sandpool_buf_append(out, body, body_len) == 0 ? 0 : fail(out, "out of memory");
    case 0x02:
        return redo(body, body_len, out);
    case 0x10: {
        char *path = malloc(body_len + 1);
        if (path == NULL) {
            return fail(out, "out of memory");
        }
        memcpy(path, body, body_len);
        path[body_len] = '\0';
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        int saved = errno;
        free(path);
        if (fd < 0) {
            return fail(out, "open: %s", strerror(saved));
        }
        uint8_t chunk[4096];
        ssize_t n;
        while ((n = read(fd, chunk, sizeof chunk)) > 0) {
            (void)sandpool_buf_append(out, chunk, (size_t)n);
        }
        close(fd);
        return 0;
    }
    case 0x11: {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            return fail(out, "socket: %s", strerror(errno));
        }
        close(fd);
        return fail(out, "socket was allowed");
    }
    case 0x12: {
        pid_t pid = fork();
        if (pid == 0) {
            _exit(0);
        }
        return fail(out, "fork was allowed (%d)", (int)pid);
    }
    case 0x13:
        return -1;
    case 0x14:
        sandpool_buf_clear(out);
        (void)sandpool_buf_append(out, body, body_len);
        return 1;
    case 0x15: {
        if (body_len < 4) {
            return fail(out, "sleep needs a u32");
        }
        uint32_t ms = le32(body);
        struct timespec pause = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
        while (nanosleep(&pause, &pause) != 0 && errno == EINTR) {
        }
        return sandpool_buf_append(out, body + 4, body_len - 4) == 0 ? 0 : fail(out, "out of memory");
    }
    case 0x16:
        fwrite(body, 1, body_len, stderr);
        return sandpool_buf_append(out, body, body_len) == 0 ? 0 : fail(out, "out of memory");
    case 0x17: {
        char *argv[] = {"/bin/true", NULL};
        char *envp[] = {NULL};
        execve("/bin/true", argv, envp);
        return fail(out, "execve: %s", strerror(errno));
    }
    case 0x30: {
        static size_t kept_mib;
        if (body_len < 4) {
            return fail(out, "grow needs a u32");
        }
        uint32_t mib = le32(body);
        size_t size = (size_t)mib << 20;
        uint8_t *block = malloc(size);
        if (block == NULL) {
            return fail(out, "malloc of %u MiB failed: %s", mib, strerror(errno));
        }
        /* Touched page by page, so it is resident, not just reserved. */
        for (size_t at = 0; at < size; at += 4096) {
            block[at] = 1;
        }
        kept_mib += mib; /* never freed: kept for the helper's life */
        uint8_t le[4];
        for (int i = 0; i < 4; i++) {
            le[i] = (uint8_t)(kept_mib >> (8 * i));
        }
        return sandpool_buf_append(out, le, sizeof le);
    }
    case 0x31:
        if (options->keep_urandom) {
            uint8_t fresh[16];
            ssize_t got = read(options->kept_fd, fresh, sizeof fresh);
            if (got != (ssize_t)sizeof fresh) {
                return fail(out, "read of the kept fd: %zd", got);
            }
            return sandpool_buf_append(out, fresh, sizeof fresh);
        }
        if (!options->init_urandom) {
            return fail(out, "no --init-urandom");
        }
        return sandpool_buf_append(out, options->seed, sizeof options->seed);
    case 0x40: {
        size_t tenant_len = 99;
        const uint8_t *tenant = sandpool_tenant(out, &tenant_len);
        if (tenant == NULL) {
            return fail(out, "not bound to a tenant (length %zu)", tenant_len);
        }
        return sandpool_buf_append(out, tenant, tenant_len) == 0 ? 0 : fail(out, "out of memory");
    }
    case 0x41: {
        static uint8_t chunk[64 * 1024];
        uint64_t taken = 0;
        while (sandpool_buf_append(out, chunk, sizeof chunk) == 0) {
            taken += sizeof chunk;
        }
        /* The last, partial chunk: byte by byte to the exact limit. */
        while (sandpool_buf_append(out, chunk, 1) == 0) {
            taken += 1;
        }
        if (taken != sandpool_buf_len(out)) {
            return fail(out, "length %zu, appended %llu", sandpool_buf_len(out),
                        (unsigned long long)taken);
        }
        sandpool_buf_clear(out);
        uint8_t le[8];
        for (int i = 0; i < 8; i++) {
            le[i] = (uint8_t)(taken >> (8 * i));
        }
        return sandpool_buf_append(out, le, sizeof le);
    }
    default:
        return fail(out, "unknown op 0x%02x", op);
    }
}

int main(int argc, char **argv) {
    /* Only argv is looked at before sandpool_serve: no fd, no thread. */
    static struct options options;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--test-ops") == 0) {
            options.test_ops = 1;
        } else if (strcmp(argv[i], "--init-urandom") == 0) {
            options.init_urandom = 1;
        } else if (strcmp(argv[i], "--keep-urandom") == 0) {
            options.keep_urandom = 1;
        } else {
            fprintf(stderr, "sandpool-c-helper: unknown argument %s\n", argv[i]);
            return 2;
        }
    }
    if (strcmp(sandpool_version(), SANDPOOL_HELPER_VERSION) != 0) {
        fprintf(stderr, "sandpool-c-helper: header %s, library %s\n", SANDPOOL_HELPER_VERSION,
                sandpool_version());
        return SANDPOOL_EXIT_STARTUP_FAILED;
    }
    return sandpool_serve_with_init("sandpool-c-helper " SANDPOOL_HELPER_VERSION, init, handle,
                                    &options);
}
