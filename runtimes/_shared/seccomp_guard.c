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
 * keeps it for itself. The server writes one frame on it: the length of PROGRAM's input in decimal
 * and a newline, then that many bytes, which the init passes to PROGRAM through a pipe (PROGRAM's
 * stdin, which then reads EOF); the server then holds the stream open for as long as it wants the
 * sandbox. When the stream ends, at any point, the server is done with the sandbox or gone
 * (killed outright, its host connection lost): the init kills every process in the container and
 * exits 137 at once, so that nothing outlives its server by more than the engine's teardown, even
 * if no server ever starts again. A malformed frame ends the sandbox the same way (exit 126).
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
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define GUARD_FAILED 126 /* the shell's "found but could not run" */
#define NOT_FOUND 127
#define DEADLINE_PASSED (128 + SIGKILL) /* what the engine reports for a container killed outright */
#define MAX_DEADLINE_SECONDS 31536000.0 /* a year: anything longer is a mistake, not a deadline */
#define NS_PER_SECOND 1000000000LL
#define LEASE_LOST (128 + SIGKILL)
#define MAX_FRAME_DIGITS 19 /* a length that fits in int64_t */

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

/* The init's own descriptors: it reads nothing and writes nothing but its own fatal errors, and
 * must never hold the program's pipes open or block on them. stdin and stdout become /dev/null;
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
 * length of PROGRAM's input in decimal and a newline, then the input; then nothing, until it ends.
 * Any end of it ends the sandbox. The input is read in whole as it arrives, whether or not PROGRAM
 * reads its stdin: a full pipe anywhere between the server and the init would hold back the end of
 * the stream behind it (the engine's copier blocks on it), so the lease is never left unread. It is
 * relayed to PROGRAM's stdin pipe from memory, without ever blocking.
 */
struct lease {
    int fd;            /* the container's stdin, or -1 without --lease */
    int relay;         /* the write end of PROGRAM's stdin, or -1 once closed */
    int64_t length;    /* the input's length; -1 while it is being read */
    int64_t digits_value;
    int digits;
    char *input;       /* the input, ``length`` bytes */
    int64_t received;  /* how much of it has arrived */
    int64_t relayed;   /* how much of it PROGRAM was given */
};

static struct lease lease = {.fd = -1, .relay = -1, .length = -1};

/* PROGRAM gets no more input: it has had all of it, or closed its stdin (the rest is then read
 * and dropped). Closing the relay makes PROGRAM read EOF. */
static void close_relay(void) {
    close(lease.relay);
    lease.relay = -1;
    free(lease.input);
    lease.input = NULL;
}

static void finish_input(void) {
    if (lease.relay >= 0 && lease.length >= 0 && lease.relayed == lease.length) close_relay();
}

/* One byte of the frame's length; 0, or GUARD_FAILED when the length is malformed. */
static int read_length_byte(char c) {
    if (c == '\n' && lease.digits > 0) {
        lease.length = lease.digits_value;
        if (lease.length > 0) {
            lease.input = malloc((size_t)lease.length);
            if (lease.input == NULL) return GUARD_FAILED;
        }
        finish_input();
        return 0;
    }
    if (c < '0' || c > '9' || lease.digits == MAX_FRAME_DIGITS) return GUARD_FAILED;
    lease.digits_value = lease.digits_value * 10 + (c - '0');
    lease.digits++;
    return 0;
}

/* The lease has something to say (``revents``): 0 while it holds, else the init's exit status. */
static int read_lease(short revents) {
    if (!(revents & POLLIN)) return LEASE_LOST; /* ended (or failed) with nothing left to read */
    char scratch[4096];
    char *into = scratch;
    size_t want = 1; /* the length, a byte at a time: nothing of the input is read with it */
    const int64_t missing = lease.length - lease.received;
    if (lease.length >= 0 && missing > 0 && lease.input != NULL) {
        into = lease.input + lease.received;
        want = (size_t)missing;
    } else if (lease.length >= 0) { /* input PROGRAM will not get, or past the frame: dropped */
        want = missing > 0 && (uint64_t)missing < sizeof scratch ? (size_t)missing : sizeof scratch;
    }
    const ssize_t n = read(lease.fd, into, want);
    if (n < 0) return errno == EAGAIN || errno == EINTR ? 0 : LEASE_LOST;
    if (n == 0) return LEASE_LOST;
    if (lease.length < 0) return read_length_byte(scratch[0]);
    if (missing > 0) lease.received += n;
    return 0;
}

/* Gives PROGRAM what has arrived, never blocking. A PROGRAM that closed its stdin (or ended) gets
 * no more: the rest of its input is read and dropped. */
static void relay_input(void) {
    const ssize_t n = write(lease.relay, lease.input + lease.relayed, (size_t)(lease.received - lease.relayed));
    if (n > 0) {
        lease.relayed += n;
        finish_input();
    } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        close_relay();
    }
}

/* Whether there is input for PROGRAM that it has not had yet. */
static bool relay_pending(void) {
    return lease.relay >= 0 && lease.relayed < lease.received;
}

/* Before the fork, with --lease: PROGRAM's stdin pipe (its read end is returned) and the init's
 * own hold on the container's stdin. Both of the init's descriptors are closed on exec. */
static int take_lease(void) {
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) fail("creating the stdin pipe failed: %s", strerror(errno));
    lease.relay = pipe_fds[1];
    lease.fd = fcntl(STDIN_FILENO, F_DUPFD_CLOEXEC, 3);
    if (lease.fd < 0) fail("keeping the lease failed: %s", strerror(errno));
    if (fcntl(lease.relay, F_SETFL, O_NONBLOCK) != 0 || fcntl(lease.fd, F_SETFL, O_NONBLOCK) != 0) {
        fail("making the lease non-blocking failed: %s", strerror(errno));
    }
    return pipe_fds[0];
}

static int supervise(double seconds, bool leased, char *const program[]) {
    const int64_t start = monotonic_ns();
    if (start == INT64_MAX) fail("reading CLOCK_MONOTONIC failed: %s", strerror(errno));
    const int64_t deadline = start + (int64_t)(seconds * (double)NS_PER_SECOND);

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
            if (ended == child) _exit(exit_status(status));
        }
        if (ended < 0) init_failed("waitpid"); /* ECHILD: PROGRAM cannot be gone unreaped */

        const int64_t remaining = deadline - monotonic_ns();
        if (remaining <= 0) {
            kill(-1, SIGKILL);
            _exit(DEADLINE_PASSED);
        }
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
            if (ending != 0) {
                kill(-1, SIGKILL);
                _exit(ending);
            }
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
