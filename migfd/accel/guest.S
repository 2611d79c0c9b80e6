/*
 * migfd's KVM guest: 64-bit code at CPL 3 over identity-mapped RAM, no firmware, no interrupts.
 *
 * The VMM (migfd/accel/vcpu.py) loads these bytes at GUEST_CODE_ADDR (0x1000),
 * writes identity page tables into the firmware area and sets long mode
 * directly through KVM_SET_SREGS (CR0.PE|PG, CR4.PAE, EFER.LME|LMA, flat
 * segments of DPL 3), then enters each vCPU here with RSI = its index and
 * RSP = the top of its own stack. Layout and mailbox: migfd/layout.py (this
 * file must follow it).
 *
 * Why 64-bit user mode: on this project's machines KVM is nested on PVM
 * (kvm_pvm), which runs only 64-bit CPL 3 code natively; real mode, 32-bit
 * protected mode (CPL 0 or 3, with paging or without), compatibility mode
 * and 64-bit CPL 0 go through the instruction emulator, at 0.05-0.6 M loop
 * turns a second instead of ~900 M (measured 2026-12-06). At CPL 3 `hlt` is
 * privileged, so the duty cycle's idle request is an `out` to IDLE_PORT
 * (RFLAGS.IOPL = 3), which exits to the VMM as KVM_EXIT_IO.
 *
 * The loop, once per turn:
 *  - bumps the guest-progress counter at 0x7000 (all vCPUs, `lock inc`) and
 *    this vCPU's own counter at 0x7100 + 4 * index;
 *  - duty cycle: when the mailbox holds a busy time (TSC cycles) and it has
 *    passed, asks the VMM to idle (`out`); the VMM sleeps out the idle part
 *    and enters KVM_RUN again;
 *  - dirtying: when the next stamp is due (rdtsc against a per-vCPU deadline
 *    advanced by tsc-per-page), stamps the next page of its share of the
 *    working set exactly as MemoryBackendMemfd.stamp does: index,
 *    generation, check word (index ^ generation * 0x9E3779B97F4A7C15 mod
 *    2^64), the check word again in the page's last 8 bytes, then the
 *    generation table entry.
 *
 * vCPU i stamps pages i, i + n, i + 2n ... of the working set (n vCPUs), so
 * no two vCPUs ever write the same page or table entry.
 *
 * Rebuild the bytes in migfd/accel/guest_code.py after a change:
 *   python -m migfd.accel.guest_code --assemble   (needs GNU as and objcopy)
 */
    .intel_syntax noprefix
    .code64

    .set MAILBOX,          0x6000
    .set MB_NCPUS,         MAILBOX + 0x04
    .set MB_WS_FIRST,      MAILBOX + 0x08   /* first page of the working set */
    .set MB_WS_PAGES,      MAILBOX + 0x0c   /* pages in it */
    .set MB_TSC_PER_PAGE,  MAILBOX + 0x10   /* u64: cycles between two stamps of one vCPU; 0: none */
    .set MB_BUSY_TSC,      MAILBOX + 0x18   /* u64: cycles to run before idling; 0: never idle */
    .set MB_CATCHUP_TSC,   MAILBOX + 0x20   /* u32: how far behind a vCPU may catch up on stamps */
    .set PERCPU,           MAILBOX + 0x100  /* 0x40 bytes a vCPU: */
    .set C_CURSOR,         0x00             /*   u32: its next page, relative to the working set */
    .set C_INFLIGHT,       0x04             /*   u32: page being stamped + 1, 0 when none */
    .set C_NEXT,           0x08             /*   u64: TSC when the next stamp is due */
    .set C_BUSY_END,       0x10             /*   u64: TSC when the busy part ends */
    .set C_DIRTIED,        0x18             /*   u64: pages stamped */
    .set C_IDLES,          0x20             /*   u32: idle requests made */
    .set PROGRESS,         0x7000
    .set VCPU_PROGRESS,    0x7100
    .set TABLE,            0x10000
    .set GOLDEN,           0x9E3779B97F4A7C15
    .set IDLE_PORT,        0x0510

    .text
    .globl _start
_start:
    mov ebp, esi
    shl ebp, 6
    add ebp, PERCPU               /* RBP: this vCPU's block, for good */
    mov [rbp + C_CURSOR], esi

loop:
    lock inc dword ptr [PROGRESS]
    inc dword ptr [VCPU_PROGRESS + rsi * 4]

    /* duty cycle */
    mov rax, [MB_BUSY_TSC]
    test rax, rax
    jz dirty
    rdtsc
    shl rdx, 32
    or rax, rdx
    cmp rax, [rbp + C_BUSY_END]
    jb dirty                      /* still in the busy part */
    mov dx, IDLE_PORT
    out dx, al                    /* the VMM sleeps out the idle part */
    inc dword ptr [rbp + C_IDLES]
    rdtsc
    shl rdx, 32
    or rax, rdx
    add rax, [MB_BUSY_TSC]
    mov [rbp + C_BUSY_END], rax

dirty:
    mov rax, [MB_TSC_PER_PAGE]
    test rax, rax
    jz loop
    mov eax, [rbp + C_CURSOR]
    cmp eax, [MB_WS_PAGES]
    jb due
    mov [rbp + C_CURSOR], esi     /* the working set shrank: start over */
    cmp esi, [MB_WS_PAGES]
    jae loop                      /* no page of it is this vCPU's */
due:
    rdtsc
    shl rdx, 32
    or rax, rdx                   /* RAX = now */
    mov rcx, rax
    sub rcx, [rbp + C_NEXT]
    jb loop                       /* the next stamp is not due yet */
    mov edx, [MB_CATCHUP_TSC]
    cmp rcx, rdx
    jbe advance
    mov [rbp + C_NEXT], rax       /* far behind (stopped, idle, migrated): pace from now */
advance:
    mov rdx, [MB_TSC_PER_PAGE]
    add [rbp + C_NEXT], rdx

    /* stamp: RBX = page index, RCX = its new generation, RAX = check word */
    mov ebx, [rbp + C_CURSOR]
    mov eax, ebx
    add eax, [MB_NCPUS]
    cmp eax, [MB_WS_PAGES]
    jb 1f
    mov eax, esi
1:  mov [rbp + C_CURSOR], eax
    add ebx, [MB_WS_FIRST]
    lea eax, [rbx + 1]
    mov [rbp + C_INFLIGHT], eax   /* a stop may land mid-stamp: verify() skips this page */
    mov ecx, [TABLE + rbx * 4]
    inc ecx
    movabs rax, GOLDEN
    imul rax, rcx
    xor rax, rbx
    mov rdi, rbx
    shl rdi, 12                   /* the page's guest-physical (= virtual) address */
    mov [rdi], rbx
    mov [rdi + 8], rcx
    mov [rdi + 16], rax
    mov [rdi + 4088], rax
    mov [TABLE + rbx * 4], ecx
    mov dword ptr [rbp + C_INFLIGHT], 0
    inc qword ptr [rbp + C_DIRTIED]
    jmp loop
