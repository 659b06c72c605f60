//! Exitscope: a bare-metal VT-x hypervisor that times every VM exit.
//!
//! This crate is the platform-neutral core. A boot front-end (multiboot in
//! `boot/`, UEFI later) turns what its loader handed over into a
//! [`bootinfo::BootInfo`] and calls [`run`]. Logic that needs no hardware
//! (boot-information and ACPI parsing, options, VMX control selection, EPT
//! building, exit decoding) is plain safe Rust and unit-tested on the host.
//! `unsafe` lives in thin wrapper modules (`cpu`, `port`, `memory`, `idt`,
//! `smp`, `vmx`) and a few capped call sites; `cargo xtask lint` counts it
//! per file and fails elsewhere (see docs/architecture.md). Architectural
//! constants (CR0/CR4/EFER bits, MSR numbers) live in [`arch`].
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod acpi;
pub mod arch;
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
pub mod port;
pub mod power;
pub mod runstate;
pub mod serial;
pub mod shadow;
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
    match bootinfo::parse_multiboot(magic, info as u64, &memory::IdentityMem) {
        Ok(mut bi) => {
            bi.preserve.push(memory::multiboot_load_range());
            run(bi)
        }
        Err(e) => boot_error(format_args!("bad boot information: {e}")),
    }
}

/// Serial console and exception handling, before anything else.
pub fn early_init() {
    // Before anything can fail and ask which vCPU it is on (fatal::current_vcpu).
    cpu::clear_gs_base();
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
    use arch::msr::*;
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
/// the guest, and enter it. Never returns. Each step is one phase below,
/// in the order they run.
pub fn run(bi: BootInfo) -> ! {
    let opts = match options::parse(&bi.cmdline) {
        Ok(o) => o,
        Err(e) => boot_error(format_args!("bad hypervisor command line '{}': {e}", bi.cmdline)),
    };
    serial::set_level(opts.log);
    hvprintln!("booted by {} ({}), command line '{}'", bi.protocol, bi.loader_name.as_deref().unwrap_or("unknown loader"), bi.cmdline);
    let mut machine = probe(&bi, &opts);
    // The guest must exist before anything moves.
    if bi.modules.is_empty() {
        boot_error(format_args!("no guest: give the guest kernel as the first boot module (GRUB: module2 /path/kernel args)"));
    }
    let place = relocate(&bi, &opts, &machine);
    let staged = stage_guest(&bi, &mut machine.acpi, place.footprint);
    let mut bitmaps = bitmaps(&machine.acpi, &machine.controls);
    let (sh, cpus) = shared_state(opts, machine, &place, &staged.guest_map, &mut bitmaps);
    let eptp = build_ept(sh, place.large);
    let setup = |id: usize| -> VcpuSetup {
        if sh.controls.shadow {
            if let Err(e) = vmx::shadowvm::alloc(id) {
                boot_error(format_args!("vCPU {id}: {e}"));
            }
        }
        let mem = match vmx::vcpu::alloc(id, sh) {
            Ok(m) => m,
            Err(e) => boot_error(format_args!("{e}")),
        };
        let ready = arena_box(core::sync::atomic::AtomicBool::new(false));
        VcpuSetup { mem, eptp, io_bitmaps_pa: bitmaps.io_pa, msr_bitmap_pa: bitmaps.msr_pa, ready }
    };
    let bsp = start_bsp(sh, setup(0));
    start_aps(sh, &cpus, &staged.guest_map, staged.staged.range, &setup);
    let loaded = load_guest(&bi, &staged.staged, &staged.guest_map, sh);
    launch(sh, bsp, &loaded)
}

/// What [`probe`] found: the ACPI facts, the VMX capabilities and the
/// controls chosen from them.
struct Machine {
    acpi: acpi::Acpi,
    probe: VmxProbe,
    controls: caps::Controls,
}

/// Phase 1, probe: the memory map, ACPI (and with it the console UART),
/// the TSC, VMX (enabled in IA32_FEATURE_CONTROL if the firmware left it
/// unlocked) and the controls the options ask for.
fn probe(bi: &BootInfo, opts: &options::Options) -> Machine {
    let ram = bi.memory.total_ram();
    if ram == 0 {
        boot_error(format_args!("no usable memory map: the boot loader reported no RAM"));
    }
    hvprintln!("memory: {} MiB of RAM in {} ranges", ram >> 20, bi.memory.regions().iter().filter(|r| r.kind == MemKind::Ram).count());
    let acpi = acpi::parse(&memory::IdentityMem, bi);
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
    let calibration = tsc::calibrate(acpi.pm_timer, opts.pit_stopped);
    hvprintln!("TSC: {calibration}");
    statsys::note_boot(bi, &calibration);

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
            if !fallible::wrmsr_safe(arch::msr::IA32_FEATURE_CONTROL, v) {
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
    Machine { acpi, probe, controls }
}

/// Where [`relocate`] put the hypervisor, and the physical-address facts
/// the later phases size things by.
struct Placement {
    /// The hypervisor's physical footprint after the move.
    footprint: (u64, u64),
    /// MAXPHYADDR.
    phys_bits: u8,
    /// End of the host identity map.
    phys_limit: u64,
    /// End of the memory map, and the top EPT maps to (see `ept.rs`).
    map_top: u64,
    phys_top: u64,
    /// EPT large pages: (2 MiB, 1 GiB).
    large: (bool, bool),
}

/// Phase 2, relocate: sizes the footprint (one vCPU block per CPU, one EPT
/// tree for all, the host identity map), then moves the hypervisor to the
/// top of RAM below 4 GiB, out of the guest's way.
fn relocate(bi: &BootInfo, opts: &options::Options, m: &Machine) -> Placement {
    // The vCPUs: the first min(cpus=, MAX_CPUS, MADT) CPUs, boot CPU included.
    let max_cpus = opts.max_cpus.map_or(MAX_CPUS, |n| n as usize);
    let vcpus_planned = m.acpi.cpus.len().clamp(1, max_cpus);
    if m.acpi.cpus.len() > MAX_CPUS {
        hvprintln!("the MADT lists {} CPUs; Exitscope virtualises at most {MAX_CPUS}, the others are not started", m.acpi.cpus.len());
    }
    let phys_bits = if cpu::cpuid(0x8000_0000, 0)[0] >= 0x8000_0008 { cpu::cpuid(0x8000_0008, 0)[0] as u8 } else { 36 };
    let huge = !opts.no_1g_pages && cpu::cpuid(0x8000_0000, 0)[0] >= 0x8000_0001 && cpu::cpuid(0x8000_0001, 0)[3] & (1 << 26) != 0;
    let map_end = bi.memory.regions().last().map_or(1 << 32, |r| r.end);
    let phys_limit = memory::identity_limit(map_end, phys_bits, huge);
    let (map_top, phys_top) = (ept::map_top(&bi.memory), ept::phys_top(&bi.memory, phys_bits));
    let large = (m.controls.ept_2m, m.controls.ept_1g);
    // The footprint's hole and the watched APIC page (neither known yet)
    // split a few more slots: 8 tables cover both.
    let ept_tables = ept::plan_tables(&ept::guest_ranges(&bi.memory, phys_top, &[], &[]), map_top, large, m.controls.lazy_ept) + 8;
    let plan = memory::plan(&memory::PlanInput {
        vcpus: vcpus_planned as u64,
        per_vcpu: (vcpu_arena_bytes() + if m.controls.shadow { vmx::shadowvm::ARENA_BYTES } else { 0 }) as u64,
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
    Placement { footprint, phys_bits, phys_limit, map_top, phys_top, large }
}

/// What [`stage_guest`] leaves: the staged boot modules and the guest's
/// memory map (the footprint removed, an RSDP copy reserved if one was
/// needed).
struct Staging {
    staged: guest::Staged,
    guest_map: guest_loader::memmap::MemoryMap,
}

/// Phase 3, stage the guest: copies the boot modules out of the way of the
/// guest's layout and describes the guest's memory.
fn stage_guest(bi: &BootInfo, acpi: &mut acpi::Acpi, footprint: (u64, u64)) -> Staging {
    let mut avoid = bi.preserve.clone();
    avoid.push(footprint);
    let staged = match guest::stage_modules(bi, &avoid) {
        Ok(s) => s,
        Err(e) => boot_error(format_args!("{e}")),
    };
    let mut guest_map = bi.memory.clone();
    guest_map.remove(footprint.0, footprint.1);
    let mut rsdp_avoid: Vec<(u64, u64)> = bi.modules.iter().map(|m| (m.start, m.end)).chain(bi.preserve.iter().copied()).collect();
    rsdp_avoid.push(staged.range);
    if let Some(line) = acpi::give_guest_rsdp_copy(acpi, &mut guest_map, &rsdp_avoid) {
        hvprintln!("{line}");
    }
    Staging { staged, guest_map }
}

/// The I/O bitmaps (two pages) and the MSR bitmap (one page) all vCPUs
/// share: the hypervisor's own pages, with their physical addresses for
/// the VMCS.
struct Bitmaps {
    io: &'static mut [u8],
    io_pa: u64,
    msr: &'static mut [u8],
    msr_pa: u64,
    watch: state::PortWatch,
}

impl Bitmaps {
    /// Makes accesses to `port` exit (bitmap A then B, one bit per port).
    fn trap_io(&mut self, port: u16) {
        self.io[usize::from(port / 8)] |= 1 << (port % 8);
    }

    /// Makes reads and writes of `msr` exit.
    fn trap_msr(&mut self, msr: u32) {
        let (base, bit) = if msr < 0x2000 { (0, msr) } else { (1024, msr - 0xC000_0000) };
        self.msr[(base + bit / 8) as usize] |= 1 << (bit % 8); // read
        self.msr[(base + 2048 + bit / 8) as usize] |= 1 << (bit % 8); // write
    }

    /// Makes writes of `msr` exit.
    fn trap_msr_write(&mut self, msr: u32) {
        let (base, bit) = if msr < 0x2000 { (2048, msr) } else { (3072, msr - 0xC000_0000) };
        self.msr[(base + bit / 8) as usize] |= 1 << (bit % 8);
    }
}

/// Phase 4, bitmaps: the I/O ports and MSRs the hypervisor watches, for
/// every vCPU: the ports that end the run (from ACPI), every port or MSR
/// when the profile intercepts them all, the PICs' ports under
/// `intercept=extint`, the VMX capability MSRs.
fn bitmaps(acpi: &acpi::Acpi, controls: &caps::Controls) -> Bitmaps {
    let io_port = |r: Option<acpi::AcpiReg>| match r {
        Some(acpi::AcpiReg::Io(p)) => Some(p),
        _ => None,
    };
    let watch = state::PortWatch {
        pm1a: io_port(acpi.pm1a_cnt),
        pm1b: io_port(acpi.pm1b_cnt),
        s5: acpi.s5,
        reset: match acpi.reset_reg {
            Some((acpi::AcpiReg::Io(p), v)) if p != 0xCF9 => Some((p, v)),
            _ => None,
        },
        sleep: io_port(acpi.sleep_control),
    };
    let pages = memory::alloc_pages(2).and_then(|io| Ok((io, memory::alloc_pages(1)?)));
    let ((io, io_pa), (msr, msr_pa)) = match pages {
        Ok(x) => x,
        Err(e) => boot_error(format_args!("{e}")),
    };
    let mut b = Bitmaps { io, io_pa, msr, msr_pa, watch };
    let watch = b.watch;
    for p in watch.ports() {
        b.trap_io(p);
    }
    if controls.classes.contains(Class::Io) {
        b.io.fill(0xFF);
    }
    if controls.classes.contains(Class::Msr) {
        b.msr.fill(0xFF);
    }
    b.trap_msr(arch::msr::IA32_FEATURE_CONTROL);
    // KVM's original paravirtual clock MSRs: in the bitmap's range, so they
    // must be trapped explicitly to be refused (see isolation.rs).
    b.trap_msr(arch::msr::KVM_WALL_CLOCK_OLD);
    b.trap_msr(arch::msr::KVM_SYSTEM_TIME_OLD);
    for m in arch::msr::IA32_VMX_BASIC..=arch::msr::IA32_VMX_EXIT_CTLS2 {
        b.trap_msr(m);
    }
    // External interrupts are acknowledged on exit: the PICs' ports are
    // watched so that one from a PIC reaches the guest as the guest's PIC
    // would deliver it (see pic.rs).
    if controls.classes.contains(Class::Extint) {
        for p in pic::PORTS {
            b.trap_io(p);
        }
    }
    b
}

/// The CPUs [`shared_state`] found: the boot CPU's local APIC and the APIC
/// ids of the APs to start.
struct Cpus {
    lapic: smp::LocalApic,
    aps: Vec<u32>,
    /// Whether the MADT listed any CPU.
    acpi_cpus_found: bool,
}

/// Phase 5, shared state: everything every vCPU reads and nobody writes
/// (options, ACPI facts, controls, the EPT ranges, ...), set once in
/// [`state::init`]; from here on [`state::shared`] answers.
fn shared_state(
    opts: options::Options,
    m: Machine,
    place: &Placement,
    guest_map: &guest_loader::memmap::MemoryMap,
    bitmaps: &mut Bitmaps,
) -> (&'static state::Shared, Cpus) {
    let Machine { acpi, probe, controls } = m;
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
    let max_cpus = opts.max_cpus.map_or(MAX_CPUS, |n| n as usize);
    let lapic = smp::LocalApic::current();
    let bsp_id = lapic.id();
    let machine_cpus = acpi.cpus_boot_first(bsp_id);
    let aps: Vec<u32> = machine_cpus[1..].iter().copied().take(max_cpus.saturating_sub(1)).collect();
    // With several CPUs, INIT and SIPI IPIs are emulated (to vCPUs) or
    // dropped (to the others, left out with `cpus=`), even with one vCPU:
    // watch the local APIC page.
    let apic_trap = (machine_cpus.len() >= 2).then(|| lapic.base());
    if apic_trap.is_some() {
        bitmaps.trap_msr_write(arch::msr::X2APIC_ICR);
    }
    let acpi_cpus_found = !acpi.cpus.is_empty();
    let mut watched: Vec<(u64, u64)> = apic_trap.iter().map(|&b| (b, b + 4096)).collect();
    // Power-management registers in memory space (see vmx/pmwatch.rs).
    watched.extend(vmx::pmwatch::init(&acpi, opts.test_mmio_pm));
    // Everything up to MAXPHYADDR but the footprint: RAM write-back, the
    // rest (64-bit BARs above RAM included) uncacheable.
    let ept_ranges = ept::guest_ranges(guest_map, place.phys_top, &[place.footprint], &watched);
    let lazy_from = ept::lazy_from(place.map_top, place.large, controls.lazy_ept);
    let efer_allowed = {
        let ext = cpu::cpuid(0x8000_0000, 0)[0];
        let d = if ext >= 0x8000_0001 { cpu::cpuid(0x8000_0001, 0)[3] } else { 0 };
        let bit = |cpuid_bit: u32, efer: u64| if d & (1 << cpuid_bit) != 0 { efer } else { 0 };
        bit(11, arch::EFER_SCE) | bit(29, arch::EFER_LME) | bit(20, arch::EFER_NXE)
    };
    let sh = state::init(state::Shared {
        options: opts,
        acpi,
        controls,
        enabled,
        footprint: place.footprint,
        ncpus: core::sync::atomic::AtomicUsize::new(1),
        watch: bitmaps.watch,
        xcr0_supported,
        hide,
        apic_trap,
        ept_ranges,
        efer_allowed,
        phys_bits: place.phys_bits,
        phys_mapped: place.phys_limit,
        lazy_from,
        ins_outs_info: probe.basic & (1 << 54) != 0,
    });
    state::APIC_IDS[0].store(bsp_id, core::sync::atomic::Ordering::SeqCst);
    (sh, Cpus { lapic, aps, acpi_cpus_found })
}

/// One EPT tree for all vCPUs: built up front below `lazy_from`, filled on
/// demand above it (all of it under ept=lazy), see ept.rs. Returns the EPTP.
fn build_ept(sh: &state::Shared, large: (bool, bool)) -> u64 {
    match ept::build(&ept::below(&sh.ept_ranges, sh.lazy_from), &mut memory::ArenaTables, large) {
        Ok(root) => ept::eptp(root),
        Err(e) => boot_error(format_args!("{e}")),
    }
}

/// Phase 6, the boot CPU: its own GDT/TSS, then VMX operation.
fn start_bsp(sh: &state::Shared, setup: VcpuSetup) -> &'static mut VcpuSetup {
    let bsp = arena_box(setup);
    bsp.mem.tables.load();
    idt::load_idt();
    if let Err(e) = enable_vmx(&sh.controls, bsp.mem.vmxon_pa) {
        boot_error(format_args!("{e}"));
    }
    bsp
}

/// Phase 7, AP start: every other CPU is started (INIT, SIPI, SIPI) at the
/// trampoline, enters VMX operation in [`ap_entry`] and parks in VMX
/// non-root operation (wait-for-SIPI), or in root mode where the CPU lacks
/// that activity state. CPUs that are not vCPUs are hidden in the MADT.
fn start_aps(
    sh: &'static state::Shared,
    cpus: &Cpus,
    guest_map: &guest_loader::memmap::MemoryMap,
    staged: (u64, u64),
    setup: &dyn Fn(usize) -> VcpuSetup,
) {
    use core::sync::atomic::Ordering::SeqCst;
    if !cpus.aps.is_empty() {
        if !sh.controls.wait_for_sipi_state {
            hvprintln!("SMP: no wait-for-SIPI activity state: APs wait for their SIPI in VMX root operation");
        }
        let entry = ap_entry as *const () as u64;
        let Some(tramp) = smp::install_trampoline(guest_map, &[staged], entry, cpu::read_cr3()) else {
            boot_error(format_args!("no free page below 1 MiB for the AP start-up code"))
        };
        for &apic_id in &cpus.aps {
            let id = sh.ncpus.load(SeqCst);
            let ap = arena_box(setup(id));
            let stack = &*ap.mem.state as *const vmx::vcpu::VcpuState as u64 - 8;
            let ready: &'static core::sync::atomic::AtomicBool = ap.ready;
            // The setup block is the AP's from here on: this CPU keeps only
            // the shared `ready` flag.
            let arg = ap as *mut VcpuSetup as u64;
            let t0 = cpu::rdtsc();
            let started = smp::start_ap(&cpus.lapic, apic_id, &tramp, stack, arg);
            let ready = tsc::spin_until(1_000_000, || ready.load(SeqCst));
            if started && ready {
                let ticks = cpu::rdtsc().wrapping_sub(t0);
                hvprintln!("SMP: vCPU {id} (APIC id {apic_id}) ready in {} us ({ticks} TSC ticks)", tsc::us_for_ticks(ticks, tsc::hz()));
                state::APIC_IDS[id].store(apic_id, SeqCst);
                sh.ncpus.fetch_add(1, SeqCst);
            } else {
                hvprintln!("warning: CPU with APIC id {apic_id} did not start; continuing without it");
            }
        }
    }
    let ncpus = sh.ncpus.load(SeqCst);
    let vcpu_ids: Vec<u32> = state::APIC_IDS[..ncpus].iter().map(|a| a.load(SeqCst)).collect();
    if let Some(line) = acpi::hide_non_vcpus(&sh.acpi, &vcpu_ids) {
        hvprintln!("{line}");
    }
    if !cpus.acpi_cpus_found {
        hvprintln!("no ACPI MADT: running on the boot CPU only");
    }
}

/// Phase 8, guest load: plans the guest from the staged modules
/// (guest-loader) and writes it into its memory.
fn load_guest(bi: &BootInfo, staged: &guest::Staged, guest_map: &guest_loader::memmap::MemoryMap, sh: &state::Shared) -> guest::Loaded {
    let loaded = match guest::load(bi, staged, guest_map, sh.acpi.rsdp_addr) {
        Ok(l) => l,
        Err(e) => boot_error(format_args!("{e}")),
    };
    hvprintln!("guest: {}", loaded.summary);
    loaded
}

/// Phase 9, launch: the boot CPU's VMCS, at the guest's entry point, then
/// the first VM entry. Never returns: the exit loop owns the vCPU.
fn launch(sh: &state::Shared, bsp: &'static mut VcpuSetup, loaded: &guest::Loaded) -> ! {
    if let Err(e) = vmx::load_vmcs(bsp.mem.vmcs_pa) {
        boot_error(format_args!("{e}"));
    }
    // The state block is the exit loop's for good: taken out of the setup
    // block for 'static (no raw pointer), which is not used again.
    let v: &'static mut vmx::vcpu::VcpuState = &mut *bsp.mem.state;
    let start = vmx::vcpu::Start::Guest(&loaded.entry);
    if let Err(e) = vmx::vcpu::setup_vmcs(v, &sh.controls, bsp.mem.tables, bsp.io_bitmaps_pa, bsp.msr_bitmap_pa, bsp.eptp, start) {
        boot_error(format_args!("VMCS setup: {e}"));
    }
    if let Err(e) = vmx::shadowvm::start(v) {
        boot_error(format_args!("VMCS setup: {e}"));
    }
    vmx::invept(sh.controls.invept_single, bsp.eptp);
    let (used, total) = memory::arena_usage();
    hvprintln!("heap: {} of {} KiB used", used / 1024, total / 1024);
    if let (true, Some(t)) = (cfg!(feature = "detailed"), sh.options.timeline) {
        statsys::start_timeline(t);
    }
    hvprintln!("entering the guest ({}) on {} vCPU(s)", loaded.kind, sh.ncpus.load(core::sync::atomic::Ordering::SeqCst));
    vmx::stub::launch(v)
}

/// What a vCPU needs to start: built by the boot CPU, used on its own CPU.
struct VcpuSetup {
    mem: vmx::vcpu::VcpuMemory,
    eptp: u64,
    io_bitmaps_pa: u64,
    msr_bitmap_pa: u64,
    /// Set by an AP when its VMCS is ready and it is about to enter; the
    /// boot CPU waits on it (its own reference, not through this block,
    /// which is the AP's).
    ready: &'static core::sync::atomic::AtomicBool,
}

/// Arena bytes one vCPU takes: its VMXON region and VMCS, its stack and
/// state (and detail block), its fault stack, descriptor tables, setup block and
/// its ready flag (each rounded up as `vmx::vcpu::alloc` and [`arena_box`]
/// align them; the setup block's 64 bytes of slack cover its alignment and
/// the one-byte flag).
pub(crate) fn vcpu_arena_bytes() -> usize {
    let page = memory::PAGE;
    // The state block, the counter block and (detailed builds) the detail
    // block after them, in one run of pages.
    let state = vmx::vcpu::STATE_BYTES.next_multiple_of(page);
    let tables = core::mem::size_of::<idt::PerCpuTables>() + 64;
    2 * page + vmx::vcpu::STACK_SIZE + state + vmx::vcpu::FAULT_STACK_SIZE + tables + core::mem::size_of::<VcpuSetup>() + 64
}

/// Moves a value into the arena for good ([`memory::arena_box`]); out of
/// memory stops the boot with a report.
fn arena_box<T>(v: T) -> &'static mut T {
    memory::arena_box(v).unwrap_or_else(|e| boot_error(format_args!("{e}")))
}

/// An AP's first Rust code, entered from the trampoline in long mode on the
/// hypervisor's page tables, on its own stack.
///
/// `setup` is this AP's alone: the boot CPU handed it over through the
/// trampoline and kept only the `ready` flag.
extern "C" fn ap_entry(setup: &'static mut VcpuSetup) -> ! {
    // Before anything can fail and ask which vCPU it is on.
    cpu::clear_gs_base();
    let sh = state::shared();
    // The state block is the exit loop's for good (see `launch`).
    let v: &'static mut vmx::vcpu::VcpuState = &mut *setup.mem.state;
    setup.mem.tables.load();
    idt::load_idt();
    // IA32_FEATURE_CONTROL is per CPU: firmware that left it unlocked on
    // the boot CPU may have left it so here too.
    let fc = fallible::rdmsr_safe(arch::msr::IA32_FEATURE_CONTROL).unwrap_or(0);
    match caps::check_presence(cpu::cpuid(1, 0)[2], fc) {
        Err(e) => boot_error(format_args!("AP {}: {e}", v.id)),
        Ok(FeatureControl::Ready) => {}
        Ok(FeatureControl::Write(fc)) => {
            if !fallible::wrmsr_safe(arch::msr::IA32_FEATURE_CONTROL, fc) {
                boot_error(format_args!("AP {}: could not enable VMX in IA32_FEATURE_CONTROL", v.id));
            }
            hvprintln!("AP {}: IA32_FEATURE_CONTROL was unlocked: enabled VMX and locked it", v.id);
        }
    }
    if let Err(e) = enable_vmx(&sh.controls, setup.mem.vmxon_pa) {
        boot_error(format_args!("AP {}: {e}", v.id));
    }
    if let Err(e) = vmx::load_vmcs(setup.mem.vmcs_pa) {
        boot_error(format_args!("AP {}: {e}", v.id));
    }
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
    if let Err(e) = vmx::shadowvm::start(v) {
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
    vmx::stub::launch(v)
}

/// CR0/CR4 as VMX requires, then VMXON.
fn enable_vmx(c: &caps::Controls, vmxon_pa: u64) -> Result<(), alloc::string::String> {
    let cr0 = caps::fix_cr(cpu::read_cr0(), c.cr0_fixed0, c.cr0_fixed1).ok_or("CR0 has bits VMX does not allow")?;
    // CR4.VMXE, OSXSAVE and MCE (see `caps::host_cr4`), on every CPU.
    let l1 = cpu::cpuid(1, 0);
    let cr4 = caps::host_cr4(cpu::read_cr4(), l1[2], l1[3], c.cr4_fixed0, c.cr4_fixed1).ok_or("CR4 has bits VMX does not allow")?;
    vmx::enter_vmx_operation(cr0, cr4, vmxon_pa).map_err(|e| alloc::format!("{e}"))
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
        if c.shadow {
            "off (shadow paging: #PF, CR3, INVLPG and INVPCID exit while the guest's paging is on; the paging-off phases run on the eager EPT)"
        } else if c.lazy_ept {
            "lazy"
        } else {
            "eager"
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bitmaps() -> Bitmaps {
        let page = |n: usize| std::boxed::Box::leak(std::vec![0u8; n * 4096].into_boxed_slice());
        Bitmaps { io: page(2), io_pa: 0, msr: page(1), msr_pa: 0, watch: state::PortWatch::default() }
    }

    #[test]
    fn bitmap_bits_are_the_sdms() {
        let mut b = bitmaps();
        // I/O bitmap A then B, one bit per port.
        b.trap_io(0x64);
        b.trap_io(0xCF9);
        b.trap_io(0x8900);
        assert_eq!(b.io[0x64 / 8], 1 << 4);
        assert_eq!(b.io[0xCF9 / 8], 1 << 1);
        assert_eq!(b.io[0x8900 / 8], 1, "port 0x8900 is in bitmap B");
        assert_eq!(b.io.iter().map(|x| x.count_ones()).sum::<u32>(), 3);
        // MSR bitmap: read low, read high, write low, write high (1 KiB each).
        b.trap_msr(arch::msr::IA32_FEATURE_CONTROL);
        assert_eq!(b.msr[0x3A / 8], 1 << 2, "read, low MSRs");
        assert_eq!(b.msr[2048 + 0x3A / 8], 1 << 2, "write, low MSRs");
        b.trap_msr(arch::msr::IA32_EFER);
        assert_eq!(b.msr[1024 + 0x80 / 8], 1, "read, high MSRs");
        assert_eq!(b.msr[3072 + 0x80 / 8], 1, "write, high MSRs");
        b.trap_msr_write(arch::msr::X2APIC_ICR);
        assert_eq!(b.msr[0x830 / 8], 0, "a write trap leaves reads alone");
        assert_eq!(b.msr[2048 + 0x830 / 8], 1, "write, low MSRs");
        assert_eq!(b.msr.iter().map(|x| x.count_ones()).sum::<u32>(), 5);
    }
}
