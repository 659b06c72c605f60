//! Multiboot1 header, 32-bit entry and the switch to long mode.
//!
//! The loader (QEMU `-kernel`, GRUB `multiboot`, Exitscope) enters `_start`
//! in 32-bit protected mode with paging off, EAX = 0x2BADB002 and EBX = the
//! physical address of the multiboot information structure. `_start`:
//!
//! 1. keeps EAX in ESI and EBX in EBP (untouched until the Rust call);
//! 2. zeroes `.bss` (the loader must have done it; this is cheap insurance);
//! 3. builds identity page tables for 0..4 GiB with 2 MiB pages in `.bss`
//!    (one PML4, one PDPT, four page directories: 24 KiB);
//! 4. sets CR3, CR4.PAE, EFER.LME (WRMSR 0xC0000080), loads a 64-bit GDT,
//!    then sets CR0.PG|NE|MP (keeping PE; clearing EM, CD and NW);
//! 5. far-jumps to 64-bit code (selector 0x08), loads the data selectors
//!    (0x10), sets RSP to the top of a 64 KiB `.bss` stack, clears DF and
//!    calls `rust_entry(magic, info)`.
//!
//! Nothing here executes CPUID: guests may account for every CPUID they run.

use core::arch::global_asm;

/// Magic number of a multiboot1 header.
const MULTIBOOT_HEADER_MAGIC: u32 = 0x1BAD_B002;
/// Flags of the header: bit 1 (memory information wanted) and bit 16 (the
/// a.out kludge address fields are valid).
const MULTIBOOT_HEADER_FLAGS: u32 = (1 << 1) | (1 << 16);
/// Makes magic + flags + checksum = 0 (mod 2^32).
const MULTIBOOT_HEADER_CHECKSUM: u32 = 0u32.wrapping_sub(MULTIBOOT_HEADER_MAGIC.wrapping_add(MULTIBOOT_HEADER_FLAGS));

/// The 64-bit code selector of the GDT set up by `_start`.
pub(crate) const KERNEL_CS: u16 = 0x08;

global_asm!(
    r#"
    .pushsection .multiboot, "a"
    .balign 4
    .global guest_rt_multiboot_header
guest_rt_multiboot_header:
    .long {mb_magic}                      /* magic */
    .long {mb_flags}                      /* flags: MEMORY_INFO | AOUT_KLUDGE */
    .long {mb_checksum}                   /* checksum */
    .long guest_rt_multiboot_header       /* header_addr */
    .long __guest_image_start             /* load_addr */
    .long __guest_load_end                /* load_end_addr */
    .long __guest_bss_end                 /* bss_end_addr */
    .long _start                          /* entry_addr */
    .popsection

    /* Page tables (6 pages) and the boot stack, in .bss. */
    .pushsection .bss.guest_rt_pt, "aw", @nobits
    .balign 4096
guest_rt_pml4:
    .skip 4096
guest_rt_pdpt:
    .skip 4096
guest_rt_pd:
    .skip 4 * 4096
    .popsection

    .pushsection .bss.guest_rt_stack, "aw", @nobits
    .balign 16
    .global guest_rt_stack_bottom
guest_rt_stack_bottom:
    .skip 64 * 1024
    .global guest_rt_stack_top
guest_rt_stack_top:
    .popsection

    /* 64-bit GDT: null, 0x08 64-bit code, 0x10 data (accessed bits preset). */
    .pushsection .data.guest_rt_gdt, "aw"
    .balign 16
guest_rt_gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
guest_rt_gdt_end:
    .balign 2
guest_rt_gdt_ptr:
    .word guest_rt_gdt_end - guest_rt_gdt - 1
    .quad guest_rt_gdt   /* lgdt in 32-bit mode reads the low 4 bytes only */
    .popsection

    .pushsection .text.guest_rt_boot, "ax"
    .code32
    .global _start
_start:
    cli
    cld
    movl %eax, %esi                 /* multiboot magic */
    movl %ebx, %ebp                 /* multiboot info address */

    /* Zero .bss (4-byte stores; both ends are 16-byte aligned). */
    movl $__guest_bss_start, %edi
    movl $__guest_bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT */
    movl $guest_rt_pdpt, %eax
    orl $0x3, %eax                  /* present, writable */
    movl %eax, guest_rt_pml4

    /* PDPT[0..4] -> the four page directories */
    movl $guest_rt_pd, %eax
    orl $0x3, %eax
    movl $guest_rt_pdpt, %edi
    movl $4, %ecx
.Lguest_rt_pdpt_loop:
    movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    loop .Lguest_rt_pdpt_loop

    /* PD entries k = 0..2048: physical k * 2 MiB, present|writable|PS */
    movl $guest_rt_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
.Lguest_rt_pd_loop:
    movl %eax, (%edi)               /* high dword stays 0 (zeroed .bss) */
    addl $0x200000, %eax
    addl $8, %edi
    loop .Lguest_rt_pd_loop

    movl $guest_rt_pml4, %eax
    movl %eax, %cr3

    movl %cr4, %eax
    orl $(1 << 5), %eax             /* CR4.PAE */
    movl %eax, %cr4

    movl $0xC0000080, %ecx          /* IA32_EFER */
    rdmsr
    orl $(1 << 8), %eax             /* EFER.LME */
    wrmsr

    lgdt guest_rt_gdt_ptr

    movl %cr0, %eax
    andl $0x9FFFFFFB, %eax          /* clear CD (30), NW (29), EM (2) */
    orl $0x80000023, %eax           /* set PG (31), NE (5), MP (1), PE (0) */
    movl %eax, %cr0                 /* now in IA-32e compatibility mode */

    ljmp ${cs}, $guest_rt_long_mode

    .code64
guest_rt_long_mode:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movl $guest_rt_stack_top, %esp  /* zero-extends into RSP; 16-byte aligned */
    cld
    movl %esi, %edi                 /* arg 1: magic (zero-extended) */
    movl %ebp, %esi                 /* arg 2: info address */
    xorl %ebp, %ebp
    call {entry}
.Lguest_rt_dead:
    cli
    hlt
    jmp .Lguest_rt_dead
    .popsection
"#,
    mb_magic = const MULTIBOOT_HEADER_MAGIC,
    mb_flags = const MULTIBOOT_HEADER_FLAGS,
    mb_checksum = const MULTIBOOT_HEADER_CHECKSUM,
    cs = const KERNEL_CS,
    entry = sym rust_entry,
    options(att_syntax)
);

/// First Rust code: called once by `_start` in 64-bit mode.
///
/// # Safety
/// Only `_start` may call it, once, with the loader's EAX and EBX.
unsafe extern "C" fn rust_entry(magic: u32, info: u32) -> ! {
    crate::serial::init();
    crate::idt::init();
    let boot = crate::multiboot::init(magic, info);
    if !boot.is_multiboot() {
        crate::println!("GUEST WARNING: multiboot magic is {magic:#x}, not 0x2badb002; no boot info");
    }
    extern "Rust" {
        // Defined by the guest with `guest_rt::entry!`.
        fn __guest_rt_main(boot: crate::BootInfo) -> !;
    }
    // SAFETY: `entry!` defines the symbol with exactly this signature.
    unsafe { __guest_rt_main(boot) }
}
