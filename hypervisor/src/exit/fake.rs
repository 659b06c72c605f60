//! A fake vCPU and machine for the handlers' host tests: plain fields that
//! a test sets up and inspects, and a record of every effect.

use super::*;
use crate::decode::{DecodeError, MemAccess};
use crate::emulate::{IrqQueue, MemFault, Segment};
use crate::state::{CpuidHide, PortWatch};
use std::collections::HashMap;
use std::string::String;
use std::vec::Vec;

/// Every instruction the fake skips is this long.
pub const INSN_LEN: u64 = 2;

#[derive(Default)]
pub struct Fake {
    pub id: usize,
    /// By instruction encoding (4 is RSP).
    pub regs: [u64; 16],
    pub rip: u64,
    pub cr4: u64,
    pub state: HashMap<Reg, u64>,
    pub activity: Option<Activity>,
    pub long64: bool,
    pub features: Features,
    pub hide: CpuidHide,
    pub watch: PortWatch,
    pub cpu_leaf1_ecx: u32,
    pub cpu_all_ones: bool,
    pub own: Option<[u32; 4]>,
    /// What IN reads: by port, else `port_value`.
    pub ports: HashMap<u16, u32>,
    pub port_value: u32,
    pub msrs: HashMap<u32, u64>,
    pub xcr0_supported: u64,
    pub xcr0: u64,
    pub pmc: Option<u64>,
    pub tsc: u64,
    pub drs: [u64; 8],
    pub icr_handled: bool,
    pub stopping: bool,
    pub all_halted: bool,
    pub refuse_cr: bool,
    pub refuse_reset: bool,
    pub sipi: Option<u8>,
    pub lazy: bool,
    pub watch_page: Option<Watched>,
    pub decoded: Option<Result<MemAccess, DecodeError>>,
    pub shutdown: usize,
    pub cpl: u8,
    /// Guest memory by linear address (unset bytes read 0).
    pub memory: HashMap<u64, u8>,
    /// An access touching this linear address faults so.
    pub fault_at: Option<(u64, MemFault)>,
    pub irq_queue: IrqQueue,
    /// An event is being injected already; blocking by STI/MOV SS.
    pub event: bool,
    pub shadow: bool,
    /// The local APIC has the interrupt in service (not a PIC's).
    pub in_service: bool,
    pub pics: spin::Mutex<crate::pic::Pics>,
    // Effects.
    pub injected: Vec<(u8, Option<u32>)>,
    pub ports_written: Vec<(u16, u8, u32)>,
    pub ports_read: usize,
    pub icr_writes: Vec<u64>,
    pub flushes: Vec<Flush>,
    pub paging_changes: usize,
    pub resets: usize,
    pub started_at: Vec<u8>,
    pub halted: Vec<usize>,
    pub cleared_halted: Vec<usize>,
    pub waiting: Vec<(usize, bool)>,
    pub interrupts: Vec<u8>,
    /// The interrupt window as last set.
    pub window: Option<bool>,
    pub resumed_in_place: usize,
    pub system_segments: Vec<(SystemSegment, u16, Option<Segment>)>,
    pub wbinvds: usize,
    pub timer_rearmed: usize,
    pub faults_injected: usize,
    pub watched_writes: Vec<(Watched, u64)>,
    pub contained: Vec<(u64, bool, bool, u8)>,
    pub reports: Vec<String>,
    /// What the shadow answers a #PF exit with.
    pub shadow_outcome: Option<crate::shadow::PfOutcome>,
    pub shadow_faults: Vec<(u64, u32)>,
    pub cr2: Option<u64>,
    pub redelivered: usize,
}

impl Fake {
    /// vCPU 0 at RIP 0x1000, RFLAGS 2, everything else zero or off.
    pub fn new() -> Fake {
        let mut f = Fake { rip: 0x1000, ..Default::default() };
        f.state.insert(Reg::Rflags, 2);
        f
    }

    /// Writes guest memory.
    pub fn poke(&mut self, la: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.memory.insert(la + i as u64, *b);
        }
    }

    /// Reads guest memory.
    pub fn memory_at(&self, la: u64, n: usize) -> Vec<u8> {
        (0..n as u64).map(|i| self.memory.get(&(la + i)).copied().unwrap_or(0)).collect()
    }

    fn check(&self, la: u64, len: usize) -> Result<(), MemFault> {
        match self.fault_at {
            Some((at, f)) if (la..la + len as u64).contains(&at) => Err(f),
            _ => Ok(()),
        }
    }
}

impl Vcpu for Fake {
    fn id(&self) -> usize {
        self.id
    }
    fn gpr(&self, n: u8) -> u64 {
        self.regs[(n & 15) as usize]
    }
    fn set_gpr(&mut self, n: u8, value: u64) {
        self.regs[(n & 15) as usize] = value;
    }
    fn read(&self, r: Reg) -> u64 {
        match r {
            Reg::Rip => self.rip,
            Reg::Cr4 => self.cr4,
            _ => self.state.get(&r).copied().unwrap_or(0),
        }
    }
    fn write(&mut self, r: Reg, value: u64) {
        match r {
            Reg::Rip => self.rip = value,
            Reg::Cr4 => self.cr4 = value,
            _ => {
                self.state.insert(r, value);
            }
        }
    }
    fn set_cr0(&mut self, value: u64) -> bool {
        if self.refuse_cr {
            return false;
        }
        self.state.insert(Reg::Cr0, value);
        self.state.insert(Reg::Cr0Shadow, value);
        true
    }
    fn set_cr4(&mut self, value: u64) -> bool {
        if self.refuse_cr {
            return false;
        }
        self.cr4 = value;
        true
    }
    fn paging_changed(&mut self) {
        self.paging_changes += 1;
    }
    fn flush_tlb(&mut self, f: Flush) {
        self.flushes.push(f);
    }
    fn inject(&mut self, vector: u8, error: Option<u32>) {
        self.injected.push((vector, error));
    }
    fn set_cr2(&mut self, value: u64) {
        self.cr2 = Some(value);
    }
    fn redeliver_event(&mut self) {
        self.redelivered += 1;
    }
    fn skip(&mut self) {
        self.rip += INSN_LEN;
    }
    fn advance(&mut self, len: u64) {
        self.rip += len;
    }
    fn resume_in_place(&mut self) {
        self.resumed_in_place += 1;
    }
    fn cpl(&self) -> u8 {
        self.cpl
    }
    fn load_system_segment(&mut self, s: SystemSegment, selector: u16, seg: Option<Segment>) {
        self.system_segments.push((s, selector, seg));
    }
    fn activity(&self) -> Activity {
        self.activity.unwrap_or(Activity::Active)
    }
    fn set_activity(&mut self, a: Activity) {
        self.activity = Some(a);
    }
    fn reset_to_wait_for_sipi(&mut self) -> bool {
        self.resets += 1;
        !self.refuse_reset
    }
    fn start_at_sipi(&mut self, vector: u8) -> bool {
        self.started_at.push(vector);
        !self.refuse_reset
    }
    fn wait_for_sipi(&mut self) -> Option<u8> {
        self.sipi
    }
    fn irqs(&mut self) -> &mut IrqQueue {
        &mut self.irq_queue
    }
    fn event_pending(&self) -> bool {
        self.event
    }
    fn interrupt_shadow(&self) -> bool {
        self.shadow
    }
    fn inject_interrupt(&mut self, vector: u8) {
        self.interrupts.push(vector);
    }
    fn set_interrupt_window(&mut self, on: bool) {
        self.window = Some(on);
    }
    fn in_64bit_mode(&self) -> bool {
        self.long64
    }
    fn rearm_timer(&mut self) {
        self.timer_rearmed += 1;
    }
    fn shutdown_len(&self) -> usize {
        self.shutdown
    }
    fn set_shutdown_len(&mut self, n: usize) {
        self.shutdown = n;
    }
}

impl Machine for Fake {
    fn cpuid(&self, leaf: u32, _sub: u32) -> [u32; 4] {
        match leaf {
            _ if self.cpu_all_ones => [u32::MAX; 4],
            1 => [0x906EA, 0, self.cpu_leaf1_ecx, 0],
            _ => [leaf; 4],
        }
    }
    fn own_leaf(&mut self, _leaf: u32, _sub: u32) -> Option<[u32; 4]> {
        self.own
    }
    fn hide(&self) -> CpuidHide {
        self.hide
    }
    fn port_watch(&self) -> &PortWatch {
        &self.watch
    }
    fn port_in(&mut self, port: u16, _size: u8) -> u32 {
        self.ports_read += 1;
        self.ports.get(&port).copied().unwrap_or(self.port_value)
    }
    fn port_out(&mut self, port: u16, size: u8, value: u32) {
        self.ports_written.push((port, size, value));
    }
    fn pics(&self) -> &spin::Mutex<crate::pic::Pics> {
        &self.pics
    }
    fn apic_in_service(&self, _vector: u8) -> bool {
        self.in_service
    }
    fn rdmsr(&mut self, msr: u32) -> Option<u64> {
        self.msrs.get(&msr).copied()
    }
    fn wrmsr(&mut self, msr: u32, value: u64) -> bool {
        self.msrs.get_mut(&msr).map(|m| *m = value).is_some()
    }
    fn xsetbv(&mut self, _xcr: u32, value: u64) -> bool {
        self.xcr0 = value;
        true
    }
    fn xcr0_supported(&self) -> u64 {
        self.xcr0_supported
    }
    fn rdpmc(&mut self, _counter: u32) -> Option<u64> {
        self.pmc
    }
    fn rdtsc(&self) -> u64 {
        self.tsc
    }
    fn wbinvd(&mut self) {
        self.wbinvds += 1;
    }
    fn read_dr(&self, n: u8) -> u64 {
        self.drs[n as usize]
    }
    fn write_dr(&mut self, n: u8, value: u64) {
        self.drs[n as usize] = value;
    }
    fn features(&self) -> Features {
        self.features
    }
    fn x2apic_icr(&mut self, value: u64) -> bool {
        self.icr_writes.push(value);
        self.icr_handled
    }
    fn inject_fault(&mut self) {
        self.faults_injected += 1;
    }
    fn report(&mut self, line: core::fmt::Arguments) {
        self.reports.push(std::format!("{line}"));
    }
    fn stopping(&self) -> bool {
        self.stopping
    }
    fn halted_for_good(&mut self, id: usize) -> bool {
        self.halted.push(id);
        self.all_halted
    }
    fn set_waiting_for_sipi(&mut self, id: usize, waiting: bool) {
        self.waiting.push((id, waiting));
    }
    fn clear_halted(&mut self, id: usize) {
        self.cleared_halted.push(id);
    }
    fn map_on_demand(&mut self, _f: NestedFault) -> Option<Flow> {
        self.lazy.then_some(Flow::Resume)
    }
    fn watched(&self, _gpa: u64) -> Option<Watched> {
        self.watch_page
    }
    fn emulate_watched_write(&mut self, w: Watched, gpa: u64) -> Flow {
        self.watched_writes.push((w, gpa));
        Flow::Resume
    }
    fn decode_at_rip(&mut self) -> Option<Result<MemAccess, DecodeError>> {
        self.decoded
    }
    fn bytes_at_rip(&mut self) -> ([u8; 15], usize) {
        let mut b = [0; 15];
        b[..2].copy_from_slice(&[0x8B, 0x07]);
        (b, 2)
    }
    fn note_contained(&mut self, gpa: u64, read: bool, write: bool, size: u8) {
        self.contained.push((gpa, read, write, size));
    }
    fn region_name(&self, _gpa: u64) -> &'static str {
        "an unbacked physical address"
    }
    fn shadow_fault(&mut self, la: u64, error_code: u32) -> crate::shadow::PfOutcome {
        self.shadow_faults.push((la, error_code));
        self.shadow_outcome.expect("the test sets the shadow's answer")
    }
    fn read_linear(&mut self, la: u64, buf: &mut [u8], _user: bool) -> Result<(), MemFault> {
        self.check(la, buf.len())?;
        buf.copy_from_slice(&self.memory_at(la, buf.len()));
        Ok(())
    }
    fn write_linear(&mut self, la: u64, data: &[u8], _user: bool) -> Result<(), MemFault> {
        self.check(la, data.len())?;
        self.poke(la, data);
        Ok(())
    }
    fn check_write_linear(&mut self, la: u64, len: usize, _user: bool) -> Result<(), MemFault> {
        self.check(la, len)
    }
}
