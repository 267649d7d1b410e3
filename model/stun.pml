/*
 * stun.pml -- asirt's strict sibling-stun handshake and VM-entry barrier, for SPIN.
 *
 * The protocol this model verifies is written down step by step, with the memory
 * ordering every step relies on, in model/README.md.  The labels in this file
 * (M, H1, H2/H3, P1, P2, B1/B3, B4, R1..R7) are the step names used there.
 *
 * One core with N sibling CPUs (N = 2, 3 or 4: spin -DN=4), D = 2 security domains.
 * Shared protocol state -- every field has exactly one writer, its owning CPU:
 *   gen[i]       stun generation of CPU i, odd = a request of i is active
 *   ack[b*N+a]   the generation of a that b has acknowledged (written by b only)
 *   dom[i]       the domain CPU i runs or returns to (0 = none/idle, 1..D);
 *                changed only while i is in HOST
 * Declared state, read by nobody in the protocol, only by the checker (monitor):
 *   mode[i]      IDLE, HOST, ASI, GUEST, STUNNED
 *
 * Every statement that touches a sibling's field is one load or one store, so SPIN
 * explores all interleavings of them under sequential consistency.  Four places
 * read several siblings' fields in one step; each is justified where it appears
 * (the predicate read is stable, so one atomic read and a pass of single loads have
 * the same outcomes).  Why the protocol needs no fence on x86-TSO: see README.md.
 *
 * Generations: the runtime uses a 64-bit counter that only grows, and ack[b][a] is a
 * copy of a's counter.  The model keeps the canonical form of that: gen[a] is 1
 * while a request is active and 0 otherwise, and a's release clears the acks of a
 * (R7).  This is exact: acks of a are only ever compared with gen[a] while gen[a] is
 * odd, and with a growing counter no earlier ack can equal a new odd generation.
 * It keeps the state space finite with unbounded rounds: every CPU loops forever.
 *
 * The core's micro-architectural buffer is a ghost (hardware, not protocol state):
 * buf_host = unrestricted-kernel data present, buf_tok[e] = data of domain e present.
 * HOST / ASI(e) / GUEST(e) deposit; a flush (R6) clears what nobody is still
 * depositing.
 *
 * Checks:
 *   S1  never mode(a) = GUEST while mode(b) = HOST          (monitor, every state)
 *   S2  never GUEST(d) beside ASI(e) or GUEST(e), e != d    (monitor, every state)
 *   S3  no host data and no data of another domain in the core buffer when a CPU
 *       enters GUEST(d)                                      (assert at B4)
 *   deadlock: pan's invalid-end-state check.  No CPU process ever terminates and
 *       only the monitor's wait is a valid end state, so a reachable state in which
 *       no CPU can move is an error.  Waits are blocking guards, never busy loops.
 *   -DNP / pan -l -f: no non-progress cycle (every fair infinite run keeps entering
 *       GUEST or HOST: no livelock).
 *   -DLIVE / pan -a -f: ltl "granted": a requester (CPU 0) waiting in R2 always
 *       eventually enters HOST (no starvation of a requester).
 *
 * Options:
 *   -DNAIVE  the requester does not wait for acks: it enters HOST right after
 *            bumping its generation (IPI delivery only).  S1 must fail.
 *   -DPEEK   the requester waits for an ack only from siblings it sees in GUEST
 *            ("load your flag" shortcut).  S1 must fail, even under SC.
 *   -DFIXDOM each CPU runs either idle or its own VM, domain 1 + (cpu % 2), instead
 *            of choosing any domain at every schedule (smaller state space; used
 *            for N = 4 by default, see README.md).
 */

#ifndef N
#define N 2
#endif
#if N < 2 || N > 4
#error "N must be 2, 3 or 4"
#endif
#define D 2       /* S3_OK, RUNS1/RUNS2 and R6 below are written out for two domains */
#if D != 2
#error "the model is written for D = 2 domains"
#endif

#define IDLE    0
#define HOST    1
#define ASI     2
#define GUEST   3
#define STUNNED 4

#define me _pid            /* CPU processes are pids 0..N-1 */

byte mode[N];
byte dom[N];
byte gen[N];
byte ack[N*N];

bool buf_host;
bool buf_tok[D+1];

/* ---- expressions over all CPUs, expanded for N = 2..4 ---- */
#if N >= 3
#define OR3(P)  || P(2)
#define AND3(P) && P(2)
#define SEQ3(P) ; P(2)
#define PAIRS3(P) || P(0,2) || P(2,0) || P(1,2) || P(2,1)
#else
#define OR3(P)
#define AND3(P)
#define SEQ3(P)
#define PAIRS3(P)
#endif
#if N >= 4
#define OR4(P)  || P(3)
#define AND4(P) && P(3)
#define SEQ4(P) ; P(3)
#define PAIRS4(P) || P(0,3) || P(3,0) || P(1,3) || P(3,1) || P(2,3) || P(3,2)
#else
#define OR4(P)
#define AND4(P)
#define SEQ4(P)
#define PAIRS4(P)
#endif
#define ANY(P)   (P(0) || P(1) OR3(P) OR4(P))
#define ALL(P)   (P(0) && P(1) AND3(P) AND4(P))
#define EACH(P)  P(0); P(1) SEQ3(P) SEQ4(P)
#define PAIRS(P) (P(0,1) || P(1,0) PAIRS3(P) PAIRS4(P))

#define ACTIVE(j)  (gen[j] & 1)

/* A request of j that this CPU has not acknowledged.  Stable: once true it stays
 * true until this CPU acks (j cannot release before it has this CPU's ack), so
 * testing the disjunction in one step has the outcomes of a pass of single loads. */
#define PEND(j)      ((j) != me && ACTIVE(j) && ack[me*N + (j)] != gen[j])
#define ANY_PENDING  ANY(PEND)

/* Sibling j has acknowledged my current request.  Stable while I wait (nobody but
 * me clears it, at my release), so one step = a pass of single loads. */
#define ACKED(j)     ((j) == me || ack[(j)*N + me] == gen[me])
#define ALL_ACKED    ALL(ACKED)

/* Ack every pending request: per pending j, load gen[j] and store ack[me][j].
 * gen[j] cannot change between the two (j waits for this ack). */
#define ACK1(j)      if :: PEND(j) -> ack[me*N + (j)] = gen[j] :: else -> skip fi
#define ACK_PENDING  EACH(ACK1)
#define CLR(j)       ack[(j)*N + me] = 0
#define CLEAR_ACKS   EACH(CLR)

/* barrier helpers: visit the siblings in index order, skipping me */
#define FIRST        (me == 0 -> 1 : 0)
#define NEXT(j)      ((j) + 1 == me -> (j) + 2 : (j) + 1)
#define FOREIGN(j)   (dom[j] != 0 && dom[j] != dom[me])

/* safety predicates (mode is the declared state the checker reads) */
#define S1BAD(a,b)   (mode[a] == GUEST && mode[b] == HOST)
#define S2BAD(a,b)   (mode[a] == GUEST && (mode[b] == ASI || mode[b] == GUEST) && dom[b] != dom[a])
#define S1_VIOLATED  PAIRS(S1BAD)
#define S2_VIOLATED  PAIRS(S2BAD)
#define S3_OK        (!buf_host && (dom[me] == 1 || !buf_tok[1]) && (dom[me] == 2 || !buf_tok[2]))

/* ghost helpers for the flush */
#define IN_HOST(j)   (mode[j] == HOST)
#define RUNS1(j)     ((mode[j] == ASI || mode[j] == GUEST) && dom[j] == 1)
#define RUNS2(j)     ((mode[j] == ASI || mode[j] == GUEST) && dom[j] == 2)

active [N] proctype cpu()
{
    byte j = 0;     /* index of the sibling being read (0 when unused) */

M:  /* main loop, mode IDLE (dom 0) or ASI(dom).  Safe point: stuns first. */
    if
    :: ANY_PENDING -> goto handle
    :: !ANY_PENDING && dom[me] != 0 -> goto barrier       /* run the vCPU */
    :: !ANY_PENDING -> goto request                       /* asi_exit / schedule() */
    :: !ANY_PENDING && dom[me] != 0 && mode[me] == ASI -> goto goidle   /* idle, no HOST */
    fi;

    /* ---------------- stun handling (safe point, or IPI in GUEST) ---------------- */
handle:
    if
    :: mode[me] == IDLE ->
H1:     d_step { ACK_PENDING };               /* idle: woken, acks, sleeps again */
        goto M
    :: else ->
H2:     d_step {                              /* guest code stopped (VM exit) */
            mode[me] = STUNNED;               /* H2: store mode, THEN ...          */
            ACK_PENDING                       /* H3: store ack[me][a] = gen[a]     */
        }
    fi;
P1: /* parked: leave only after one pass over the siblings sees every gen even;
     * new requests are acked at once (so concurrent requesters cannot deadlock) */
    j = 0;
    do
    :: ANY_PENDING -> d_step { ACK_PENDING }
    :: j < N && (j == me || !ACTIVE(j)) -> j++        /* load gen[j] */
    :: j == N -> break
    od;
P2: j = 0;
    d_step { mode[me] = ASI; buf_tok[dom[me]] = 1 }   /* unpark: back to ASI, not GUEST */
    goto M;

    /* ---------------- VM-entry barrier (mode ASI(d), d != 0) ---------------- */
barrier:
    j = FIRST;
B1: do      /* B1 and B3 of each sibling as two loads, as the runtime does them */
    :: j == N -> break
    :: j < N ->
        if
        :: ACTIVE(j) -> goto bfail                     /* B1: load gen[j]: active */
        :: else -> skip
        fi;
        if
        :: FOREIGN(j) -> goto bdom                     /* B3: then load dom[j] */
        :: else -> j = NEXT(j)
        fi
    od;
    /* (A sibling's dom may change between the two loads: in its HOST period, which
     * needs my ack, or on its way to idle (goidle), which keeps dom until its flush.
     * B2, the runtime's defensive "mode[j] != HOST", is deliberately not modelled:
     * the protocol must be, and is, safe without it.) */
B4: j = 0;
    d_step {
        mode[me] = GUEST;                     /* VM entry */
        if                                    /* S3, unless S1/S2 already broke */
        :: !(S3_OK || S1_VIOLATED || S2_VIOLATED) ->
            printf("MONITOR: S3 violated (VM entry with foreign data in the core buffer)\n");
            assert(false)
        :: else -> skip
        fi;
        buf_tok[dom[me]] = 1
    }
progress_guest:
    if
    :: ANY_PENDING -> goto handle             /* IPI: forced VM exit, then H2/H3 */
    :: mode[me] = ASI; goto M                 /* ordinary VM exit */
    fi;
bfail:                                        /* a stun is active: safe point next */
    j = 0;
    goto M;
bdom:                                         /* another domain on the core: core */
    j = 0;                                    /* scheduling must switch or idle */
    goto request;

    /* ---------------- a lane goes idle without the kernel (VcpuLoop._go_idle) ---------- */
goidle:
#if defined(HOLD)
    /* broken on purpose: R1 without R2 (Stun.hold), IDLE and dom 0 at once, R6, R7:
     * a sibling between its B1 and B3 loads enters another VM over our data (S3) */
    gen[me] = 1;
    d_step { mode[me] = IDLE; dom[me] = 0 };
    atomic { buf_host = ANY(IN_HOST); buf_tok[1] = ANY(RUNS1); buf_tok[2] = ANY(RUNS2) };
    d_step { gen[me] = 0; CLEAR_ACKS };
#else
    /* State.go_idle: IDLE keeping dom (B3 still refuses other VMs), flush, then dom 0 */
    mode[me] = IDLE;
    atomic { buf_host = ANY(IN_HOST); buf_tok[1] = ANY(RUNS1); buf_tok[2] = ANY(RUNS2) };
    dom[me] = 0;
#endif
    goto M;

    /* ---------------- requester: asi_exit ... asi_enter ---------------- */
request:  /* mode IDLE or ASI */
R1: gen[me] = 1;                              /* bump to odd; then send the IPIs */
#if defined(NAIVE)
    skip;                                     /* delivery only: no wait */
#elif defined(PEEK)
    j = FIRST;
    do
    :: j == N -> break
    :: j < N && mode[j] != GUEST -> j = NEXT(j)        /* load mode[j]: skip non-guests */
    :: j < N && mode[j] == GUEST ->
        do
        :: ack[j*N + me] == gen[me] -> break
        :: ack[j*N + me] != gen[me] && ANY_PENDING -> d_step { ACK_PENDING }
        od;
        j = NEXT(j)
    od;
    j = 0;
#else
R2: do                                        /* wait for EVERY sibling's ack */
    :: ALL_ACKED -> break                     /* load ack[j][me], all j */
    :: !ALL_ACKED && ANY_PENDING -> d_step { ACK_PENDING }   /* ack others at once */
    od;
#endif
R3: atomic {
        mode[me] = HOST;                      /* enter the unrestricted kernel */
        buf_host = 1                          /* touch sensitive data */
    }
progress_host:
R4: atomic {
        if                                    /* schedule() may switch domain or idle */
        :: dom[me] = 0
#ifdef FIXDOM
        :: dom[me] = 1 + (me & 1)
#else
        :: dom[me] = 1
        :: dom[me] = 2
#endif
        fi;
R5:     if                                    /* asi_enter: leave HOST */
        :: dom[me] == 0 -> mode[me] = IDLE
        :: else -> mode[me] = ASI; buf_tok[dom[me]] = 1
        fi;
R6:     buf_host = ANY(IN_HOST);              /* flush the core buffer */
        buf_tok[1] = ANY(RUNS1);
        buf_tok[2] = ANY(RUNS2)
    };
R7: d_step {                                  /* bump to even: release */
        gen[me] = 0;
        CLEAR_ACKS                            /* canonical form, see header */
    }
    goto M
}

active proctype monitor()
{
end_mon:
    atomic {
        (S1_VIOLATED || S2_VIOLATED) ->
        if
        :: S1_VIOLATED -> printf("MONITOR: S1 violated (GUEST beside HOST)\n")
        :: else -> printf("MONITOR: S2 violated (GUEST beside another domain)\n")
        fi;
        assert(false)
    }
}

#ifdef LIVE
/* a requester waiting for acks always eventually enters HOST (pan -a -f) */
ltl granted { [] ((cpu[0]@R2) -> <> (mode[0] == HOST)) }
#endif
