//! The few ACPI facts the hypervisor needs: how to power off and reset the
//! machine (FADT, DSDT `\_S5`), which ports the guest uses for that (so they
//! can be watched), and the processors (MADT). Pure parsing over [`PhysMem`].

use crate::bootinfo::{BootInfo, PhysMem, RsdpInfo};
use alloc::vec::Vec;
use guest_loader::memmap::{MemKind, MemoryMap, Region};

/// Where a 16550-compatible UART's registers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UartPort {
    /// I/O ports `base..base+8`.
    Io(u16),
    /// Memory-mapped: with `wide`, 32-bit registers 4 bytes apart (Linux's
    /// `mmio32`), else byte registers 1 byte apart (`mmio`).
    Mmio { base: u64, wide: bool },
}

impl core::fmt::Display for UartPort {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            UartPort::Io(p) => write!(f, "I/O port {p:#x}"),
            UartPort::Mmio { base, wide: true } => write!(f, "MMIO {base:#x} (32-bit registers)"),
            UartPort::Mmio { base, wide: false } => write!(f, "MMIO {base:#x} (byte registers)"),
        }
    }
}

/// A register named by an ACPI Generic Address Structure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcpiReg {
    Io(u16),
    Memory(u64),
}

impl core::fmt::Display for AcpiReg {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AcpiReg::Io(p) => write!(f, "port {p:#x}"),
            AcpiReg::Memory(a) => write!(f, "MMIO {a:#x}"),
        }
    }
}

/// Where the RSDP the guest gets was found (for the boot log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsdpSource {
    /// The EFI configuration table (multiboot2 tag 12): its ACPI 2.0 entry,
    /// or its ACPI 1.0 entry when there is no 2.0 one.
    EfiSystemTable { acpi20: bool },
    /// Given by the boot loader as an address (the UEFI front-end).
    Loader,
    /// Found by scanning the ACPI reclaim and NVS ranges of the memory map.
    AcpiRanges,
    /// Found by scanning the BIOS areas (EBDA, 0xE0000-0xFFFFF).
    BiosArea,
    /// Only the boot loader's copy (multiboot2 tag 14 or 15) was found: the
    /// guest gets a copy placed in reserved memory ([`place_rsdp_copy`]).
    LoaderCopy,
}

impl core::fmt::Display for RsdpSource {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RsdpSource::EfiSystemTable { acpi20: true } => "EFI system table, ACPI 2.0 entry",
            RsdpSource::EfiSystemTable { acpi20: false } => "EFI system table, ACPI 1.0 entry",
            RsdpSource::Loader => "from the boot loader",
            RsdpSource::AcpiRanges => "ACPI memory ranges",
            RsdpSource::BiosArea => "BIOS area",
            RsdpSource::LoaderCopy => "multiboot2 copy only",
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acpi {
    /// Physical address of the RSDP, when known: the address the guest is
    /// given (for [`RsdpSource::LoaderCopy`], set once the copy is placed).
    pub rsdp_addr: Option<u64>,
    /// Where the RSDP came from.
    pub rsdp_source: Option<RsdpSource>,
    /// The RSDP's bytes (20, or 36 from ACPI 2.0 on), kept to give the guest
    /// a copy when only the loader's copy was found.
    pub rsdp_bytes: Vec<u8>,
    pub pm1a_cnt: Option<AcpiReg>,
    pub pm1b_cnt: Option<AcpiReg>,
    /// SLP_TYPa and SLP_TYPb of S5 (soft off), from the DSDT.
    pub s5: Option<(u8, u8)>,
    pub reset_reg: Option<(AcpiReg, u8)>,
    pub smi_cmd: u16,
    pub acpi_enable: u8,
    /// The power-management timer (3.579545 MHz): its register, and whether
    /// it counts 32 bits (FADT flag TMR_VAL_EXT) rather than 24.
    pub pm_timer: Option<(AcpiReg, bool)>,
    /// Local APIC ids of the processors that may be started (MADT entries
    /// enabled or online capable), each once, in MADT order; see
    /// [`Acpi::cpus_boot_first`].
    pub cpus: Vec<u32>,
    /// Physical address and length of the MADT, to hide CPUs in it.
    pub madt: Option<(u64, usize)>,
    pub lapic_base: Option<u64>,
    /// Tables found (signatures), for the boot log.
    pub tables: Vec<[u8; 4]>,
    /// FADT flag HW_REDUCED_ACPI (bit 20): no PM1 registers; sleep goes
    /// through the sleep control register.
    pub hw_reduced: bool,
    /// FADT SLEEP_CONTROL_REG and SLEEP_STATUS_REG (offsets 244 and 256).
    pub sleep_control: Option<AcpiReg>,
    pub sleep_status: Option<AcpiReg>,
    /// The console the SPCR table names, if it is a 16550-compatible UART.
    pub spcr: Option<Spcr>,
}

/// The serial console named by the SPCR table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spcr {
    pub port: UartPort,
    /// Baud rate the firmware configured (None: "as is").
    pub baud: Option<u32>,
}

/// PM1 control register: SLP_EN, SLP_TYP and SCI_EN.
pub const SLP_EN: u16 = 1 << 13;
pub const SCI_EN: u16 = 1;
pub fn slp_typ(pm1_cnt: u16) -> u8 {
    ((pm1_cnt >> 10) & 7) as u8
}

/// HW-reduced ACPI sleep control register (8 bits): SLP_EN and SLP_TYPx.
pub const SLEEP_SLP_EN: u8 = 1 << 5;
pub fn sleep_slp_typ(ctl: u8) -> u8 {
    (ctl >> 2) & 7
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

/// Scans the BIOS areas for the RSDP (EBDA first KiB, then 0xE0000-0xFFFFF).
pub fn find_rsdp(mem: &impl PhysMem) -> Option<u64> {
    find_rsdp_matching(mem, None)
}

/// An RSDP at `p`: signature and checksum of the first 20 bytes (and of all
/// of them from ACPI 2.0 on, when its length field is sane).
fn rsdp_ok(b: &[u8]) -> bool {
    if b.len() < 20 || &b[..8] != b"RSD PTR " || !checksum_ok(&b[..20]) {
        return false;
    }
    match (b[15], le32(b, 20)) {
        (2.., Some(len)) if (36..=b.len() as u32).contains(&len) => checksum_ok(&b[..len as usize]),
        _ => true,
    }
}

/// The RSDP's bytes at `pa` (36 when readable, else 20), if valid.
fn rsdp_at(mem: &impl PhysMem, pa: u64) -> Option<&[u8]> {
    let b = mem.bytes(pa, 36).or_else(|| mem.bytes(pa, 20))?;
    rsdp_ok(b).then_some(b)
}

/// Whether the RSDP `b` is the one `copy` was taken from: same revision
/// and root table addresses (the first 20 bytes, and the XSDT address).
fn same_rsdp(b: &[u8], copy: &[u8]) -> bool {
    b.get(..20) == copy.get(..20) && (copy.len() < 32 || b.get(24..32) == copy.get(24..32))
}

/// Scans `[start, end)` on 16-byte boundaries for a valid RSDP (the one
/// `copy` was taken from, if given).
fn scan_rsdp(mem: &impl PhysMem, start: u64, end: u64, copy: Option<&[u8]>) -> Option<u64> {
    let mut p = start.next_multiple_of(16);
    while p + 20 <= end {
        if mem.bytes(p, 8) == Some(b"RSD PTR ".as_slice()) {
            if let Some(b) = rsdp_at(mem, p) {
                if copy.is_none_or(|c| same_rsdp(b, c)) {
                    return Some(p);
                }
            }
        }
        p += 16;
    }
    None
}

fn find_rsdp_matching(mem: &impl PhysMem, copy: Option<&[u8]>) -> Option<u64> {
    let ebda = mem.u16_at(0x40E).map(|s| (s as u64) << 4).filter(|e| (0x80000..0xA0000).contains(e));
    let ranges = ebda.map(|e| (e, e + 1024)).into_iter().chain([(0xE0000, 0x100000)]);
    for (start, end) in ranges {
        if let Some(p) = scan_rsdp(mem, start, end, copy) {
            return Some(p);
        }
    }
    None
}

/// Most bytes of ACPI ranges scanned for the RSDP, and the limit below
/// which they are scanned (the early page tables map 0..4 GiB).
const ACPI_SCAN_MAX: u64 = 64 << 20;
const ACPI_SCAN_BELOW: u64 = 1 << 32;

/// Scans the memory map's ACPI reclaim ranges, then its ACPI NVS ranges,
/// for the RSDP (UEFI firmware keeps it there; it is not in the BIOS areas).
pub fn find_rsdp_in_acpi_ranges(mem: &impl PhysMem, map: &MemoryMap, copy: Option<&[u8]>) -> Option<u64> {
    let mut budget = ACPI_SCAN_MAX;
    for kind in [MemKind::AcpiReclaimable, MemKind::AcpiNvs] {
        for r in map.regions().iter().filter(|r| r.kind == kind && r.start < ACPI_SCAN_BELOW) {
            let end = r.end.min(ACPI_SCAN_BELOW).min(r.start + budget);
            if let Some(p) = scan_rsdp(mem, r.start, end, copy) {
                return Some(p);
            }
            budget -= end - r.start;
            if budget == 0 {
                return None;
            }
        }
    }
    None
}

/// `EFI_ACPI_20_TABLE_GUID` 8868e871-e4f1-11d3-bc22-0080c73c8881 and
/// `ACPI_TABLE_GUID` (1.0) eb9d2d30-2d88-11d3-9a16-0090273fc14d, as stored
/// (the first three fields little-endian). The 2.0 value is as the UEFI
/// specification and edk2 define it, and as OVMF's configuration table
/// holds it.
pub const EFI_ACPI20_GUID: [u8; 16] = [0x71, 0xe8, 0x68, 0x88, 0xf1, 0xe4, 0xd3, 0x11, 0xbc, 0x22, 0x00, 0x80, 0xc7, 0x3c, 0x88, 0x81];
pub const EFI_ACPI10_GUID: [u8; 16] = [0x30, 0x2d, 0x9d, 0xeb, 0x88, 0x2d, 0xd3, 0x11, 0x9a, 0x16, 0x00, 0x90, 0x27, 0x3f, 0xc1, 0x4d];
/// "IBI SYST", the EFI system table's signature.
const EFI_SYSTEM_TABLE_SIGNATURE: u64 = 0x5453_5953_2049_4249;

/// The RSDP named by the EFI system table at `st` (x86-64 layout): the
/// ACPI 2.0 entry of its configuration table, else the ACPI 1.0 one, if it
/// points to a valid RSDP. Returns the address and whether it was 2.0.
pub fn rsdp_from_efi(mem: &impl PhysMem, st: u64) -> Option<(u64, bool)> {
    // ACPI is read before the hypervisor maps all memory: only the boot
    // page tables' 0..4 GiB can be read yet.
    let below = |a: u64, what: &str| {
        let ok = a < ACPI_SCAN_BELOW - 4096;
        if !ok {
            log::warn!("EFI {what} at {a:#x} is above 4 GiB, beyond the boot page tables; ignored");
        }
        ok
    };
    if !below(st, "system table") {
        return None;
    }
    if mem.u64_at(st)? != EFI_SYSTEM_TABLE_SIGNATURE {
        log::warn!("EFI system table at {st:#x} has a bad signature; ignored");
        return None;
    }
    let (n, table) = (mem.u64_at(st + 104)?, mem.u64_at(st + 112)?);
    if n > 1024 || table == 0 || table + n * 24 > ACPI_SCAN_BELOW {
        log::warn!("EFI system table at {st:#x}: configuration table {table:#x} with {n} entries; ignored");
        return None;
    }
    let entry = |guid: &[u8; 16]| {
        (0..n).find_map(|i| {
            let e = table + i * 24;
            (mem.bytes(e, 16)? == guid.as_slice()).then(|| mem.u64_at(e + 16)).flatten()
        })
    };
    let (a20, a10) = (entry(&EFI_ACPI20_GUID), entry(&EFI_ACPI10_GUID));
    for (a, v20) in [(a20, true), (a10, false)] {
        match a {
            Some(a) if !below(a, "configuration table's RSDP") => {}
            Some(a) if rsdp_at(mem, a).is_some() => return Some((a, v20)),
            Some(a) => log::warn!("EFI configuration table: no valid RSDP at {a:#x}"),
            None => {}
        }
    }
    None
}

/// Finds the RSDP: the EFI configuration table (multiboot2 tag 12); the
/// address the loader gave; the ACPI reclaim/NVS ranges of the memory map;
/// the BIOS areas; and, where the loader gave only a copy (multiboot2 tags
/// 14/15) and none of these holds its original, that copy (the guest then
/// gets it in reserved memory, see [`place_rsdp_copy`]). A copy found
/// means only the original it was taken from is accepted by the scans.
pub fn locate_rsdp(mem: &impl PhysMem, bi: &BootInfo) -> Option<(Option<u64>, Vec<u8>, RsdpSource)> {
    let found = |a: u64, src| rsdp_at(mem, a).map(|b| (Some(a), b.to_vec(), src));
    if let Some((a, acpi20)) = bi.efi_system_table.and_then(|st| rsdp_from_efi(mem, st)) {
        return found(a, RsdpSource::EfiSystemTable { acpi20 });
    }
    let copy = match &bi.rsdp {
        Some(RsdpInfo::At(a)) => {
            if let r @ Some(_) = found(*a, RsdpSource::Loader) {
                return r;
            }
            log::warn!("no valid RSDP at {a:#x}, where the boot loader said; searching");
            None
        }
        Some(RsdpInfo::Copy(b)) if rsdp_ok(b) => Some(b.as_slice()),
        Some(RsdpInfo::Copy(_)) => {
            log::warn!("the boot loader's copy of the RSDP is invalid; searching");
            None
        }
        None => None,
    };
    if let Some(a) = find_rsdp_in_acpi_ranges(mem, &bi.memory, copy) {
        return found(a, RsdpSource::AcpiRanges);
    }
    if let Some(a) = find_rsdp_matching(mem, copy) {
        return found(a, RsdpSource::BiosArea);
    }
    copy.map(|c| (None, c.to_vec(), RsdpSource::LoaderCopy))
}

/// Gives the guest the RSDP copy of [`RsdpSource::LoaderCopy`]: picks the
/// highest page of RAM below 4 GiB that overlaps none of `avoid` and marks
/// it reserved in `map` (the guest's memory map, so that it is kept out of
/// the guest's RAM). Returns the copy's address; the caller writes
/// `bytes` there.
pub fn place_rsdp_copy(map: &mut MemoryMap, avoid: &[(u64, u64)]) -> Option<u64> {
    let page = map.highest_fit(4096, 4096, 1 << 32, avoid)?;
    map.add(Region::new(page, page + 4096, MemKind::Reserved));
    Some(page)
}

struct Table<'a> {
    sig: [u8; 4],
    addr: u64,
    data: &'a [u8],
}

fn table_at<'a>(mem: &'a impl PhysMem, addr: u64) -> Option<Table<'a>> {
    let len = mem.u32_at(addr + 4)? as usize;
    if !(36..=16 << 20).contains(&len) {
        return None;
    }
    let data = mem.bytes(addr, len)?;
    if !checksum_ok(data) {
        log::warn!("ACPI table {:?} at {addr:#x} has a bad checksum; ignored", core::str::from_utf8(&data[..4]));
        return None;
    }
    Some(Table { sig: data[..4].try_into().ok()?, addr, data })
}

fn le16(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn le32(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn le64(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// A Generic Address Structure at offset `o`, if present and non-zero.
fn gas(b: &[u8], o: usize) -> Option<AcpiReg> {
    let space = *b.get(o)?;
    let addr = le64(b, o + 4)?;
    match (space, addr) {
        (_, 0) => None,
        (0, a) => Some(AcpiReg::Memory(a)),
        (1, a) if a <= 0xFFFF => Some(AcpiReg::Io(a as u16)),
        _ => None,
    }
}

/// Reads the ACPI tables, from the RSDP [`locate_rsdp`] finds for `bi`.
/// Missing ACPI is not an error: the result is then empty and callers fall
/// back (one CPU, emulator power-off ports).
pub fn parse(mem: &impl PhysMem, bi: &BootInfo) -> Acpi {
    let mut acpi = Acpi::default();
    let Some((addr, bytes, source)) = locate_rsdp(mem, bi) else {
        return acpi;
    };
    acpi.rsdp_addr = addr;
    acpi.rsdp_source = Some(source);
    acpi.rsdp_bytes = bytes;
    let rsdp_owned = acpi.rsdp_bytes.clone();
    let rsdp_bytes: &[u8] = &rsdp_owned;
    let revision = rsdp_bytes[15];
    let xsdt = if revision >= 2 { le64(rsdp_bytes, 24).unwrap_or(0) } else { 0 };
    let (root, entry) = if xsdt != 0 { (xsdt, 8) } else { (le32(rsdp_bytes, 16).unwrap_or(0) as u64, 4) };
    let Some(root) = table_at(mem, root) else {
        log::warn!("ACPI root table at {root:#x} is unreadable; continuing without ACPI");
        return acpi;
    };
    let mut addrs = Vec::new();
    let mut o = 36;
    while o + entry <= root.data.len() {
        let a = if entry == 8 { le64(root.data, o) } else { le32(root.data, o).map(u64::from) };
        addrs.extend(a);
        o += entry;
    }
    for a in addrs {
        let Some(t) = table_at(mem, a) else { continue };
        acpi.tables.push(t.sig);
        match &t.sig {
            b"FACP" => parse_fadt(mem, &t, &mut acpi),
            b"APIC" => parse_madt(&t, &mut acpi),
            b"SPCR" => acpi.spcr = parse_spcr(t.data),
            _ => {}
        }
    }
    acpi
}

fn parse_fadt(mem: &impl PhysMem, t: &Table, acpi: &mut Acpi) {
    let d = t.data;
    let io = |o| le32(d, o).filter(|&p| p != 0 && p <= 0xFFFF).map(|p| AcpiReg::Io(p as u16));
    acpi.pm1a_cnt = (d.len() >= 184).then(|| gas(d, 172)).flatten().or_else(|| io(64));
    acpi.pm1b_cnt = (d.len() >= 196).then(|| gas(d, 184)).flatten().or_else(|| io(68));
    acpi.smi_cmd = le32(d, 48).unwrap_or(0) as u16;
    acpi.acpi_enable = d.get(52).copied().unwrap_or(0);
    let flags = le32(d, 112).unwrap_or(0);
    let tmr = (d.len() >= 220).then(|| gas(d, 208)).flatten().or_else(|| io(76));
    acpi.pm_timer = tmr.map(|r| (r, flags & (1 << 8) != 0));
    if flags & (1 << 10) != 0 {
        if let (Some(r), Some(&v)) = (gas(d, 116), d.get(128)) {
            acpi.reset_reg = Some((r, v));
        }
    }
    parse_fadt_sleep(d, acpi);
    let dsdt = le64(d, 140).filter(|&x| x != 0 && d.len() >= 148).unwrap_or(le32(d, 40).unwrap_or(0) as u64);
    if let Some(dsdt) = table_at(mem, dsdt) {
        acpi.tables.push(dsdt.sig);
        acpi.s5 = find_s5(dsdt.data);
    }
    let _ = t.addr;
}

/// The FADT's HW-reduced flag and its sleep control/status registers.
fn parse_fadt_sleep(d: &[u8], acpi: &mut Acpi) {
    acpi.hw_reduced = le32(d, 112).unwrap_or(0) & (1 << 20) != 0;
    if d.len() >= 268 {
        acpi.sleep_control = gas(d, 244);
        acpi.sleep_status = gas(d, 256);
    }
}

/// The SPCR table (`d`: the whole table): its console, if it is a
/// 16550-compatible UART (interface types 0, 1 and 0x12) in I/O or memory
/// space. A 32-bit access size (or, with the size unspecified, a 32-bit
/// register width) means 32-bit registers 4 bytes apart, else bytes.
pub fn parse_spcr(d: &[u8]) -> Option<Spcr> {
    let ty = *d.get(36)?;
    if !matches!(ty, 0 | 1 | 0x12) {
        log::info!("ACPI SPCR: interface type {ty:#x} is not a 16550-compatible UART; ignored");
        return None;
    }
    let (space, width, access) = (*d.get(40)?, *d.get(41)?, *d.get(43)?);
    let addr = le64(d, 44)?;
    let port = match (space, addr) {
        (_, 0) => return None,
        (1, a) if a <= 0xFFFF => UartPort::Io(a as u16),
        (0, a) => UartPort::Mmio { base: a, wide: access == 3 || (access == 0 && width == 32) },
        _ => return None,
    };
    let baud = match d.get(58).copied().unwrap_or(0) {
        3 => Some(9600),
        4 => Some(19200),
        6 => Some(57600),
        7 => Some(115200),
        _ => None,
    };
    Some(Spcr { port, baud })
}

/// Finds `Name(_S5_, Package() { SLP_TYPa, SLP_TYPb, ... })` in AML.
pub fn find_s5(aml: &[u8]) -> Option<(u8, u8)> {
    let pos = aml.windows(4).position(|w| w == b"_S5_")?;
    let mut p = pos + 4;
    if *aml.get(p)? != 0x12 {
        return None; // not a PackageOp
    }
    p += 1;
    let lead = *aml.get(p)?;
    p += 1 + (lead >> 6) as usize; // PkgLength bytes
    p += 1; // NumElements
    let element = |p: &mut usize| -> Option<u8> {
        let op = *aml.get(*p)?;
        *p += 1;
        match op {
            0x00 => Some(0),
            0x01 => Some(1),
            0xFF => Some(0xFF),
            0x0A => {
                let v = *aml.get(*p)?;
                *p += 1;
                Some(v)
            }
            0x0B => {
                let v = *aml.get(*p)?;
                *p += 2;
                Some(v)
            }
            _ => None,
        }
    };
    let a = element(&mut p)?;
    let b = element(&mut p).unwrap_or(0);
    Some((a & 7, b & 7))
}

/// One processor entry of a MADT: where its flags are in the table, APIC id, and
/// flags (bit 0 enabled, bit 1 online capable).
struct MadtCpu {
    flags_at: usize,
    apic_id: u32,
    flags: u32,
}

/// The Local APIC (type 0) and Local x2APIC (type 9) entries of a MADT.
fn madt_cpus(d: &[u8]) -> Vec<MadtCpu> {
    let mut out = Vec::new();
    let mut o = 44;
    while o + 2 <= d.len() {
        let (ty, len) = (d[o], d[o + 1] as usize);
        if len < 2 || o + len > d.len() {
            break;
        }
        let e = &d[o..o + len];
        match ty {
            0 if len >= 8 => out.push(MadtCpu { flags_at: o + 4, apic_id: e[3] as u32, flags: le32(e, 4).unwrap_or(0) }),
            9 if len >= 16 => out.push(MadtCpu { flags_at: o + 8, apic_id: le32(e, 4).unwrap_or(0), flags: le32(e, 8).unwrap_or(0) }),
            _ => {}
        }
        o += len;
    }
    out
}

/// Whether a processor with these MADT flags may be started: enabled
/// (bit 0), or "online capable" (bit 1, defined from MADT revision 5,
/// ACPI 6.3, as Linux reads it; reserved before).
fn startable(flags: u32, madt_revision: u8) -> bool {
    flags & 1 != 0 || (madt_revision >= 5 && flags & 2 != 0)
}

fn parse_madt(t: &Table, acpi: &mut Acpi) {
    let d = t.data;
    acpi.lapic_base = le32(d, 36).map(u64::from);
    acpi.madt = Some((t.addr, d.len()));
    let revision = d[8];
    for c in madt_cpus(d) {
        // A CPU listed as xAPIC and as x2APIC (same id) is one CPU.
        if startable(c.flags, revision) && !acpi.cpus.contains(&c.apic_id) {
            acpi.cpus.push(c.apic_id);
        }
    }
    let mut o = 44;
    while o + 2 <= d.len() {
        let (ty, len) = (d[o], d[o + 1] as usize);
        if len < 2 || o + len > d.len() {
            break;
        }
        if ty == 5 && len >= 12 {
            acpi.lapic_base = le64(&d[o..o + len], 4);
        }
        o += len;
    }
    let _ = le16;
}

impl Acpi {
    /// The processors that may be started (see [`Acpi::cpus`]), the boot
    /// CPU (APIC id `bsp`) first, the others in MADT order.
    pub fn cpus_boot_first(&self, bsp: u32) -> Vec<u32> {
        let mut v = Vec::with_capacity(self.cpus.len() + 1);
        v.push(bsp);
        v.extend(self.cpus.iter().copied().filter(|&id| id != bsp));
        v
    }
}

/// Marks every processor of the MADT `madt` whose APIC id is not in `keep`
/// as neither enabled nor online capable (flags bits 0 and 1 cleared, in
/// its Local APIC and its Local x2APIC entries) and fixes the checksum.
/// Returns the APIC ids hidden, each once.
///
/// Exitscope patches the firmware's MADT in place rather than building a
/// copy (with an RSDT/XSDT and RSDP of its own) in reserved memory: every
/// pointer to it stays valid for every kind of guest, whether it is handed
/// the RSDP (Linux's boot_params), scans the BIOS areas, or follows the
/// EFI configuration table; a copy would be seen only by guests told where
/// it is. Firmware tables live in RAM (ACPI reclaim or NVS); where a write
/// does not stick, the caller says so and the INIT/SIPI filter still keeps
/// those CPUs from starting.
pub fn hide_cpus(madt: &mut [u8], keep: &[u32]) -> Vec<u32> {
    let mut hidden = Vec::new();
    for c in madt_cpus(madt) {
        if keep.contains(&c.apic_id) || c.flags & 3 == 0 {
            continue;
        }
        let f = (c.flags & !3).to_le_bytes();
        madt[c.flags_at..c.flags_at + 4].copy_from_slice(&f);
        if !hidden.contains(&c.apic_id) {
            hidden.push(c.apic_id);
        }
    }
    if !hidden.is_empty() && madt.len() > 9 {
        madt[9] = 0;
        let sum = madt.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        madt[9] = 0u8.wrapping_sub(sum);
    }
    hidden
}

/// On the machine: hides the processors that are not vCPUs (APIC ids not
/// in `vcpus`) in the firmware's MADT ([`hide_cpus`]). Returns the line for
/// the boot log, or `None` when there is nothing to hide.
pub fn hide_non_vcpus(acpi: &Acpi, vcpus: &[u32]) -> Option<alloc::string::String> {
    let (addr, len) = acpi.madt?;
    let mut madt = crate::memory::IdentityMem.bytes(addr, len)?.to_vec();
    let hidden = hide_cpus(&mut madt, vcpus);
    if hidden.is_empty() {
        return None;
    }
    let ids: Vec<alloc::string::String> = hidden.iter().map(|id| alloc::format!("{id}")).collect();
    // SAFETY: `addr` is the firmware's MADT (outside the footprint: the
    // footprint is RAM the memory map gave us); its view above was copied
    // out, and the guest has not run.
    Some(if unsafe { crate::memory::phys_write_verified(addr, &madt) } {
        alloc::format!(
            "ACPI: MADT at {addr:#x}: {} CPU(s) that are not vCPUs marked disabled for the guest (APIC ids {})",
            hidden.len(),
            ids.join(", ")
        )
    } else {
        alloc::format!(
            "warning: ACPI: the MADT at {addr:#x} is read-only: the guest sees {} CPU(s) that are not vCPUs (APIC ids {}); \
             INIT/SIPI to them are dropped",
            hidden.len(),
            ids.join(", ")
        )
    })
}

/// On the machine: where only the loader's copy of the RSDP was found
/// ([`RsdpSource::LoaderCopy`]), writes it to a page reserved in the
/// guest's memory map `map` ([`place_rsdp_copy`], avoiding `avoid`) and
/// sets `acpi.rsdp_addr`. Returns the line for the boot log.
pub fn give_guest_rsdp_copy(acpi: &mut Acpi, map: &mut MemoryMap, avoid: &[(u64, u64)]) -> Option<alloc::string::String> {
    if acpi.rsdp_source != Some(RsdpSource::LoaderCopy) {
        return None;
    }
    let Some(page) = place_rsdp_copy(map, avoid) else {
        return Some("warning: ACPI: no page for the guest's copy of the RSDP; the guest runs without ACPI".into());
    };
    // SAFETY: `page` is a RAM page of the guest's map (which excludes the
    // footprint), now reserved for this copy; nothing else uses it.
    if !unsafe { crate::memory::phys_write_verified(page, &acpi.rsdp_bytes) } {
        return Some(alloc::format!("warning: ACPI: the RSDP copy at {page:#x} did not stick; the guest runs without ACPI"));
    }
    acpi.rsdp_addr = Some(page);
    Some(alloc::format!("ACPI: guest RSDP {page:#x} (a copy of the loader's, in memory reserved in the guest's memory map)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootinfo::tests::Buf;
    use std::vec;

    /// Boot information with only what the RSDP search looks at.
    fn boot(rsdp: Option<RsdpInfo>, efi_system_table: Option<u64>, memory: MemoryMap) -> BootInfo {
        BootInfo {
            protocol: "test",
            loader_name: None,
            memory,
            modules: Vec::new(),
            cmdline: Default::default(),
            rsdp,
            efi_system_table,
            preserve: Vec::new(),
        }
    }

    fn none() -> BootInfo {
        boot(None, None, MemoryMap::new())
    }

    fn fix_checksum(b: &mut [u8], at: usize) {
        b[at] = 0;
        let s = b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        b[at] = 0u8.wrapping_sub(s);
    }

    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut t = vec![0u8; 36];
        t[..4].copy_from_slice(sig);
        t.extend_from_slice(body);
        let len = t.len() as u32;
        t[4..8].copy_from_slice(&len.to_le_bytes());
        fix_checksum(&mut t, 9);
        t
    }

    /// A little ACPI world like Bochs': RSDP in the BIOS area, RSDT, FADT
    /// with PM1a at 0xB004, a DSDT with \_S5 = {0, 0}, a MADT with 2 CPUs.
    fn world() -> Buf {
        let mut m = Buf::new(0, 0x100000);
        let dsdt_body = [b"\x08_S5_\x12\x06\x04\x0A\x05\x0A\x05\x00\x00".as_slice()].concat();
        let dsdt = table(b"DSDT", &dsdt_body);
        m.put(0x70000, &dsdt);
        let mut fadt_body = vec![0u8; 244 - 36];
        fadt_body[40 - 36..44 - 36].copy_from_slice(&0x70000u32.to_le_bytes());
        fadt_body[48 - 36..52 - 36].copy_from_slice(&0xB2u32.to_le_bytes());
        fadt_body[52 - 36] = 0xF1;
        fadt_body[64 - 36..68 - 36].copy_from_slice(&0xB004u32.to_le_bytes());
        fadt_body[76 - 36..80 - 36].copy_from_slice(&0xB008u32.to_le_bytes());
        fadt_body[112 - 36..116 - 36].copy_from_slice(&(1u32 << 10 | 1 << 8).to_le_bytes());
        fadt_body[116 - 36] = 1; // reset reg: I/O
        fadt_body[120 - 36..128 - 36].copy_from_slice(&0xCF9u64.to_le_bytes());
        fadt_body[128 - 36] = 6;
        m.put(0x71000, &table(b"FACP", &fadt_body));
        let mut madt_body = vec![0u8; 8];
        madt_body[..4].copy_from_slice(&0xFEE00000u32.to_le_bytes());
        madt_body.extend_from_slice(&[0, 8, 0, 0, 1, 0, 0, 0]); // CPU 0, enabled
        madt_body.extend_from_slice(&[0, 8, 1, 1, 1, 0, 0, 0]); // CPU 1, enabled
        madt_body.extend_from_slice(&[0, 8, 2, 2, 0, 0, 0, 0]); // CPU 2, disabled
        madt_body.extend_from_slice(&[1, 12, 0, 0, 0, 0, 0xC0, 0xFE, 0, 0, 0, 0]); // IOAPIC
        m.put(0x72000, &table(b"APIC", &madt_body));
        let mut rsdt_body = Vec::new();
        rsdt_body.extend_from_slice(&0x71000u32.to_le_bytes());
        rsdt_body.extend_from_slice(&0x72000u32.to_le_bytes());
        m.put(0x73000, &table(b"RSDT", &rsdt_body));
        let mut rsdp = b"RSD PTR \0BOCHS \0\0\0\0\0\0\0\0".to_vec();
        rsdp[16..20].copy_from_slice(&0x73000u32.to_le_bytes());
        fix_checksum(&mut rsdp, 8);
        m.put(0xFA000, &rsdp);
        m
    }

    #[test]
    fn bochs_like_tables() {
        let m = world();
        assert_eq!(find_rsdp(&m), Some(0xFA000));
        let a = parse(&m, &none());
        assert_eq!(a.rsdp_addr, Some(0xFA000));
        assert_eq!(a.pm1a_cnt, Some(AcpiReg::Io(0xB004)));
        assert_eq!(a.pm1b_cnt, None);
        assert_eq!(a.s5, Some((5, 5)));
        assert_eq!(a.reset_reg, Some((AcpiReg::Io(0xCF9), 6)));
        assert_eq!((a.smi_cmd, a.acpi_enable), (0xB2, 0xF1));
        assert_eq!(a.pm_timer, Some((AcpiReg::Io(0xB008), true)));
        assert_eq!(a.cpus, [0, 1]);
        assert_eq!(a.lapic_base, Some(0xFEE00000));
        assert!(a.tables.contains(b"DSDT"));
    }

    #[test]
    fn pm_timer_from_x_pm_tmr_blk_and_24_bits() {
        let mut m = world();
        let fadt = 0x71000;
        // X_PM_TMR_BLK (GAS at 208: I/O, 32 bits wide, port 0x608) wins
        // over PM_TMR_BLK; TMR_VAL_EXT clear: a 24-bit counter.
        m.data[fadt + 208] = 1;
        m.data[fadt + 209] = 32;
        m.data[fadt + 212..fadt + 220].copy_from_slice(&0x608u64.to_le_bytes());
        m.data[fadt + 112..fadt + 116].copy_from_slice(&(1u32 << 10).to_le_bytes());
        let len = 244;
        fix_checksum(&mut m.data[fadt..fadt + len], 9);
        assert_eq!(parse(&m, &none()).pm_timer, Some((AcpiReg::Io(0x608), false)));
        // Neither: no timer.
        m.data[fadt + 212..fadt + 220].copy_from_slice(&0u64.to_le_bytes());
        m.data[fadt + 76..fadt + 80].copy_from_slice(&0u32.to_le_bytes());
        fix_checksum(&mut m.data[fadt..fadt + len], 9);
        assert_eq!(parse(&m, &none()).pm_timer, None);
    }

    #[test]
    fn no_acpi_is_empty_not_an_error() {
        let m = Buf::new(0, 0x100000);
        let a = parse(&m, &none());
        assert_eq!(a, Acpi::default());
    }

    #[test]
    fn bad_checksums_are_ignored() {
        let mut m = world();
        m.data[0x72000 + 20] ^= 0xFF; // corrupt the MADT
        let a = parse(&m, &none());
        assert!(a.cpus.is_empty());
        assert_eq!(a.pm1a_cnt, Some(AcpiReg::Io(0xB004)));
    }

    #[test]
    fn s5_encodings() {
        assert_eq!(find_s5(b"\x08_S5_\x12\x08\x04\x0A\x07\x0A\x07\x00\x00"), Some((7, 7)));
        assert_eq!(find_s5(b"\x08_S5_\x12\x06\x04\x00\x00\x00\x00"), Some((0, 0)));
        assert_eq!(find_s5(b"\x08_S5_\x12\x06\x02\x01\x0A\x02"), Some((1, 2)));
        assert_eq!(find_s5(b"no sleep here"), None);
        assert_eq!(find_s5(b"_S5_\x10"), None);
    }

    fn spcr_table(ty: u8, space: u8, width: u8, access: u8, addr: u64, baud: u8) -> Vec<u8> {
        let mut body = vec![0u8; 80 - 36];
        body[0] = ty;
        body[4] = space;
        body[5] = width;
        body[7] = access;
        body[8..16].copy_from_slice(&addr.to_le_bytes());
        body[58 - 36] = baud;
        table(b"SPCR", &body)
    }

    #[test]
    fn spcr_consoles() {
        use crate::serial::UartPort;
        // COM2 in I/O space, 115200.
        let s = parse_spcr(&spcr_table(0, 1, 8, 1, 0x2F8, 7)).unwrap();
        assert_eq!(s, Spcr { port: UartPort::Io(0x2F8), baud: Some(115200) });
        // An Intel LPSS-style UART: MMIO, 32-bit accesses, baud "as is".
        let s = parse_spcr(&spcr_table(0, 0, 32, 3, 0xFE03_E000, 0)).unwrap();
        assert_eq!(s, Spcr { port: UartPort::Mmio { base: 0xFE03_E000, wide: true }, baud: None });
        // Access size unspecified: the register width decides.
        assert_eq!(parse_spcr(&spcr_table(0x12, 0, 32, 0, 0xFE03_E000, 0)).unwrap().port, UartPort::Mmio { base: 0xFE03_E000, wide: true });
        assert_eq!(
            parse_spcr(&spcr_table(1, 0, 8, 1, 0xFE03_E000, 3)).unwrap(),
            Spcr { port: UartPort::Mmio { base: 0xFE03_E000, wide: false }, baud: Some(9600) }
        );
        // Not a 16550 (a PL011, type 3), no address, another space, truncated.
        assert_eq!(parse_spcr(&spcr_table(3, 0, 32, 3, 0x900_0000, 7)), None);
        assert_eq!(parse_spcr(&spcr_table(0, 1, 8, 1, 0, 7)), None);
        assert_eq!(parse_spcr(&spcr_table(0, 2, 8, 1, 0x2F8, 7)), None);
        assert_eq!(parse_spcr(&spcr_table(0, 1, 8, 1, 0x2F8, 7)[..50]), None);
        // Found through the RSDT.
        let mut m = world();
        m.put(0x74000, &spcr_table(0, 1, 8, 1, 0x2F8, 7));
        let mut rsdt_body = Vec::new();
        for t in [0x71000u32, 0x72000, 0x74000] {
            rsdt_body.extend_from_slice(&t.to_le_bytes());
        }
        m.put(0x73000, &table(b"RSDT", &rsdt_body));
        assert_eq!(parse(&m, &none()).spcr.map(|s| s.port), Some(UartPort::Io(0x2F8)));
        assert_eq!(parse(&world(), &none()).spcr, None);
    }

    /// A HW-reduced FADT: no PM1 blocks, flag bit 20, sleep control and
    /// status registers in memory space.
    #[test]
    fn fadt_sleep_registers() {
        let mut m = world();
        let a = parse(&m, &none());
        assert!(!a.hw_reduced);
        assert_eq!((a.sleep_control, a.sleep_status), (None, None));
        let mut body = vec![0u8; 276 - 36];
        body[40 - 36..44 - 36].copy_from_slice(&0x70000u32.to_le_bytes());
        body[112 - 36..116 - 36].copy_from_slice(&(1u32 << 20).to_le_bytes());
        for (o, addr) in [(244usize, 0xFED8_0404u64), (256, 0xFED8_0400)] {
            body[o - 36] = 0; // system memory
            body[o - 36 + 1] = 8;
            body[o - 36 + 3] = 1;
            body[o - 36 + 4..o - 36 + 12].copy_from_slice(&addr.to_le_bytes());
        }
        m.put(0x71000, &table(b"FACP", &body));
        let a = parse(&m, &none());
        assert!(a.hw_reduced);
        assert_eq!(a.pm1a_cnt, None);
        assert_eq!(a.sleep_control, Some(AcpiReg::Memory(0xFED8_0404)));
        assert_eq!(a.sleep_status, Some(AcpiReg::Memory(0xFED8_0400)));
        assert_eq!(a.s5, Some((5, 5)));
        // MMIO PM1 blocks (X_PM1a_CNT_BLK in system memory).
        let mut body = vec![0u8; 244 - 36];
        body[40 - 36..44 - 36].copy_from_slice(&0x70000u32.to_le_bytes());
        body[172 - 36] = 0;
        body[172 - 36 + 1] = 16;
        body[176 - 36..184 - 36].copy_from_slice(&0xFED0_1004u64.to_le_bytes());
        m.put(0x71000, &table(b"FACP", &body));
        let a = parse(&m, &none());
        assert_eq!(a.pm1a_cnt, Some(AcpiReg::Memory(0xFED0_1004)));
        assert_eq!(a.sleep_control, None, "too short for the sleep registers");
    }

    #[test]
    fn rsdp_copy_is_used() {
        let m = world();
        let copy = m.bytes(0xFA000, 20).unwrap().to_vec();
        let a = parse(&m, &boot(Some(RsdpInfo::Copy(copy)), None, MemoryMap::new()));
        assert_eq!(a.cpus, [0, 1]);
        assert_eq!(a.rsdp_addr, Some(0xFA000));
        assert_eq!(a.rsdp_source, Some(RsdpSource::BiosArea));
    }

    /// The world's RSDP moved out of the BIOS areas to `to` (as on UEFI
    /// machines without a CSM); returns its bytes.
    fn move_rsdp(m: &mut Buf, to: u64) -> Vec<u8> {
        let rsdp = m.bytes(0xFA000, 20).unwrap().to_vec();
        m.put(0xFA000, &[0u8; 20]);
        m.put(to, &rsdp);
        rsdp
    }

    /// An EFI system table at 0x60000 whose configuration table (0x61000)
    /// has an unrelated entry, then `entries`.
    fn efi_tables(m: &mut Buf, entries: &[([u8; 16], u64)]) {
        m.put64(0x60000, EFI_SYSTEM_TABLE_SIGNATURE);
        m.put64(0x60000 + 104, 1 + entries.len() as u64);
        m.put64(0x60000 + 112, 0x61000);
        m.put(0x61000, &[0x11; 16]); // some other GUID (SMBIOS, say)
        m.put64(0x61000 + 16, 0x62000);
        for (i, (guid, a)) in entries.iter().enumerate() {
            let e = 0x61000 + 24 * (i as u64 + 1);
            m.put(e, guid);
            m.put64(e + 16, *a);
        }
    }

    #[test]
    fn rsdp_from_the_efi_system_table() {
        let mut m = world();
        move_rsdp(&mut m, 0x74000);
        efi_tables(&mut m, &[(EFI_ACPI10_GUID, 0x74000)]);
        assert_eq!(find_rsdp(&m), None);
        let a = parse(&m, &boot(None, Some(0x60000), MemoryMap::new()));
        assert_eq!(a.rsdp_addr, Some(0x74000));
        assert_eq!(a.rsdp_source, Some(RsdpSource::EfiSystemTable { acpi20: false }));
        assert_eq!(a.cpus, [0, 1]);
        assert_eq!(a.pm1a_cnt, Some(AcpiReg::Io(0xB004)));
        // The ACPI 2.0 entry wins over the 1.0 one, whatever the order.
        let copy = m.bytes(0x74000, 20).unwrap().to_vec();
        m.put(0x75000, &copy);
        efi_tables(&mut m, &[(EFI_ACPI10_GUID, 0x74000), (EFI_ACPI20_GUID, 0x75000)]);
        let a = parse(&m, &boot(Some(RsdpInfo::Copy(copy)), Some(0x60000), MemoryMap::new()));
        assert_eq!((a.rsdp_addr, a.rsdp_source), (Some(0x75000), Some(RsdpSource::EfiSystemTable { acpi20: true })));
        assert_eq!(RsdpSource::EfiSystemTable { acpi20: true }.to_string(), "EFI system table, ACPI 2.0 entry");
    }

    #[test]
    fn bad_efi_tables_fall_back() {
        let mut m = world();
        // The 2.0 entry points to garbage: the 1.0 entry is used.
        efi_tables(&mut m, &[(EFI_ACPI20_GUID, 0x76000), (EFI_ACPI10_GUID, 0xFA000)]);
        assert_eq!(rsdp_from_efi(&m, 0x60000), Some((0xFA000, false)));
        // No system table signature: the BIOS areas are scanned.
        m.put64(0x60000, 0);
        assert_eq!(rsdp_from_efi(&m, 0x60000), None);
        let a = parse(&m, &boot(None, Some(0x60000), MemoryMap::new()));
        assert_eq!((a.rsdp_addr, a.rsdp_source), (Some(0xFA000), Some(RsdpSource::BiosArea)));
        // Pointers above 4 GiB (beyond the boot page tables) are refused.
        assert_eq!(rsdp_from_efi(&m, 0x1_0000_0000), None);
        efi_tables(&mut m, &[(EFI_ACPI20_GUID, 0x2_0000_0000), (EFI_ACPI10_GUID, 0xFA000)]);
        assert_eq!(rsdp_from_efi(&m, 0x60000), Some((0xFA000, false)));
        // An absurd entry count is refused.
        efi_tables(&mut m, &[(EFI_ACPI10_GUID, 0xFA000)]);
        m.put64(0x60000 + 104, 1 << 40);
        assert_eq!(rsdp_from_efi(&m, 0x60000), None);
    }

    /// A map like OVMF's: RAM, the ACPI tables in a reclaim range, NVS.
    fn uefi_map() -> MemoryMap {
        MemoryMap::from_regions([
            Region::new(0, 0x60000, MemKind::Ram),
            Region::new(0x60000, 0x70000, MemKind::AcpiNvs),
            Region::new(0x70000, 0x80000, MemKind::AcpiReclaimable),
            Region::new(0x80000, 0xA0000, MemKind::Ram),
        ])
    }

    #[test]
    fn rsdp_from_the_acpi_reclaim_ranges() {
        let mut m = world();
        let copy = move_rsdp(&mut m, 0x7F000);
        // A stale RSDP earlier in the range names another RSDT: with the
        // loader's copy in hand, only the matching one is taken.
        let mut stale = copy.clone();
        stale[16..20].copy_from_slice(&0x7E000u32.to_le_bytes());
        stale[8] = 0;
        let sum = stale.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        stale[8] = 0u8.wrapping_sub(sum);
        m.put(0x7C010, &stale);
        let a = parse(&m, &boot(Some(RsdpInfo::Copy(copy.clone())), None, uefi_map()));
        assert_eq!((a.rsdp_addr, a.rsdp_source), (Some(0x7F000), Some(RsdpSource::AcpiRanges)));
        assert_eq!(a.cpus, [0, 1]);
        // Without a copy (multiboot1), the first valid one is taken.
        assert_eq!(find_rsdp_in_acpi_ranges(&m, &uefi_map(), None), Some(0x7C010));
        // Only the ACPI ranges are scanned, not RAM.
        let ram_only = MemoryMap::from_regions([Region::new(0, 0xA0000, MemKind::Ram)]);
        assert_eq!(find_rsdp_in_acpi_ranges(&m, &ram_only, None), None);
    }

    #[test]
    fn rsdp_copy_only_goes_to_reserved_guest_memory() {
        let mut m = world();
        let copy = move_rsdp(&mut m, 0x7F000);
        m.put(0x7F000, &[0u8; 20]); // the original is nowhere to be found
        let mut a = parse(&m, &boot(Some(RsdpInfo::Copy(copy.clone())), None, uefi_map()));
        assert_eq!((a.rsdp_addr, a.rsdp_source), (None, Some(RsdpSource::LoaderCopy)));
        assert_eq!(a.rsdp_bytes, copy);
        assert_eq!(a.cpus, [0, 1], "the tables are read through the copy");
        // The guest's map: RAM up to 256 MiB with the top 2 MiB avoided.
        let mut map = MemoryMap::from_regions([Region::new(0, 0x9F000, MemKind::Ram), Region::new(0x10_0000, 0x1000_0000, MemKind::Ram)]);
        let ram = map.total_ram();
        let page = place_rsdp_copy(&mut map, &[(0xFE0_0000, 0x1000_0000)]).unwrap();
        assert_eq!(page, 0xFE0_0000 - 4096);
        assert_eq!(map.region_at(page).map(|r| r.kind), Some(MemKind::Reserved));
        assert_eq!(map.total_ram(), ram - 4096);
        assert!(!map.is_ram(page, page + 1));
        // Nothing left: no page, the map unchanged.
        let mut tiny = MemoryMap::from_regions([Region::new(0x1000, 0x2000, MemKind::Ram)]);
        assert_eq!(place_rsdp_copy(&mut tiny, &[(0x1000, 0x2000)]), None);
        assert_eq!(tiny.total_ram(), 0x1000);
        // The line the boot log prints names the source.
        a.rsdp_addr = Some(page);
        assert_eq!(RsdpSource::LoaderCopy.to_string(), "multiboot2 copy only");
    }

    #[test]
    fn an_invalid_loader_address_is_searched_past() {
        let m = world();
        let a = parse(&m, &boot(Some(RsdpInfo::At(0x50000)), None, MemoryMap::new()));
        assert_eq!((a.rsdp_addr, a.rsdp_source), (Some(0xFA000), Some(RsdpSource::BiosArea)));
        let a = parse(&m, &boot(Some(RsdpInfo::At(0xFA000)), None, MemoryMap::new()));
        assert_eq!((a.rsdp_addr, a.rsdp_source), (Some(0xFA000), Some(RsdpSource::Loader)));
    }

    /// A MADT of `revision` with the given entries (type, bytes after the
    /// type and length).
    fn madt(revision: u8, entries: &[(u8, &[u8])]) -> Vec<u8> {
        let mut body = vec![0u8; 8];
        body[..4].copy_from_slice(&0xFEE00000u32.to_le_bytes());
        for (ty, e) in entries {
            body.push(*ty);
            body.push(2 + e.len() as u8);
            body.extend_from_slice(e);
        }
        let mut t = table(b"APIC", &body);
        t[8] = revision;
        fix_checksum(&mut t, 9);
        t
    }

    fn lapic(uid: u8, id: u8, flags: u32) -> Vec<u8> {
        let mut e = vec![uid, id];
        e.extend_from_slice(&flags.to_le_bytes());
        e
    }

    fn x2apic(id: u32, flags: u32) -> Vec<u8> {
        let mut e = vec![0, 0];
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&id.to_le_bytes()); // UID
        e
    }

    fn madt_cpus_of(t: &[u8]) -> Vec<u32> {
        let mut a = Acpi::default();
        parse_madt(&Table { sig: *b"APIC", addr: 0x72000, data: t }, &mut a);
        a.cpus
    }

    #[test]
    fn madt_online_capable_cpus_count_from_revision_5() {
        let (l0, l1, l2, l3) = (lapic(0, 0, 1), lapic(1, 1, 2), lapic(2, 2, 0), lapic(3, 3, 3));
        let entries: [(u8, &[u8]); 4] = [(0, &l0), (0, &l1), (0, &l2), (0, &l3)];
        // ACPI 6.3 (MADT revision 5): bit 1 alone is "online capable".
        assert_eq!(madt_cpus_of(&madt(5, &entries)), [0, 1, 3]);
        // Before it, bit 1 was reserved: only enabled CPUs.
        assert_eq!(madt_cpus_of(&madt(4, &entries)), [0, 3]);
        let x = x2apic(0x100, 2);
        assert_eq!(madt_cpus_of(&madt(5, &[(0, &l0), (9, &x)])), [0, 0x100]);
    }

    #[test]
    fn madt_cpu_listed_as_xapic_and_x2apic_is_one_cpu() {
        let (l0, l1, x0, x1, x2) = (lapic(0, 0, 1), lapic(1, 1, 1), x2apic(0, 1), x2apic(1, 1), x2apic(2, 1));
        let t = madt(5, &[(0, &l0), (0, &l1), (9, &x0), (9, &x1), (9, &x2)]);
        assert_eq!(madt_cpus_of(&t), [0, 1, 2]);
    }

    #[test]
    fn boot_cpu_first() {
        let (l0, l1, l2) = (lapic(0, 4, 1), lapic(1, 2, 1), lapic(2, 6, 1));
        let a = Acpi { cpus: madt_cpus_of(&madt(5, &[(0, &l0), (0, &l1), (0, &l2)])), ..Acpi::default() };
        assert_eq!(a.cpus, [4, 2, 6]);
        assert_eq!(a.cpus_boot_first(2), [2, 4, 6]);
        assert_eq!(a.cpus_boot_first(4), [4, 2, 6]);
        // A boot CPU the MADT does not list (or no MADT) is still first.
        assert_eq!(a.cpus_boot_first(9), [9, 4, 2, 6]);
        assert_eq!(Acpi::default().cpus_boot_first(0), [0]);
    }

    #[test]
    fn hiding_cpus_clears_both_flags_in_every_entry_and_fixes_the_checksum() {
        let (l0, l1, l2, l3) = (lapic(0, 0, 1), lapic(1, 1, 1), lapic(2, 2, 2), lapic(3, 3, 0));
        let (x1, x2) = (x2apic(1, 1), x2apic(0x200, 3));
        let mut t = madt(5, &[(0, &l0), (0, &l1), (0, &l2), (0, &l3), (9, &x1), (9, &x2)]);
        assert_eq!(madt_cpus_of(&t), [0, 1, 2, 0x200]);
        let hidden = hide_cpus(&mut t, &[0, 2]);
        assert_eq!(hidden, [1, 0x200], "CPU 3 was disabled already");
        assert!(checksum_ok(&t));
        assert_eq!(madt_cpus_of(&t), [0, 2]);
        // The patched table still parses in the world.
        let mut m = world();
        m.put(0x72000, &t);
        let a = parse(&m, &none());
        assert_eq!(a.cpus, [0, 2]);
        assert_eq!(a.madt, Some((0x72000, t.len())));
        // Nothing to hide: the table is untouched.
        let before = t.clone();
        assert!(hide_cpus(&mut t, &[0, 2]).is_empty());
        assert_eq!(t, before);
    }
}
