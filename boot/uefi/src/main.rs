//! The second front-end of Exitscope: entered by the rust-osdev
//! `bootloader` (0.11) from a UEFI or BIOS disk image.
//!
//! The bootloader enters in long mode on its own page tables and stack, with
//! all physical memory mapped at an offset, and hands over a
//! [`bootloader_api::BootInfo`]: the memory map, the RSDP and one "ramdisk",
//! which holds Exitscope's boot bundle (`guest_loader::bundle`: the
//! hypervisor's command line, the guest kernel and its modules). This file
//! turns that into the core's platform-neutral [`exitscope_hv::bootinfo::BootInfo`]
//! and calls [`exitscope_hv::run`], the same core the multiboot entry calls.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::info::{MemoryRegionKind, Optional};
use exitscope_hv::bootinfo::{BootInfo, Module, RsdpInfo};
use exitscope_hv::fatal::boot_error;
use exitscope_hv::{hvprintln, memory};
use guest_loader::bundle;
use guest_loader::memmap::{MemKind, MemoryMap, Region};

/// What the bootloader must do for us: map all physical memory (the core
/// reads ACPI tables and copies modules through it until it has relocated
/// itself onto its own identity map), and give `_start` a stack big enough
/// for the few calls before [`exitscope_uefi_main`] switches stacks.
pub const BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut c = BootloaderConfig::new_default();
    c.mappings.physical_memory = Some(Mapping::Dynamic);
    c.kernel_stack_size = 128 * 1024;
    c
};

bootloader_api::entry_point!(bootloader_main, config = &BOOTLOADER_CONFIG);

/// `_start`, on the bootloader's stack. That stack is not part of the
/// image: it vanishes when the core relocates the image and switches page
/// tables, so move to a stack inside the image's .bss first.
fn bootloader_main(info: &'static mut bootloader_api::BootInfo) -> ! {
    // SAFETY: the trampoline only loads RSP with the top of a stack that
    // nothing else uses and calls exitscope_uefi_main(info); it never returns.
    unsafe { exitscope_uefi_switch_stack(info as *mut bootloader_api::BootInfo as *mut u8) }
}

const STACK_SIZE: usize = 128 * 1024;

core::arch::global_asm!(
    ".section .text.exitscope_uefi_switch_stack, \"ax\"",
    ".global exitscope_uefi_switch_stack",
    "exitscope_uefi_switch_stack:", // rdi: the boot info, passed through
    "    cli",
    "    lea rsp, [rip + exitscope_uefi_stack_top]",
    "    xor ebp, ebp",
    "    call exitscope_uefi_main",
    "2:  cli",
    "    hlt",
    "    jmp 2b",
    ".section .bss.exitscope_uefi_stack, \"aw\", @nobits",
    ".balign 4096",
    "    .skip {stack}",
    "exitscope_uefi_stack_top:",
    stack = const STACK_SIZE,
);

unsafe extern "C" {
    /// Never returns; `info` is handed to exitscope_uefi_main unchanged.
    fn exitscope_uefi_switch_stack(info: *mut u8) -> !;
}

/// A flat GDT: 64-bit code at selector 0x08 (the core's IDT gates use it
/// until the core loads its per-CPU GDT) and data at 0x10, as the multiboot
/// entry leaves them. In the image, so it survives relocation. The
/// accessed bits are preset: the CPU would otherwise set them on the first
/// segment load, and this table is in read-only memory.
static GDT: [u64; 3] = [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF];

fn load_gdt() {
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let ptr = Ptr { limit: (core::mem::size_of_val(&GDT) - 1) as u16, base: GDT.as_ptr() as u64 };
    // SAFETY: the GDT is valid and static; the far return reloads CS with
    // its code descriptor and the data selectors with its data descriptor,
    // which describe the same flat address space as the bootloader's.
    unsafe {
        core::arch::asm!(
            "lgdt [{ptr}]",
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, 0x10",
            "mov ds, {tmp:e}",
            "mov es, {tmp:e}",
            "mov ss, {tmp:e}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            ptr = in(reg) &ptr,
            tmp = out(reg) _,
        );
    }
}

/// Rust continuation on the image's own stack.
#[unsafe(no_mangle)]
extern "C" fn exitscope_uefi_main(info: &'static mut bootloader_api::BootInfo) -> ! {
    load_gdt();
    let offset = match info.physical_memory_offset {
        Optional::Some(o) => o,
        // Without it phys_ptr() cannot work; say so as early as we can.
        Optional::None => {
            exitscope_hv::early_init();
            boot_error(format_args!("the bootloader did not map physical memory (BootloaderConfig.mappings.physical_memory)"))
        }
    };
    memory::set_phys_offset(offset);
    // The bootloader's serial log (BIOS, or UEFI with a framebuffer) ends
    // without a newline: start our banner on a line of its own.
    exitscope_hv::serial::init(log::LevelFilter::Info);
    exitscope_hv::serial::write_raw(format_args!("\n"));
    exitscope_hv::serial::drain();
    exitscope_hv::early_init();
    let bi = match boot_info(info, offset) {
        Ok(bi) => bi,
        Err(e) => boot_error(format_args!("{e}")),
    };
    exitscope_hv::run(bi)
}

/// The UEFI memory types that are RAM once boot services have ended:
/// loader code/data (1, 2), boot-services code/data (3, 4), conventional (7).
fn uefi_kind(t: u32) -> MemKind {
    match t {
        1..=4 | 7 => MemKind::Ram,
        9 => MemKind::AcpiReclaimable,
        10 => MemKind::AcpiNvs,
        _ => MemKind::Reserved,
    }
}

/// The memory map, the protocol name and the ranges to keep until the guest
/// is loaded (everything the bootloader marked as its own: the image, page
/// tables, boot info, ramdisk).
fn memory_map(info: &bootloader_api::BootInfo) -> (MemoryMap, &'static str, Vec<(u64, u64)>) {
    let (mut uefi, mut bios) = (false, false);
    let mut preserve = Vec::new();
    let regions: Vec<Region> = info
        .memory_regions
        .iter()
        .map(|r| {
            let kind = match r.kind {
                MemoryRegionKind::Usable => MemKind::Ram,
                MemoryRegionKind::Bootloader => {
                    preserve.push((r.start, r.end));
                    MemKind::Ram
                }
                MemoryRegionKind::UnknownUefi(t) => {
                    uefi = true;
                    uefi_kind(t)
                }
                MemoryRegionKind::UnknownBios(t) => {
                    bios = true;
                    MemKind::from_e820(t)
                }
                // The enum is non-exhaustive; anything new is not ours.
                _ => MemKind::Reserved,
            };
            Region::new(r.start, r.end, kind)
        })
        .collect();
    // BootInfo does not say which firmware ran; the memory map's foreign
    // entries do (every firmware reports some reserved memory).
    let protocol = match (uefi, bios) {
        (true, false) => "uefi",
        (false, true) => "bios",
        _ => "bootloader",
    };
    (MemoryMap::from_regions(regions), protocol, preserve)
}

/// Translates a virtual address of the bootloader's address space through
/// its page tables (read through the physical-memory window).
fn translate(va: u64, offset: u64) -> Option<u64> {
    const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
    let mut table = exitscope_hv::cpu::read_cr3() & ADDR;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let index = (va >> shift) & 511;
        // SAFETY: `table` is a page-table page of the live paging
        // structures, mapped by the bootloader's physical-memory window.
        let e = unsafe { core::ptr::read_volatile((table + offset + index * 8) as *const u64) };
        if e & 1 == 0 {
            return None;
        }
        let size = 1u64 << shift;
        if level == 0 || (level < 3 && e & (1 << 7) != 0) {
            return Some((e & ADDR & !(size - 1)) | (va & (size - 1)));
        }
        table = e & ADDR;
    }
    None
}

/// The ramdisk's physical address (the bootloader reports where it mapped
/// it); it must be one physically contiguous range, as the bootloader loads
/// it, because the core treats modules as physical ranges.
fn ramdisk_phys(va: u64, len: u64, offset: u64) -> Result<u64, String> {
    let pa = translate(va, offset).ok_or_else(|| format!("the ramdisk at {va:#x} is not mapped"))?;
    let mut at = 0;
    while at < len {
        if translate(va + at, offset) != Some(pa + at) {
            return Err(format!("the bootloader's ramdisk is not physically contiguous (at +{at:#x})"));
        }
        at += 4096 - ((va + at) & 0xFFF);
    }
    Ok(pa)
}

fn boot_info(info: &bootloader_api::BootInfo, offset: u64) -> Result<BootInfo, String> {
    let (memory, protocol, preserve) = memory_map(info);
    let api = &info.api_version;
    let loader_name = Some(format!("rust-osdev bootloader {}.{}.{}", api.version_major(), api.version_minor(), api.version_patch()));
    let rsdp = match info.rsdp_addr {
        Optional::Some(a) => Some(RsdpInfo::At(a)),
        Optional::None => None,
    };
    let mut bi = BootInfo {
        protocol,
        loader_name,
        memory,
        modules: Vec::new(),
        cmdline: String::new(),
        rsdp,
        // The bootloader hands over the RSDP itself, not the system table.
        efi_system_table: None,
        preserve,
    };
    let (Optional::Some(va), len) = (info.ramdisk_addr, info.ramdisk_len) else {
        return Err("no boot bundle: the disk image has no ramdisk; write it with `cargo xtask image`".into());
    };
    // SAFETY: the bootloader mapped the ramdisk at `va` for `len` bytes and
    // nothing writes it until the core stages the modules (it is in a
    // Bootloader region, which the core preserves).
    let data = unsafe { core::slice::from_raw_parts(va as *const u8, len as usize) };
    let b = bundle::parse(data).map_err(|e| format!("bad boot bundle in the ramdisk: {e}"))?;
    let pa = ramdisk_phys(va, len, offset)?;
    bi.cmdline = String::from(b.hv_cmdline.trim());
    for p in b.payloads() {
        // A path word first, as GRUB writes module strings: Module::cmdline()
        // strips it, so a command line is never mistaken for a file name.
        let name: String = p.name.chars().map(|c| if c.is_whitespace() || c == '=' { '_' } else { c }).collect();
        bi.modules.push(Module { start: pa + p.offset, end: pa + p.offset + p.len, string: format!("/bundle/{name} {}", p.cmdline) });
    }
    hvprintln!("boot bundle: {} KiB ramdisk at {pa:#x}, {} payload(s)", len / 1024, bi.modules.len());
    Ok(bi)
}
