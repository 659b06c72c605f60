/*
 * Multiboot headers and the 32-bit entry of Exitscope.
 *
 * Both multiboot1 (with a.out-kludge addresses, for QEMU -kernel and GRUB
 * `multiboot`) and multiboot2 (GRUB `multiboot2`, on BIOS and UEFI) enter at
 * _start32 in 32-bit protected mode with paging off, EAX = magic and
 * EBX = physical address of the boot information.
 *
 * _start32 checks for long mode, maps physical 0..4 GiB twice (identity, and
 * at KERNEL_VMA for the image), enables long mode and calls
 * exitscope_boot_main(magic, info) on the boot stack. Nothing here is used
 * again after Rust relocates the image.
 */
.set KERNEL_VMA,        0xFFFFFFFF80000000
.set MB1_MAGIC,         0x1BADB002
.set MB1_FLAGS,         0x00010003      /* page-align modules, memory info, a.out kludge */
.set MB2_MAGIC,         0xE85250D6

.section .multiboot_header, "a"
.code32
.balign 4
mb1_header:
    .long MB1_MAGIC
    .long MB1_FLAGS
    .long -(MB1_MAGIC + MB1_FLAGS)
    .long mb1_header                    /* header_addr */
    .long __boot_start                  /* load_addr */
    .long __load_end - KERNEL_VMA       /* load_end_addr */
    .long __image_end - KERNEL_VMA      /* bss_end_addr */
    .long _start32                      /* entry_addr */

.balign 8
mb2_header:
    .long MB2_MAGIC
    .long 0                             /* architecture: i386 protected mode */
    .long mb2_header_end - mb2_header
    .long -(MB2_MAGIC + (mb2_header_end - mb2_header))
    .balign 8                           /* information request, all optional */
    .short 1, 1
    .long 8 + 4 * 6
    .long 1, 3, 6, 12, 14, 15           /* cmdline, modules, mmap, EFI64 system table, ACPI old, ACPI new */
    .balign 8                           /* page-align modules */
    .short 6, 0
    .long 8
    .balign 8                           /* end */
    .short 0, 0
    .long 8
mb2_header_end:

.section .boot.text, "ax"
.code32
.global _start32
_start32:
    cli
    cld
    mov dword ptr [mb_magic], eax
    mov dword ptr [mb_info], ebx
    mov esp, offset boot_stack_top - KERNEL_VMA

    /* Long mode present? CPUID 0x80000001: EDX bit 29. */
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb no_long_mode
    mov eax, 0x80000001
    cpuid
    bt edx, 29
    jnc no_long_mode

    /* Zero the PML4 and both PDPTs (3 consecutive pages). */
    mov edi, offset boot_pml4 - KERNEL_VMA
    xor eax, eax
    mov ecx, 3 * 1024
    rep stosd

    /* PML4[0] -> low PDPT, PML4[511] -> high PDPT. */
    mov eax, offset boot_pdpt_lo - KERNEL_VMA
    or eax, 3
    mov dword ptr [boot_pml4 - KERNEL_VMA], eax
    mov eax, offset boot_pdpt_hi - KERNEL_VMA
    or eax, 3
    mov dword ptr [boot_pml4 - KERNEL_VMA + 511 * 8], eax

    /* Low PDPT[0..4] -> the four page directories (identity 0..4 GiB). */
    mov edi, offset boot_pdpt_lo - KERNEL_VMA
    mov eax, offset boot_pd - KERNEL_VMA
    or eax, 3
    mov ecx, 4
1:  mov dword ptr [edi], eax
    mov dword ptr [edi + 4], 0
    add eax, 4096
    add edi, 8
    loop 1b

    /* High PDPT[510..512] -> the first two directories: KERNEL_VMA + x maps x. */
    mov eax, offset boot_pd - KERNEL_VMA
    or eax, 3
    mov dword ptr [boot_pdpt_hi - KERNEL_VMA + 510 * 8], eax
    add eax, 4096
    mov dword ptr [boot_pdpt_hi - KERNEL_VMA + 511 * 8], eax

    /* The directories: 2048 large pages of 2 MiB, physical 0..4 GiB. */
    mov edi, offset boot_pd - KERNEL_VMA
    xor ebx, ebx                        /* physical address bits 31:21 */
    xor edx, edx                        /* bits 63:32 of the entry */
    mov ecx, 2048
2:  mov eax, ebx
    or eax, 0x83                        /* present, writable, 2 MiB page */
    mov dword ptr [edi], eax
    mov dword ptr [edi + 4], edx
    add ebx, 0x200000
    jnc 3f
    inc edx
3:  add edi, 8
    loop 2b

    /* CR3, CR4.PAE, EFER.LME, then CR0.PG (with NE set, which VMX requires). */
    mov eax, offset boot_pml4 - KERNEL_VMA
    mov cr3, eax
    mov eax, cr4
    or eax, 1 << 5
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 1 << 8
    wrmsr
    mov eax, cr0
    and eax, ~((1 << 30) | (1 << 29))   /* caches on: clear CD and NW */
    or eax, (1 << 31) | (1 << 5) | 1    /* PG, NE, PE */
    mov cr0, eax

    lgdt [boot_gdt_ptr]
    mov eax, 0x08
    push eax
    mov eax, offset long_mode_low
    push eax
    retf

no_long_mode:
    mov esi, offset msg_no_long_mode
4:  lodsb
    test al, al
    jz 6f
    mov ah, al
    mov dx, 0x3FD
5:  in al, dx
    test al, 0x20
    jz 5b
    mov al, ah
    mov dx, 0x3F8
    out dx, al
    jmp 4b
6:  cli
    hlt
    jmp 6b

.code64
long_mode_low:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    movabs rax, offset high_entry
    jmp rax

.section .boot.data, "aw"
.balign 8
mb_magic:       .long 0
mb_info:        .long 0
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08: 64-bit code */
    .quad 0x00CF92000000FFFF            /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .short boot_gdt_end - boot_gdt - 1
    .long boot_gdt
msg_no_long_mode:
    .asciz "\r\n[exitscope] FATAL: this CPU has no 64-bit long mode; Exitscope needs an x86-64 CPU with VT-x\r\n"

.section .text.boot64, "ax"
.code64
high_entry:
    lea rsp, [rip + boot_stack_top]
    xor ebp, ebp
    movabs rax, offset mb_magic
    mov edi, dword ptr [rax]
    mov esi, dword ptr [rax + 4]
    call exitscope_boot_main
7:  cli
    hlt
    jmp 7b

.section .bss.boot, "aw", @nobits
.balign 4096
boot_pml4:      .skip 4096
boot_pdpt_lo:   .skip 4096
boot_pdpt_hi:   .skip 4096
boot_pd:        .skip 4 * 4096
.balign 16
boot_stack:     .skip 64 * 1024
.global boot_stack_top
boot_stack_top:
