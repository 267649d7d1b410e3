"""The hardware floor: a C cache-line ping-pong between the same two CPUs.

Compiled at run time into a temporary directory with the system C compiler, it does exactly
what the ``spin`` transport does (one writer per cache line, the target polls, the requester
times each round trip with CLOCK_MONOTONIC) without the interpreter, and buckets its samples
with the same log-linear scheme, so every transport can be reported as a ratio to it.
Where there is no compiler the floor is skipped with a note, never guessed.

Nothing outlives the CLI: the program asks for SIGKILL when its parent dies
(PR_SET_PDEATHSIG), and its directory, ``asirt-floor-<pid>-<hex>`` in the temporary
directory, holds a lock file its creator keeps locked (shared) until it is done, so
:func:`reclaim_dirs` (``asirt cleanup``, and every new floor) removes those of dead runs
exactly as shm_layout.region reclaims segments.
"""
from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
from typing import NamedTuple

import numpy as np

from asirt import histogram
from asirt.cpu.wait import SPIN_LIMIT
from asirt.errors import FeatureMissing
from shm_layout.errors import NotOurs
from shm_layout.region import Leftover, Status, creator_lock

DIR_RE = re.compile(r"asirt-floor-(\d+)-[0-9a-f]{8}", re.ASCII)
LOCK = "lock"

C_SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

/* One writer per 128-byte block, like the region's slots. */
static struct { volatile int64_t v; char pad[120]; } ping __attribute__((aligned(128))),
                                                     pong __attribute__((aligned(128)));
static volatile int stop_flag;
static int64_t counts[NBUCKETS];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int bucket(int64_t v) {   /* mirrors asirt.histogram.bucket_index */
    if (v < 0) v = 0;
    if (v < (2 << SUB_BITS)) return (int)v;
    int shift = (64 - __builtin_clzll((uint64_t)v)) - (SUB_BITS + 1);
    int64_t idx = (int64_t)shift * (1 << SUB_BITS) + (v >> shift);
    return idx >= NBUCKETS ? NBUCKETS - 1 : (int)idx;
}

static int pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *target(void *arg) {
    if (pin(*(int *)arg)) { perror("pin target"); exit(4); }
    int64_t last = 0;
    long idle = 0;
    while (!stop_flag) {
        int64_t v = __atomic_load_n(&ping.v, __ATOMIC_ACQUIRE);
        if (v != last) {
            __atomic_store_n(&pong.v, v, __ATOMIC_RELEASE);
            last = v;
            idle = 0;
        } else if (++idle > SPIN_LIMIT) {
            sched_yield();   /* spin-then-yield, as the Python transports do */
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--selftest") == 0) {   /* print bucket(v) for stdin values */
        long long v;
        while (scanf("%lld", &v) == 1) printf("%d\n", bucket(v));
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "--spin-limit") == 0) {  /* what it was compiled with */
        printf("%ld\n", (long)SPIN_LIMIT);
        return 0;
    }
    if (argc != 6) {
        fprintf(stderr, "usage: %s CPU_A CPU_B DURATION_NS OUT PARENT_PID\n", argv[0]);
        return 2;
    }
    /* Die with the CLI (kill -9, SIGHUP) rather than spin on both CPUs for the rest of the
       duration; if it died before the request took effect we have been reparented: end. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) { perror("prctl"); return 6; }
    if (getppid() != (pid_t)atoll(argv[5])) return 6;
    int a = atoi(argv[1]), b = atoi(argv[2]);
    int64_t duration = atoll(argv[3]);
    pthread_t t;
    if (pin(a)) { perror("pin requester"); return 4; }
    if (pthread_create(&t, NULL, target, &b)) { perror("pthread_create"); return 3; }
    int64_t end = now_ns() + duration, k = 0;
    while (1) {
        ++k;
        int64_t t0 = now_ns();
        __atomic_store_n(&ping.v, k, __ATOMIC_RELEASE);
        long spins = 0;
        while (__atomic_load_n(&pong.v, __ATOMIC_ACQUIRE) != k)
            if (++spins > SPIN_LIMIT) sched_yield();
        int64_t t1 = now_ns();
        counts[bucket(t1 - t0)]++;
        if (t1 >= end) break;
    }
    stop_flag = 1;
    pthread_join(t, NULL);
    FILE *f = fopen(argv[4], "wb");
    if (!f || fwrite(counts, sizeof counts, 1, f) != 1) { perror(argv[4]); return 5; }
    fclose(f);
    return 0;
}
"""


class Floor(NamedTuple):
    counts: np.ndarray   # histogram of round trips, asirt.histogram layout
    compiler: str


def compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


class CFloor:
    """A compiled floor program in a temporary directory; use as a context manager."""

    def __init__(self) -> None:
        cc = compiler()
        if cc is None:
            raise FeatureMissing("a C compiler", "no cc, gcc or clang on PATH",
                                 "install one (apt-get install gcc) to measure the hardware floor")
        self.cc = cc
        reclaim_dirs()            # what the floors of dead runs left
        self._dir, self._lock = _make_dir()
        src = os.path.join(self._dir, "floor.c")
        self.exe = os.path.join(self._dir, "floor")
        with open(src, "w") as f:
            f.write(C_SOURCE)
        cmd = [cc, "-O2", "-pthread", f"-DSUB_BITS={histogram.SUB_BITS}",
               f"-DNBUCKETS={histogram.NBUCKETS}", f"-DSPIN_LIMIT={SPIN_LIMIT}L", src,
               "-o", self.exe]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            self.close()
            raise FeatureMissing("a working C compiler", f"{cc} failed: {res.stderr.strip()[:500]}",
                                 "check the compiler installation")

    def measure(self, cpu_a: int, cpu_b: int, duration_s: float) -> Floor:
        out = os.path.join(self._dir, f"hist-{cpu_a}-{cpu_b}.bin")
        res = subprocess.run([self.exe, str(cpu_a), str(cpu_b), str(int(duration_s * 1e9)), out,
                              str(os.getpid())],
                             capture_output=True, text=True, timeout=duration_s + 60)
        if res.returncode != 0:
            raise FeatureMissing("the C floor program", res.stderr.strip()[:500] or
                                 f"exit status {res.returncode}", "see the message above")
        counts = np.fromfile(out, dtype="<i8")
        assert counts.shape == (histogram.NBUCKETS,), counts.shape
        return Floor(counts, self.cc)

    def bucket(self, values: list[int]) -> list[int]:
        """The C program's bucket index of each value (tests compare it with Python's)."""
        res = subprocess.run([self.exe, "--selftest"], input="\n".join(map(str, values)),
                             capture_output=True, text=True, timeout=60, check=True)
        return [int(x) for x in res.stdout.split()]

    def spin_limit(self) -> int:
        """The polls before yielding the C program was compiled with (asirt.cpu.wait.SPIN_LIMIT)."""
        res = subprocess.run([self.exe, "--spin-limit"], capture_output=True, text=True,
                             timeout=60, check=True)
        return int(res.stdout)

    def close(self) -> None:
        """Remove the directory, then let go of its lock; safe to call twice."""
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> "CFloor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _make_dir() -> tuple[str, int]:
    """A private directory ``asirt-floor-<pid>-<hex>`` and the descriptor of its lock file,
    locked (shared) by this process. It is made under a hidden name and renamed once
    locked, so no reclaimer ever sees it unlocked."""
    tmp = tempfile.gettempdir()
    try:
        hidden = tempfile.mkdtemp(prefix=".asirt-floor-", dir=tmp)
    except OSError as err:
        raise FeatureMissing("a writable temporary directory", f"{tmp}: {err.strerror or err}",
                             "set TMPDIR to a writable directory") from err
    fd = -1
    try:
        fd = os.open(os.path.join(hidden, LOCK), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        final = os.path.join(tmp, f"asirt-floor-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(hidden, final)
    except BaseException as err:
        shutil.rmtree(hidden, ignore_errors=True)
        if fd >= 0:
            os.close(fd)
        if isinstance(err, OSError):
            raise FeatureMissing("a writable temporary directory", f"{tmp}: "
                                 f"{err.strerror or err}",
                                 "set TMPDIR to a writable directory") from err
        raise
    return final, fd


def _reclaim_dir(path: str, pid: int) -> Leftover | None:
    """Remove one floor directory if its creator is gone; None if it vanished meanwhile."""
    lo = Leftover(path, path, "floor directory", pid, Status.SKIPPED)
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise NotOurs(f"not a directory of this user (uid {os.getuid()}): not a floor "
                          f"directory; remove it by hand if it is yours")
    except FileNotFoundError:
        return None
    except (NotOurs, OSError) as err:
        return lo._replace(why=str(err))
    try:
        with creator_lock(os.path.join(path, LOCK)) as fd:
            if fd is None:
                return lo._replace(status=Status.ACTIVE, why="in use (its creator holds its lock)")
            lo = lo._replace(status=Status.STALE, why="its creator is gone (nobody holds its lock)")
            shutil.rmtree(path)                      # while still holding the lock
            return lo._replace(removed=True)
    except FileNotFoundError:
        return lo._replace(why="has no lock file: not made by this asirt version; remove it by "
                           "hand if no floor is running")
    except NotOurs as err:
        return lo._replace(why=f"its lock file is {err}")
    except OSError as err:
        return lo._replace(why=f"cannot be examined or removed ({err.strerror or err})")


def reclaim_dirs(tmp: str | None = None) -> list[Leftover]:
    """Remove the floor directories of dead runs from ``tmp`` (the temporary directory);
    like shm_layout.region.reclaim, every one looked at is returned with what was done."""
    tmp = tmp or tempfile.gettempdir()
    try:
        entries = sorted(os.listdir(tmp))
    except OSError:
        return []
    found = (_reclaim_dir(os.path.join(tmp, e), int(m.group(1)))
             for e in entries if (m := DIR_RE.fullmatch(e)))
    return [lo for lo in found if lo is not None]
