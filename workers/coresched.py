"""User-level core scheduling alone: ``python -m workers --role coresched``.

Each CPU runs tasks of cookies drawn from ``cookies`` (shown as GUEST(cookie), so the monitor
checks S2 on them), admitted by asirt.sync.coresched.CoreSched (forced idle measured in
``forced_idle``) -- or, with ``enforce`` false, not admitted at all (the broken variant the
monitor must catch).
"""
from __future__ import annotations

from asirt.cpu import GUEST, IDLE
from asirt.params import CoreschedParams
from asirt.sync.corelock import CoreLock
from asirt.sync.coresched import CoreSched
from shm_layout.header import STOP_WORD
from workers.context import WorkerContext, make_delay

PARAMS = CoreschedParams


def run(ctx: WorkerContext, prepared: None) -> None:
    p: CoreschedParams = ctx.params
    rng = ctx.rng(p.seed)
    delay = make_delay(rng, p.delays) if p.delays is not None else None
    cpu = ctx.make_cpu(p.cpu, delay)
    lock = CoreLock(cpu)
    cs = CoreSched(cpu, lock, int(p.patience_us * 1000), ctx.recorder("forced_idle"))
    cpu.start()
    w = ctx.words
    samples_i = ctx.slot_word(ctx.slot, "samples")
    tasks = 0
    try:
        while not w[STOP_WORD]:
            cookie = rng.choice(p.cookies)
            if p.enforce and not cs.run_task(cookie, 50_000_000):
                continue
            cpu.state.set(GUEST, cookie)          # running a task of this cookie
            if cpu.checker is not None:
                cpu.checker.guest_exit()          # S1/S2 against the siblings, now
            for _ in range(rng.randrange(1, 50)):
                if delay:
                    delay()
                if p.enforce and (cs.yield_now or cs.answer()):
                    break
            cpu.state.set(IDLE, 0)
            if p.enforce:
                cs.stop_task()
            tasks += 1
            if tasks % 64 == 0:
                w[samples_i] = tasks
                cpu.publish_progress()
        w[samples_i] = tasks
    finally:
        cpu.publish_progress()
        lock.close()
        cpu.close()
