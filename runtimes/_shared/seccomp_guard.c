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
 * keeps it for itself. The server writes one frame on it: the length of the body in decimal and a
 * newline, then the body: a header line (the guard's nonce, the size of the files section, the
 * collection's limits), the files section (the workspace's input files, which the init writes
 * under /sandbox), then PROGRAM's input, which the init passes to PROGRAM through a pipe (PROGRAM's
 * stdin, which then reads EOF); the server then holds the stream open for as long as it wants the
 * sandbox. When the stream ends, at any point, the server is done with the sandbox or gone
 * (killed outright, its host connection lost): the init kills every process in the container and
 * exits 137 at once, so that nothing outlives its server by more than the engine's teardown, even
 * if no server ever starts again. A malformed frame ends the sandbox the same way (exit 126). When
 * PROGRAM ends, the init kills everything else and writes the workspace's new and changed files on
 * the container's stdout, framed with the nonce (see collect()), before it exits.
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
 *
 * At the deadline, or when the lease ends, it sends SIGKILL to every process of the namespace
 * (stopped ones included) and exits 137; its exit makes the kernel kill anything forked in
 * between, and the container ends. Two processes in all: this one and PROGRAM.
 */
/*
 * The lease (--lease): the container's stdin, held by the init alone. It carries one frame, the
 * length of the body in decimal and a newline, then the body; then nothing, until it ends. Any end
 * of it ends the sandbox. The body is read in whole as it arrives, whether or not PROGRAM reads its
 * stdin: a full pipe anywhere between the server and the init would hold back the end of the
 * stream behind it (the engine's copier blocks on it), so the lease is never left unread. The body
 * is, byte for byte:
 *
 *     CODOMYRMEX-WS1 <nonce> <files length> <max returned> <max file bytes> <max total bytes> <max listed> <budget ms>\n
 *     <files section: <files length> bytes, entries "<path length> <content length>\n<path><content>">
 *     <PROGRAM's input: the rest>
 *
 * Once the header and the files section have arrived, the files are written under /sandbox, and
 * only then is PROGRAM's input relayed to its stdin pipe, from memory, without ever blocking (so
 * the files exist before the code even reaches the runner). The header and the files stay in
 * memory until the end: the collection compares the workspace against them.
 */
#define MAX_HEADER_LINE 512  /* bytes, the newline included */
#define MAX_NUMBER_DIGITS 19 /* a decimal that fits in int64_t (checked for overflow too) */
#define NONCE_DIGITS 32
#define MAX_PATH_BYTES 1024
#define MAX_COMPONENT_BYTES 255
static const char header_magic[] = "CODOMYRMEX-WS1 ";

struct lease {
    int fd;              /* the container's stdin, or -1 without --lease */
    int relay;           /* the write end of PROGRAM's stdin, or -1 once closed */
    int64_t length;      /* the body's length; -1 while it is being read */
    int64_t digits_value;
    int digits;
    char *body;          /* the first ``kept`` bytes of the body */
    int64_t kept;        /* the body's length, then only the header and files once PROGRAM has its input */
    int64_t received;    /* how much of the body has arrived */
    int64_t files_start; /* where the files section starts (past the header line); 0 until it is parsed */
    int64_t files_end;   /* where PROGRAM's input starts */
    bool files_written;  /* the files are under /sandbox: PROGRAM's input may be relayed */
    int64_t relayed;     /* the offset in the body up to which PROGRAM was given its input */
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

/* The header line, body[0 .. newline]: all its fields, or a malformed frame. */
static void parse_header(const char *line, const char *end) {
    const size_t magic = sizeof header_magic - 1;
    if ((size_t)(end - line) < magic || memcmp(line, header_magic, magic) != 0) {
        malformed("the header does not start with CODOMYRMEX-WS1");
    }
    const char *at = line + magic;
    for (int i = 0; i < NONCE_DIGITS; i++, at++) {
        if (at == end || !((*at >= '0' && *at <= '9') || (*at >= 'a' && *at <= 'f'))) {
            malformed("the nonce is not 32 lowercase hex digits");
        }
        workspace.nonce[i] = *at;
    }
    workspace.nonce[NONCE_DIGITS] = '\0';
    if (at == end || *at++ != ' ') malformed("the nonce is not 32 lowercase hex digits");
    int64_t files_length;
    if (!parse_number(&at, end, ' ', &files_length) || !parse_number(&at, end, ' ', &workspace.max_returned) ||
        !parse_number(&at, end, ' ', &workspace.max_file_bytes) ||
        !parse_number(&at, end, ' ', &workspace.max_total_bytes) ||
        !parse_number(&at, end, ' ', &workspace.max_listed) || !parse_number(&at, end, '\n', &workspace.budget_ms) ||
        at != end) {
        malformed("the header's numbers are not six plain decimals separated by single spaces");
    }
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
    if (close(fd) != 0) cannot_write(upload);
    if (dir != workspace.dir) close(dir);
    free(path);
}

static int by_path(const void *a, const void *b) {
    return strcmp(((const struct upload *)a)->path, ((const struct upload *)b)->path);
}

/* The body has grown: parse the header once its line is in, write the files once their section is
 * in. */
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
    }
}

/* PROGRAM gets no more input: it has had all of it, or closed its stdin (the rest is then read
 * and dropped). Closing the relay makes PROGRAM read EOF. Only the header and the files are kept. */
static void close_relay(void) {
    close(lease.relay);
    lease.relay = -1;
    lease.kept = lease.files_end;
    char *kept = realloc(lease.body, (size_t)lease.kept);
    if (kept != NULL) lease.body = kept;
}

static void finish_input(void) {
    if (lease.relay >= 0 && lease.files_written && lease.relayed == lease.length) close_relay();
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

/* The lease has something to say (``revents``): 0 while it holds, else the init's exit status. */
static int read_lease(short revents) {
    if (!(revents & POLLIN)) return LEASE_LOST; /* ended (or failed) with nothing left to read */
    char scratch[4096];
    char *into = scratch;
    size_t want = 1; /* the length, a byte at a time: nothing of the body is read with it */
    const int64_t missing = lease.length - lease.received;
    if (lease.length >= 0 && lease.received < lease.kept) {
        into = lease.body + lease.received;
        want = (size_t)(lease.kept - lease.received);
    } else if (lease.length >= 0) { /* input PROGRAM will not get, or past the frame: dropped */
        want = missing > 0 && (uint64_t)missing < sizeof scratch ? (size_t)missing : sizeof scratch;
    }
    const ssize_t n = read(lease.fd, into, want);
    if (n < 0) return errno == EAGAIN || errno == EINTR ? 0 : LEASE_LOST;
    if (n == 0) return LEASE_LOST;
    if (lease.length < 0) {
        read_length_byte(scratch[0]);
        return 0;
    }
    if (missing > 0) {
        lease.received += n;
        if (!lease.files_written) advance_frame();
        finish_input();
    }
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

/* The digest in lowercase hex, into ``hex`` (65 bytes, NUL-terminated). */
static void sha256_finish(struct sha256 *hash, char hex[65]) {
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
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        const unsigned char byte = (unsigned char)(hash->state[i / 4] >> (24 - 8 * (i % 4)));
        hex[2 * i] = digits[byte >> 4];
        hex[2 * i + 1] = digits[byte & 0xf];
    }
    hex[64] = '\0';
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
 */
#define MAX_DEPTH 64                 /* directories below /sandbox */
#define MAX_NAMES 200000             /* names held per directory */
#define REAP_BOUND_NS 200000000LL    /* how long the init waits for the killed processes to be reaped */
#define READ_CHUNK 65536
#define CHECK_EVERY (1024 * 1024)    /* bytes read between two looks at the clock */

struct collection {
    int64_t ends;        /* the time budget's end (CLOCK_MONOTONIC ns), never past the deadline */
    int64_t listed, unlisted, returned, returned_bytes;
    bool complete;
    bool stopped;        /* the budget ran out, or the output is gone: the walk goes no further */
    char *path;          /* the current entry's path, relative to /sandbox */
    size_t path_length, path_capacity;
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

static bool out_of_time(void) {
    if (monotonic_ns() < collection.ends) return false;
    collection.stopped = true;
    collection.complete = false;
    return true;
}

/* Something could not be looked at: the end trailer will say the collection is incomplete. */
static void missed(void) {
    collection.complete = false;
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
 * the program took it away: the init is the owner, and every other process is dead by now. */
static int open_entry(int dir, const char *name, int flags, mode_t mode) {
    int fd = openat(dir, name, flags);
    if (fd < 0 && errno == EACCES) {
        const mode_t wanted = (mode & 07777) | S_IRUSR | (S_ISDIR(mode) ? S_IXUSR : 0);
        if (fchmodat(dir, name, wanted, 0) == 0) fd = openat(dir, name, flags);
    }
    return fd;
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
    /* At most ``hold`` bytes are held: enough to return the file if it can be returned, and one byte
     * more to tell that it is larger. None when it cannot be returned whatever its size. */
    bool returnable = listing && collection.returned < workspace.max_returned;
    int64_t hold = 0;
    if (returnable) {
        const int64_t total_left = workspace.max_total_bytes - collection.returned_bytes;
        const int64_t room = workspace.max_file_bytes < total_left ? workspace.max_file_bytes : total_left;
        hold = room < INT64_MAX ? room + 1 : INT64_MAX;
    }
    static unsigned char chunk[READ_CHUNK];
    unsigned char *held = NULL;
    int64_t held_size = 0, held_capacity = 0, size = 0, unchecked = 0;
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
        const int64_t take = returnable && hold - held_size < n ? hold - held_size : (returnable ? n : 0);
        if (take > 0 && held_size + take > held_capacity) {
            int64_t capacity = held_capacity == 0 ? READ_CHUNK : held_capacity * 2;
            if (capacity > hold) capacity = hold;
            if (capacity < held_size + take) capacity = held_size + take;
            unsigned char *grown = realloc(held, (size_t)capacity);
            if (grown == NULL) { /* it cannot be returned after all, and the end trailer says so */
                missed();
                returnable = false;
            } else {
                held = grown;
                held_capacity = capacity;
            }
        }
        if (take > 0 && returnable) {
            memcpy(held + held_size, chunk, (size_t)take);
            held_size += take;
        }
        size += n;
        unchecked += n;
        if (unchecked >= CHECK_EVERY) {
            unchecked = 0;
            if (out_of_time()) { /* the entry being read is not written */
                close(fd);
                free(held);
                return;
            }
        }
    }
    close(fd);
    if (same && size == upload->size) { /* unchanged */
        free(held);
        return;
    }
    if (!listing) {
        collection.unlisted++;
        free(held);
        return;
    }
    char hex[65];
    sha256_finish(&hash, hex);
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
    free(held);
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

/* PROGRAM has ended with ``status``: kill what is left, reap it (for a bounded time), walk the
 * workspace and write its entries, then the end trailer, and exit with PROGRAM's status. */
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
        /* Bytes past the frame mean nothing: they are read and dropped. */
    }
}

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

    const int64_t budget_ns = workspace.budget_ms > (INT64_MAX - start) / 1000000 ? INT64_MAX - start
                                                                                  : workspace.budget_ms * 1000000;
    collection.ends = start + budget_ns < deadline_ns ? start + budget_ns : deadline_ns;
    collection.complete = true;
    collection.path = calloc(1, 256);
    collection.path_capacity = 256;
    const int root = openat(workspace.dir, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (collection.path == NULL || root < 0) {
        if (root >= 0) close(root);
        missed();
    } else {
        walk(root, 0);
    }
    char end[2 + NONCE_DIGITS + 16 + 2 * 20 + 8];
    const int length = snprintf(end, sizeof end, "%c%s:files-end=%lld %lld %d%c", '\0', workspace.nonce,
                                (long long)collection.listed, (long long)collection.unlisted,
                                collection.complete ? 1 : 0, '\0');
    if (length > 0) {
        /* On both streams: each is first-in first-out and everything else in the sandbox is dead,
         * so the end trailer on a stream means that stream is complete (the engine delivers the
         * two streams independently: stdout's end says nothing of stderr's). stderr is the init's
         * own non-blocking description (see detach_stdio). */
        emit(end, (size_t)length);
        emit_to(STDERR_FILENO, end, (size_t)length);
    }
    wait_for_hang_up(exit_status(status));
}

static int supervise(double seconds, bool leased, char *const program[]) {
    const int64_t start = monotonic_ns();
    if (start == INT64_MAX) fail("reading CLOCK_MONOTONIC failed: %s", strerror(errno));
    deadline_ns = start + (int64_t)(seconds * (double)NS_PER_SECOND);

    /* Block everything before the fork: no signal meant for the init is lost in between. Signals
     * are then read from a signalfd, and only there. */
    sigset_t all, original;
    sigfillset(&all);
    if (sigprocmask(SIG_SETMASK, &all, &original) != 0) fail("blocking the signals failed: %s", strerror(errno));
    const int signals = signalfd(-1, &all, SFD_NONBLOCK | SFD_CLOEXEC);
    if (signals < 0) fail("signalfd failed: %s", strerror(errno));
    /* Before the fork too, so that PROGRAM never sees a dumpable init; its own execve() makes it
     * dumpable again as usual. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) fail("PR_SET_DUMPABLE failed: %s", strerror(errno));
    const int input = leased ? take_lease() : -1;

    const pid_t child = fork();
    if (child < 0) fail("fork failed: %s", strerror(errno));
    if (child == 0) run_program(program, &original, input);

    if (input >= 0) close(input);
    detach_stdio();
    for (;;) {
        /* Orphans are re-parented to PID 1: reap them all, and stop when PROGRAM has ended. */
        int status;
        pid_t ended;
        while ((ended = waitpid(-1, &status, WNOHANG)) > 0) {
            if (ended != child) continue;
            /* The whole frame arrived (and so was valid): the workspace is collected. */
            if (leased && lease.files_written && lease.received == lease.length) collect(status);
            _exit(exit_status(status));
        }
        if (ended < 0) init_failed("waitpid"); /* ECHILD: PROGRAM cannot be gone unreaped */

        const int64_t remaining = deadline_ns - monotonic_ns();
        if (remaining <= 0) end_sandbox(DEADLINE_PASSED);
        const struct timespec timeout = {.tv_sec = remaining / NS_PER_SECOND, .tv_nsec = remaining % NS_PER_SECOND};
        struct pollfd watched[3] = {
            {.fd = signals, .events = POLLIN, .revents = 0},
            {.fd = lease.fd, .events = POLLIN, .revents = 0}, /* -1 (ignored) without --lease */
            {.fd = relay_pending() ? lease.relay : -1, .events = POLLOUT, .revents = 0},
        };
        if (ppoll(watched, 3, &timeout, NULL) < 0) {
            if (errno == EINTR) continue;
            init_failed("ppoll");
        }
        if (watched[0].revents & POLLIN) {
            /* A bounded number per wake-up: a flood of queued signals cannot keep the loop from its
             * deadline and its lease. */
            struct signalfd_siginfo info;
            for (int taken = 0; taken < 64 && read(signals, &info, sizeof info) == (ssize_t)sizeof info; taken++) {
                for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++) {
                    if ((int)info.ssi_signo == forwarded[i]) kill(child, (int)info.ssi_signo);
                }
            }
        }
        if (watched[1].revents) {
            const int ending = read_lease(watched[1].revents);
            if (ending != 0) end_sandbox(ending);
        }
        if (watched[2].revents || relay_pending()) relay_input();
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
