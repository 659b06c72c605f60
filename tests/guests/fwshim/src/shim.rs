//! The chain loader (see the crate documentation).

use core::arch::global_asm;
use guest_rt::{halt_forever, println, BootInfo};

const MB1_HEADER_MAGIC: u32 = 0x1BAD_B002;
const MB1_BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
const MSR_FEATURE_CONTROL: u32 = 0x3A;

/// Most modules passed on, bytes of strings kept, memory-map bytes kept.
const MAX_MODULES: usize = 16;
const STRINGS: usize = 4096;
const MMAP_BYTES: usize = 2048;

fn fail(what: core::fmt::Arguments<'_>) -> ! {
    println!("FWSHIM FAIL: {what}");
    halt_forever()
}

fn rd32(a: u64) -> u32 {
    // SAFETY: boot-loader data below 4 GiB, identity-mapped by guest-rt.
    unsafe { core::ptr::read_unaligned(a as *const u32) }
}

fn wr32(a: u64, v: u32) {
    // SAFETY: the shim's staging area, in RAM it checked.
    unsafe { core::ptr::write_unaligned(a as *mut u32, v) }
}

fn copy(dst: u64, src: u64, len: u64) {
    // SAFETY: both ranges are RAM the caller owns now (see main).
    unsafe { core::ptr::copy(src as *const u8, dst as *mut u8, len as usize) }
}

fn zero(dst: u64, len: u64) {
    // SAFETY: as for copy.
    unsafe { core::ptr::write_bytes(dst as *mut u8, 0, len as usize) }
}

/// Appends the NUL-terminated string at `pa` to `buf`; returns its offset.
fn keep_string(buf: &mut [u8; STRINGS], used: &mut usize, pa: u64) -> usize {
    let start = *used;
    let mut i = 0;
    while pa != 0 && i < 1024 && *used + 1 < STRINGS {
        // SAFETY: a loader string below 4 GiB.
        let b = unsafe { core::ptr::read_volatile((pa + i) as *const u8) };
        if b == 0 {
            break;
        }
        buf[*used] = b;
        *used += 1;
        i += 1;
    }
    buf[*used] = 0;
    *used += 1;
    start
}

/// Sets byte `at` of `len` bytes at `pa` so that they sum to 0.
fn fix_checksum(pa: u64, len: u64, at: u64) {
    let sum = (0..len).filter(|&i| i != at).fold(0u8, |s, i| {
        // SAFETY: bytes the shim just wrote.
        s.wrapping_add(unsafe { core::ptr::read_volatile((pa + i) as *const u8) })
    });
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile((pa + at) as *mut u8, 0u8.wrapping_sub(sum)) };
}

/// An ACPI table header (36 bytes) at `pa`, checksum left for later.
fn table_header(pa: u64, sig: &[u8; 4], len: u32) {
    zero(pa, len as u64);
    copy(pa, sig.as_ptr() as u64, 4);
    wr32(pa + 4, len);
    // SAFETY: the table's revision byte, just zeroed.
    unsafe { core::ptr::write_volatile((pa + 8) as *mut u8, 1) };
    copy(pa + 10, b"FWSHIM".as_ptr() as u64, 6);
}

/// Writes an RSDT at `at` pointing to a MADT (right after it) with `cpus`
/// enabled local APICs (ids 0..cpus), and an ACPI 1.0 RSDP pointing to the
/// RSDT in the EBDA's first KiB, where Exitscope looks for it. Returns the
/// RSDP's address. (Nothing uses the BIOS's EBDA data after the loader.)
fn write_madt(at: u64, cpus: u8) -> u64 {
    let (rsdt, madt) = (at, at + 0x100);
    let madt_len = 44 + 8 * cpus as u32;
    table_header(madt, b"APIC", madt_len);
    wr32(madt + 36, 0xFEE0_0000);
    for i in 0..cpus as u64 {
        // Processor local APIC: type 0, length 8, processor id, APIC id, enabled.
        wr32(madt + 44 + 8 * i, (i as u32) << 24 | (i as u32) << 16 | 8 << 8);
        wr32(madt + 48 + 8 * i, 1);
    }
    fix_checksum(madt, madt_len as u64, 9);
    table_header(rsdt, b"RSDT", 40);
    wr32(rsdt + 36, madt as u32);
    fix_checksum(rsdt, 40, 9);
    // SAFETY: the BIOS data area word at 0x40E (the EBDA segment).
    let ebda = (unsafe { core::ptr::read_volatile(0x40E as *const u16) } as u64) << 4;
    if !(0x8_0000..0xA_0000).contains(&ebda) {
        fail(format_args!("no EBDA for the RSDP (segment word {:#x})", ebda >> 4));
    }
    let rsdp = ebda + 0x3E0;
    zero(rsdp, 20);
    copy(rsdp, b"RSD PTR ".as_ptr() as u64, 8);
    copy(rsdp + 9, b"FWSHIM".as_ptr() as u64, 6);
    wr32(rsdp + 16, rsdt as u32);
    fix_checksum(rsdp, 20, 8);
    rsdp
}

unsafe extern "C" {
    static __guest_bss_end: u8;
    fn fwshim_enter(entry: u64, info: u64) -> !;
}

pub fn main(boot: BootInfo) -> ! {
    println!("FWSHIM Exitscope test firmware (cmdline \"{}\")", boot.cmdline());
    if !boot.is_multiboot() {
        fail(format_args!("not started by a multiboot1 loader"));
    }
    let info = boot.info_addr() as u64;
    let flags = rd32(info);
    let no_mmap = boot.arg("mmap") == Some("none");
    let lock_off = boot.arg("feature_control") == Some("locked-off");
    let madt_cpus = match boot.arg("madt") {
        None => 0,
        Some(v) => match v.parse::<u8>() {
            Ok(n) if (1..=16).contains(&n) => n,
            _ => fail(format_args!("bad madt={v:?} (want 1 to 16 CPUs)")),
        },
    };

    // 1. Everything the loader gave, into the shim's own memory.
    if flags & (1 << 3) == 0 || rd32(info + 20) == 0 {
        fail(format_args!("no modules: give Exitscope as the first module"));
    }
    let count = (rd32(info + 20) as usize).min(MAX_MODULES);
    let mods_pa = rd32(info + 24) as u64;
    let mut strings = [0u8; STRINGS];
    let mut used = 0;
    let mut mods = [(0u64, 0u64, 0usize); MAX_MODULES];
    for (i, m) in mods.iter_mut().enumerate().take(count) {
        let e = mods_pa + 16 * i as u64;
        *m = (rd32(e) as u64, rd32(e + 4) as u64, keep_string(&mut strings, &mut used, rd32(e + 8) as u64));
    }
    let mut mmap = [0u8; MMAP_BYTES];
    let mmap_len = if flags & (1 << 6) != 0 { (rd32(info + 44) as usize).min(MMAP_BYTES) } else { 0 };
    let mmap_pa = rd32(info + 48) as u64;
    for (i, b) in mmap.iter_mut().enumerate().take(mmap_len) {
        // SAFETY: the loader's memory map, below 4 GiB.
        *b = unsafe { core::ptr::read_volatile((mmap_pa + i as u64) as *const u8) };
    }
    let (mem_lower, mem_upper) = (rd32(info + 4), rd32(info + 8));

    // 2. The staging area: above every module and the shim, 2 MiB aligned.
    let shim_end = &raw const __guest_bss_end as u64;
    let top = mods[..count].iter().map(|m| m.1).max().unwrap_or(0).max(shim_end);
    let stage = (top + 0x20_0000) & !0x1F_FFFF;
    let (info2, mods2, mmap2, strings2, mut data) = (stage, stage + 0x100, stage + 0x400, stage + 0x1000, stage + 0x2000);
    let mut staged = [(0u64, 0u64); MAX_MODULES];
    for i in 0..count {
        let (s, e, _) = mods[i];
        copy(data, s, e - s);
        staged[i] = (data, data + (e - s));
        data = (data + (e - s) + 0xFFF) & !0xFFF;
    }
    copy(strings2, strings.as_ptr() as u64, used as u64);
    println!("FWSHIM {count} module(s) staged at {stage:#x}; Exitscope is module 0 ({} KiB)", (mods[0].1 - mods[0].0) / 1024);

    // 3. Exitscope's multiboot1 header (a.out kludge: where to load it).
    let (k, k_end) = staged[0];
    let Some(off) = (0..8192u64.min(k_end - k).saturating_sub(32)).step_by(4).find(|&o| {
        let (m, f, c) = (rd32(k + o), rd32(k + o + 4), rd32(k + o + 8));
        m == MB1_HEADER_MAGIC && m.wrapping_add(f).wrapping_add(c) == 0
    }) else {
        fail(format_args!("module 0 has no multiboot1 header in its first 8 KiB"))
    };
    let h = k + off;
    if rd32(h + 4) & (1 << 16) == 0 {
        fail(format_args!("module 0's multiboot1 header has no load addresses (flag bit 16)"));
    }
    let [header_addr, load_addr, load_end, bss_end, entry] = [12, 16, 20, 24, 28].map(|o| rd32(h + o) as u64);
    let file_off = off - (header_addr - load_addr);
    let load_len = if load_end == 0 { k_end - k - file_off } else { load_end - load_addr };
    let bss_end = bss_end.max(load_addr + load_len);
    if bss_end > 0x400_0000 || load_addr < 0x10_0000 {
        fail(format_args!("Exitscope's image {load_addr:#x}-{bss_end:#x} would overlap the shim"));
    }

    // 4. The multiboot information Exitscope gets.
    zero(info2, 0x100);
    let mut f2 = (1 << 2) | (1 << 3) | (1 << 9);
    wr32(info2 + 16, (strings2 + mods[0].2 as u64) as u32); // cmdline: module 0's string
    wr32(info2 + 20, count as u32 - 1);
    wr32(info2 + 24, mods2 as u32);
    for i in 1..count {
        let e = mods2 + 16 * (i as u64 - 1);
        wr32(e, staged[i].0 as u32);
        wr32(e + 4, staged[i].1 as u32);
        wr32(e + 8, (strings2 + mods[i].2 as u64) as u32);
        wr32(e + 12, 0);
    }
    let name = b"Exitscope test firmware (fwshim)\0";
    copy(strings2 + used as u64, name.as_ptr() as u64, name.len() as u64);
    wr32(info2 + 64, (strings2 + used as u64) as u32);
    if no_mmap {
        println!("FWSHIM mmap=none: no memory map and no mem_lower/mem_upper in the information block");
    } else {
        if flags & 1 != 0 {
            f2 |= 1;
            wr32(info2 + 4, mem_lower);
            wr32(info2 + 8, mem_upper);
        }
        if mmap_len > 0 {
            f2 |= 1 << 6;
            copy(mmap2, mmap.as_ptr() as u64, mmap_len as u64);
            wr32(info2 + 44, mmap_len as u32);
            wr32(info2 + 48, mmap2 as u32);
        }
    }
    wr32(info2, f2);

    // 4b. ACPI tables listing the CPUs, for a BIOS that has none.
    if madt_cpus > 0 {
        let rsdp = write_madt(data, madt_cpus);
        println!("FWSHIM madt={madt_cpus}: RSDP at {rsdp:#x} (EBDA), RSDT at {data:#x}, a MADT with APIC ids 0 to {}", madt_cpus - 1);
    }

    // 5. IA32_FEATURE_CONTROL, as a firmware with VT-x disabled leaves it.
    if lock_off {
        let mut value = u64::MAX;
        let p = &mut value as *mut u64;
        // SAFETY: IA32_FEATURE_CONTROL exists on VMX CPUs; a fault is
        // caught; `p` points at `value`.
        if guest_rt::catch(|| unsafe { p.write_volatile(guest_rt::rdmsr(MSR_FEATURE_CONTROL)) }).is_some() {
            fail(format_args!("RDMSR IA32_FEATURE_CONTROL faulted"));
        }
        if value & 1 != 0 {
            println!("FWSHIM IA32_FEATURE_CONTROL is already locked ({value:#x}): the firmware locked it first; cannot lock VMX off");
        } else {
            // SAFETY: writing the lock bit with VMX off: VMX stays off until reset.
            let w = guest_rt::catch(|| unsafe { guest_rt::wrmsr(MSR_FEATURE_CONTROL, 1) });
            // SAFETY: as above.
            let after = unsafe { guest_rt::rdmsr(MSR_FEATURE_CONTROL) };
            println!(
                "FWSHIM IA32_FEATURE_CONTROL was {value:#x}: wrote 0x1 (locked, VMX off): {}, now {after:#x}",
                if w.is_none() { "ok" } else { "faulted" }
            );
        }
    }

    // 6. Load the image and enter it.
    copy(load_addr, k + file_off, load_len);
    zero(load_addr + load_len, bss_end - (load_addr + load_len));
    println!(
        "FWSHIM entering Exitscope at {entry:#x} (image {load_addr:#x}-{bss_end:#x}), EAX={MB1_BOOTLOADER_MAGIC:#x} EBX={info2:#x}, memory map {}",
        if no_mmap { "withheld" } else { "passed on" }
    );
    // Let the UART send everything: Exitscope resets its FIFO.
    for _ in 0..10_000_000 {
        // SAFETY: reading COM1's line status register.
        if unsafe { guest_rt::inb(0x3FD) } & 0x40 != 0 {
            break;
        }
    }
    // SAFETY: the image is in place; the trampoline leaves long mode and
    // jumps to its 32-bit entry as a multiboot1 loader would.
    unsafe { fwshim_enter(entry, info2) }
}

// Leaves long mode for 32-bit protected mode with paging off, then enters
// a multiboot1 kernel: EAX = magic, EBX = info, flat 32-bit segments.
global_asm!(
    r#"
    .pushsection .text.fwshim_enter, "ax"
    .code64
    .global fwshim_enter
fwshim_enter:
    cli
    lgdt [rip + fwshim_gdt_ptr]
    mov edi, edi
    mov esi, esi
    push 0x18
    lea rax, [rip + fwshim_compat]
    push rax
    retfq
    .code32
fwshim_compat:
    mov eax, cr0
    and eax, 0x7FFFFFFF
    mov cr0, eax
    mov ecx, 0xC0000080
    rdmsr
    and eax, 0xFFFFFEFF
    wrmsr
    mov eax, cr4
    and eax, 0xFFFFFFDF
    mov cr4, eax
    mov eax, 0x10
    mov ds, eax
    mov es, eax
    mov fs, eax
    mov gs, eax
    mov ss, eax
    mov eax, {magic}
    mov ebx, esi
    jmp edi
    .code64
    .popsection

    .pushsection .data.fwshim_gdt, "aw"
    .balign 16
fwshim_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00CF9A000000FFFF
fwshim_gdt_ptr:
    .short 31
    .quad fwshim_gdt
    .popsection
"#,
    magic = const MB1_BOOTLOADER_MAGIC,
);
