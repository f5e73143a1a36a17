/*
 * sandpool-launcher: spawns helpers for one host process that it never
 * forks. Built by pool/build.rs, embedded in the sandpool library and
 * exec'd fresh by it (posix_spawn from a sealed memfd); its host side and
 * the wire format are in pool/src/launch/server.rs, which is the
 * authority on both.
 *
 * Its fd table, after the close_range that is the first thing it does:
 *   0, 1, 2                /dev/null
 *   3 .. 3+sockets-1       one end of a SOCK_SEQPACKET socketpair per
 *                          worker thread (the host holds the other ends)
 *   3+sockets              the pinned helper image, if the host pins one
 * and, transiently, the child ends of the pipes of the launches in flight.
 *
 * argv: sandpool-launcher SOCKETS KEEP CAPS EXEC_PATH ARGC ARGV... ENV...
 *   SOCKETS    worker threads and sockets (1..64)
 *   KEEP       inherited fds from 3 up to keep (SOCKETS or SOCKETS+1)
 *   CAPS       the capabilities (a hex mask) to leave in the launcher's
 *              bounding set, which it empties of all others when it may
 *              (CAP_SETPCAP): a helper exec'd by root then starts without
 *              them, and its own drop has nothing left to do but these
 *              (the ones a helper's switch to its configured user needs).
 *              Then it drops every capability of its own.
 *   EXEC_PATH  what each helper's execve runs (the program or its image)
 *   ARGC       how many helper argv entries follow; the rest is the
 *              helper's whole environment. The launcher's own environment
 *              is empty and never reaches a helper.
 *
 * One request: 16 bytes (u64 sequence, u32 flags, u32 zero) with the child
 * ends as SCM_RIGHTS: stdin's read end, stdout's and stderr's write ends,
 * the write end of a report pipe, and (flag 1) the region's memfd. The
 * spawned child makes them its fds 0, 1, 2 (and 3), puts itself in its own
 * process group, writes its pid into the report pipe (so a host whose
 * launcher died mid-spawn still learns, and reaps, the child) and execs.
 * Signals need no set-up in the child: the launcher has every signal at its
 * default disposition and an empty mask in every thread, which the child
 * inherits.
 *
 * One reply: 24 bytes (u64 sequence, i32 pid, i32 errno, u32 stage, u32
 * zero) with the child's pidfd as SCM_RIGHTS whenever a child exists (pid >
 * 0), even if its exec failed: the child is the host's (CLONE_PARENT), and
 * only the host can reap it.
 *
 * The spawn is clone(CLONE_VM | CLONE_VFORK | CLONE_PARENT | CLONE_PIDFD):
 * posix_spawn's own technique (no copy of any address space; the calling
 * thread sleeps until the child has exec'd), made the host's child, with a
 * pidfd from the clone itself. End of file on any socket means the host is
 * gone or done: the launcher exits.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/capability.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef SYS_close_range
#define SYS_close_range 436
#endif

enum { MAX_SOCKETS = 64, MAX_FDS = 5, CHILD_STACK = 64 * 1024 };
enum { FLAG_REGION = 1 };
/* The step a failed reply names (the host maps them onto its errors). */
enum { STAGE_OK = 0, STAGE_REQUEST = 1, STAGE_CLONE = 2, STAGE_EXEC = 3 };
/* Exit codes: usage (the host built a bad command line), a socket error. */
enum { EXIT_USAGE = 64, EXIT_SOCKET = 71 };

struct request {
    uint64_t seq;
    uint32_t flags;
    uint32_t zero;
};

struct reply {
    uint64_t seq;
    int32_t pid;
    int32_t error;
    uint32_t stage;
    uint32_t zero;
};

_Static_assert(sizeof(struct request) == 16, "request layout");
_Static_assert(sizeof(struct reply) == 24, "reply layout");

static const char *exec_path;
static char **helper_argv;
static char **helper_envp;

/* What one clone child needs; on the spawning thread's stack, shared with
 * the child through CLONE_VM. */
struct child {
    int fds[MAX_FDS];
    int nfds;
    volatile int exec_errno;
};

/* Runs in the child, on its own stack, in the launcher's memory until the
 * exec replaces it: only async-signal-safe calls, no allocation, no locks. */
static int child_main(void *arg) {
    struct child *c = arg;
    /* Every source fd is 4 or above (checked before the clone), so no dup2
     * overwrites a source that a later one still needs. dup2 clears
     * FD_CLOEXEC on the copy; the sources close at exec. */
    for (int target = 0; target < 3; target++) {
        if (dup2(c->fds[target], target) < 0)
            goto fail;
    }
    if (c->nfds == MAX_FDS && dup2(c->fds[4], 3) < 0)
        goto fail;
    if (setpgid(0, 0) < 0)
        goto fail;
    pid_t pid = (pid_t)syscall(SYS_getpid);
    /* Best effort: a full or closed report pipe only costs the host its
     * fallback when the launcher dies mid-spawn. */
    ssize_t ignored = write(c->fds[3], &pid, sizeof pid);
    (void)ignored;
    execve(exec_path, helper_argv, helper_envp);
fail:
    c->exec_errno = errno ? errno : EINVAL;
    _exit(127);
}

static void close_all(const int *fds, int nfds) {
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
}

/* Receives one request; returns its length (0 at end of file, -1 on error)
 * and every fd that came with it, however malformed the rest. */
static ssize_t receive(int sock, struct request *req, int *fds, int *nfds, int *truncated) {
    union {
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = req, .iov_len = sizeof *req};
    struct msghdr msg = {
        .msg_iov = &iov,
        .msg_iovlen = 1,
        .msg_control = control.buf,
        .msg_controllen = sizeof control.buf,
    };
    *nfds = 0;
    *truncated = 0;
    ssize_t n;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return n;
    for (struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg); cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
        if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
            continue;
        size_t count = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(cmsg) + i * sizeof(int), sizeof fd);
            if (*nfds < MAX_FDS)
                fds[(*nfds)++] = fd;
            else
                close(fd);
        }
    }
    if (msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))
        *truncated = 1;
    return n;
}

static void send_reply(int sock, const struct reply *rep, int pidfd) {
    union {
        char buf[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    struct iovec iov = {.iov_base = (void *)rep, .iov_len = sizeof *rep};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
    if (pidfd >= 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = sizeof control.buf;
        struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
        cmsg->cmsg_level = SOL_SOCKET;
        cmsg->cmsg_type = SCM_RIGHTS;
        cmsg->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cmsg), &pidfd, sizeof pidfd);
    }
    ssize_t n;
    do
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        /* The host closed its end (EPIPE) or the socket broke: either way
         * nobody will read this launcher's replies again. */
        _exit(errno == EPIPE || errno == ECONNRESET ? 0 : EXIT_SOCKET);
    }
}

static void spawn(const struct request *req, struct child *c, void *stack_top, struct reply *rep,
                  int *pidfd) {
    int want = (req->flags & FLAG_REGION) ? MAX_FDS : MAX_FDS - 1;
    if (req->zero != 0 || (req->flags & ~(uint32_t)FLAG_REGION) || c->nfds != want) {
        rep->stage = STAGE_REQUEST;
        rep->error = EPROTO;
        return;
    }
    for (int i = 0; i < c->nfds; i++) {
        /* Received fds land above the launcher's own (0 to 3 at least are
         * taken), but keep the dup2 order safe whatever the table holds. */
        if (c->fds[i] < 4) {
            int lifted = fcntl(c->fds[i], F_DUPFD_CLOEXEC, 4);
            if (lifted < 0) {
                rep->stage = STAGE_REQUEST;
                rep->error = errno;
                return;
            }
            close(c->fds[i]);
            c->fds[i] = lifted;
        }
    }
    c->exec_errno = 0;
    int fd = -1;
    int pid = clone(child_main, stack_top,
                    CLONE_VM | CLONE_VFORK | CLONE_PARENT | CLONE_PIDFD | SIGCHLD, c, &fd);
    if (pid < 0) {
        rep->stage = STAGE_CLONE;
        rep->error = errno;
        return;
    }
    /* CLONE_VFORK: the child has exec'd or exited by now. */
    rep->pid = pid;
    *pidfd = fd;
    if (c->exec_errno != 0) {
        rep->stage = STAGE_EXEC;
        rep->error = c->exec_errno;
    }
}

static void *serve(void *arg) {
    int sock = (int)(intptr_t)arg;
    /* One spawn at a time per worker (the thread sleeps while its child
     * execs), so one child stack per worker, reused. */
    char *stack = mmap(NULL, CHILD_STACK, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED)
        _exit(EXIT_SOCKET);
    void *stack_top = (void *)(((uintptr_t)(stack + CHILD_STACK)) & ~(uintptr_t)15);
    for (;;) {
        struct request req = {0};
        struct child c;
        int truncated;
        ssize_t n = receive(sock, &req, c.fds, &c.nfds, &truncated);
        if (n == 0)
            _exit(0);
        if (n < 0)
            _exit(errno == ECONNRESET ? 0 : EXIT_SOCKET);
        struct reply rep = {.seq = req.seq, .pid = 0, .error = 0, .stage = STAGE_OK, .zero = 0};
        int pidfd = -1;
        if (n != (ssize_t)sizeof req || truncated) {
            rep.stage = STAGE_REQUEST;
            rep.error = EPROTO;
        } else {
            spawn(&req, &c, stack_top, &rep, &pidfd);
        }
        close_all(c.fds, c.nfds);
        send_reply(sock, &rep, pidfd);
        if (pidfd >= 0)
            close(pidfd);
    }
    return NULL;
}

/* Empties this process's bounding set but for the capabilities in `keep`,
 * so that every helper it execs starts without them. Best effort: without
 * CAP_SETPCAP (a non-root host) nothing can be dropped, and each helper
 * drops (or reports) its own set as it would anyway; the helper and the
 * host check the result, never this. */
static void empty_bounding_set(unsigned long long keep) {
    for (int cap = 0; cap < 64; cap++) {
        if (keep & (1ULL << cap))
            continue;
        /* EINVAL: past the kernel's last capability; EPERM: no
         * CAP_SETPCAP. */
        if (prctl(PR_CAPBSET_DROP, (unsigned long)cap, 0UL, 0UL, 0UL) < 0)
            break;
    }
}

/* Empties this process's own effective, permitted and inheritable sets
 * (and with them the ambient set) when it runs as root: it needs no
 * capability to clone, place fds and exec, and what a helper exec'd by
 * root holds comes from the bounding set above (root's exec gets it as its
 * permitted set), not from these. A non-root launcher keeps them: its
 * helpers' capabilities, if any, come from its ambient set. Best effort,
 * like the above: a launcher that keeps them is no worse than before. */
static void drop_own_capabilities(void) {
    if (geteuid() != 0)
        return;
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2];
    memset(data, 0, sizeof data);
    (void)syscall(SYS_capset, &header, data);
}

static unsigned long long parse_mask(const char *text) {
    char *end;
    errno = 0;
    unsigned long long value = strtoull(text, &end, 16);
    if (errno || end == text || *end)
        _exit(EXIT_USAGE);
    return value;
}

static int parse(const char *text, int lo, int hi) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || end == text || *end || value < lo || value > hi)
        _exit(EXIT_USAGE);
    return (int)value;
}

int main(int argc, char **argv) {
    if (argc < 6)
        _exit(EXIT_USAGE);
    int sockets = parse(argv[1], 1, MAX_SOCKETS);
    int keep = parse(argv[2], sockets, sockets + 1);
    /* First thing: nothing the host leaked past CLOEXEC stays open here. */
    if (syscall(SYS_close_range, 3 + keep, ~0U, 0) < 0) {
        struct rlimit limit;
        long top = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY
                       ? (long)limit.rlim_cur
                       : 1L << 20;
        for (long fd = 3 + keep; fd < top; fd++)
            close((int)fd);
    }
    for (int fd = 3; fd < 3 + keep; fd++) {
        /* Kept fds must not reach the helpers. */
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
            _exit(EXIT_USAGE);
    }
    empty_bounding_set(parse_mask(argv[3]));
    drop_own_capabilities();
    int count = parse(argv[5], 1, argc - 6);
    exec_path = argv[4];
    helper_argv = calloc((size_t)count + 1, sizeof *helper_argv);
    if (!helper_argv)
        _exit(EXIT_USAGE);
    memcpy(helper_argv, argv + 6, (size_t)count * sizeof *helper_argv);
    helper_envp = argv + 6 + count; /* NULL-terminated with argv */

    /* Every signal at its default disposition, none blocked: the helpers
     * inherit exactly that, and no handler can ever run in a clone child
     * that shares this memory. */
    for (int sig = 1; sig < NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            signal(sig, SIG_DFL);
    }
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    prctl(PR_SET_NAME, "sandpool-launch", 0, 0, 0);

    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0 || pthread_attr_setstacksize(&attr, 64 * 1024) != 0)
        _exit(EXIT_USAGE);
    for (int i = 1; i < sockets; i++) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, serve, (void *)(intptr_t)(3 + i)) != 0)
            _exit(EXIT_USAGE);
    }
    serve((void *)(intptr_t)3);
    return 0;
}
