# asirt's guest: a 16-bit real-mode loop that the host drives through a mailbox page.
#
# Every upper-case name is a layout constant of asirt/kvm/guest.py, passed to the assembler
# with --defsym (guest.py is their one source; it lists them with their values). Build:
#
#     python -m asirt.kvm.guest --regenerate     # as --32 + objcopy -O binary, then rewrites
#                                                # the bytes literal CODE in guest.py
#
# The code is position-independent (only relative jumps and calls; every address it
# touches is an absolute constant), so the flat .text bytes run wherever they are loaded;
# the host loads them at CODE_GPA and starts the vCPU there with every segment base 0, IF = 0.
#
# Each pass of the loop:
#   (a) echo seq into the output header, so the host sees which request this exit answers
#       (a pass that spun echoes the seq that started it);
#   (b) work: work_iters iterations of `dec; jnz`; WORK_FOREVER (0xffffffff) instead spins
#       until the host changes work_iters (KVM_RUN returns meanwhile only when kicked);
#   (c) if sample_len != 0: before (b) when sample_when has SAMPLE_BEFORE, after it when it
#       has SAMPLE_AFTER (both: two copies), copy sample_len bytes (at most SAMPLE_MAX, in
#       whole dwords, highest address first) from the read-only window at sample_off into
#       the output page's area for it (OUT_BEFORE, OUT_AFTER), counting each finished copy
#       in the header (OUT_COPIES): the guest, as a side-channel attacker, reading the core
#       buffer that a shared-memory region exposes;
#   (d) exit with the drawn kind: EXIT_IO: `out %al, %dx` to port IO_PORT_BASE + exit_code
#       (exit_code < 256) with the data byte exit_code; EXIT_MMIO: a 4-byte write of
#       exit_code to the unmapped MMIO_GPA (= MMIO_SEG:MMIO_OFF); EXIT_HLT: `hlt`. When the
#       host runs the vCPU again the guest continues after the exit and loops to (a).
#
# The hot path (no work, no sample, an IO exit) is 11 instructions: where real mode is
# emulated instruction by instruction (kvm_pvm, see guest.py) each costs 0.25 to 0.8 us.

	.code16
	.text
start:
	cli				# no interrupts (RFLAGS is 0x2 already; say it)
	xor	%ax, %ax
	mov	%ax, %ds		# DS = ES = SS = 0: every constant is a physical address
	mov	%ax, %es
	mov	%ax, %ss
	mov	$STACK_TOP, %sp
	cld				# string instructions count up
	jmp	top

io_exit:	# (d) EXIT_IO, placed before `top` so that the guest resumes straight into (a)
	mov	MAILBOX+MB_EXIT_CODE, %dx
	mov	%dl, %al		# data byte: the code
	add	$IO_PORT_BASE, %dx	# port: IO_PORT_BASE + code
	out	%al, %dx

top:	# (a) echo seq into the output header; the hot path skips (b) and (c) in one test
	mov	MAILBOX+MB_SEQ, %eax
	mov	%eax, OUTPUT+OUT_SEQ
	mov	MAILBOX+MB_WORK_ITERS, %ecx
	or	MAILBOX+MB_SAMPLE_LEN, %ecx
	jnz	steps

exit:	# (d) leave the guest the way the mailbox says
	cmpl	$EXIT_IO, MAILBOX+MB_EXIT_KIND
	je	io_exit
	cmpl	$EXIT_MMIO, MAILBOX+MB_EXIT_KIND
	jne	halt
	mov	MAILBOX+MB_EXIT_CODE, %eax
	mov	$MMIO_SEG, %bx
	mov	%bx, %es
	mov	%eax, %es:MMIO_OFF	# nothing is mapped there: KVM_EXIT_MMIO, 4 bytes
	xor	%bx, %bx
	mov	%bx, %es		# ES back to 0 for the sample copy
	jmp	top
halt:	hlt				# EXIT_HLT (and any unknown kind)
	jmp	top

steps:	# (c) before the work?
	movl	$0, OUTPUT+OUT_COPIES	# no copy of this pass yet
	mov	MAILBOX+MB_SAMPLE_LEN, %ecx
	jecxz	work
	testl	$SAMPLE_BEFORE, MAILBOX+MB_SAMPLE_WHEN
	jz	work
	mov	$OUTPUT+OUT_BEFORE, %edi
	call	sample

work:	# (b) work_iters iterations of the work loop
	mov	MAILBOX+MB_WORK_ITERS, %ecx
	jecxz	after
	cmp	$WORK_FOREVER, %ecx
	je	forever
1:	dec	%ecx
	jnz	1b

after:	# (c) after the work?
	mov	MAILBOX+MB_SAMPLE_LEN, %ecx
	jecxz	exit
	testl	$SAMPLE_AFTER, MAILBOX+MB_SAMPLE_WHEN
	jz	exit
	mov	$OUTPUT+OUT_AFTER, %edi
	call	sample
	jmp	exit

forever:	# WORK_FOREVER: spin until the host writes another work_iters
	cmpl	$WORK_FOREVER, MAILBOX+MB_WORK_ITERS
	je	forever
	jmp	after

sample:	# copy ECX (clamped to SAMPLE_MAX) bytes from WINDOW_SEG:sample_off to ES:EDI (the
	# output's area for this copy), four at a time (the host asks for whole words; an
	# emulated rep costs per iteration), from the highest address down: a core-buffer lane's
	# head and marks are read before its ring, the order its writer's stores need (a deposit
	# stores the ring entry, then the head), so a deposit that races the copy is seen whole
	# or not at all; then count the copy done (the host trusts only counted copies)
	cmp	$SAMPLE_MAX, %ecx
	jbe	1f
	mov	$SAMPLE_MAX, %ecx
1:	shr	$2, %ecx		# dwords (a tail of 1-3 bytes is not copied)
	mov	MAILBOX+MB_SAMPLE_OFF, %esi
	lea	-4(%esi,%ecx,4), %esi	# the last dword of each
	lea	-4(%edi,%ecx,4), %edi
	push	%ds
	mov	$WINDOW_SEG, %ax
	mov	%ax, %ds		# DS base = WINDOW_GPA; the window is at most 64 KiB
	std				# count down
	addr32	rep movsl		# DS:ESI -> ES:EDI, ECX dwords (32-bit addressing)
	cld
	pop	%ds
	incl	OUTPUT+OUT_COPIES
	ret
