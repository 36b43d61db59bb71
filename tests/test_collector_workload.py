"""The workload program the collector tests measure: a tiny C program built with gcc.

``work MODE N [phased]`` does one known thing N times (or N ms, N MiB, N bytes). With
``phased`` it prints ``ready``, waits for a line on stdin, does the work, prints ``done`` and
waits for another line before exiting, so a test can drain the collector right before and right
after the work and compare that interval's values with what the program did.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

WORK_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;

static void say(const char *s) { fputs(s, stdout); fputc('\n', stdout); fflush(stdout); }

static void wait_line(void)
{
    char buf[64];
    if (!fgets(buf, sizeof buf, stdin))
        exit(3);
}

static double cpu_ms(clockid_t clk)
{
    struct timespec t;
    clock_gettime(clk, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void burn(clockid_t clk, double ms)
{
    double end = cpu_ms(clk) + ms;
    while (cpu_ms(clk) < end)
        for (int i = 0; i < 10000; i++)
            sink += i;
}

__attribute__((noinline)) int osad_probe_target(int x)
{
    sink += x;
    __asm__ volatile("" ::: "memory");
    return (int)sink;
}

static void *thread_main(void *arg)
{
    burn(CLOCK_THREAD_CPUTIME_ID, *(double *)arg);
    return 0;
}

static int tcp(long n)
{
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {0};
    socklen_t al = sizeof a;
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(l, (void *)&a, sizeof a) || listen(l, 1) || getsockname(l, (void *)&a, &al))
        return 5;
    int c = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(c, (void *)&a, sizeof a))
        return 6;
    int s = accept(l, 0, 0);
    static char buf[65536];
    for (long left = n; left > 0;) {
        long k = left < (long)sizeof buf ? left : (long)sizeof buf;
        long w = send(c, buf, k, 0);
        if (w <= 0)
            return 7;
        left -= w;
        for (long got = 0; got < w;) {
            long r = recv(s, buf, sizeof buf, 0);
            if (r <= 0)
                return 8;
            got += r;
        }
    }
    close(c);
    close(s);
    close(l);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: work MODE N [phased]\n");
        return 2;
    }
    const char *mode = argv[1];
    long n = atol(argv[2]);
    int phased = argc > 3 && !strcmp(argv[3], "phased");
    pthread_t th[16];
    double thread_ms = 150;
    long nth = n < 16 ? n : 16;
    if (!strcmp(mode, "threads"))  /* threads exist before the measured phase */
        for (long i = 0; i < nth; i++)
            pthread_create(&th[i], 0, thread_main, &thread_ms);
    if (phased) {
        say("ready");
        wait_line();
    }
    if (!strcmp(mode, "burn")) {                 /* N ms of CPU */
        burn(CLOCK_PROCESS_CPUTIME_ID, (double)n);
    } else if (!strcmp(mode, "syscalls")) {      /* N getppid, N/4 failing close */
        for (long i = 0; i < n; i++)
            syscall(SYS_getppid);
        for (long i = 0; i < n / 4; i++)
            close(-1);
    } else if (!strcmp(mode, "touch")) {         /* touch N MiB of fresh anonymous memory */
        size_t sz = (size_t)n << 20;
        char *p = mmap(0, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            return 4;
        for (size_t i = 0; i < sz; i += 4096)
            p[i] = 1;
        sink += p[sz - 1];
    } else if (!strcmp(mode, "futex")) {         /* N futex waits (on a changed value: they return at once) */
        int word = 1;
        for (long i = 0; i < n; i++)
            syscall(SYS_futex, &word, 0 /* FUTEX_WAIT */, 0, NULL, NULL, 0);
    } else if (!strcmp(mode, "mmap")) {          /* N mmap/munmap pairs of one page */
        for (long i = 0; i < n; i++) {
            void *p = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (p == MAP_FAILED || munmap(p, 4096))
                return 4;
        }
    } else if (!strcmp(mode, "openclose")) {     /* N open/close pairs of /dev/null */
        for (long i = 0; i < n; i++) {
            int fd = open("/dev/null", O_RDONLY);
            if (fd < 0 || close(fd))
                return 4;
        }
    } else if (!strcmp(mode, "dwrite")) {        /* write N MiB to a file with O_DIRECT (fsync'd), then remove it */
        char path[64];
        snprintf(path, sizeof path, "/var/tmp/osad-work-%d", (int)getpid());
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_DIRECT, 0600);
        if (fd < 0)
            fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);  /* no O_DIRECT here: fsync does it */
        void *buf;
        if (fd < 0 || posix_memalign(&buf, 4096, 1 << 20))
            return 4;
        memset(buf, 7, 1 << 20);
        for (long i = 0; i < n; i++)
            if (write(fd, buf, 1 << 20) != 1 << 20)
                return 5;
        if (fsync(fd) || close(fd) || unlink(path))
            return 6;
    } else if (!strcmp(mode, "malloc")) {        /* N mallocs of 4 KiB, never freed; then 10 malloc/free pairs */
        for (long i = 0; i < n; i++)
            if (!malloc(4096))
                return 4;
        for (int i = 0; i < 10; i++) {
            void *volatile p = malloc(100);  /* volatile: the compiler may not elide the pair */
            free(p);
        }
    } else if (!strcmp(mode, "fds")) {           /* open N descriptors (of /dev/null), kept open */
        for (long i = 0; i < n; i++)
            if (open("/dev/null", O_RDONLY) < 0)
                return 4;
    } else if (!strcmp(mode, "tcp")) {           /* send (and receive) N bytes over loopback TCP */
        int rc = tcp(n);
        if (rc)
            return rc;
    } else if (!strcmp(mode, "sleep")) {         /* N sleeps of 1 ms */
        struct timespec t = {0, 1000000};
        for (long i = 0; i < n; i++)
            nanosleep(&t, 0);
    } else if (!strcmp(mode, "probe")) {         /* N calls of osad_probe_target */
        for (long i = 0; i < n; i++)
            osad_probe_target((int)i);
    } else if (!strcmp(mode, "threads")) {       /* N threads burn 150 ms each */
        for (long i = 0; i < nth; i++)
            pthread_join(th[i], 0);
    } else if (!strcmp(mode, "fork")) {          /* N children, each burns 5 ms */
        for (long i = 0; i < n; i++) {
            pid_t p = fork();
            if (p == 0) {
                burn(CLOCK_PROCESS_CPUTIME_ID, 5);
                _exit(0);
            }
            waitpid(p, 0, 0);
        }
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    if (phased) {
        say("done");
        wait_line();
    }
    return 0;
}
"""


def build_workload(dest: Path) -> Path:
    """Compile the workload program into ``dest``; skip the calling test if there is no C compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (gcc) to build the workload program; scripts/setup.sh installs it")
    src = dest / "work.c"
    src.write_text(WORK_C)
    out = dest / "work"
    r = subprocess.run([cc, "-O1", "-Wall", "-o", str(out), str(src), "-lpthread"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


def test_workload_builds_and_runs(tmp_path):
    work = build_workload(tmp_path)
    for mode, n in (("burn", "5"), ("syscalls", "100"), ("touch", "1"), ("tcp", "100000"), ("sleep", "2"),
                    ("probe", "10"), ("threads", "2"), ("fork", "2")):
        r = subprocess.run([str(work), mode, n], capture_output=True, timeout=60)
        assert r.returncode == 0, (mode, r.returncode, r.stderr)
