/*
 * seccomp-guard: the init of every sandbox, and the seccomp filter that everything in it runs under.
 *
 *     seccomp-guard --deadline SECONDS [--lease] PROGRAM [ARGUMENT...]
 *     seccomp-guard PROGRAM [ARGUMENT...]
 *
 * Every sandbox starts its command through this program. It installs a filter that allows every
 * system call except the ones listed below, which fail with EPERM (socket families: see further
 * down), then runs PROGRAM, which inherits the filter, as do all of its children; nothing can
 * remove it. The filter stacks on the engine's default profile (the kernel runs every filter and
 * the strictest answer wins), so a sandbox is always strictly stricter than the engine's default,
 * whatever that default allows.
 *
 * With --deadline, the guard is the container's init (PID 1; the engine's own init must be off):
 * it forks PROGRAM, reaps every process that ends in the container, forwards the usual
 * termination signals to PROGRAM, exits with PROGRAM's status when it ends (its exit code, or
 * 128 + the signal that killed it, as tini does), and when SECONDS have passed kills every
 * process in the container and exits 137, even if the server that started it is gone. Nothing
 * inside the container can stop that deadline; see supervise() for why. Without --deadline it
 * simply executes PROGRAM (no fork, no deadline).
 *
 * With --lease as well, the container's stdin is the server's lease on the sandbox, and the init
 * keeps it for itself. The server writes frames on it, each the length of the body in decimal and a
 * newline, then the body; the first frame's header line decides the sandbox's mode for its whole
 * life (see struct lease):
 *
 * - One-shot (CODOMYRMEX-WS1): one frame: a header line (the guard's nonce, the size of the files
 *   section, the collection's limits), the files section (the workspace's input files, which the
 *   init writes under /sandbox), then PROGRAM's input, which the init passes to PROGRAM through a
 *   pipe (PROGRAM's stdin, which then reads EOF); the server then holds the stream open for as long
 *   as it wants the sandbox. When PROGRAM ends, the init kills everything else and writes the
 *   workspace's new and changed files on the container's stdout, framed with the nonce (see
 *   collect()), before it exits.
 * - Session (CODOMYRMEX-SS1): the same first frame with one more field, the session's lifetime,
 *   which lowers the deadline; PROGRAM (a runner that keeps one interpreter) gets its input through
 *   the same pipe, which is never closed; then one frame per call (CODOMYRMEX-SC1, a fresh nonce
 *   and the call's runner input), appended to the pipe. When PROGRAM has finished a call it sends
 *   signal 40 to the init, which then reports, without killing anything, the files that are new or
 *   changed since the previous report (see report_call()); when PROGRAM ends, the init ends the
 *   sandbox as one-shot does if a call was under way, at once otherwise.
 *
 * When the stream ends, at any point, the server is done with the sandbox or gone (killed
 * outright, its host connection lost): the init kills every process in the container and exits
 * 137 at once, so that nothing outlives its server by more than the engine's teardown, even if no
 * server ever starts again. A malformed frame ends the sandbox the same way (exit 126).
 *
 * The denied calls are the kernel interfaces that untrusted code has no use for and that keep
 * turning up in container escapes: mounting and namespaces, other processes' memory, eBPF,
 * perf, userfaultfd and io_uring (large attack surfaces), keyrings (not namespaced), kernel
 * replacement and modules, the host's clocks, file handles, and host administration; and socket
 * families other than local, IPv4, IPv6 and routing netlink (AF_VSOCK above all: it reaches the
 * hypervisor of a VM host, and the engine's network_mode=none does not cover it).
 *
 * It fails closed: if any step before PROGRAM starts fails it says so on stderr and exits 126
 * without running PROGRAM. Only the native ABI is allowed (see ACT_BADARCH below), so one list of
 * names covers everything.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <dirent.h>
#include <sched.h>
#include <seccomp.h>
#include <signal.h>
#include <stdbool.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define GUARD_FAILED 126 /* the shell's "found but could not run" */
#define NOT_FOUND 127
#define DEADLINE_PASSED (128 + SIGKILL) /* what the engine reports for a container killed outright */
#define MAX_DEADLINE_SECONDS 31536000.0 /* a year: anything longer is a mistake, not a deadline */
#define NS_PER_SECOND 1000000000LL
#define LEASE_LOST (128 + SIGKILL)

/* Denied outright. Names, not numbers, so that the same list serves any architecture. */
static const char *const denied[] = {
    /* Changing the filesystem view: the classic and the new mount API. */
    "mount", "umount2", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
    "mount_setattr", "pivot_root", "chroot",
    /* New namespaces (user namespaces above all) unlock kernel code meant for root. */
    "unshare", "setns",
    /* Reading or steering another process. */
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp",
    /* Large, bug-prone kernel surfaces that ordinary programs never need. io_uring would also
     * create sockets (IORING_OP_SOCKET) without the socket() rules below ever seeing them. */
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

/* socket() and socketpair(): the address families a sandbox may use. Everything else fails with
 * EAFNOSUPPORT, as if this kernel had no such family: AF_VSOCK (a channel to the hypervisor of a
 * VM host, which network_mode=none does not close), AF_PACKET, AF_ALG, AF_KEY, AF_BLUETOOTH, AF_CAN,
 * AF_TIPC, AF_RDS, AF_XDP... and every number that a future kernel may assign. AF_NETLINK is
 * allowed with NETLINK_ROUTE only: glibc asks it for the interface addresses (getifaddrs, and
 * getaddrinfo to sort its answers), and so do Node's os.networkInterfaces() and Python's
 * socket.if_nameindex(); without CAP_NET_ADMIN, in the container's own network namespace, it can
 * only read that namespace's links and addresses. Any other netlink protocol (uevents, audit,
 * sock_diag, xfrm, generic netlink...) fails with EPROTONOSUPPORT. */
static const unsigned allowed_families[] = {AF_UNIX, AF_INET, AF_INET6, AF_NETLINK};
#define FAMILY_VALUE_RULES_BELOW 64 /* rules by value below this, by bit above (see below) */
#define LOW_32_BITS 0xffffffffULL

/* The init (PID 1) runs as the same user as the program, and the kernel lets a process change
 * the scheduling, priority, CPU set and resource limits of any process of its own user. Starved
 * of CPU time (SCHED_IDLE, nice 19, pinned to a busy CPU) the init would still kill at its
 * deadline, but late; with its limits changed it could fail. So these calls may not name PID 1
 * (0, "the caller", and every other pid stay allowed). */
static const char *const not_on_init[] = {
    "sched_setscheduler", "sched_setparam", "sched_setattr", "sched_setaffinity", "prlimit64",
};

/* Signals the init passes on to PROGRAM (the ones an engine or a terminal sends to stop it). */
static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};

/* The signal with which a session's PROGRAM asks for its call's report: the raw kernel number, which
 * glibc calls SIGRTMIN+6 (its own SIGRTMIN is 34). Never forwarded. */
#define REPORT_SIGNAL 40

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

static int family_allowed(unsigned family) {
    for (size_t i = 0; i < sizeof allowed_families / sizeof *allowed_families; i++) {
        if (allowed_families[i] == family) return 1;
    }
    return 0;
}

/* An int argument equal to value. The kernel reads an int argument from the low 32 bits of its
 * register and ignores the rest, but a filter sees all 64 bits: an equality rule on the whole
 * register (SCMP_CMP_EQ, and also libseccomp's SCMP_A0_32, which only narrows the datum) misses a
 * caller that sets the upper half, so every int comparison here masks it off. */
static struct scmp_arg_cmp int_is(unsigned arg, uint32_t value) {
    return SCMP_CMP(arg, SCMP_CMP_MASKED_EQ, LOW_32_BITS, value);
}

/* An int argument with the given bit (0..31) set. */
static struct scmp_arg_cmp int_has_bit(unsigned arg, unsigned bit) {
    return SCMP_CMP(arg, SCMP_CMP_MASKED_EQ, 1ULL << bit, 1ULL << bit);
}

static int block_denied(unsigned first, unsigned size) {
    for (unsigned family = first; family < first + size; family++) {
        if (family_allowed(family)) return 0;
    }
    return 1;
}

/* socket(domain, type, protocol) and socketpair(domain, type, protocol, sv): rules are
 * alternatives and a rule compares an argument once, so "any family but the allowed ones" is
 * spelled as rules for the values below 64 that are not allowed, each rule an aligned block of
 * them (the low bits masked off: 4-7, 32-63...), and one rule per bit from 6 to 31, which covers
 * every value of 64 and above (negative ones included). Blocks rather than one rule per value
 * keep the path short for the allowed families, which pass every rule. */
static void restrict_socket_families(scmp_filter_ctx ctx, const char *name) {
    int nr = must_resolve(name);
    const uint32_t no_family = SCMP_ACT_ERRNO(EAFNOSUPPORT);
    for (unsigned family = 0; family < FAMILY_VALUE_RULES_BELOW;) {
        if (family_allowed(family)) {
            family++;
            continue;
        }
        unsigned size = 1;
        while (family % (2 * size) == 0 && family + 2 * size <= FAMILY_VALUE_RULES_BELOW &&
               block_denied(family, 2 * size)) {
            size *= 2;
        }
        const scmp_datum_t mask = LOW_32_BITS & ~(scmp_datum_t)(size - 1);
        check(seccomp_rule_add(ctx, no_family, nr, 1, SCMP_CMP(0, SCMP_CMP_MASKED_EQ, mask, family)), name);
        family += size;
    }
    for (unsigned bit = 6; bit < 32; bit++) {
        check(seccomp_rule_add(ctx, no_family, nr, 1, int_has_bit(0, bit)), name);
    }
    /* AF_NETLINK with any protocol but NETLINK_ROUTE (0): any set bit in the protocol's int. */
    for (unsigned bit = 0; bit < 32; bit++) {
        check(seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPROTONOSUPPORT), nr, 2, int_is(0, AF_NETLINK),
                               int_has_bit(2, bit)),
              name);
    }
}

static void install_filter(void) {
    /* Required to load a filter without CAP_SYS_ADMIN, and it also keeps set-uid binaries
     * from regaining privileges under the filter. */
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) fail("PR_SET_NO_NEW_PRIVS failed: %s", strerror(errno));

    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    if (ctx == NULL) fail("seccomp_init failed");

    /* 32-bit calls (int 0x80, x32) would reach the same kernel code under other numbers; rather
     * than list every call again per ABI, the other ABIs are closed. No runtime here uses them.
     * That also closes socketcall(), the i386 way to make sockets past the rules below. */
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

    restrict_socket_families(ctx, "socket");
    restrict_socket_families(ctx, "socketpair");

    /* Hands off the init (see not_on_init). The pid is the first argument of each of these. */
    for (size_t i = 0; i < sizeof not_on_init / sizeof *not_on_init; i++) {
        check(seccomp_rule_add(ctx, deny, must_resolve(not_on_init[i]), 1, int_is(0, 1)), not_on_init[i]);
    }
    /* setpriority(which, who, nice): not PID 1, and not by process group or user, which would
     * take in the init (it shares the program's user, and a process may join its group). */
    int setpriority_nr = must_resolve("setpriority");
    check(seccomp_rule_add(ctx, deny, setpriority_nr, 2, int_is(0, PRIO_PROCESS), int_is(1, 1)), "setpriority");
    check(seccomp_rule_add(ctx, deny, setpriority_nr, 1, int_is(0, PRIO_PGRP)), "setpriority");
    check(seccomp_rule_add(ctx, deny, setpriority_nr, 1, int_is(0, PRIO_USER)), "setpriority");

    check(seccomp_load(ctx), "loading the filter");
    seccomp_release(ctx);
}

/* CLOCK_MONOTONIC in nanoseconds. It cannot fail with a valid clock and address; were it to,
 * INT64_MAX reads as "the deadline has passed": the init fails closed. */
static int64_t monotonic_ns(void) {
    struct timespec now;
    if (clock_gettime(CLOCK_MONOTONIC, &now) != 0) return INT64_MAX;
    return (int64_t)now.tv_sec * NS_PER_SECOND + now.tv_nsec;
}

static double parse_deadline(const char *text) {
    char *end = NULL;
    errno = 0;
    double seconds = strtod(text, &end);
    if (errno != 0 || end == text || *end != '\0' || !isfinite(seconds) || seconds <= 0 ||
        seconds > MAX_DEADLINE_SECONDS) {
        fail("--deadline takes a number of seconds above 0 and at most %.0f, not \"%s\"", MAX_DEADLINE_SECONDS, text);
    }
    return seconds;
}

/* Runs in the forked child: PROGRAM, with the signal mask the guard started with, and with the
 * lease's relay pipe as its stdin when there is one (``input`` >= 0). */
static void run_program(char *const program[], const sigset_t *mask, int input) {
    if (input >= 0 && (dup2(input, STDIN_FILENO) < 0 || close(input) != 0)) {
        fprintf(stderr, "seccomp-guard: cannot give the program its stdin: %s\n", strerror(errno));
        _exit(GUARD_FAILED);
    }
    if (sigprocmask(SIG_SETMASK, mask, NULL) != 0) {
        fprintf(stderr, "seccomp-guard: cannot restore the signal mask: %s\n", strerror(errno));
        _exit(GUARD_FAILED);
    }
    execvp(program[0], program);
    int error = errno;
    fprintf(stderr, "seccomp-guard: cannot run %s: %s\n", program[0], strerror(error));
    _exit(error == ENOENT ? NOT_FOUND : GUARD_FAILED);
}

/* The init's own descriptors: through these it reads nothing and writes nothing but its own fatal
 * errors (the lease and the collection have descriptors of their own, see take_lease), and it must
 * never hold the program's pipes open or block on them. stdin and stdout become /dev/null;
 * stderr is opened again, through /proc, as a description of its own that does not block, so a
 * full pipe that nobody reads cannot stall the init (the program's descriptor stays as it was). */
static void detach_stdio(void) {
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    int err = open("/proc/self/fd/2", O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (err < 0) err = null;
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        dup2(null, STDOUT_FILENO);
    } else {
        close(STDIN_FILENO);
        close(STDOUT_FILENO);
    }
    if (err >= 0) {
        dup2(err, STDERR_FILENO);
    } else {
        close(STDERR_FILENO);
    }
    if (null > STDERR_FILENO) close(null);
    if (err > STDERR_FILENO && err != null) close(err);
}

/* Something that cannot happen happened to the init: end the container rather than leave it
 * without its deadline. */
static void init_failed(const char *what) {
    char message[160];
    int length = snprintf(message, sizeof message, "seccomp-guard: %s failed: %s; the sandbox is ended\n", what,
                          strerror(errno));
    if (length > 0 && write(STDERR_FILENO, message, (size_t)length) < 0) { /* nowhere left to report it */
    }
    kill(-1, SIGKILL);
    _exit(GUARD_FAILED);
}

static int exit_status(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return GUARD_FAILED;
}

/*
 * The init: PROGRAM runs in a child; this process waits for signals and children until PROGRAM
 * ends or the deadline passes. Why nothing in the container can stop it (kernel/signal.c):
 *
 * - It is the child reaper of the container's PID namespace, so the kernel marks it
 *   SIGNAL_UNKILLABLE (copy_process). sig_task_ignored() then drops any signal whose handler is
 *   SIG_DFL unless it is "forced" and SIGKILL or SIGSTOP, and forced means sent by the kernel or
 *   from an ancestor PID namespace (the host: `docker kill` still works). SIGKILL and SIGSTOP can
 *   be neither blocked nor handled, so their handler is always SIG_DFL: sent from inside the
 *   container (kill, tgkill, pidfd_send_signal, to a process group or to -1) they are discarded
 *   before they are queued. The init can be neither killed nor stopped from inside.
 * - Every other signal is blocked here, and sig_ignored() never ignores a blocked signal: it is
 *   queued, and only ever taken off the queue by reading the signalfd below, which forwards the
 *   termination signals to PROGRAM and drops the rest. No signal runs a handler or a default
 *   action in the init (the init installs no handler, and the default actions never apply to a
 *   blocked signal). A flood of signals only wakes the loop, which checks the deadline each time.
 * - kill(-1, ...) skips PID 1 altogether (kill_something_info: only task_pid_vnr(p) > 1).
 * - The deadline is a timeout of ppoll() measured on CLOCK_MONOTONIC, a kernel timer that
 *   the program cannot reach; the remaining time is computed again on every wake-up.
 * - The init shares the program's user id, which would let the program ptrace it or open
 *   /proc/1/mem and rewrite it: ptrace, process_vm_writev and kcmp are denied by the filter, and
 *   the init makes itself non-dumpable (PR_SET_DUMPABLE 0), which makes the kernel refuse every
 *   ptrace-mode access to it (/proc/1/mem, /proc/1/environ, /proc/1/fd, pidfd_getfd...) to anyone
 *   without CAP_SYS_PTRACE, and gives its /proc files to root. Calls that change another process
 *   of the same user by pid (scheduling, priority, CPU set, limits) may not name PID 1 (see
 *   not_on_init). A fault in the init itself (a bug) clears SIGNAL_UNKILLABLE and kills it, and
 *   when PID 1 exits, the kernel kills every other process of the namespace.
 *
 * - With --lease it also relays PROGRAM's input and watches the lease (see struct lease): it reads
 *   the container's stdin, which no other process holds, whole and at once, and writes to PROGRAM's
 *   stdin pipe without ever blocking; a PROGRAM that never reads its stdin stops only the relay.
 * - In a session, signal 40 from PROGRAM asks for a call's report (see report_call()). It is read
 *   from the signalfd like every other signal, never forwarded, and believed only when the kernel
 *   filled in its sender (kill() or tgkill(), which give the true pid), so that no other process
 *   can pass for PROGRAM; the report is bounded in time and watches the lease and the deadline as it
 *   goes, so that the init is never kept from either for longer than a moment.
 *
 * At the deadline, or when the lease ends, it sends SIGKILL to every process of the namespace
 * (stopped ones included) and exits 137; its exit makes the kernel kill anything forked in
 * between, and the container ends. Two processes in all: this one and PROGRAM.
 */
/*
 * The lease (--lease): the container's stdin, held by the init alone. It carries frames, each the
 * length of the body in decimal and a newline, then the body. Any end of it ends the sandbox. The
 * body is read in whole as it arrives, whether or not PROGRAM reads its stdin: a full pipe anywhere
 * between the server and the init would hold back the end of the stream behind it (the engine's
 * copier blocks on it), so the lease is never left unread. The first body is, byte for byte, one of:
 *
 *     CODOMYRMEX-WS1 <nonce> <files length> <max returned> <max file bytes> <max total bytes> <max listed> <budget ms>\n
 *     CODOMYRMEX-SS1 <nonce> <the same six numbers> <lifetime ms>\n
 *     <files section: <files length> bytes, entries "<path length> <content length>\n<path><content>">
 *     <PROGRAM's input: the rest>
 *
 * Once the header and the files section have arrived, the files are written under /sandbox, and
 * only then is PROGRAM's input relayed to its stdin pipe, from memory, without ever blocking (so
 * the files exist before the code even reaches the runner).
 *
 * WS1 (one-shot): the only frame; a byte after it is a malformed lease (once the collection is
 * written, bytes are only read and dropped until the hang-up). PROGRAM's stdin pipe is closed once
 * it has its input (it reads EOF). The header and the files stay in memory until the end: the
 * collection compares the workspace against them.
 *
 * SS1 (a session): the init lowers its deadline to now + <lifetime ms> (never raises it), and
 * remembers the files it wrote as the first snapshot (see struct snapshot) before it relays
 * PROGRAM's input; that pipe is never closed. The first frame is call 0; every later frame is one
 * call, its body, byte for byte:
 *
 *     CODOMYRMEX-SC1 <nonce>\n<PROGRAM's input: the rest>
 *
 * with a nonce of its own, under which that call is reported; its input is appended to the pipe.
 * A call is pending from when its frame has arrived whole until it is reported; the server sends a
 * frame only once it has read the previous call's report, so a frame that begins while a call is
 * pending is a malformed lease, as are a later frame that is not SC1 and an SC1 frame as the first.
 * A frame is freed once PROGRAM has had it all; only its nonce is kept.
 */
#define MAX_HEADER_LINE 512  /* bytes, the newline included */
#define MAX_NUMBER_DIGITS 19 /* a decimal that fits in int64_t (checked for overflow too) */
#define NONCE_DIGITS 32
#define MAX_PATH_BYTES 1024
#define MAX_COMPONENT_BYTES 255
static const char one_shot_magic[] = "CODOMYRMEX-WS1 ";
static const char session_magic[] = "CODOMYRMEX-SS1 ";
static const char call_magic[] = "CODOMYRMEX-SC1 ";
#define MAGIC_BYTES (sizeof one_shot_magic - 1) /* the three have the same length */

struct lease {
    int fd;              /* the container's stdin, or -1 without --lease */
    int relay;           /* the write end of PROGRAM's stdin, or -1 once closed */
    int64_t length;      /* the body's length; -1 while it is being read */
    int64_t digits_value;
    int digits;
    char *body;          /* the first ``kept`` bytes of the body */
    int64_t kept;        /* the body's length, then only the header and files once PROGRAM has its input
                          * (one-shot), or nothing (a session: the body is freed) */
    int64_t received;    /* how much of the body has arrived */
    int64_t files_start; /* where the files section starts (past the header line); 0 until it is parsed */
    int64_t files_end;   /* where PROGRAM's input starts */
    bool files_written;  /* the files are under /sandbox (a call frame has none): the input may be relayed */
    int64_t relayed;     /* the offset in the body up to which PROGRAM was given its input */
    bool session;        /* the first frame was SS1 */
    int64_t frames;      /* how many frames' header lines were parsed */
    bool reported;       /* a session: the current frame's call has been reported */
};

static struct lease lease = {.fd = -1, .relay = -1, .length = -1};

/* One input file: its path (validated, NUL-terminated) and where its content sits in the body. An
 * offset rather than a pointer: the body shrinks (and may move) once PROGRAM has its input. */
struct upload {
    char *path;
    int64_t offset;
    int64_t size;
};

/* The workspace: the frame's header, the input files (sorted by path once written), and the init's
 * own descriptors for /sandbox and the container's stdout, both opened before the fork. */
struct workspace {
    char nonce[NONCE_DIGITS + 1];
    int64_t max_returned, max_file_bytes, max_total_bytes, max_listed, budget_ms;
    struct upload *uploads;
    size_t upload_count;
    int dir;
    int out;
};

static struct workspace workspace = {.dir = -1, .out = -1};
static int64_t deadline_ns; /* the self-destruct, on CLOCK_MONOTONIC */

/* The whole sandbox ends now: every other process is killed, and the init exits with ``status``. */
static void end_sandbox(int status) {
    kill(-1, SIGKILL);
    _exit(status);
}

/* Reports one line on the init's stderr, never blocking (see detach_stdio). */
static void report(const char *format, ...) {
    char message[1400]; /* room for a path of MAX_PATH_BYTES and the words around it */
    va_list args;
    va_start(args, format);
    int length = vsnprintf(message, sizeof message - 1, format, args);
    va_end(args);
    if (length < 0) return;
    if ((size_t)length > sizeof message - 2) length = (int)sizeof message - 2;
    message[length++] = '\n';
    if (write(STDERR_FILENO, message, (size_t)length) < 0) { /* nowhere left to report it */
    }
}

static void malformed(const char *what) {
    report("seccomp-guard: malformed lease frame: %s; the sandbox is ended", what);
    end_sandbox(GUARD_FAILED);
}

/* A plain decimal (1 to MAX_NUMBER_DIGITS digits, no sign, no overflow) at *cursor, followed by
 * ``terminator``, all before ``end``; *cursor moves past the terminator. */
static bool parse_number(const char **cursor, const char *end, char terminator, int64_t *value) {
    const char *at = *cursor;
    int64_t result = 0;
    int digits = 0;
    while (at < end && *at >= '0' && *at <= '9') {
        if (digits == MAX_NUMBER_DIGITS || result > (INT64_MAX - (*at - '0')) / 10) return false;
        result = result * 10 + (*at - '0');
        digits++;
        at++;
    }
    if (digits == 0 || at == end || *at != terminator) return false;
    *value = result;
    *cursor = at + 1;
    return true;
}

static bool has_magic(const char *line, const char *end, const char *magic) {
    return (size_t)(end - line) >= MAGIC_BYTES && memcmp(line, magic, MAGIC_BYTES) == 0;
}

/* The nonce at *cursor, followed by ``terminator``, into workspace.nonce: *cursor moves past both. */
static void parse_nonce(const char **cursor, const char *end, char terminator) {
    const char *at = *cursor;
    for (int i = 0; i < NONCE_DIGITS; i++, at++) {
        if (at == end || !((*at >= '0' && *at <= '9') || (*at >= 'a' && *at <= 'f'))) {
            malformed("the nonce is not 32 lowercase hex digits");
        }
        workspace.nonce[i] = *at;
    }
    workspace.nonce[NONCE_DIGITS] = '\0';
    if (at == end || *at++ != terminator) malformed("the nonce is not 32 lowercase hex digits");
    *cursor = at;
}

/* A session's lifetime lowers the deadline, and never raises it. */
static void lower_deadline(int64_t lifetime_ms) {
    const int64_t now = monotonic_ns();
    if (lifetime_ms > (INT64_MAX - now) / 1000000) return; /* past any deadline there can be */
    if (now + lifetime_ms * 1000000 < deadline_ns) deadline_ns = now + lifetime_ms * 1000000;
}

/* A later frame's header line (a session's call): its nonce, or a malformed frame. */
static void parse_call_header(const char *line, const char *end) {
    if (!lease.session) malformed("a second frame follows a one-shot frame");
    if (!has_magic(line, end, call_magic)) malformed("a later frame's header does not start with CODOMYRMEX-SC1");
    const char *at = line + MAGIC_BYTES;
    parse_nonce(&at, end, '\n');
    if (at != end) malformed("a call's header line has more than its nonce");
    lease.files_start = lease.files_end = lease.relayed = end - line;
    lease.files_written = true; /* a call has no files: its input may be relayed at once */
}

/* The header line, body[0 .. newline]: all its fields, or a malformed frame. */
static void parse_header(const char *line, const char *end) {
    if (lease.frames++ > 0) {
        parse_call_header(line, end);
        return;
    }
    if (has_magic(line, end, session_magic)) {
        lease.session = true;
    } else if (!has_magic(line, end, one_shot_magic)) {
        malformed("the header does not start with CODOMYRMEX-WS1 or CODOMYRMEX-SS1");
    }
    const char *at = line + MAGIC_BYTES;
    parse_nonce(&at, end, ' ');
    int64_t files_length, lifetime_ms = 0;
    if (!parse_number(&at, end, ' ', &files_length) || !parse_number(&at, end, ' ', &workspace.max_returned) ||
        !parse_number(&at, end, ' ', &workspace.max_file_bytes) ||
        !parse_number(&at, end, ' ', &workspace.max_total_bytes) ||
        !parse_number(&at, end, ' ', &workspace.max_listed) ||
        !parse_number(&at, end, lease.session ? ' ' : '\n', &workspace.budget_ms) ||
        (lease.session && !parse_number(&at, end, '\n', &lifetime_ms)) || at != end) {
        malformed(lease.session ? "the header's numbers are not seven plain decimals separated by single spaces"
                                : "the header's numbers are not six plain decimals separated by single spaces");
    }
    if (lease.session) lower_deadline(lifetime_ms);
    lease.files_start = end - line;
    if (files_length > lease.length - lease.files_start) malformed("the files section is longer than the frame");
    lease.files_end = lease.files_start + files_length;
    lease.relayed = lease.files_end;
}

/* The host checked the paths already; this checks them again, since a bad one would reach outside
 * the files' tree or make an unreadable name. */
static const char *path_problem(const char *path, int64_t size) {
    if (size == 0) return "an input file's path is empty";
    if (size > MAX_PATH_BYTES) return "an input file's path is longer than 1024 bytes";
    if (path[0] == '/') return "an input file's path starts with /";
    int64_t component = 0;
    for (int64_t i = 0; i <= size; i++) {
        if (i == size || path[i] == '/') {
            const char *name = path + i - component;
            if (component == 0) return "an input file's path has an empty component";
            if ((component == 1 && name[0] == '.') || (component == 2 && name[0] == '.' && name[1] == '.')) {
                return "an input file's path has a . or .. component";
            }
            if (component > MAX_COMPONENT_BYTES) return "an input file's path has a component longer than 255 bytes";
            component = 0;
            continue;
        }
        const unsigned char c = (unsigned char)path[i];
        if (c < 0x20 || c == 0x7f) return "an input file's path has a control character";
        component++;
    }
    return NULL;
}

/* The files section, whole: every entry parsed and its path checked, or a malformed frame. */
static void parse_files(void) {
    const char *at = lease.body + lease.files_start;
    const char *end = lease.body + lease.files_end;
    size_t capacity = 0;
    while (at < end) {
        int64_t path_size, content_size;
        if (!parse_number(&at, end, ' ', &path_size) || !parse_number(&at, end, '\n', &content_size)) {
            malformed("a files entry does not start with two plain decimals");
        }
        if (path_size > end - at || content_size > end - at - path_size) {
            malformed("a files entry is longer than the files section");
        }
        const char *problem = path_problem(at, path_size);
        if (problem != NULL) malformed(problem);
        if (workspace.upload_count == capacity) {
            capacity = capacity == 0 ? 16 : capacity * 2;
            struct upload *grown = realloc(workspace.uploads, capacity * sizeof *grown);
            if (grown == NULL) init_failed("keeping the input files");
            workspace.uploads = grown;
        }
        struct upload *upload = &workspace.uploads[workspace.upload_count++];
        upload->path = strndup(at, (size_t)path_size);
        if (upload->path == NULL) init_failed("keeping the input files");
        upload->offset = at + path_size - lease.body;
        upload->size = content_size;
        at += path_size + content_size;
    }
}

static void remember_upload(const struct upload *upload, int fd);
static void forget_uploads(void);

static void cannot_write(const struct upload *upload) {
    report("seccomp-guard: cannot write the input file %s: %s", upload->path, strerror(errno));
    end_sandbox(GUARD_FAILED);
}

/* One input file, under /sandbox, with *at() calls from the init's own descriptor only: no path
 * is ever resolved from the root or through a link. */
static void write_upload(const struct upload *upload) {
    char *path = strdup(upload->path);
    if (path == NULL) init_failed("writing the input files");
    int dir = workspace.dir;
    char *name = path;
    for (char *slash; (slash = strchr(name, '/')) != NULL; name = slash + 1) {
        *slash = '\0';
        if (mkdirat(dir, name, 0755) != 0 && errno != EEXIST) cannot_write(upload);
        const int next = openat(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
        if (next < 0) cannot_write(upload);
        if (dir != workspace.dir) close(dir);
        dir = next;
    }
    const int fd = openat(dir, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0) cannot_write(upload);
    /* RLIMIT_FSIZE holds for the init too: past it, write() fails with EFBIG (SIGXFSZ is blocked). */
    for (int64_t written = 0; written < upload->size;) {
        const ssize_t n = write(fd, lease.body + upload->offset + written, (size_t)(upload->size - written));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) cannot_write(upload);
        written += n;
    }
    if (lease.session) remember_upload(upload, fd);
    if (close(fd) != 0) cannot_write(upload);
    if (dir != workspace.dir) close(dir);
    free(path);
}

static int by_path(const void *a, const void *b) {
    return strcmp(((const struct upload *)a)->path, ((const struct upload *)b)->path);
}

/* The body has grown: parse the header once its line is in, write the files once their section is
 * in (a session then takes its first snapshot from them, before PROGRAM has any input). */
static void advance_frame(void) {
    if (lease.files_start == 0) {
        const int64_t scanned = lease.received < MAX_HEADER_LINE ? lease.received : MAX_HEADER_LINE;
        const char *newline = memchr(lease.body, '\n', (size_t)scanned);
        if (newline == NULL) {
            if (scanned == MAX_HEADER_LINE) malformed("the header line is longer than 512 bytes");
            if (lease.received == lease.length) malformed("the frame ends before its header line does");
            return;
        }
        parse_header(lease.body, newline + 1);
    }
    if (!lease.files_written && lease.received >= lease.files_end) {
        parse_files();
        for (size_t i = 0; i < workspace.upload_count; i++) write_upload(&workspace.uploads[i]);
        qsort(workspace.uploads, workspace.upload_count, sizeof *workspace.uploads, by_path);
        lease.files_written = true;
        if (lease.session) forget_uploads();
    }
}

/* PROGRAM gets no more input: it has had all of it (one-shot), or closed its stdin (the rest is then
 * read and dropped, and in a session so are the calls to come). Closing the relay makes PROGRAM read
 * EOF. Only the header and the files are kept. */
static void close_relay(void) {
    close(lease.relay);
    lease.relay = -1;
    lease.kept = lease.files_end;
    char *kept = realloc(lease.body, (size_t)lease.kept);
    if (kept != NULL) lease.body = kept;
}

/* PROGRAM has had the whole frame: a one-shot PROGRAM reads EOF; a session's pipe stays open for the
 * calls to come, and the frame is freed (its nonce was copied out of it). */
static void finish_input(void) {
    if (lease.relay < 0 || !lease.files_written || lease.relayed != lease.length) return;
    if (!lease.session) {
        close_relay();
        return;
    }
    free(lease.body);
    lease.body = NULL;
    lease.kept = 0;
}

/* A session's frame is whole (it arrived, and its header and files are taken care of) and its call
 * not yet reported: the call is under way. */
static bool call_pending(void) {
    return lease.session && lease.length >= 0 && lease.files_written && lease.received == lease.length &&
           !lease.reported;
}

/* PROGRAM has had all of the pending call's input (or will never have any more). */
static bool call_relayed(void) {
    return lease.relay < 0 || lease.relayed == lease.length;
}

/* A byte has arrived past a whole frame: it begins a session's next frame, when that may come. */
static void next_frame(void) {
    if (!lease.session) malformed("a second frame follows a one-shot frame");
    if (!lease.reported) malformed("a frame began before the previous call was reported");
    free(lease.body);
    lease.body = NULL;
    lease.length = -1;
    lease.digits_value = 0;
    lease.digits = 0;
    lease.kept = lease.received = lease.files_start = lease.files_end = lease.relayed = 0;
    lease.files_written = false;
    lease.reported = false;
}

/* One byte of the frame's length; it may not fail: a malformed length ends the sandbox. */
static void read_length_byte(char c) {
    if (c == '\n' && lease.digits > 0) {
        lease.length = lease.digits_value;
        if (lease.length == 0) malformed("the body is empty");
        lease.body = malloc((size_t)lease.length);
        if (lease.body == NULL) malformed("the body is too large to hold");
        lease.kept = lease.length;
        return;
    }
    if (c < '0' || c > '9' || lease.digits == MAX_NUMBER_DIGITS ||
        lease.digits_value > (INT64_MAX - (c - '0')) / 10) {
        malformed("the length is not a plain decimal followed by a newline");
    }
    lease.digits_value = lease.digits_value * 10 + (c - '0');
    lease.digits++;
}

/* The lease has something to say (``revents``): 0 while it holds, else the init's exit status. Never
 * reads past the frame it is in: a byte after a whole frame is read alone, and begins the next. */
static int read_lease(short revents) {
    if (!(revents & POLLIN)) return LEASE_LOST; /* ended (or failed) with nothing left to read */
    char scratch[4096];
    char *into = scratch;
    size_t want = 1; /* a length, a byte at a time: nothing of the body is read with it */
    const bool whole = lease.length >= 0 && lease.received == lease.length;
    const int64_t missing = lease.length - lease.received;
    if (lease.length >= 0 && lease.received < lease.kept) {
        into = lease.body + lease.received;
        want = (size_t)(lease.kept - lease.received);
    } else if (lease.length >= 0 && !whole) { /* input PROGRAM will not get: dropped */
        want = (uint64_t)missing < sizeof scratch ? (size_t)missing : sizeof scratch;
    }
    const ssize_t n = read(lease.fd, into, want);
    if (n < 0) return errno == EAGAIN || errno == EINTR ? 0 : LEASE_LOST;
    if (n == 0) return LEASE_LOST;
    if (whole) next_frame();
    if (lease.length < 0) {
        read_length_byte(scratch[0]);
        return 0;
    }
    lease.received += n;
    if (!lease.files_written) advance_frame();
    finish_input();
    return 0;
}

/* Gives PROGRAM what has arrived, never blocking. A PROGRAM that closed its stdin (or ended) gets
 * no more: the rest of its input is read and dropped. */
static void relay_input(void) {
    const ssize_t n = write(lease.relay, lease.body + lease.relayed, (size_t)(lease.received - lease.relayed));
    if (n > 0) {
        lease.relayed += n;
        finish_input();
    } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        close_relay();
    }
}

/* Whether there is input for PROGRAM that it has not had yet. */
static bool relay_pending(void) {
    return lease.relay >= 0 && lease.files_written && lease.relayed < lease.received;
}

/* Before the fork, with --lease: PROGRAM's stdin pipe (its read end is returned), the init's own
 * hold on the container's stdin, and its own descriptors for /sandbox and the container's stdout
 * (a description of its own, which does not block, so that O_NONBLOCK never touches PROGRAM's).
 * All of the init's descriptors are closed on exec. */
static int take_lease(void) {
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) fail("creating the stdin pipe failed: %s", strerror(errno));
    lease.relay = pipe_fds[1];
    lease.fd = fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 3);
    if (lease.fd < 0) fail("keeping the lease failed: %s", strerror(errno));
    if (fcntl(lease.relay, F_SETFL, O_NONBLOCK) != 0 || fcntl(lease.fd, F_SETFL, O_NONBLOCK) != 0) {
        fail("making the lease non-blocking failed: %s", strerror(errno));
    }
    workspace.dir = open("/sandbox", O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (workspace.dir < 0) fail("opening /sandbox failed: %s", strerror(errno));
    workspace.out = open("/proc/self/fd/1", O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (workspace.out < 0) fail("opening the container's stdout failed: %s", strerror(errno));
    return pipe_fds[0];
}

/* Waits until ``fd`` is ready for ``events`` (-1: for nothing), or ``until`` (CLOCK_MONOTONIC ns),
 * while the lease and the deadline hold: their end ends the sandbox, here as everywhere. */
static void wait_for(int fd, short events, int64_t until) {
    const int64_t now = monotonic_ns();
    if (now >= deadline_ns) end_sandbox(DEADLINE_PASSED);
    const int64_t remaining = (until < deadline_ns ? until : deadline_ns) - now;
    const struct timespec timeout = {
        .tv_sec = remaining > 0 ? remaining / NS_PER_SECOND : 0,
        .tv_nsec = remaining > 0 ? remaining % NS_PER_SECOND : 0,
    };
    struct pollfd watched[2] = {
        {.fd = lease.fd, .events = POLLIN, .revents = 0},
        {.fd = fd, .events = events, .revents = 0},
    };
    if (ppoll(watched, 2, &timeout, NULL) < 0) {
        if (errno == EINTR) return;
        init_failed("ppoll");
    }
    if (watched[0].revents) {
        const int ending = read_lease(watched[0].revents);
        if (ending != 0) end_sandbox(ending);
    }
    if (monotonic_ns() >= deadline_ns) end_sandbox(DEADLINE_PASSED);
}

static pid_t program_pid = -1; /* PROGRAM, the init's only child */
static int signal_fd = -1;     /* every signal, all blocked, is read here and only here */

/* Takes the queued signals, a bounded number per call (a flood of them cannot keep the init from its
 * deadline and its lease): the termination signals are forwarded to PROGRAM, the rest dropped. True
 * when signal 40 was among them and came from PROGRAM itself: its sender is believed only when the
 * kernel wrote it (kill() and tgkill(); sigqueue() lets the sender write any pid, but the kernel
 * refuses these two codes from a process to another). */
static bool take_signals(void) {
    bool asked = false;
    struct signalfd_siginfo info;
    for (int taken = 0; taken < 64 && read(signal_fd, &info, sizeof info) == (ssize_t)sizeof info; taken++) {
        if (info.ssi_signo == REPORT_SIGNAL) {
            asked |= (pid_t)info.ssi_pid == program_pid && (info.ssi_code == SI_USER || info.ssi_code == SI_TKILL);
            continue;
        }
        for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) {
            if ((int)info.ssi_signo == forwarded[i]) kill(program_pid, (int)info.ssi_signo);
        }
    }
    return asked;
}

/*
 * SHA-256 (FIPS 180-4) and base64 (RFC 4648, standard alphabet, padded): the collection reports
 * every file's digest and returns contents as text. Written here because the binary is static and
 * links nothing but libc and libseccomp.
 */
struct sha256 {
    uint32_t state[8];
    uint64_t bytes;
    unsigned char block[64];
    size_t used;
};

static const uint32_t sha256_k[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static uint32_t rotate_right(uint32_t x, unsigned n) {
    return (x >> n) | (x << (32 - n));
}

static void sha256_block(uint32_t state[8], const unsigned char block[64]) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++) {
        w[i] = (uint32_t)block[4 * i] << 24 | (uint32_t)block[4 * i + 1] << 16 | (uint32_t)block[4 * i + 2] << 8 |
               (uint32_t)block[4 * i + 3];
    }
    for (int i = 16; i < 64; i++) {
        const uint32_t s0 = rotate_right(w[i - 15], 7) ^ rotate_right(w[i - 15], 18) ^ (w[i - 15] >> 3);
        const uint32_t s1 = rotate_right(w[i - 2], 17) ^ rotate_right(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    uint32_t e = state[4], f = state[5], g = state[6], h = state[7];
    for (int i = 0; i < 64; i++) {
        const uint32_t t1 = h + (rotate_right(e, 6) ^ rotate_right(e, 11) ^ rotate_right(e, 25)) +
                            ((e & f) ^ (~e & g)) + sha256_k[i] + w[i];
        const uint32_t t2 = (rotate_right(a, 2) ^ rotate_right(a, 13) ^ rotate_right(a, 22)) +
                            ((a & b) ^ (a & c) ^ (b & c));
        h = g;
        g = f;
        f = e;
        e = d + t1;
        d = c;
        c = b;
        b = a;
        a = t1 + t2;
    }
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
    state[4] += e;
    state[5] += f;
    state[6] += g;
    state[7] += h;
}

static void sha256_start(struct sha256 *hash) {
    static const uint32_t initial[8] = {
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
    };
    memcpy(hash->state, initial, sizeof initial);
    hash->bytes = 0;
    hash->used = 0;
}

static void sha256_add(struct sha256 *hash, const unsigned char *data, size_t size) {
    hash->bytes += size;
    while (size > 0) {
        size_t take = sizeof hash->block - hash->used;
        if (take > size) take = size;
        memcpy(hash->block + hash->used, data, take);
        hash->used += take;
        data += take;
        size -= take;
        if (hash->used == sizeof hash->block) {
            sha256_block(hash->state, hash->block);
            hash->used = 0;
        }
    }
}

/* The digest's 32 bytes, into ``digest``. */
static void sha256_digest(struct sha256 *hash, unsigned char digest[32]) {
    const uint64_t bits = hash->bytes * 8;
    hash->block[hash->used++] = 0x80;
    if (hash->used > 56) {
        memset(hash->block + hash->used, 0, sizeof hash->block - hash->used);
        sha256_block(hash->state, hash->block);
        hash->used = 0;
    }
    memset(hash->block + hash->used, 0, 56 - hash->used);
    for (int i = 0; i < 8; i++) hash->block[56 + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_block(hash->state, hash->block);
    for (int i = 0; i < 32; i++) digest[i] = (unsigned char)(hash->state[i / 4] >> (24 - 8 * (i % 4)));
}

/* A digest in lowercase hex, into ``hex`` (65 bytes, NUL-terminated). */
static void sha256_hex(const unsigned char digest[32], char hex[65]) {
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[digest[i] >> 4];
        hex[2 * i + 1] = digits[digest[i] & 0xf];
    }
    hex[64] = '\0';
}

/* The digest in lowercase hex, into ``hex`` (65 bytes, NUL-terminated). */
static void sha256_finish(struct sha256 *hash, char hex[65]) {
    unsigned char digest[32];
    sha256_digest(hash, digest);
    sha256_hex(digest, hex);
}

static size_t base64_size(size_t size) {
    return (size + 2) / 3 * 4;
}

/* Writes base64_size(size) bytes at ``into``; returns the byte past them. */
static char *base64_encode(char *into, const unsigned char *data, size_t size) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (size_t i = 0; i < size; i += 3) {
        const uint32_t group = (uint32_t)data[i] << 16 | (i + 1 < size ? (uint32_t)data[i + 1] << 8 : 0) |
                               (i + 2 < size ? data[i + 2] : 0);
        *into++ = alphabet[group >> 18];
        *into++ = alphabet[(group >> 12) & 63];
        *into++ = i + 1 < size ? alphabet[(group >> 6) & 63] : '=';
        *into++ = i + 2 < size ? alphabet[group & 63] : '=';
    }
    return into;
}

/*
 * The collection: when PROGRAM has ended (and the whole frame had arrived), the init kills every
 * other process, then walks /sandbox and writes on the container's stdout, for each new or changed
 * entry in walk order (names sorted bytewise in each directory, depth first):
 *
 *     \0<nonce>:file=<base64(path)> <size> <sha256 hex | -> <omitted | -> <base64(content) | ->\0
 *
 * then, always, \0<nonce>:files-end=<listed> <unlisted> <complete: 1 | 0>\0, on stdout and on
 * stderr (each stream's end: the engine delivers the two independently). Nothing else runs by
 * then: nothing can change a file while it is read, or write between the entries. The nonce came on
 * the lease, which only the init reads, and the init is not dumpable: no process in the sandbox
 * can know it, so a program that prints lookalike trailers prints ordinary output. Every read is
 * bounded (depth, names per directory, the time budget, the bytes held per file), so a hostile
 * workspace can only make the collection incomplete, which the end trailer says.
 *
 * One-shot, "new or changed" is against the uploads: a file is unchanged when its content is its
 * upload's. In a session it is against the snapshot (see struct snapshot), and a call's report (see
 * report_call()) is the same walk, in the same format, under the call's nonce, with every limit
 * (returned, bytes, listed, the budget) counted afresh, but nothing is killed first: a walk that
 * runs beside the program's processes never changes a mode to read an entry (one it cannot read
 * makes the report incomplete), and it looks at the lease, the deadline and the signals every few
 * milliseconds. Another process may then write to stdout between two of the init's writes: an entry
 * larger than the pipe's atomic size may be split, and the host finds it malformed (files-end's
 * count of listed entries then disagrees with what it read). The session's final collection, when
 * PROGRAM has ended during a call, kills everything first, as one-shot does, and writes
 * \0<nonce>:ended=<PROGRAM's exit status>\0 on stdout before the end trailer: a call's report alone
 * does not say that PROGRAM is over (a thread of PROGRAM can send signal 40 before its call is).
 */
#define MAX_DEPTH 64                 /* directories below /sandbox */
#define MAX_NAMES 200000             /* names held per directory */
#define REAP_BOUND_NS 200000000LL    /* how long the init waits for the killed processes to be reaped */
#define READ_CHUNK 65536
#define CHECK_EVERY (1024 * 1024)    /* bytes read between two looks at the clock */
#define LOOK_EVERY_NS 10000000LL     /* a walk beside live processes: between two looks at the lease */

struct collection {
    int64_t ends;        /* the time budget's end (CLOCK_MONOTONIC ns), never past the deadline */
    int64_t listed, unlisted, returned, returned_bytes;
    bool complete;
    bool stopped;        /* the budget ran out, or the output is gone: the walk goes no further */
    char *path;          /* the current entry's path, relative to /sandbox */
    size_t path_length, path_capacity;
    bool live;           /* a call's report: the program's processes run on (nothing was killed) */
    int64_t next_look;   /* when live: when to look at the lease, the deadline and the signals next */
    struct timespec started; /* CLOCK_REALTIME when the walk started (the clock of the files' times) */
};

static struct collection collection;

/* Writes it all on the container's stdout, waiting for room as long as the lease and the deadline
 * hold. False when the stream is gone (nobody can read the rest). */
static bool emit_to(int fd, const char *data, size_t size) {
    while (size > 0) {
        const ssize_t n = write(fd, data, size);
        if (n > 0) {
            data += n;
            size -= (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            wait_for(fd, POLLOUT, INT64_MAX);
        } else if (!(n < 0 && errno == EINTR)) {
            return false;
        }
    }
    return true;
}

static bool emit(const char *data, size_t size) {
    return emit_to(workspace.out, data, size);
}

/* A walk beside live processes looks around now and then: the end of the lease or the deadline ends
 * the sandbox here as everywhere, and queued signals are taken (a report is under way: signal 40
 * asks for nothing more). */
static void look_around(int64_t now) {
    collection.next_look = now + LOOK_EVERY_NS;
    wait_for(-1, 0, now);
    take_signals();
}

static bool out_of_time(void) {
    const int64_t now = monotonic_ns();
    /* Beside live processes the deadline ends the sandbox, not just the walk (which stops at it). */
    if (collection.live && (now >= collection.next_look || now >= collection.ends)) look_around(now);
    if (now < collection.ends) return false;
    collection.stopped = true;
    collection.complete = false;
    return true;
}

/* Something could not be looked at: the end trailer will say the collection is incomplete. */
static void missed(void) {
    collection.complete = false;
}

/*
 * The snapshot (sessions): the workspace as the previous report saw it, so that a call's report lists
 * only what is new or changed since. One entry per regular file and per other entry that is not a
 * directory, keyed by the SHA-256 of its path, cut to 16 bytes (a path may be 16 KiB long; two paths
 * with one key would take some 2^64 tries to find, and cost their maker only a missed listing),
 * with its (st_dev, st_ino, st_size, st_mtim, st_ctim). An entry is unchanged when that tuple is
 * equal, except a *racy* one: a regular file whose ctime was within RACY_NS of (or after) the start
 * of the walk that recorded it. A file's times come from a coarse clock (tmpfs stamps them with the
 * last timer tick), so a write just after the walk saw it can leave the whole tuple as it was (the
 * same size, rewritten in the same tick); a racy entry is compared by the SHA-256 of its content
 * instead, which the walk that recorded it took. A chmod or a touch changes the tuple (ctime,
 * mtime), so it lists the file again, unless the entry was racy (then its content decides).
 *
 * The first snapshot is the uploads, taken as the init writes them (all racy: they were just
 * written); a file that is already under /sandbox by then (PROGRAM wrote it before the frame came)
 * is new to call 0. Each report's walk updates the entries it sees in place and adds the ones it
 * finds new; when it is over, the entries it did not see are dropped if it saw the whole workspace
 * (they are gone) and kept if it was cut short (they may still be there, as they were). At most
 * MAX_SNAPSHOT entries (about 100 bytes each): past that, an entry is not remembered (it will count
 * as new again) and the report says it is incomplete.
 */
#define MAX_SNAPSHOT 200000
#define RACY_NS 50000000LL
#define KEY_BYTES 16

struct entry {
    unsigned char key[KEY_BYTES];
    unsigned char sha256[32]; /* the content's digest, when ``hashed`` */
    uint64_t dev, ino;
    int64_t size, mtime_sec, ctime_sec;
    int32_t mtime_nsec, ctime_nsec;
    bool regular, racy, hashed;
    bool seen; /* by the walk under way */
};

struct snapshot {
    struct entry *entries; /* sorted by key up to ``sorted``; the entries the walk under way added follow */
    size_t count, sorted, capacity;
};

static struct snapshot snapshot;

static void path_key(const char *path, size_t size, unsigned char key[KEY_BYTES]) {
    struct sha256 hash;
    unsigned char digest[32];
    sha256_start(&hash);
    sha256_add(&hash, (const unsigned char *)path, size);
    sha256_digest(&hash, digest);
    memcpy(key, digest, KEY_BYTES);
}

static int by_key(const void *a, const void *b) {
    return memcmp(((const struct entry *)a)->key, ((const struct entry *)b)->key, KEY_BYTES);
}

/* The previous snapshot's entry for ``key``, or NULL. */
static struct entry *snapshot_find(const unsigned char key[KEY_BYTES]) {
    if (snapshot.sorted == 0) return NULL;
    struct entry probe;
    memcpy(probe.key, key, KEY_BYTES);
    return bsearch(&probe, snapshot.entries, snapshot.sorted, sizeof probe, by_key);
}

/* A new entry for ``key``, or NULL when the snapshot is full (or memory is). Moves the entries:
 * pointers to them do not survive it. */
static struct entry *snapshot_add(const unsigned char key[KEY_BYTES]) {
    if (snapshot.count == MAX_SNAPSHOT) return NULL;
    if (snapshot.count == snapshot.capacity) {
        size_t capacity = snapshot.capacity == 0 ? 256 : snapshot.capacity * 2;
        if (capacity > MAX_SNAPSHOT) capacity = MAX_SNAPSHOT;
        struct entry *grown = realloc(snapshot.entries, capacity * sizeof *grown);
        if (grown == NULL) return NULL;
        snapshot.entries = grown;
        snapshot.capacity = capacity;
    }
    struct entry *entry = &snapshot.entries[snapshot.count++];
    memset(entry, 0, sizeof *entry);
    memcpy(entry->key, key, KEY_BYTES);
    return entry;
}

static bool same_stat(const struct entry *entry, const struct stat *st) {
    return entry->dev == (uint64_t)st->st_dev && entry->ino == (uint64_t)st->st_ino && entry->size == st->st_size &&
           entry->mtime_sec == st->st_mtim.tv_sec && entry->mtime_nsec == st->st_mtim.tv_nsec &&
           entry->ctime_sec == st->st_ctim.tv_sec && entry->ctime_nsec == st->st_ctim.tv_nsec;
}

/* Whether a file the walk under way stats as ``st`` is racy (see struct snapshot). The walk's start is
 * read from the same clock as the file's times, CLOCK_REALTIME, which only the host can set. */
static bool is_racy(const struct stat *st) {
    int64_t sec = collection.started.tv_sec, nsec = collection.started.tv_nsec - RACY_NS;
    while (nsec < 0) {
        nsec += NS_PER_SECOND;
        sec--;
    }
    return st->st_ctim.tv_sec > sec || (st->st_ctim.tv_sec == sec && st->st_ctim.tv_nsec >= nsec);
}

static void fill_entry(struct entry *entry, const struct stat *st, bool regular, bool racy,
                       const unsigned char *digest) {
    entry->dev = (uint64_t)st->st_dev;
    entry->ino = (uint64_t)st->st_ino;
    entry->size = st->st_size;
    entry->mtime_sec = st->st_mtim.tv_sec;
    entry->mtime_nsec = (int32_t)st->st_mtim.tv_nsec;
    entry->ctime_sec = st->st_ctim.tv_sec;
    entry->ctime_nsec = (int32_t)st->st_ctim.tv_nsec;
    entry->regular = regular;
    entry->racy = racy;
    entry->hashed = digest != NULL;
    if (digest != NULL) memcpy(entry->sha256, digest, sizeof entry->sha256);
    entry->seen = true;
}

/* What the walk under way saw at the current path: ``old`` updated in place, or a new entry. A racy
 * entry without its digest (it was not read) will count as changed. */
static void remember(const unsigned char key[KEY_BYTES], struct entry *old, const struct stat *st, bool regular,
                     const unsigned char *digest) {
    struct entry *entry = old != NULL ? old : snapshot_add(key);
    if (entry == NULL) {
        missed();
        return;
    }
    fill_entry(entry, st, regular, regular && is_racy(st), digest);
}

/* A walk is over (``whole``: it saw all of the workspace): the entries it did not see are dropped
 * (gone) or kept (not looked at), and the ones it added are sorted and merged in. */
static void snapshot_settle(bool whole) {
    size_t kept = 0;
    for (size_t i = 0; i < snapshot.sorted; i++) {
        if (whole && !snapshot.entries[i].seen) continue;
        snapshot.entries[i].seen = false;
        snapshot.entries[kept++] = snapshot.entries[i];
    }
    size_t end = kept;
    for (size_t i = snapshot.sorted; i < snapshot.count; i++) {
        snapshot.entries[i].seen = false;
        snapshot.entries[end++] = snapshot.entries[i];
    }
    const size_t added = end - kept;
    snapshot.count = snapshot.sorted = end;
    if (added == 0) return;
    qsort(snapshot.entries + kept, added, sizeof *snapshot.entries, by_key);
    struct entry *tail = malloc(added * sizeof *tail);
    if (tail == NULL) { /* sorted whole instead: slower, and it needs no memory */
        qsort(snapshot.entries, end, sizeof *snapshot.entries, by_key);
        return;
    }
    /* Merged from the back: the kept entries move up into the room the added ones leave. */
    memcpy(tail, snapshot.entries + kept, added * sizeof *tail);
    size_t i = kept, j = added, k = end;
    while (j > 0) {
        if (i > 0 && by_key(&snapshot.entries[i - 1], &tail[j - 1]) > 0) {
            snapshot.entries[--k] = snapshot.entries[--i];
        } else {
            snapshot.entries[--k] = tail[--j];
        }
    }
    free(tail);
}

/* An input file just written, its descriptor still open: the first snapshot's entry for it. Not
 * remembered (no memory, or the file cannot be stat'ed), it is new to call 0's report. */
static void remember_upload(const struct upload *upload, int fd) {
    struct stat written;
    if (fstat(fd, &written) != 0) return;
    unsigned char key[KEY_BYTES], digest[32];
    path_key(upload->path, strlen(upload->path), key);
    struct sha256 hash;
    sha256_start(&hash);
    sha256_add(&hash, (const unsigned char *)lease.body + upload->offset, (size_t)upload->size);
    sha256_digest(&hash, digest);
    struct entry *entry = snapshot_add(key);
    if (entry != NULL) fill_entry(entry, &written, true, true, digest);
}

/* A session's uploads are written and remembered: the snapshot is settled, and the uploads (which
 * only one-shot's collection compares against) are freed. */
static void forget_uploads(void) {
    snapshot_settle(false);
    for (size_t i = 0; i < workspace.upload_count; i++) free(workspace.uploads[i].path);
    free(workspace.uploads);
    workspace.uploads = NULL;
    workspace.upload_count = 0;
}

static bool push_name(const char *name) {
    const size_t size = strlen(name);
    const size_t needed = collection.path_length + 1 + size + 1;
    if (needed > collection.path_capacity) {
        char *grown = realloc(collection.path, needed * 2);
        if (grown == NULL) return false;
        collection.path = grown;
        collection.path_capacity = needed * 2;
    }
    if (collection.path_length > 0) collection.path[collection.path_length++] = '/';
    memcpy(collection.path + collection.path_length, name, size + 1);
    collection.path_length += size;
    return true;
}

static void pop_name(size_t length) {
    collection.path_length = length;
    collection.path[length] = '\0';
}

/* The upload at the current path, or NULL. */
static const struct upload *uploaded(void) {
    const struct upload key = {.path = collection.path};
    return bsearch(&key, workspace.uploads, workspace.upload_count, sizeof key, by_path);
}

/* One entry trailer. ``sha256`` is NULL for an entry that is not a regular file, ``content`` NULL
 * when it is not returned (then ``omitted`` says why). */
static void write_entry(int64_t size, const char *sha256, const char *omitted, const unsigned char *content) {
    const size_t path_bytes = collection.path_length;
    const size_t content_bytes = content != NULL ? (size_t)size : 0;
    const size_t capacity = 2 + NONCE_DIGITS + 6 + base64_size(path_bytes) + 1 + 20 + 1 + 64 + 1 + 16 + 1 +
                            (content != NULL ? base64_size(content_bytes) : 1);
    char *entry = malloc(capacity);
    if (entry == NULL) {
        missed();
        collection.stopped = true;
        return;
    }
    char *at = entry;
    at += sprintf(at, "%c%s:file=", '\0', workspace.nonce);
    at = base64_encode(at, (const unsigned char *)collection.path, path_bytes);
    at += sprintf(at, " %lld %s %s ", (long long)size, sha256 != NULL ? sha256 : "-", omitted != NULL ? omitted : "-");
    if (content != NULL) {
        at = base64_encode(at, content, content_bytes);
    } else {
        *at++ = '-';
    }
    *at++ = '\0';
    if (!emit(entry, (size_t)(at - entry))) collection.stopped = true;
    free(entry);
    collection.listed++;
}

/* A link, fifo, socket or device (or a file that stopped being regular): listed, never opened. */
static void not_regular(int64_t size) {
    if (collection.listed < workspace.max_listed) {
        write_entry(size, NULL, "not_regular", NULL);
    } else {
        collection.unlisted++;
    }
}

/* openat(), and once more after giving the owner read (and for a directory, search) permission if
 * the program took it away: the init is the owner, and every other process is dead by now. Not in a
 * call's report, where the program runs on: it would see its modes change, and a process could swap
 * the entry for a link between the look and the change (fchmodat() follows links). */
static int open_entry(int dir, const char *name, int flags, mode_t mode) {
    int fd = openat(dir, name, flags);
    if (fd < 0 && errno == EACCES && !collection.live) {
        const mode_t wanted = (mode & 07777) | S_IRUSR | (S_ISDIR(mode) ? S_IXUSR : 0);
        if (fchmodat(dir, name, wanted, 0) == 0) fd = openat(dir, name, flags);
    }
    return fd;
}

/* A new or changed regular file, read whole (``size`` bytes, ``held`` when they could be returned): its
 * entry, with its content when the limits allow. */
static void list_file(int64_t size, const char *hex, bool returnable, const unsigned char *held) {
    const char *omitted = NULL;
    if (size > workspace.max_file_bytes) {
        omitted = "too_large";
    } else if (collection.returned >= workspace.max_returned) {
        omitted = "over_count";
    } else if (size > workspace.max_total_bytes - collection.returned_bytes || !returnable) {
        omitted = "over_total";
    }
    if (omitted == NULL) {
        write_entry(size, hex, NULL, held != NULL ? held : (const unsigned char *)"");
        collection.returned++;
        collection.returned_bytes += size;
    } else {
        write_entry(size, hex, omitted, NULL);
    }
}

/* What is held of a file as it is read: at most ``limit`` bytes, enough to return the file if it can be
 * returned, and one byte more to tell that it is larger. None when it cannot be returned whatever its
 * size. */
struct held {
    unsigned char *data;
    int64_t size, capacity, limit;
    bool returnable;
};

static struct held start_holding(bool listing) {
    struct held held = {.returnable = listing && collection.returned < workspace.max_returned};
    if (held.returnable) {
        const int64_t total_left = workspace.max_total_bytes - collection.returned_bytes;
        const int64_t room = workspace.max_file_bytes < total_left ? workspace.max_file_bytes : total_left;
        held.limit = room < INT64_MAX ? room + 1 : INT64_MAX;
    }
    return held;
}

static void hold(struct held *held, const unsigned char *chunk, int64_t n) {
    const int64_t take = held->returnable && held->limit - held->size < n ? held->limit - held->size
                                                                           : (held->returnable ? n : 0);
    if (take > 0 && held->size + take > held->capacity) {
        int64_t capacity = held->capacity == 0 ? READ_CHUNK : held->capacity * 2;
        if (capacity > held->limit) capacity = held->limit;
        if (capacity < held->size + take) capacity = held->size + take;
        unsigned char *grown = realloc(held->data, (size_t)capacity);
        if (grown == NULL) { /* it cannot be returned after all, and the end trailer says so */
            missed();
            held->returnable = false;
        } else {
            held->data = grown;
            held->capacity = capacity;
        }
    }
    if (take > 0 && held->returnable) {
        memcpy(held->data + held->size, chunk, (size_t)take);
        held->size += take;
    }
}

/* A regular file: read to its end (what was read is what is reported), hashed, compared with its
 * upload if it has one (unchanged: no entry), and listed with its content when the limits allow. */
static void regular_file(int dir, const char *name, const struct stat *seen) {
    const struct upload *upload = uploaded();
    const bool listing = collection.listed < workspace.max_listed;
    if (!listing && upload == NULL) { /* only counted: whether it changed is not in question */
        collection.unlisted++;
        return;
    }
    const int fd = open_entry(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, seen->st_mode);
    if (fd < 0) {
        if (errno == ELOOP) {
            not_regular(seen->st_size);
        } else {
            missed();
        }
        return;
    }
    struct stat opened;
    if (fstat(fd, &opened) != 0 || !S_ISREG(opened.st_mode)) {
        close(fd);
        not_regular(seen->st_size);
        return;
    }
    struct held held = start_holding(listing);
    static unsigned char chunk[READ_CHUNK];
    int64_t size = 0, unchecked = 0;
    bool same = upload != NULL; /* as the upload, so far */
    struct sha256 hash;
    sha256_start(&hash);
    for (;;) {
        const ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) missed(); /* what was read is reported */
        if (n <= 0) break;
        if (same) {
            same = size + n <= upload->size && memcmp(lease.body + upload->offset + size, chunk, (size_t)n) == 0;
            if (!same && !listing) break; /* changed, and only counted */
        }
        if (listing) sha256_add(&hash, chunk, (size_t)n);
        hold(&held, chunk, n);
        size += n;
        unchecked += n;
        if (unchecked >= CHECK_EVERY) {
            unchecked = 0;
            if (out_of_time()) { /* the entry being read is not written */
                close(fd);
                free(held.data);
                return;
            }
        }
    }
    close(fd);
    if (same && size == upload->size) { /* unchanged */
        free(held.data);
        return;
    }
    if (!listing) {
        collection.unlisted++;
        free(held.data);
        return;
    }
    char hex[65];
    sha256_finish(&hash, hex);
    list_file(size, hex, held.returnable, held.data);
    free(held.data);
}

/* A session's entry that is not a regular file (``st``): listed when it is new or its tuple changed. */
static void session_other(const unsigned char key[KEY_BYTES], struct entry *old, const struct stat *st) {
    if (old != NULL && !old->regular && same_stat(old, st)) {
        old->seen = true;
        return;
    }
    not_regular(st->st_size);
    remember(key, old, st, false, NULL);
}

/* A session's regular file, compared with the snapshot (see struct snapshot): unchanged by its tuple
 * without being read; else read to its end (what was read is what is reported and remembered), and
 * listed when it is new, changed by its tuple, or (racy) by its content. A file only counted is read
 * only when its digest is needed: to compare it, or to remember it if it is racy now. */
static void session_file(int dir, const char *name, const struct stat *seen) {
    unsigned char key[KEY_BYTES];
    path_key(collection.path, collection.path_length, key);
    struct entry *old = snapshot_find(key);
    if (old != NULL && old->regular && !old->racy && same_stat(old, seen)) {
        old->seen = true;
        return;
    }
    const bool listing = collection.listed < workspace.max_listed;
    const bool by_content = old != NULL && old->regular && old->racy;
    if (!listing && !by_content && !is_racy(seen)) { /* new, or changed by its tuple: only counted */
        collection.unlisted++;
        remember(key, old, seen, true, NULL);
        return;
    }
    const int fd = open_entry(dir, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, seen->st_mode);
    if (fd < 0) {
        if (errno == ELOOP) {
            session_other(key, old, seen);
        } else {
            missed();
        }
        return;
    }
    struct stat opened;
    if (fstat(fd, &opened) != 0 || !S_ISREG(opened.st_mode)) {
        close(fd);
        session_other(key, old, seen);
        return;
    }
    struct held held = start_holding(listing);
    static unsigned char chunk[READ_CHUNK];
    int64_t size = 0, unchecked = 0;
    struct sha256 hash;
    sha256_start(&hash);
    for (;;) {
        const ssize_t n = read(fd, chunk, sizeof chunk);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) missed(); /* what was read is reported */
        if (n <= 0) break;
        sha256_add(&hash, chunk, (size_t)n);
        hold(&held, chunk, n);
        size += n;
        unchecked += n;
        if (unchecked >= CHECK_EVERY) {
            unchecked = 0;
            if (out_of_time()) { /* neither listed nor remembered: the walk is cut short */
                close(fd);
                free(held.data);
                return;
            }
        }
    }
    close(fd);
    unsigned char digest[32];
    sha256_digest(&hash, digest);
    const bool same = old != NULL && old->regular &&
                      (old->racy ? old->hashed && memcmp(old->sha256, digest, sizeof digest) == 0
                                 : same_stat(old, &opened));
    if (!same && listing) {
        char hex[65];
        sha256_hex(digest, hex);
        list_file(size, hex, held.returnable, held.data);
    } else if (!same) {
        collection.unlisted++;
    }
    free(held.data);
    remember(key, old, &opened, true, digest);
}

/* One entry of a session's walk that is not a directory. */
static void session_entry(int dir, const char *name, const struct stat *seen) {
    if (S_ISREG(seen->st_mode)) {
        session_file(dir, name, seen);
        return;
    }
    unsigned char key[KEY_BYTES];
    path_key(collection.path, collection.path_length, key);
    session_other(key, snapshot_find(key), seen);
}

static void walk(int fd, int depth);

/* One name of a directory, in walk order. */
static void visit(int dir, const char *name, int depth) {
    if (out_of_time()) return;
    struct stat seen;
    if (fstatat(dir, name, &seen, AT_SYMLINK_NOFOLLOW) != 0) {
        if (errno != ENOENT) missed();
        return;
    }
    const size_t parent = collection.path_length;
    if (!push_name(name)) {
        missed();
        collection.stopped = true;
        return;
    }
    if (S_ISDIR(seen.st_mode)) {
        const int fd = depth < MAX_DEPTH
                           ? open_entry(dir, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, seen.st_mode)
                           : -1;
        if (fd < 0) {
            missed();
        } else {
            walk(fd, depth + 1);
        }
    } else if (lease.session) {
        session_entry(dir, name, &seen);
    } else if (S_ISREG(seen.st_mode)) {
        regular_file(dir, name, &seen);
    } else {
        not_regular(seen.st_size);
    }
    pop_name(parent);
}

static int by_name(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* A directory (``fd``, which it takes over), ``depth`` directories below /sandbox: its names read
 * whole, sorted, and visited in that order. */
static void walk(int fd, int depth) {
    DIR *directory = fdopendir(fd);
    if (directory == NULL) {
        close(fd);
        missed();
        return;
    }
    char **names = NULL;
    size_t count = 0, capacity = 0;
    bool whole = true;
    for (struct dirent *found; whole && (errno = 0, found = readdir(directory)) != NULL;) {
        if (strcmp(found->d_name, ".") == 0 || strcmp(found->d_name, "..") == 0) continue;
        if (count == MAX_NAMES || (count % 4096 == 4095 && out_of_time())) {
            whole = false;
            break;
        }
        if (count == capacity) {
            capacity = capacity == 0 ? 64 : capacity * 2;
            char **grown = realloc(names, capacity * sizeof *grown);
            if (grown == NULL) {
                whole = false;
                break;
            }
            names = grown;
        }
        names[count] = strdup(found->d_name);
        if (names[count] == NULL) {
            whole = false;
            break;
        }
        count++;
    }
    if (whole && errno != 0) whole = false;
    if (whole) {
        qsort(names, count, sizeof *names, by_name);
        for (size_t i = 0; i < count && !collection.stopped; i++) visit(dirfd(directory), names[i], depth);
    } else {
        missed(); /* this directory is left out altogether */
    }
    for (size_t i = 0; i < count; i++) free(names[i]);
    free(names);
    closedir(directory);
}

/* Walks the workspace and writes its new and changed entries, every limit counted afresh; the budget
 * runs from ``start``. ``live``: the program's processes run on (a call's report). */
static void walk_workspace(int64_t start, bool live) {
    const int64_t budget_ns = workspace.budget_ms > (INT64_MAX - start) / 1000000 ? INT64_MAX - start
                                                                                  : workspace.budget_ms * 1000000;
    collection.ends = start + budget_ns < deadline_ns ? start + budget_ns : deadline_ns;
    collection.listed = collection.unlisted = collection.returned = collection.returned_bytes = 0;
    collection.complete = true;
    collection.stopped = false;
    collection.live = live;
    collection.next_look = start + LOOK_EVERY_NS;
    if (clock_gettime(CLOCK_REALTIME, &collection.started) != 0) {
        collection.started.tv_sec = 0; /* cannot fail; were it to, every file would count as racy */
        collection.started.tv_nsec = 0;
    }
    if (collection.path == NULL) {
        collection.path = calloc(1, 256);
        collection.path_capacity = collection.path != NULL ? 256 : 0;
    } else {
        pop_name(0);
    }
    const int root = openat(workspace.dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (collection.path == NULL || root < 0) {
        if (root >= 0) close(root);
        missed();
    } else {
        walk(root, 0);
    }
}

/* The end trailer, under the nonce the entries were written under. */
static void write_end(void) {
    char end[2 + NONCE_DIGITS + 16 + 2 * 20 + 8];
    const int length = snprintf(end, sizeof end, "%c%s:files-end=%lld %lld %d%c", '\0', workspace.nonce,
                                (long long)collection.listed, (long long)collection.unlisted,
                                collection.complete ? 1 : 0, '\0');
    if (length > 0) {
        /* On both streams: each is first-in first-out and everything else in the sandbox is dead
         * (or, in a call's report, done with the call), so the end trailer on a stream means that
         * stream is complete (the engine delivers the two streams independently: stdout's end says
         * nothing of stderr's). stderr is the init's own non-blocking description (see
         * detach_stdio). */
        emit(end, (size_t)length);
        emit_to(STDERR_FILENO, end, (size_t)length);
    }
}

/* The report is written: everything in the sandbox is over, and the sandbox stays only until the
 * server hangs up, which it does once it has read the report and the kernel's accounting of the
 * sandbox (that goes with the container). The end of the lease is then the ordinary end: the init
 * exits with PROGRAM's status, which the engine reports. The deadline still holds. */
static void wait_for_hang_up(int status) {
    for (;;) {
        const int64_t now = monotonic_ns();
        if (now >= deadline_ns) end_sandbox(DEADLINE_PASSED);
        const int64_t remaining = deadline_ns - now;
        const struct timespec timeout = {.tv_sec = remaining / NS_PER_SECOND, .tv_nsec = remaining % NS_PER_SECOND};
        struct pollfd watched = {.fd = lease.fd, .events = POLLIN, .revents = 0};
        if (ppoll(&watched, 1, &timeout, NULL) < 0) {
            if (errno == EINTR) continue;
            init_failed("ppoll");
        }
        if (!watched.revents) continue;
        char scratch[4096];
        const ssize_t n = (watched.revents & POLLIN) ? read(lease.fd, scratch, sizeof scratch) : 0;
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) _exit(status);
        /* Bytes past the last frame mean nothing now: they are read and dropped. */
    }
}

/* PROGRAM has ended with ``status`` (one-shot, or a session's during a call): kill what is left, reap
 * it (for a bounded time), walk the workspace and write its entries, then the end trailer, and exit
 * with PROGRAM's status once the server hangs up. */
static void collect(int status) {
    const int64_t start = monotonic_ns();
    kill(-1, SIGKILL);
    const int64_t reaped_by = start + REAP_BOUND_NS;
    for (;;) {
        int ignored;
        const pid_t ended = waitpid(-1, &ignored, WNOHANG);
        if (ended > 0) continue;
        if (ended < 0 && errno != EINTR) break; /* ECHILD: nothing is left */
        const int64_t now = monotonic_ns();
        if (now >= reaped_by) break; /* go on anyway: what is left cannot run for long */
        const int64_t millisecond = NS_PER_SECOND / 1000;
        wait_for(-1, 0, now + millisecond < reaped_by ? now + millisecond : reaped_by);
    }
    walk_workspace(start, false);
    if (lease.session) {
        /* A session's report comes after every call; this one is the last, PROGRAM having ended.
         * Said so, under the nonce no process knows: a call's report that a thread of PROGRAM's
         * own asked for too early (signal 40 comes from the process, whichever thread sent it)
         * must not read as the interpreter's death. */
        char ended[2 + NONCE_DIGITS + 8 + 4 + 2];
        const int length =
            snprintf(ended, sizeof ended, "%c%s:ended=%d%c", '\0', workspace.nonce, exit_status(status), '\0');
        if (length > 0) emit(ended, (size_t)length);
    }
    write_end();
    wait_for_hang_up(exit_status(status));
}

/*
 * A session's call is over: PROGRAM, done with it, sent signal 40. The init reports what is new or
 * changed since the previous report (or, for call 0, since the uploads): the collection's walk, its
 * limits and its format, under the call's nonce, and the end trailer on both streams, but nothing
 * is killed and the walk looks around as it goes (see the collection). The walk becomes the next
 * snapshot. Once the end trailers are being written the call counts as reported, and the next
 * frame may come.
 */
static void report_call(void) {
    walk_workspace(monotonic_ns(), true);
    lease.reported = true;
    write_end();
    snapshot_settle(collection.complete && !collection.stopped);
    collection.live = false;
}

static int supervise(double seconds, bool leased, char *const program[]) {
    const int64_t start = monotonic_ns();
    if (start == INT64_MAX) fail("reading CLOCK_MONOTONIC failed: %s", strerror(errno));
    deadline_ns = start + (int64_t)(seconds * (double)NS_PER_SECOND);

    /* Block everything before the fork: no signal meant for the init is lost in between. Signals
     * are then read from a signalfd, and only there. */
    sigset_t all, original, blocked;
    sigfillset(&all);
    if (sigprocmask(SIG_SETMASK, &all, &original) != 0) fail("blocking the signals failed: %s", strerror(errno));
    /* glibc keeps two signals of its own out of any mask; a session's signal 40 must be in it. */
    if (sigprocmask(SIG_BLOCK, NULL, &blocked) != 0 || sigismember(&blocked, REPORT_SIGNAL) != 1) {
        fail("signal %d cannot be blocked", REPORT_SIGNAL);
    }
    signal_fd = signalfd(-1, &all, SFD_NONBLOCK | SFD_CLOEXEC);
    if (signal_fd < 0) fail("signalfd failed: %s", strerror(errno));
    /* Before the fork too, so that PROGRAM never sees a dumpable init; its own execve() makes it
     * dumpable again as usual. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) fail("PR_SET_DUMPABLE failed: %s", strerror(errno));
    const int input = leased ? take_lease() : -1;

    const pid_t child = fork();
    if (child < 0) fail("fork failed: %s", strerror(errno));
    if (child == 0) run_program(program, &original, input);
    program_pid = child;

    if (input >= 0) close(input);
    detach_stdio();
    for (;;) {
        /* Orphans are re-parented to PID 1: reap them all, and stop when PROGRAM has ended. */
        int status;
        pid_t ended;
        while ((ended = waitpid(-1, &status, WNOHANG)) > 0) {
            if (ended != child) continue;
            /* A session: if a call is under way, it ends as one-shot does; between calls, at once. */
            if (lease.session) {
                if (call_pending()) collect(status);
                end_sandbox(exit_status(status));
            }
            /* The whole frame arrived (and so was valid): the workspace is collected. */
            if (leased && lease.files_written && lease.received == lease.length) collect(status);
            _exit(exit_status(status));
        }
        if (ended < 0) init_failed("waitpid"); /* ECHILD: PROGRAM cannot be gone unreaped */

        const int64_t remaining = deadline_ns - monotonic_ns();
        if (remaining <= 0) end_sandbox(DEADLINE_PASSED);
        const struct timespec timeout = {.tv_sec = remaining / NS_PER_SECOND, .tv_nsec = remaining % NS_PER_SECOND};
        struct pollfd watched[3] = {
            {.fd = signal_fd, .events = POLLIN, .revents = 0},
            {.fd = lease.fd, .events = POLLIN, .revents = 0}, /* -1 (ignored) without --lease */
            {.fd = relay_pending() ? lease.relay : -1, .events = POLLOUT, .revents = 0},
        };
        if (ppoll(watched, 3, &timeout, NULL) < 0) {
            if (errno == EINTR) continue;
            init_failed("ppoll");
        }
        /* Signal 40 from PROGRAM asks for the pending call's report, once PROGRAM has had all of its
         * input; at any other time it asks for nothing (at most one report per call). */
        if ((watched[0].revents & POLLIN) && take_signals() && call_pending() && call_relayed()) report_call();
        if (watched[1].revents) {
            const int ending = read_lease(watched[1].revents);
            if (ending != 0) end_sandbox(ending);
        }
        /* Only while there is input to give (a report, or the lease just read, may have changed that
         * since the poll): a write to a pipe whose reader is gone fails then, and the relay closes. */
        if (relay_pending()) relay_input();
    }
}

int main(int argc, char *argv[]) {
    const char *usage = "usage: seccomp-guard [--deadline SECONDS [--lease]] PROGRAM [ARGUMENT...]";
    double deadline = 0;
    bool leased = false;
    int first = 1;
    if (argc >= 2 && strcmp(argv[1], "--deadline") == 0) {
        if (argc < 4) fail("%s", usage);
        deadline = parse_deadline(argv[2]);
        first = 3;
        if (strcmp(argv[first], "--lease") == 0) {
            leased = true;
            first++;
            if (first >= argc) fail("%s", usage);
        }
        /* The deadline holds only for the namespace's init (see supervise): under another init it
         * could be stopped, so refuse rather than pretend. */
        if (getpid() != 1) fail("--deadline makes the guard the container's init: it must run as PID 1 (no --init)");
    } else if (argc < 2) {
        fail("%s", usage);
    }

    /* Before the fork: the init and PROGRAM both run under the filter. */
    install_filter();

    if (deadline > 0) return supervise(deadline, leased, &argv[first]);

    execvp(argv[first], &argv[first]);
    int error = errno;
    fprintf(stderr, "seccomp-guard: cannot run %s: %s\n", argv[first], strerror(error));
    return error == ENOENT ? NOT_FOUND : GUARD_FAILED;
}
