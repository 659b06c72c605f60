/*
 * Multiboot headers and the 32-bit entry of Exitscope.
 *
 * Both multiboot1 (with a.out-kludge addresses, for QEMU -kernel and GRUB
 * `multiboot`) and multiboot2 (GRUB `multiboot2`, on BIOS and UEFI) enter at
 * _start32 in 32-bit protected mode with paging off, EAX = magic and
 * EBX = physical address of the boot information.
 *
 * Multiboot1 loads the image at its link address (1 MiB). The multiboot2
 * header carries the relocatable tag, so a multiboot2 loader may load it
 * anywhere from 1 MiB to 4 GiB on a 4 KiB boundary (under UEFI, 1 MiB is
 * often the firmware's). _start32 is position-independent: it finds the
 * load delta (load address - link address) and adds it to every physical
 * address it touches.
 *
 * _start32 checks for long mode, maps physical 0..4 GiB (identity) and the
 * image window at KERNEL_VMA + link address onto where the image really is
 * (4 KiB pages), enables long mode and calls
 * exitscope_boot_main(magic, info, load_base) on the boot stack. Nothing
 * here is used again after Rust relocates the image.
 */
.set KERNEL_VMA,        0xFFFFFFFF80000000
.set MB1_MAGIC,         0x1BADB002
.set MB1_FLAGS,         0x00010003      /* page-align modules, memory info, a.out kludge */
.set MB2_MAGIC,         0xE85250D6
.set MB2_LOADER_MAGIC,  0x36D76289      /* EAX from a multiboot2 loader */

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
    /* Relocatable (optional: a loader without it loads at the link address):
     * load anywhere from 1 MiB to 4 GiB, 4 KiB-aligned, as low as possible.
     * The header checksum does not cover tags; the probe-relocated test
     * patches min_addr in a copy of the ELF. */
    .balign 8
    .short 10, 1
    .long 24
    .long 0x100000                      /* min_addr */
    .long 0xFFFFFFFF                    /* max_addr (the image's end) */
    .long 0x1000                        /* align */
    .long 1                             /* preference: low */
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
    /*
     * EBP = load delta: 0 unless a multiboot2 loader relocated the image.
     * Finding it takes a call, but ESP is undefined at entry: the first
     * 8 bytes of the multiboot2 information (total_size, reserved) serve
     * as the stack for it, and the word it overwrites is restored.
     */
    xor ebp, ebp
    cmp eax, MB2_LOADER_MAGIC
    jne .Lhave_delta
    mov ecx, dword ptr [ebx + 4]
    lea esp, [ebx + 8]
    call .Lhere
.Lhere:
    pop ebp
    sub ebp, offset .Lhere
    mov dword ptr [ebx + 4], ecx
    /* The page tables below map 4 KiB pages. */
    test ebp, 0xFFF
    jz .Lhave_delta
    lea esi, [ebp + msg_misaligned]
    jmp fatal32
.Lhave_delta:
    mov dword ptr [ebp + mb_magic], eax
    mov dword ptr [ebp + mb_info], ebx
    lea esp, [ebp + boot_stack_top - KERNEL_VMA]

    /* Long mode present? CPUID 0x80000001: EDX bit 29. */
    mov eax, 0x80000000
    cpuid
    cmp eax, 0x80000001
    jb no_long_mode
    mov eax, 0x80000001
    cpuid
    bt edx, 29
    jnc no_long_mode

    /* Zero the PML4, both PDPTs and the window's directory (4 consecutive pages). */
    lea edi, [ebp + boot_pml4 - KERNEL_VMA]
    xor eax, eax
    mov ecx, 4 * 1024
    rep stosd

    /* PML4[0] -> low PDPT, PML4[511] -> high PDPT. */
    lea eax, [ebp + boot_pdpt_lo - KERNEL_VMA]
    or eax, 3
    mov dword ptr [ebp + boot_pml4 - KERNEL_VMA], eax
    lea eax, [ebp + boot_pdpt_hi - KERNEL_VMA]
    or eax, 3
    mov dword ptr [ebp + boot_pml4 - KERNEL_VMA + 511 * 8], eax

    /* Low PDPT[0..4] -> the four page directories (identity 0..4 GiB). */
    lea edi, [ebp + boot_pdpt_lo - KERNEL_VMA]
    lea eax, [ebp + boot_pd - KERNEL_VMA]
    or eax, 3
    mov ecx, 4
1:  mov dword ptr [edi], eax
    mov dword ptr [edi + 4], 0
    add eax, 4096
    add edi, 8
    loop 1b

    /* The identity directories: 2048 large pages of 2 MiB, physical 0..4 GiB. */
    lea edi, [ebp + boot_pd - KERNEL_VMA]
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

    /* High PDPT[510] -> the window's directory (KERNEL_VMA + 0..1 GiB). */
    lea eax, [ebp + boot_pd_hi - KERNEL_VMA]
    or eax, 3
    mov dword ptr [ebp + boot_pdpt_hi - KERNEL_VMA + 510 * 8], eax

    /* Its entries from the 2 MiB boundary below __image_start on -> the
     * page tables in .boot_pt. */
    mov eax, offset __image_start - KERNEL_VMA
    shr eax, 21
    lea edi, [ebp + eax * 8 + boot_pd_hi - KERNEL_VMA]
    lea eax, [ebp + __boot_pt_start - KERNEL_VMA]
    or eax, 3
    mov ecx, offset __boot_pt_pages
.Lpde:
    mov dword ptr [edi], eax
    add eax, 4096
    add edi, 8
    loop .Lpde

    /* The page tables: KERNEL_VMA + x -> x + delta, 4 KiB pages (the
     * image lies below 4 GiB, so 32-bit sums are exact for it). */
    lea edi, [ebp + __boot_pt_start - KERNEL_VMA]
    mov eax, offset __image_start - KERNEL_VMA
    and eax, ~0x1FFFFF
    add eax, ebp
    or eax, 3
    mov ecx, offset __boot_pt_pages
    shl ecx, 9
.Lpte:
    mov dword ptr [edi], eax
    mov dword ptr [edi + 4], 0
    add eax, 4096
    add edi, 8
    loop .Lpte

    /* CR3, CR4.PAE, EFER.LME, then CR0.PG (with NE set, which VMX requires). */
    lea eax, [ebp + boot_pml4 - KERNEL_VMA]
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

    lea eax, [ebp + boot_gdt]
    mov dword ptr [ebp + boot_gdt_ptr + 2], eax
    lgdt [ebp + boot_gdt_ptr]
    mov eax, 0x08
    push eax
    lea eax, [ebp + long_mode_low]
    push eax
    retf

no_long_mode:
    lea esi, [ebp + msg_no_long_mode]
    /* Prints the message at ESI on COM1 and halts. */
fatal32:
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
    /* The upper halves are undefined after the switch. */
    mov ebp, ebp
    mov edi, dword ptr [rbp + mb_magic]
    mov esi, dword ptr [rbp + mb_info]
    lea edx, [rbp + __boot_start]       /* the load address */
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
    .long 0                             /* base: set at run time */
msg_misaligned:
    .asciz "\r\n[exitscope] FATAL: the boot loader put the image at an address that is not 4 KiB-aligned, against its multiboot2 header\r\n"
msg_no_long_mode:
    .asciz "\r\n[exitscope] FATAL: this CPU has no 64-bit long mode; Exitscope needs an x86-64 CPU with VT-x\r\n"

.section .text.boot64, "ax"
.code64
high_entry:
    /* EDI = magic, ESI = info, EDX = load address (from long_mode_low). */
    lea rsp, [rip + boot_stack_top]
    xor ebp, ebp
    call exitscope_boot_main
7:  cli
    hlt
    jmp 7b

.section .bss.boot, "aw", @nobits
.balign 4096
boot_pml4:      .skip 4096
boot_pdpt_lo:   .skip 4096
boot_pdpt_hi:   .skip 4096
boot_pd_hi:     .skip 4096
boot_pd:        .skip 4 * 4096
.balign 16
boot_stack:     .skip 64 * 1024
.global boot_stack_top
boot_stack_top:
