/* slowfsync.so: an LD_PRELOAD shim that makes every fsync/fdatasync 2 ms slower, like a consumer SSD's
 * cache flush (this VM's ~0.3 ms flush hides what group commit is for). Built by bench/run with
 *   cc -O2 -shared -fPIC -o bench/.work/slowfsync.so bench/slowfsync.c -ldl
 * BENCH_FSYNC_DELAY_US sets another delay in microseconds. The delay comes before the real call, so
 * durability is unchanged: the data is still flushed before the call returns. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

static long delay_ns(void) {
    static long ns = -1;
    if (ns < 0) {
        const char *v = getenv("BENCH_FSYNC_DELAY_US");
        ns = (v && *v ? atol(v) : 2000) * 1000L;
    }
    return ns;
}

static void wait_a_while(void) {
    struct timespec ts = {delay_ns() / 1000000000L, delay_ns() % 1000000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    wait_a_while();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    wait_a_while();
    return real(fd);
}
