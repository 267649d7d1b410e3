"""The hardware floor for real VM exits: the I/O-exit loop of asirt's guest driven from C.

A C program, compiled at run time into a temporary directory like ``asirt.cfloor``'s
ping-pong, creates its own VM through /dev/kvm with the same guest bytes and mailbox as the
Python side (``asirt.kvm.guest``; the host passes the whole initial RAM image in a file),
pins itself to one CPU, and runs the guest's IO exit (work_iters 0, nothing sampled) for a
duration. Each sample is CLOCK_MONOTONIC around one KVM_RUN plus the decoding a VMM must do
anyway (exit reason, port, data byte, checked); samples are bucketed in C exactly like
``asirt.histogram`` (the same log-linear scheme; tests compare the two), so Python's
``measure_exit_roundtrip`` can be reported as a ratio to it, measured on the same CPU.

The child gets PR_SET_PDEATHSIG(SIGKILL) (prctl(2)) and checks its parent is still the one
that started it (the parent may die before the prctl); ``subprocess.run`` kills and reaps it
on a timeout or any exception; the temporary directory is removed by ``close()`` on every
exit path, including a failed compile. Where there is no compiler (or no <linux/kvm.h>) or
no usable KVM, FeatureMissing says so; the floor is never guessed.

``CProgram`` and ``C_HELPERS`` are the parts ``asirt.cfloor`` repeats today (compile into a
temporary directory, the bucket function, the clock, pinning, the bucket self-test mode).

Imports numpy, asirt.histogram, asirt.cfloor (compiler discovery) and asirt.kvm.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from typing import Iterable, Mapping, Self

import numpy as np

from asirt import histogram
from asirt.cfloor import compiler
from asirt.errors import FeatureMissing
from asirt.kvm import guest, vm
from asirt.kvm.vm import ExitKind

__all__ = ["C_HELPERS", "CProgram", "ExitFloor", "EXIT_CODE"]

#: what every floor program shares: the clock, the bucketing of asirt.histogram, pinning,
#: dying with the parent, and a self-test that prints bucket(v) for each value on stdin
C_HELPERS = r"""
#define _GNU_SOURCE
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

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

static int bucket_selftest(void) {
    long long v;
    while (scanf("%lld", &v) == 1) printf("%d\n", bucket(v));
    return 0;
}

static int pin_thread(int cpu) {   /* sched_setaffinity(0) pins the calling thread */
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof set, &set);
}

static void die_with_parent(pid_t parent) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) { perror("prctl(PR_SET_PDEATHSIG)"); exit(4); }
    if (getppid() != parent) exit(4);   /* the parent died before the prctl */
}
"""

#: the IO exit code the floor's guest makes (any 0..255 would do)
EXIT_CODE = 0x5A

EXIT_LOOP = r"""
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

static int64_t counts[NBUCKETS];

static void die(const char *what) { perror(what); exit(3); }

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "--selftest") == 0) return bucket_selftest();
    if (argc != 6) {
        fprintf(stderr, "usage: %s CPU DURATION_NS RAM_IMAGE PARENT_PID OUT\n", argv[0]);
        return 2;
    }
    die_with_parent((pid_t)atol(argv[4]));
    if (pin_thread(atoi(argv[1]))) { perror("sched_setaffinity"); return 4; }
    int64_t duration = atoll(argv[2]);

    uint8_t *ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                        -1, 0);
    if (ram == MAP_FAILED) die("mmap guest RAM");
    FILE *image = fopen(argv[3], "rb");
    if (!image || fread(ram, 1, RAM_SIZE, image) != RAM_SIZE) die(argv[3]);
    fclose(image);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vmfd = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vmfd < 0) die("KVM_CREATE_VM");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = RAM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)ram};
    if (ioctl(vmfd, KVM_SET_USER_MEMORY_REGION, &region)) die("KVM_SET_USER_MEMORY_REGION");
    int cpu = ioctl(vmfd, KVM_CREATE_VCPU, 0);
    if (cpu < 0) die("KVM_CREATE_VCPU");
    int size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (size < (int)sizeof(struct kvm_run)) die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, cpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");

    /* real mode at ENTRY, as asirt.kvm.vm.Vcpu.reset() */
    struct kvm_sregs sregs;
    if (ioctl(cpu, KVM_GET_SREGS, &sregs)) die("KVM_GET_SREGS");
    struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs,
                                  &sregs.ss};
    for (size_t i = 0; i < sizeof segs / sizeof segs[0]; i++) segs[i]->base = segs[i]->selector = 0;
    if (ioctl(cpu, KVM_SET_SREGS, &sregs)) die("KVM_SET_SREGS");
    struct kvm_regs regs = {.rip = ENTRY, .rsp = STACK, .rflags = 0x2};
    if (ioctl(cpu, KVM_SET_REGS, &regs)) die("KVM_SET_REGS");

    const volatile uint8_t *base = (const volatile uint8_t *)run;
    int64_t end = 0;
    for (long k = -(long)WARMUP;; k++) {   /* the first exits fault the guest in: not samples */
        int64_t t0 = now_ns();
        int rc = ioctl(cpu, KVM_RUN, 0);
        if (rc == 0 && run->exit_reason == KVM_EXIT_IO && run->io.port == IO_PORT
            && run->io.direction == KVM_EXIT_IO_OUT && base[run->io.data_offset] == IO_DATA) {
            int64_t t1 = now_ns();
            if (k == 0) end = t1 + duration;
            if (k < 0) continue;
            counts[bucket(t1 - t0)]++;
            if (t1 >= end) break;
        } else if (rc < 0 && errno == EINTR) {
            continue;   /* a signal: not an exit of the guest */
        } else {
            fprintf(stderr, "KVM_RUN returned %d (%s), exit_reason %u, port %#x: not the "
                    "guest's IO exit\n", rc, rc < 0 ? strerror(errno) : "ok", run->exit_reason,
                    run->io.port);
            return 6;
        }
    }
    FILE *out = fopen(argv[5], "wb");
    if (!out || fwrite(counts, sizeof counts, 1, out) != 1 || fclose(out)) die(argv[5]);
    return 0;
}
"""


class CProgram:
    """``source`` compiled with ``defines`` into its own temporary directory, removed by
    ``close()`` (also when the compile fails); a context manager."""

    def __init__(self, name: str, source: str, defines: Mapping[str, object]) -> None:
        cc = compiler()
        if cc is None:
            raise FeatureMissing("a C compiler", "no cc, gcc or clang on PATH",
                                 "install one (apt-get install gcc) to measure the floor")
        self.name, self.cc = name, cc
        self._dir = tempfile.TemporaryDirectory(prefix=f"asirt-{name}-")
        try:
            src = self.path(f"{name}.c")
            self.exe = self.path(name)
            with open(src, "w") as f:
                f.write(source)
            cmd = [cc, "-O2", *(f"-D{k}={v}" for k, v in defines.items()), src, "-o", self.exe]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise FeatureMissing("a working C compiler", f"{cc} failed on the {name} "
                                     f"program: {res.stderr.strip()[:500]}",
                                     "check the compiler and the kernel headers "
                                     "(apt-get install gcc linux-libc-dev)")
        except BaseException:
            self.close()
            raise

    @property
    def directory(self) -> str:
        return self._dir.name

    def path(self, name: str) -> str:
        return os.path.join(self._dir.name, name)

    def run(self, args: Iterable[object], timeout: float, stdin: str | None = None) -> str:
        """Run the program; its stdout. A non-zero status raises FeatureMissing with its
        stderr. On a timeout or any exception the child is killed and reaped."""
        res = subprocess.run([self.exe, *map(str, args)], input=stdin, capture_output=True,
                             text=True, timeout=timeout)
        if res.returncode != 0:
            raise FeatureMissing(f"the {self.name} program", res.stderr.strip()[:500] or
                                 f"exit status {res.returncode}", "see the message above")
        return res.stdout

    def bucket(self, values: Iterable[int]) -> list[int]:
        """The program's bucket index of each value (C_HELPERS' ``--selftest`` mode)."""
        out = self.run(["--selftest"], timeout=60, stdin="\n".join(map(str, values)))
        return [int(x) for x in out.split()]

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ram_image(exit_code: int = EXIT_CODE) -> bytes:
    """Guest RAM as the floor starts it: the program at CODE_GPA and a mailbox asking for
    IO exits with ``exit_code``, no work, no sample."""
    image = bytearray(guest.RAM_SIZE)
    image[guest.CODE_GPA:guest.CODE_GPA + len(guest.CODE)] = guest.CODE
    guest.Mailbox(image).post(guest.Request(seq=0, exit_kind=ExitKind.IO, exit_code=exit_code))
    return bytes(image)


class ExitFloor(CProgram):
    """The compiled exit-floor program; a context manager. ``measure(cpu, s)`` -> counts."""

    #: exits run before sampling starts (the first ones fault the guest's pages in)
    WARMUP = 100

    def __init__(self, path: str = vm.DEFAULT_PATH) -> None:
        support = vm.probe(path)
        if not support.usable:
            raise FeatureMissing("a usable KVM device", support.reason,
                                 "the exit floor needs /dev/kvm")
        defines = {"SUB_BITS": histogram.SUB_BITS, "NBUCKETS": histogram.NBUCKETS,
                   "RAM_SIZE": guest.RAM_SIZE, "ENTRY": guest.CODE_GPA,
                   "STACK": guest.STACK_TOP, "IO_PORT": guest.IO_PORT_BASE + EXIT_CODE,
                   "IO_DATA": EXIT_CODE, "WARMUP": self.WARMUP}
        super().__init__("exitfloor", C_HELPERS + EXIT_LOOP, defines)
        try:
            self._image = self.path("ram.bin")
            with open(self._image, "wb") as f:
                f.write(ram_image())
        except BaseException:
            self.close()
            raise

    def measure(self, cpu: int, duration_s: float) -> np.ndarray:
        """IO exit round trips on ``cpu`` for ``duration_s``: an asirt.histogram counts array."""
        out = self.path(f"hist-{cpu}.bin")
        self.run([cpu, int(duration_s * 1e9), self._image, os.getpid(), out],
                 timeout=duration_s + 60)
        counts = np.fromfile(out, dtype="<i8")
        os.unlink(out)
        if counts.shape != (histogram.NBUCKETS,):
            raise FeatureMissing("the exitfloor program", f"it wrote {counts.size} counts, "
                                 f"not {histogram.NBUCKETS}", "rebuild it")
        return counts
