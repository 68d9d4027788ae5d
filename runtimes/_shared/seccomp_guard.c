/*
 * seccomp-guard: run a program under the project's own seccomp filter.
 *
 *     seccomp-guard PROGRAM [ARGUMENT...]
 *
 * Every sandbox starts its command through this program. It installs a filter that allows every
 * system call except the ones listed below, which fail with EPERM, then executes PROGRAM, which
 * inherits the filter, as do all of its children; nothing can remove it. The filter stacks on the
 * engine's default profile (the kernel runs every filter and the strictest answer wins), so a
 * sandbox is always strictly stricter than the engine's default, whatever that default allows.
 *
 * The denied calls are the kernel interfaces that untrusted code has no use for and that keep
 * turning up in container escapes: mounting and namespaces, other processes' memory, eBPF,
 * perf, userfaultfd and io_uring (large attack surfaces), keyrings (not namespaced), kernel
 * replacement and modules, the host's clocks, file handles, and host administration.
 *
 * It fails closed: if any step fails it says so on stderr and exits 126 without running PROGRAM.
 * Only the native ABI is allowed (see ACT_BADARCH below), so one list of names covers everything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <seccomp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#define GUARD_FAILED 126 /* the shell's "found but could not run" */
#define NOT_FOUND 127

/* Denied outright. Names, not numbers, so that the same list serves any architecture. */
static const char *const denied[] = {
    /* Changing the filesystem view: the classic and the new mount API. */
    "mount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
    "mount_setattr", "pivot_root", "chroot",
    /* New namespaces (user namespaces above all) unlock kernel code meant for root. */
    "unshare", "setns",
    /* Reading or steering another process. */
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    /* Large, bug-prone kernel surfaces that ordinary programs never need. */
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    /* Kernel keyrings are not namespaced: keys would be shared with the host. */
    "keyctl", "add_key", "request_key",
    /* Replacing the kernel or extending it. */
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    /* The clocks belong to the host; even read-only adjtimex is refused (nothing here needs it). */
    "clock_settime", "clock_adjtime", "settimeofday", "adjtimex",
    /* Opening files by handle skips path permission checks (the "shocker" escape). */
    "open_by_handle_at", "name_to_handle_at",
    /* Host administration. */
    "swapon", "swapoff", "reboot", "syslog", "acct", "quotactl", "lookup_dcookie", "vhangup",
    "iopl", "ioperm", "fanotify_init",
};

/* Obsolete calls that some architectures never had: denied where they exist, skipped elsewhere. */
static const char *const denied_where_present[] = {"nfsservctl", "uselib"};

/* clone() may make processes and threads, but not enter new namespaces. CLONE_NEWTIME shares
 * its bit with the exit signal in clone()'s flags; no valid signal sets it, so denying it costs
 * nothing. */
static const unsigned long namespace_flags[] = {
    CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID,
    CLONE_NEWIPC, CLONE_NEWUTS, CLONE_NEWCGROUP, CLONE_NEWTIME,
};

/* personality(): only PER_LINUX (0) and the 0xffffffff query are allowed. Other personas turn
 * off address-space randomisation or change how the kernel treats the process. */
#define PERSONALITY_QUERY 0xffffffffUL

static void fail(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("seccomp-guard: ", stderr);
    vfprintf(stderr, format, args);
    fputs("; the program was not run\n", stderr);
    va_end(args);
    exit(GUARD_FAILED);
}

/* libseccomp returns negative errno values. */
static void check(int rc, const char *what) {
    if (rc < 0) fail("%s failed: %s", what, strerror(-rc));
}

static int resolve(const char *name) {
    int nr = seccomp_syscall_resolve_name(name);
    /* A negative number is either an unknown name or one that this ABI does not have. */
    return nr < 0 ? -1 : nr;
}

static int must_resolve(const char *name) {
    int nr = resolve(name);
    /* A typo, or a libseccomp too old to know the call, would silently leave it open. */
    if (nr < 0) fail("libseccomp does not know the system call %s", name);
    return nr;
}

int main(int argc, char *argv[]) {
    if (argc < 2) fail("usage: seccomp-guard PROGRAM [ARGUMENT...]");

    /* Required to load a filter without CAP_SYS_ADMIN, and it also keeps set-uid binaries
     * from regaining privileges under the filter. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail("PR_SET_NO_NEW_PRIVS failed: %s", strerror(errno));

    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (ctx == NULL) fail("seccomp_init failed");

    /* 32-bit calls (int 0x80, x32) would reach the same kernel code under other numbers; rather
     * than list every call again per ABI, the other ABIs are closed. No runtime here uses them. */
    check(seccomp_attr_set(ctx, SCMP_FLTATR_ACT_BADARCH, SCMP_ACT_ERRNO(ENOSYS)), "closing the other ABIs");
    /* Every system call runs through the filter: a binary tree keeps that cost logarithmic. */
    check(seccomp_attr_set(ctx, SCMP_FLTATR_CTL_OPTIMIZE, 2), "optimizing the filter");

    const uint32_t deny = SCMP_ACT_ERRNO(EPERM);
    for (size_t i = 0; i < sizeof denied / sizeof *denied; i++) {
        check(seccomp_rule_add(ctx, deny, must_resolve(denied[i]), 0), denied[i]);
    }
    for (size_t i = 0; i < sizeof denied_where_present / sizeof *denied_where_present; i++) {
        int nr = resolve(denied_where_present[i]);
        if (nr >= 0) check(seccomp_rule_add(ctx, deny, nr, 0), denied_where_present[i]);
    }

    /* Flags are the first argument of clone() on this architecture. One rule per flag: the
     * rules of a call are alternatives, so any one flag set is enough to deny it. */
    int clone_nr = must_resolve("clone");
    for (size_t i = 0; i < sizeof namespace_flags / sizeof *namespace_flags; i++) {
        scmp_datum_t flag = namespace_flags[i];
        check(seccomp_rule_add(ctx, deny, clone_nr, 1, SCMP_A0(SCMP_CMP_MASKED_EQ, flag, flag)), "clone");
    }
    /* clone3() takes its flags behind a pointer, which a filter cannot read. ENOSYS makes glibc
     * fall back to clone(), where the rules above apply. */
    check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), must_resolve("clone3"), 0), "clone3");

    /* personality(): a rule may compare an argument only once, so "neither 0 nor the query" is
     * spelled as alternatives: any value wider than 32 bits, or any 32-bit value with a set bit
     * next to a clear one (going round), which is every value but all-zeros and all-ones. */
    int personality_nr = must_resolve("personality");
    check(seccomp_rule_add(ctx, deny, personality_nr, 1, SCMP_A0(SCMP_CMP_GT, PERSONALITY_QUERY)), "personality");
    for (unsigned bit = 0; bit < 32; bit++) {
        scmp_datum_t set = 1UL << bit, clear = 1UL << ((bit + 1) % 32);
        check(seccomp_rule_add(ctx, deny, personality_nr, 1, SCMP_A0(SCMP_CMP_MASKED_EQ, set | clear, set)),
              "personality");
    }

    check(seccomp_load(ctx), "loading the filter");
    seccomp_release(ctx);

    execvp(argv[1], &argv[1]);
    int error = errno;
    fprintf(stderr, "seccomp-guard: cannot run %s: %s\n", argv[1], strerror(error));
    return error == ENOENT ? NOT_FOUND : GUARD_FAILED;
}
