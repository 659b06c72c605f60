//! Exitscope: a bare-metal VT-x hypervisor that times every VM exit.
//!
//! This crate is the platform-neutral core. A boot front-end (multiboot in
//! `boot/`, UEFI later) turns what its loader handed over into a
//! [`bootinfo::BootInfo`] and calls [`run`]. Logic that needs no hardware
//! (boot-information and ACPI parsing, options, VMX control selection, EPT
//! building, exit decoding) is plain safe Rust and unit-tested on the host;
//! the `unsafe` instruction wrappers live in `cpu`, `vmx` and `idt`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod bootinfo;
pub mod cpu;
pub mod decode;
pub mod emulate;
pub mod ept;
pub mod exit;
pub mod fallible;
pub mod fatal;
pub mod guest;
pub mod guestaccess;
pub mod guestmem;
pub mod idt;
pub mod memory;
pub mod options;
pub mod percpu;
pub mod pic;
pub mod power;
pub mod runstate;
pub mod serial;
pub mod smp;
pub mod state;
pub mod statsys;
pub mod tsc;
pub mod vmx;

use alloc::vec::Vec;
use bootinfo::BootInfo;
use exitscope_stats::intercept::Class;
use fatal::boot_error;
use guest_loader::memmap::MemKind;
pub use state::MAX_CPUS;
use vmx::caps::{self, FeatureControl, VmxProbe};

#[cfg(all(not(test), target_os = "none"))]
#[global_allocator]
static ALLOC: memory::HeapAllocator = memory::HeapAllocator;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Entry from the multiboot front-end: `magic` and `info` as the loader
/// left them in EAX and EBX, `load_base` where it put the image (a
/// multiboot2 loader may relocate it).
pub fn multiboot_entry(magic: u32, info: u32, load_base: u32) -> ! {
    memory::set_multiboot_load_base(load_base as u64);
    serial::SCREEN.store(true, core::sync::atomic::Ordering::Relaxed);
    early_init();
    let how = match magic {
        bootinfo::MB1_BOOTLOADER_MAGIC => Some("multiboot1 (link address)"),
        bootinfo::MB2_BOOTLOADER_MAGIC => Some("multiboot2 (relocatable)"),
        _ => None,
    };
    if let Some(how) = how {
        hvprintln!("loaded at {:#x} by {how}", memory::multiboot_load_range().0);
    }
    match bootinfo::parse_multiboot(magic, info as u64, &guest::IdentityMem) {
        Ok(mut bi) => {
            bi.preserve.push(memory::multiboot_load_range());
            run(bi)
        }
        Err(e) => boot_error(format_args!("bad boot information: {e}")),
    }
}

/// Serial console and exception handling, before anything else.
pub fn early_init() {
    serial::init(log::LevelFilter::Info);
    if let Err(e) = memory::init_heap() {
        boot_error(format_args!("{e}"));
    }
    idt::init_idt();
    idt::load_idt();
    hvprintln!("Exitscope {VERSION}: VM-exit statistics hypervisor");
}

fn read_probe() -> VmxProbe {
    let ecx = cpu::cpuid(1, 0)[2];
    let mut p = VmxProbe { cpuid1_ecx: ecx, ..VmxProbe::default() };
    if ecx & (1 << 5) == 0 {
        return p;
    }
    let rd = |m| fallible::rdmsr_safe(m).unwrap_or(0);
    use cpu::msr::*;
    p.feature_control = rd(IA32_FEATURE_CONTROL);
    p.basic = rd(IA32_VMX_BASIC);
    let true_ctls = p.basic & (1 << 55) != 0;
    p.pinbased = rd(if true_ctls { IA32_VMX_TRUE_PINBASED_CTLS } else { IA32_VMX_PINBASED_CTLS });
    p.procbased = rd(if true_ctls { IA32_VMX_TRUE_PROCBASED_CTLS } else { IA32_VMX_PROCBASED_CTLS });
    p.exit = rd(if true_ctls { IA32_VMX_TRUE_EXIT_CTLS } else { IA32_VMX_EXIT_CTLS });
    p.entry = rd(if true_ctls { IA32_VMX_TRUE_ENTRY_CTLS } else { IA32_VMX_ENTRY_CTLS });
    p.procbased2 = if p.procbased & (1 << 63) != 0 { rd(IA32_VMX_PROCBASED_CTLS2) } else { 0 };
    p.misc = rd(IA32_VMX_MISC);
    p.cr0_fixed0 = rd(IA32_VMX_CR0_FIXED0);
    p.cr0_fixed1 = rd(IA32_VMX_CR0_FIXED1);
    p.cr4_fixed0 = rd(IA32_VMX_CR4_FIXED0);
    p.cr4_fixed1 = rd(IA32_VMX_CR4_FIXED1);
    p.ept_vpid = if p.procbased2 & (1 << 33) != 0 { rd(IA32_VMX_EPT_VPID_CAP) } else { 0 };
    let ext = cpu::cpuid(0x8000_0000, 0)[0];
    p.has_rdtscp = ext >= 0x8000_0001 && cpu::cpuid(0x8000_0001, 0)[3] & (1 << 27) != 0;
    let l7 = cpu::cpuid(7, 0);
    p.has_invpcid = l7[1] & (1 << 10) != 0;
    p.has_waitpkg = l7[2] & (1 << 5) != 0;
    p.has_xsaves = cpu::cpuid(0xD, 1)[0] & (1 << 3) != 0;
    p
}

/// The core: check the machine, move out of the guest's way, set up VMX and
/// the guest, and enter it. Never returns.
pub fn run(bi: BootInfo) -> ! {
    let opts = match options::parse(&bi.cmdline) {
        Ok(o) => o,
        Err(e) => boot_error(format_args!("bad hypervisor command line '{}': {e}", bi.cmdline)),
    };
    serial::set_level(opts.log);
    hvprintln!("booted by {} ({}), command line '{}'", bi.protocol, bi.loader_name.as_deref().unwrap_or("unknown loader"), bi.cmdline);

    // The machine.
    let ram = bi.memory.total_ram();
    if ram == 0 {
        boot_error(format_args!("no usable memory map: the boot loader reported no RAM"));
    }
    hvprintln!("memory: {} MiB of RAM in {} ranges", ram >> 20, bi.memory.regions().iter().filter(|r| r.kind == MemKind::Ram).count());
    let mut acpi = acpi::parse(&guest::IdentityMem, &bi);
    power::set_boot_acpi(&acpi);
    // The console UART is known now: `serial=`, the SPCR's, or COM1.
    serial::configure(opts.serial, acpi.spcr);
    if acpi.tables.is_empty() {
        hvprintln!("ACPI: none found; power-off falls back to emulator ports, one CPU");
    } else {
        let pm1a = acpi.pm1a_cnt.map_or("none".into(), |r| alloc::format!("{r}"));
        let s5 = acpi.s5.map_or("unknown".into(), |s| alloc::format!("SLP_TYP {}", s.0));
        let (rsdp, guest_rsdp) = match (acpi.rsdp_addr, acpi.rsdp_source) {
            (Some(a), Some(src)) => (alloc::format!("{a:#x} ({src})"), alloc::format!("{a:#x}")),
            (_, src) => (
                alloc::format!("not in memory ({})", src.map_or("none".into(), |s| alloc::format!("{s}"))),
                "a copy in reserved memory".into(),
            ),
        };
        hvprintln!("ACPI: RSDP {rsdp}, guest RSDP {guest_rsdp}, PM1a control {pm1a}, S5 {s5}, {} CPU(s) in the MADT", acpi.cpus.len());
    }

    // Time: the TSC, calibrated once (every delay and bounded wait uses it).
    if opts.pit_stopped {
        hvprintln!("test switch pit=stopped: the 8254 PIT reads as stopped");
    }
    hvprintln!("TSC: {}", tsc::calibrate(acpi.pm_timer, opts.pit_stopped));

    // VMX.
    let mut probe = read_probe();
    if opts.vmx_misc_clear != 0 {
        hvprintln!("test switch: acting as if IA32_VMX_MISC ({:#x}) lacked bits {:#x}", probe.misc, opts.vmx_misc_clear);
        probe.misc &= !opts.vmx_misc_clear;
    }
    match caps::check_presence(probe.cpuid1_ecx, probe.feature_control) {
        Err(e) => boot_error(format_args!("{e}")),
        Ok(FeatureControl::Ready) => {}
        Ok(FeatureControl::Write(v)) => {
            if !fallible::wrmsr_safe(cpu::msr::IA32_FEATURE_CONTROL, v) {
                boot_error(format_args!("could not enable VMX in IA32_FEATURE_CONTROL"));
            }
            hvprintln!("IA32_FEATURE_CONTROL was unlocked: enabled VMX and locked it");
        }
    }
    let mut controls = match caps::choose(&probe, &opts.intercept) {
        Ok(c) => c,
        Err(e) => boot_error(format_args!("{e}")),
    };
    if opts.no_1g_pages {
        controls.ept_1g = false;
        hvprintln!("pages_1g=off (test-only): using no 1 GiB pages, as on a CPU without them");
    }
    hvprintln!(
        "VMX: VMCS revision {:#x}, EPT ({}{}), {}, unrestricted guest",
        controls.vmcs_revision,
        if controls.ept_2m { "2M" } else { "4K" },
        if controls.ept_1g { " 1G pages" } else { " pages" },
        if controls.vpid { "VPID" } else { "no VPID" }
    );
    for s in &controls.skipped {
        hvprintln!("VMX: not available on this CPU, skipped: {s}");
    }
    print_interception(&opts.intercept, &controls);

    // The guest must exist before anything moves.
    if bi.modules.is_empty() {
        boot_error(format_args!("no guest: give the guest kernel as the first boot module (GRUB: module2 /path/kernel args)"));
    }

    // The vCPUs: the first min(cpus=, MAX_CPUS, MADT) CPUs, boot CPU included.
    let max_cpus = opts.max_cpus.map_or(MAX_CPUS, |n| n as usize);
    let vcpus_planned = acpi.cpus.len().clamp(1, max_cpus);
    if acpi.cpus.len() > MAX_CPUS {
        hvprintln!("the MADT lists {} CPUs; Exitscope virtualises at most {MAX_CPUS}, the others are not started", acpi.cpus.len());
    }

    // Size the footprint: one vCPU block per CPU, one EPT tree for all
    // (MAXPHYADDR wide), the host identity map.
    let phys_bits = if cpu::cpuid(0x8000_0000, 0)[0] >= 0x8000_0008 { cpu::cpuid(0x8000_0008, 0)[0] as u8 } else { 36 };
    let huge = !opts.no_1g_pages && cpu::cpuid(0x8000_0000, 0)[0] >= 0x8000_0001 && cpu::cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;
    let map_end = bi.memory.regions().last().map_or(1 << 32, |r| r.end);
    let phys_limit = memory::identity_limit(map_end, phys_bits, huge);
    let (map_top, phys_top) = (ept::map_top(&bi.memory), ept::phys_top(&bi.memory, phys_bits));
    let large = (controls.ept_2m, controls.ept_1g);
    // The footprint's hole and the watched APIC page (neither known yet)
    // split a few more slots: 8 tables cover both.
    let ept_tables = ept::plan_tables(&ept::guest_ranges(&bi.memory, phys_top, &[], &[]), map_top, large, controls.lazy_ept) + 8;
    let plan = memory::plan(&memory::PlanInput {
        vcpus: vcpus_planned as u64,
        per_vcpu: vcpu_arena_bytes() as u64,
        ept_tables,
        host_tables: memory::identity_tables(phys_limit, huge),
        arena_used: memory::arena_usage().0 as u64 + ((opts.arena_pad_mib as u64) << 20),
        arena_offset: memory::arena_offset(),
        image: memory::image_size(),
    });
    hvprintln!(
        "memory plan: {} vCPU(s) x {} KiB, one EPT tree of up to {} KiB for all, host page tables {} KiB (identity map to {} GiB{})",
        vcpus_planned,
        plan.per_vcpu >> 10,
        plan.ept >> 10,
        plan.host >> 10,
        phys_limit >> 30,
        if huge { ", MAXPHYADDR" } else { ", the end of the memory map: no 1 GiB pages" }
    );

    // Move the hypervisor to the top of RAM below 4 GiB.
    let size = plan.footprint;
    let mut keep: Vec<(u64, u64)> = bi.modules.iter().map(|m| (m.start, m.end)).collect();
    keep.extend_from_slice(&bi.preserve);
    let Some(base) = bi.memory.highest_fit(size, 2 << 20, 1 << 32, &keep) else {
        boot_error(format_args!(
            "too little memory: the hypervisor needs {} MiB of contiguous RAM below 4 GiB besides the boot modules",
            size >> 20
        ))
    };
    if let Err(e) = memory::relocate(base, &plan, phys_limit, huge) {
        boot_error(format_args!("{e}"));
    }
    if opts.arena_pad_mib > 0 {
        let pad = (opts.arena_pad_mib as usize) << 20;
        if let Err(e) = memory::arena_alloc(pad, memory::PAGE) {
            boot_error(format_args!("{e}"));
        }
        hvprintln!(
            "arena_pad={} (test-only): {} MiB of the arena set aside; what follows is allocated from {} KiB into the footprint, beyond the image's {} MiB",
            opts.arena_pad_mib,
            opts.arena_pad_mib,
            (memory::arena_offset() as usize + memory::arena_usage().0) >> 10,
            memory::image_size() >> 20
        );
    }
    let footprint = memory::footprint();
    hvprintln!(
        "hypervisor region: {:#x}-{:#x} ({} MiB), not mapped for the guest and not in its memory map",
        footprint.0,
        footprint.1,
        (footprint.1 - footprint.0) >> 20
    );

    // Stage the modules, then describe the guest's memory.
    let mut avoid = bi.preserve.clone();
    avoid.push(footprint);
    let staged = match guest::stage_modules(&bi, &avoid) {
        Ok(s) => s,
        Err(e) => boot_error(format_args!("{e}")),
    };
    let mut guest_map = bi.memory.clone();
    guest_map.remove(footprint.0, footprint.1);
    let mut rsdp_avoid: Vec<(u64, u64)> = bi.modules.iter().map(|m| (m.start, m.end)).chain(bi.preserve.iter().copied()).collect();
    rsdp_avoid.push(staged.range);
    if let Some(line) = acpi::give_guest_rsdp_copy(&mut acpi, &mut guest_map, &rsdp_avoid) {
        hvprintln!("{line}");
    }

    // Bitmaps shared by all vCPUs: I/O ports and MSRs the hypervisor watches.
    let watch = state::PortWatch {
        pm1a: match acpi.pm1a_cnt {
            Some(acpi::AcpiReg::Io(p)) => Some(p),
            _ => None,
        },
        pm1b: match acpi.pm1b_cnt {
            Some(acpi::AcpiReg::Io(p)) => Some(p),
            _ => None,
        },
        s5: acpi.s5,
        reset: match acpi.reset_reg {
            Some((acpi::AcpiReg::Io(p), v)) if p != 0xCF9 => Some((p, v)),
            _ => None,
        },
        sleep: match acpi.sleep_control {
            Some(acpi::AcpiReg::Io(p)) => Some(p),
            _ => None,
        },
    };
    let (io_bitmaps_pa, msr_bitmap_pa) =
        match make_bitmaps(&watch, controls.classes.contains(Class::Io), controls.classes.contains(Class::Msr)) {
            Ok(x) => x,
            Err(e) => boot_error(format_args!("{e}")),
        };
    // External interrupts are acknowledged on exit: the PICs' ports are
    // watched so that one from a PIC reaches the guest as the guest's PIC
    // would deliver it (see pic.rs).
    if controls.classes.contains(Class::Extint) {
        for p in pic::PORTS {
            trap_io(io_bitmaps_pa, p);
        }
    }
    let xcr0_supported = {
        let d = cpu::cpuid(0xD, 0);
        (d[3] as u64) << 32 | d[0] as u64
    };
    let msr_imm = cpu::cpuid(7, 1)[2] & (1 << 5) != 0;
    let enabled = caps::enabled_reasons(&controls, msr_imm);
    let hide = state::CpuidHide {
        rdtscp: controls.hide_rdtscp,
        invpcid: controls.hide_invpcid,
        xsaves: controls.hide_xsaves,
        waitpkg: controls.hide_waitpkg,
        monitor: caps::hide_monitor(&controls),
    };
    let timeline = opts.timeline;
    let lapic = smp::LocalApic::current();
    let bsp_id = lapic.id();
    let machine_cpus = acpi.cpus_boot_first(bsp_id);
    let aps: Vec<u32> = machine_cpus[1..].iter().copied().take(max_cpus.saturating_sub(1)).collect();
    // With several CPUs, INIT and SIPI IPIs are emulated (to vCPUs) or
    // dropped (to the others, left out with `cpus=`), even with one vCPU:
    // watch the local APIC page.
    let apic_trap = if machine_cpus.len() < 2 {
        None
    } else {
        // SAFETY: IA32_APIC_BASE exists on every CPU with an APIC.
        Some(unsafe { cpu::rdmsr(cpu::msr::IA32_APIC_BASE) } & 0xF_FFFF_F000)
    };
    if apic_trap.is_some() {
        trap_msr_write(msr_bitmap_pa, exit::msr::X2APIC_ICR);
    }
    let acpi_cpus_found = !acpi.cpus.is_empty();
    let mut watched: Vec<(u64, u64)> = apic_trap.iter().map(|&b| (b, b + 4096)).collect();
    // Power-management registers in memory space (see vmx/pmwatch.rs).
    watched.extend(vmx::pmwatch::init(&acpi, opts.test_mmio_pm));
    // Everything up to MAXPHYADDR but the footprint: RAM write-back, the
    // rest (64-bit BARs above RAM included) uncacheable.
    let ept_ranges = ept::guest_ranges(&guest_map, phys_top, &[footprint], &watched);
    let lazy_from = ept::lazy_from(map_top, large, controls.lazy_ept);
    let efer_allowed = {
        let ext = cpu::cpuid(0x8000_0000, 0)[0];
        let d = if ext >= 0x8000_0001 { cpu::cpuid(0x8000_0001, 0)[3] } else { 0 };
        let bit = |cpuid_bit: u32, efer: u64| if d & (1 << cpuid_bit) != 0 { efer } else { 0 };
        bit(11, 1) | bit(29, 1 << 8) | bit(20, 1 << 11)
    };
    let sh = state::init(state::Shared {
        options: opts,
        acpi,
        controls,
        enabled,
        footprint,
        ncpus: core::sync::atomic::AtomicUsize::new(1),
        watch,
        xcr0_supported,
        hide,
        apic_trap,
        ept_ranges,
        efer_allowed,
        phys_bits,
        phys_mapped: phys_limit,
        lazy_from,
        ins_outs_info: probe.basic & (1 << 54) != 0,
    });
    state::APIC_IDS[0].store(bsp_id, core::sync::atomic::Ordering::SeqCst);
    // One EPT tree for all vCPUs: built up front below `lazy_from`, filled
    // on demand above it (all of it under ept=lazy), see ept.rs.
    let eptp = match ept::build(&ept::below(&sh.ept_ranges, sh.lazy_from), &mut memory::ArenaTables, large) {
        Ok(root) => ept::eptp(root),
        Err(e) => boot_error(format_args!("{e}")),
    };
    let new_vcpu = |id: usize| -> VcpuSetup {
        let mem = match vmx::vcpu::alloc(id, sh.controls.vmcs_revision, &state::COUNTERS[id]) {
            Ok(m) => m,
            Err(e) => boot_error(format_args!("{e}")),
        };
        VcpuSetup { mem, eptp, io_bitmaps_pa, msr_bitmap_pa, ready: core::sync::atomic::AtomicBool::new(false) }
    };

    // The boot CPU: its own GDT/TSS, then VMXON.
    let bsp = arena_box(new_vcpu(0));
    bsp.mem.tables.load();
    idt::load_idt();
    if let Err(e) = enable_vmx(&sh.controls, bsp.mem.vmxon_pa) {
        boot_error(format_args!("{e}"));
    }

    // The other CPUs, each parked in VMX non-root operation (wait-for-SIPI),
    // or in root mode where the CPU lacks that activity state.
    if !aps.is_empty() {
        if !sh.controls.wait_for_sipi_state {
            hvprintln!("SMP: no wait-for-SIPI activity state: APs wait for their SIPI in VMX root operation");
        }
        let Some(tramp) = guest_map.lowest_fit(4096, 4096, 0x1000, 0xA0000, &[staged.range]) else {
            boot_error(format_args!("no free page below 1 MiB for the AP start-up code"))
        };
        smp::install_trampoline(tramp, ap_entry as *const () as u64, cpu::read_cr3());
        for apic_id in aps {
            let id = sh.ncpus.load(core::sync::atomic::Ordering::SeqCst);
            let ap = arena_box(new_vcpu(id));
            let stack = &*ap.mem.state as *const vmx::vcpu::VcpuState as u64 - 8;
            let t0 = cpu::rdtsc();
            let started = smp::start_ap(&lapic, apic_id, tramp, stack, ap as *const VcpuSetup as u64);
            let ready = tsc::spin_until(1_000_000, || ap.ready.load(core::sync::atomic::Ordering::SeqCst));
            if started && ready {
                let ticks = cpu::rdtsc().wrapping_sub(t0);
                hvprintln!("SMP: vCPU {id} (APIC id {apic_id}) ready in {} us ({ticks} TSC ticks)", tsc::us_for_ticks(ticks, tsc::hz()));
                state::APIC_IDS[id].store(apic_id, core::sync::atomic::Ordering::SeqCst);
                sh.ncpus.fetch_add(1, core::sync::atomic::Ordering::SeqCst);
            } else {
                hvprintln!("warning: CPU with APIC id {apic_id} did not start; continuing without it");
            }
        }
    }
    let ncpus = sh.ncpus.load(core::sync::atomic::Ordering::SeqCst);
    let vcpu_ids: Vec<u32> = state::APIC_IDS[..ncpus].iter().map(|a| a.load(core::sync::atomic::Ordering::SeqCst)).collect();
    if let Some(line) = acpi::hide_non_vcpus(&sh.acpi, &vcpu_ids) {
        hvprintln!("{line}");
    }
    if !acpi_cpus_found {
        hvprintln!("no ACPI MADT: running on the boot CPU only");
    }

    // The guest.
    let loaded = match guest::load(&bi, &staged, &guest_map, sh.acpi.rsdp_addr) {
        Ok(l) => l,
        Err(e) => boot_error(format_args!("{e}")),
    };
    hvprintln!("guest: {}", loaded.summary);

    if let Err(e) = vmx::load_vmcs(bsp.mem.vmcs_pa) {
        boot_error(format_args!("{e}"));
    }
    let v = &mut *bsp.mem.state;
    let start = vmx::vcpu::Start::Guest(&loaded.entry);
    if let Err(e) = vmx::vcpu::setup_vmcs(v, &sh.controls, bsp.mem.tables, io_bitmaps_pa, msr_bitmap_pa, bsp.eptp, start) {
        boot_error(format_args!("VMCS setup: {e}"));
    }
    vmx::invept(sh.controls.invept_single, bsp.eptp);
    let (used, total) = memory::arena_usage();
    hvprintln!("heap: {} of {} KiB used", used / 1024, total / 1024);
    if let (true, Some(t)) = (cfg!(feature = "detailed"), timeline) {
        statsys::start_timeline(t);
    }
    hvprintln!("entering the guest ({}) on {} vCPU(s)", loaded.kind, ncpus);
    // SAFETY: the state block lives in the arena for good; it is handed to
    // the exit loop, which owns it from now on.
    vmx::stub::launch(unsafe { &mut *(v as *mut vmx::vcpu::VcpuState) })
}

/// What a vCPU needs to start: built by the boot CPU, used on its own CPU.
struct VcpuSetup {
    mem: vmx::vcpu::VcpuMemory,
    eptp: u64,
    io_bitmaps_pa: u64,
    msr_bitmap_pa: u64,
    /// Set by an AP when its VMCS is ready and it is about to enter.
    ready: core::sync::atomic::AtomicBool,
}

/// Arena bytes one vCPU takes: its VMXON region and VMCS, its stack and
/// state, its fault stack, descriptor tables, detail block and setup block
/// (each rounded up as `vmx::vcpu::alloc` and [`arena_box`] align them).
pub(crate) fn vcpu_arena_bytes() -> usize {
    let page = memory::PAGE;
    let state = core::mem::size_of::<vmx::vcpu::VcpuState>().next_multiple_of(page);
    let tables = core::mem::size_of::<idt::PerCpuTables>() + 64;
    #[cfg(feature = "detailed")]
    let detail = core::mem::size_of::<exitscope_stats::detail::VcpuDetail>() + 64;
    #[cfg(not(feature = "detailed"))]
    let detail = 0;
    2 * page + vmx::vcpu::STACK_SIZE + state + vmx::vcpu::FAULT_STACK_SIZE + tables + detail + core::mem::size_of::<VcpuSetup>() + 64
}

/// Moves a value into the arena for good.
fn arena_box<T>(v: T) -> &'static mut T {
    match memory::arena_alloc(core::mem::size_of::<T>(), core::mem::align_of::<T>()) {
        Ok(p) => {
            let p = p as *mut T;
            // SAFETY: fresh, aligned, exclusive arena memory of the right size.
            unsafe {
                p.write(v);
                &mut *p
            }
        }
        Err(e) => boot_error(format_args!("{e}")),
    }
}

/// An AP's first Rust code, entered from the trampoline in long mode on the
/// hypervisor's page tables, on its own stack.
extern "C" fn ap_entry(setup: &'static mut VcpuSetup) -> ! {
    let sh = state::shared();
    setup.mem.tables.load();
    idt::load_idt();
    // IA32_FEATURE_CONTROL is per CPU: firmware that left it unlocked on
    // the boot CPU may have left it so here too.
    let fc = fallible::rdmsr_safe(cpu::msr::IA32_FEATURE_CONTROL).unwrap_or(0);
    match caps::check_presence(cpu::cpuid(1, 0)[2], fc) {
        Err(e) => boot_error(format_args!("AP {}: {e}", setup.mem.state.id)),
        Ok(FeatureControl::Ready) => {}
        Ok(FeatureControl::Write(v)) => {
            if !fallible::wrmsr_safe(cpu::msr::IA32_FEATURE_CONTROL, v) {
                boot_error(format_args!("AP {}: could not enable VMX in IA32_FEATURE_CONTROL", setup.mem.state.id));
            }
            hvprintln!("AP {}: IA32_FEATURE_CONTROL was unlocked: enabled VMX and locked it", setup.mem.state.id);
        }
    }
    if let Err(e) = enable_vmx(&sh.controls, setup.mem.vmxon_pa) {
        boot_error(format_args!("AP {}: {e}", setup.mem.state.id));
    }
    if let Err(e) = vmx::load_vmcs(setup.mem.vmcs_pa) {
        boot_error(format_args!("AP {}: {e}", setup.mem.state.id));
    }
    let v = &mut *setup.mem.state;
    let r = vmx::vcpu::setup_vmcs(
        v,
        &sh.controls,
        setup.mem.tables,
        setup.io_bitmaps_pa,
        setup.msr_bitmap_pa,
        setup.eptp,
        vmx::vcpu::Start::WaitForSipi,
    );
    if let Err(e) = r {
        boot_error(format_args!("AP {} VMCS setup: {e}", v.id));
    }
    vmx::invept(sh.controls.invept_single, setup.eptp);
    runstate::WAITING_FOR_SIPI.insert(v.id);
    setup.ready.store(true, core::sync::atomic::Ordering::SeqCst);
    if !sh.controls.wait_for_sipi_state {
        // No wait-for-SIPI activity state: wait here, in root mode, and
        // enter the guest active at the SIPI's vector.
        let vector = vmx::backend::wait_for_sipi_in_root(v.id);
        if let Err(e) = vmx::vcpu::start_at_sipi(vector) {
            boot_error(format_args!("AP {} start at SIPI vector {vector:#x}: {e}", v.id));
        }
    }
    // SAFETY: as for the boot CPU.
    vmx::stub::launch(unsafe { &mut *(v as *mut vmx::vcpu::VcpuState) })
}

/// CR0/CR4 as VMX requires, then VMXON.
fn enable_vmx(c: &caps::Controls, vmxon_pa: u64) -> Result<(), alloc::string::String> {
    let cr0 = caps::fix_cr(cpu::read_cr0(), c.cr0_fixed0, c.cr0_fixed1).ok_or("CR0 has bits VMX does not allow")?;
    // CR4.VMXE, OSXSAVE and MCE (see `caps::host_cr4`), on every CPU.
    let l1 = cpu::cpuid(1, 0);
    let cr4 = caps::host_cr4(cpu::read_cr4(), l1[2], l1[3], c.cr4_fixed0, c.cr4_fixed1).ok_or("CR4 has bits VMX does not allow")?;
    // SAFETY: the values satisfy the VMX fixed-bit MSRs; paging stays on.
    unsafe {
        cpu::write_cr0(cr0);
        cpu::write_cr4(cr4);
    }
    vmx::vmxon(vmxon_pa).map_err(|e| alloc::format!("{e}"))
}

/// Prints the interception in effect: the profile, every class on, EPT,
/// the preemption timer.
fn print_interception(want: &exitscope_stats::intercept::Interception, c: &caps::Controls) {
    let mut classes = alloc::string::String::new();
    for info in c.classes.iter() {
        if !classes.is_empty() {
            classes.push(',');
        }
        classes.push_str(info.name);
    }
    let preempt = match c.preempt {
        Some(p) => alloc::format!("every {} TSC ticks (timer value {}, rate 2^{})", p.ticks, p.value, p.rate),
        None => "off".into(),
    };
    hvprintln!(
        "interception: profile {}, intercept={classes}, ept={}, preempt {preempt}",
        want.profile.name(),
        if c.lazy_ept { "lazy" } else { "eager" },
    );
}

/// Builds the I/O bitmaps (two pages) and the MSR bitmap (one page):
/// every port (`io_all`) or only the watched ones; every MSR (`msr_all`)
/// or only the hypervisor's.
fn make_bitmaps(w: &state::PortWatch, io_all: bool, msr_all: bool) -> Result<(u64, u64), memory::OutOfMemory> {
    let (io, io_pa) = memory::alloc_pages(2)?;
    for p in w.ports() {
        io[p as usize / 8] |= 1 << (p % 8);
    }
    if io_all {
        io.fill(0xFF);
    }
    let (msr, msr_pa) = memory::alloc_pages(1)?;
    if msr_all {
        msr.fill(0xFF);
    }
    let mut trap = |m: u32| {
        let (base, bit) = if m < 0x2000 { (0, m) } else { (1024, m - 0xC000_0000) };
        msr[(base + bit / 8) as usize] |= 1 << (bit % 8); // read
        msr[(base + 2048 + bit / 8) as usize] |= 1 << (bit % 8); // write
    };
    trap(cpu::msr::IA32_FEATURE_CONTROL);
    // KVM's original paravirtual clock MSRs: in the bitmap's range, so they
    // must be trapped explicitly to be refused (see isolation.rs).
    trap(0x11);
    trap(0x12);
    for m in cpu::msr::IA32_VMX_BASIC..=cpu::msr::IA32_VMX_EXIT_CTLS2 {
        trap(m);
    }
    Ok((io_pa, msr_pa))
}

/// Makes writes of `msr` exit (MSR bitmap at physical `bitmap_pa`).
fn trap_msr_write(bitmap_pa: u64, msr: u32) {
    let (base, bit) = if msr < 0x2000 { (2048, msr) } else { (3072, msr - 0xC000_0000) };
    // SAFETY: the bitmap page is ours (allocated by make_bitmaps).
    unsafe { *memory::phys_ptr::<u8>(bitmap_pa + (base + bit / 8) as u64) |= 1 << (bit % 8) };
}

/// Makes accesses to `port` exit (I/O bitmaps at physical `bitmaps_pa`).
fn trap_io(bitmaps_pa: u64, port: u16) {
    // SAFETY: the bitmap pages are ours (allocated by make_bitmaps); A then
    // B, one bit per port.
    unsafe { *memory::phys_ptr::<u8>(bitmaps_pa + u64::from(port / 8)) |= 1 << (port % 8) };
}
