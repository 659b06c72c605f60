//! The multiboot1 memory map, and the hole in it where the hypervisor is.

use guest_rt::BootInfo;

/// Memory-map entries kept (more are ignored).
const MAX: usize = 64;

#[derive(Clone, Copy, Default)]
pub struct Entry {
    pub start: u64,
    pub end: u64,
    pub kind: u32,
}

pub struct MemoryMap {
    pub entries: [Entry; MAX],
    pub len: usize,
}

impl MemoryMap {
    pub fn entries(&self) -> &[Entry] {
        &self.entries[..self.len]
    }
}

fn rd32(a: u64) -> u32 {
    // SAFETY: the loader's info block and map, below 4 GiB, identity-mapped.
    unsafe { core::ptr::read_unaligned(a as *const u32) }
}

fn rd64(a: u64) -> u64 {
    // SAFETY: as above.
    unsafe { core::ptr::read_unaligned(a as *const u64) }
}

/// The map the loader gave (flags bit 6), if any.
pub fn read(boot: &BootInfo) -> Option<MemoryMap> {
    if !boot.is_multiboot() || boot.flags() & (1 << 6) == 0 {
        return None;
    }
    let info = boot.info_addr() as u64;
    let (len, addr) = (rd32(info + 44) as u64, rd32(info + 48) as u64);
    let mut m = MemoryMap { entries: [Entry::default(); MAX], len: 0 };
    let mut p = addr;
    while p + 24 <= addr + len && m.len < MAX {
        let size = rd32(p) as u64;
        let (base, length, kind) = (rd64(p + 4), rd64(p + 12), rd32(p + 20));
        m.entries[m.len] = Entry { start: base, end: base.saturating_add(length), kind };
        m.len += 1;
        if size < 20 {
            break;
        }
        p += size + 4;
    }
    Some(m)
}

/// Where the hypervisor's footprint is, and how the guest knows.
pub fn find_hole(m: &MemoryMap) -> Option<(u64, u64, &'static str)> {
    if let Some((s, e)) = hole_between_ram(m) {
        return Some((s, e, "between two RAM ranges"));
    }
    // No gap: the footprint may be the top of RAM (a firmware that puts no
    // ACPI tables up there). The PC's CMOS says how much RAM the machine
    // has above 16 MiB (registers 0x34/0x35, in 64 KiB units).
    let top = (16u64 << 20) + ((cmos(0x35) as u64) << 24 | (cmos(0x34) as u64) << 16);
    let end = m.entries().iter().filter(|a| a.kind == 1 && a.end <= 1 << 32).map(|a| a.end).max()?;
    let covered = m.entries().iter().any(|x| x.start < top && end < x.end);
    (end < top && top <= 1 << 32 && !covered).then_some((end, top, "between the end of RAM in the map and the RAM size in CMOS"))
}

fn cmos(reg: u8) -> u8 {
    // SAFETY: the RTC/CMOS index and data ports; reading a register only.
    unsafe {
        guest_rt::outb(0x70, reg);
        guest_rt::inb(0x71)
    }
}

/// The largest gap above 1 MiB and below 4 GiB between the end of one RAM
/// range and the start of the next that no entry of any kind covers.
fn hole_between_ram(m: &MemoryMap) -> Option<(u64, u64)> {
    let e = m.entries();
    let mut best: Option<(u64, u64)> = None;
    for a in e.iter().filter(|a| a.kind == 1) {
        // The RAM range starting next after `a`.
        let Some(next) = e.iter().filter(|b| b.kind == 1 && b.start >= a.end).map(|b| b.start).min() else { continue };
        let (s, t) = (a.end, next);
        if s >= t || s < 1 << 20 || t > 1 << 32 {
            continue;
        }
        if e.iter().any(|x| x.start < t && s < x.end) {
            continue;
        }
        if best.is_none_or(|(bs, bt)| t - s > bt - bs) {
            best = Some((s, t));
        }
    }
    best
}
