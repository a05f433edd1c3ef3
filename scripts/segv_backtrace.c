/* LD_PRELOAD'ed into a process that dies of SIGSEGV/SIGBUS/SIGABRT without a native trace (a C++
 * extension crashing under Python): prints each frame as "<library> +0x<offset> <exported symbol>" to
 * stderr, then dies of the same signal. tests/deepgemm_bisect.py turns the offsets into function names
 * with addr2line. Build: cc -O1 -g -shared -fPIC -o /tmp/segv_backtrace.so scripts/segv_backtrace.c -ldl */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void report(int sig, siginfo_t *info, void *context) {
    (void)context;
    char line[512];
    int len = snprintf(line, sizeof line, "segv_backtrace: signal %d, fault address %p\n", sig, info->si_addr);
    write(2, line, (size_t)len);
    void *frames[64];
    int count = backtrace(frames, 64);
    for (int i = 0; i < count; i++) {
        Dl_info where;
        memset(&where, 0, sizeof where);
        if (dladdr(frames[i], &where) && where.dli_fname) {
            /* -1: the return address points past the call; addr2line wants the call itself */
            unsigned long offset = (unsigned long)((char *)frames[i] - (char *)where.dli_fbase) - (i > 1);
            len = snprintf(line, sizeof line, "segv_backtrace: #%d %s +0x%lx %s\n", i, where.dli_fname, offset,
                           where.dli_sname ? where.dli_sname : "?");
        } else {
            len = snprintf(line, sizeof line, "segv_backtrace: #%d %p\n", i, frames[i]);
        }
        write(2, line, (size_t)len);
    }
    signal(sig, SIG_DFL);
    raise(sig);
}

__attribute__((constructor)) static void install(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = report;
    action.sa_flags = SA_SIGINFO | SA_RESETHAND;
    sigaction(SIGSEGV, &action, NULL);
    sigaction(SIGBUS, &action, NULL);
    sigaction(SIGABRT, &action, NULL);
}
