/*
 * kiln-init: PID 1 of every sandbox.
 *
 * Why C and not the kiln binary: the init process is visible to the step as
 * /proc/1, and the kiln binary is usually owned by the very user that the
 * step's root maps to. runc CVE-2019-5736 overwrote the runtime through
 * /proc/PID/exe. This program is compiled into kiln, copied into a sealed
 * memfd and executed from there, so /proc/1/exe is an anonymous, sealed,
 * executing file; it also makes itself non-dumpable first thing, so a step
 * (which has no CAP_SYS_PTRACE) cannot open /proc/1/fd/N, /proc/1/mem or
 * ptrace it.
 *
 * Protocol (set up by the runtime before exec):
 *   argv[1]  the PID (in this namespace) of the
 *            command process, already forked and waiting on fd 4
 *   fd 3     write end of the status pipe: the raw wait status of the
 *            command (4 bytes, native endian) is written here once
 *   fd 4     write end of the ready pipe: closed once this process is
 *            non-dumpable and its signal mask is set, which releases the
 *            command
 * It forwards SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and
 * SIGWINCH to the command, reaps every zombie, and exits with the command's
 * status (128+N when killed by signal N). When it exits the kernel kills
 * every process left in the PID namespace.
 */
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

static void write_all(int fd, const void *buf, size_t len) {
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += n;
        len -= (size_t)n;
    }
}

int main(int argc, char **argv) {
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
        _exit(125);
    if (argc != 2)
        _exit(125);
    pid_t command = (pid_t)atoi(argv[1]);

    sigset_t set;
    sigemptyset(&set);
    int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGWINCH};
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        sigaddset(&set, forwarded[i]);
    sigaddset(&set, SIGCHLD);
    if (sigprocmask(SIG_BLOCK, &set, NULL) != 0)
        _exit(125);
    close(4);

    for (;;) {
        int sig = sigwaitinfo(&set, NULL);
        if (sig < 0)
            continue;
        if (sig != SIGCHLD) {
            kill(command, sig);
            continue;
        }
        for (;;) {
            int status;
            pid_t pid = waitpid(-1, &status, WNOHANG);
            if (pid <= 0)
                break;
            if (pid == command) {
                write_all(3, &status, sizeof status);
                if (WIFEXITED(status))
                    _exit(WEXITSTATUS(status));
                _exit(128 + WTERMSIG(status));
            }
        }
    }
}
