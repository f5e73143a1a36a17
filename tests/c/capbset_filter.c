/* Test fixture: execs argv[2] under a seccomp filter that answers
 * prctl(PR_CAPBSET_DROP) with EINVAL ("einval") or with a faked success
 * ("fake"), or PR_CAPBSET_READ with EINVAL ("readinval"): a process in the
 * way of the helper's bounding-set drop. The helper must then fail its
 * start-up or report the set kept, never claim it cleared
 * (tests/tests/privileges.rs). From an adversarial review's repro. */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc < 3) { fprintf(stderr, "usage\n"); return 2; }
    unsigned err = EINVAL, option = PR_CAPBSET_DROP;
    if (!strcmp(argv[1], "fake")) err = 0;
    if (!strcmp(argv[1], "readinval")) option = PR_CAPBSET_READ;
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_prctl, 0, 3),
        BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[0])),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, option, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (err & SECCOMP_RET_DATA)),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    struct sock_fprog prog = { .len = sizeof f / sizeof f[0], .filter = f };
    if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) { perror("seccomp"); return 2; }
    execv(argv[2], argv + 2);
    perror("execv");
    return 2;
}
