//! The few ACPI facts the hypervisor needs: how to power off and reset the
//! machine (FADT, DSDT `\_S5`), which ports the guest uses for that (so they
//! can be watched), and the processors (MADT). Pure parsing over [`PhysMem`].

use crate::bootinfo::{PhysMem, RsdpInfo};
use alloc::vec::Vec;

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

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acpi {
    /// Physical address of the RSDP, when known.
    pub rsdp_addr: Option<u64>,
    pub pm1a_cnt: Option<AcpiReg>,
    pub pm1b_cnt: Option<AcpiReg>,
    /// SLP_TYPa and SLP_TYPb of S5 (soft off), from the DSDT.
    pub s5: Option<(u8, u8)>,
    pub reset_reg: Option<(AcpiReg, u8)>,
    pub smi_cmd: u16,
    pub acpi_enable: u8,
    /// Local APIC ids of usable processors, from the MADT, boot CPU first.
    pub cpus: Vec<u32>,
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
    pub port: crate::serial::UartPort,
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
    let ebda = mem.u16_at(0x40E).map(|s| (s as u64) << 4).filter(|e| (0x80000..0xA0000).contains(e));
    let ranges = ebda.map(|e| (e, e + 1024)).into_iter().chain([(0xE0000, 0x100000)]);
    for (start, end) in ranges {
        let mut p = start;
        while p + 20 <= end {
            if let Some(b) = mem.bytes(p, 20) {
                if &b[..8] == b"RSD PTR " && checksum_ok(b) {
                    return Some(p);
                }
            }
            p += 16;
        }
    }
    None
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

/// Reads the ACPI tables. `rsdp` says where the root pointer is; without
/// one, the BIOS areas are scanned. Missing ACPI is not an error: the result
/// is then empty and callers fall back (one CPU, emulator power-off ports).
pub fn parse(mem: &impl PhysMem, rsdp: Option<&RsdpInfo>) -> Acpi {
    let mut acpi = Acpi::default();
    let found;
    let rsdp_bytes: &[u8] = match rsdp {
        Some(RsdpInfo::Copy(b)) => {
            // A copy: look for the original too, so the guest can be told.
            acpi.rsdp_addr = find_rsdp(mem);
            b
        }
        Some(RsdpInfo::At(a)) => {
            acpi.rsdp_addr = Some(*a);
            match mem.bytes(*a, 36).or_else(|| mem.bytes(*a, 20)) {
                Some(b) => b,
                None => return acpi,
            }
        }
        None => {
            found = find_rsdp(mem);
            acpi.rsdp_addr = found;
            match found.and_then(|a| mem.bytes(a, 36).or_else(|| mem.bytes(a, 20))) {
                Some(b) => b,
                None => return acpi,
            }
        }
    };
    if rsdp_bytes.len() < 20 || &rsdp_bytes[..8] != b"RSD PTR " || !checksum_ok(&rsdp_bytes[..20]) {
        log::warn!("ACPI RSDP is invalid; continuing without ACPI");
        return acpi;
    }
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
    use crate::serial::UartPort;
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

fn parse_madt(t: &Table, acpi: &mut Acpi) {
    let d = t.data;
    acpi.lapic_base = le32(d, 36).map(u64::from);
    let mut o = 44;
    while o + 2 <= d.len() {
        let (ty, len) = (d[o], d[o + 1] as usize);
        if len < 2 || o + len > d.len() {
            break;
        }
        let e = &d[o..o + len];
        match ty {
            0 if len >= 8 => {
                let flags = le32(e, 4).unwrap_or(0);
                if flags & 3 != 0 {
                    acpi.cpus.push(e[3] as u32);
                }
            }
            9 if len >= 16 => {
                let flags = le32(e, 8).unwrap_or(0);
                if flags & 3 != 0 {
                    acpi.cpus.push(le32(e, 4).unwrap_or(0));
                }
            }
            5 if len >= 12 => acpi.lapic_base = le64(e, 4),
            _ => {}
        }
        o += len;
    }
    let _ = le16;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootinfo::tests::Buf;
    use std::vec;

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
        fadt_body[112 - 36..116 - 36].copy_from_slice(&(1u32 << 10).to_le_bytes());
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
        let a = parse(&m, None);
        assert_eq!(a.rsdp_addr, Some(0xFA000));
        assert_eq!(a.pm1a_cnt, Some(AcpiReg::Io(0xB004)));
        assert_eq!(a.pm1b_cnt, None);
        assert_eq!(a.s5, Some((5, 5)));
        assert_eq!(a.reset_reg, Some((AcpiReg::Io(0xCF9), 6)));
        assert_eq!((a.smi_cmd, a.acpi_enable), (0xB2, 0xF1));
        assert_eq!(a.cpus, [0, 1]);
        assert_eq!(a.lapic_base, Some(0xFEE00000));
        assert!(a.tables.contains(b"DSDT"));
    }

    #[test]
    fn no_acpi_is_empty_not_an_error() {
        let m = Buf::new(0, 0x100000);
        let a = parse(&m, None);
        assert_eq!(a, Acpi::default());
    }

    #[test]
    fn bad_checksums_are_ignored() {
        let mut m = world();
        m.data[0x72000 + 20] ^= 0xFF; // corrupt the MADT
        let a = parse(&m, None);
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
        assert_eq!(parse_spcr(&spcr_table(1, 0, 8, 1, 0xFE03_E000, 3)).unwrap(), Spcr { port: UartPort::Mmio { base: 0xFE03_E000, wide: false }, baud: Some(9600) });
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
        assert_eq!(parse(&m, None).spcr.map(|s| s.port), Some(UartPort::Io(0x2F8)));
        assert_eq!(parse(&world(), None).spcr, None);
    }

    /// A HW-reduced FADT: no PM1 blocks, flag bit 20, sleep control and
    /// status registers in memory space.
    #[test]
    fn fadt_sleep_registers() {
        let mut m = world();
        let a = parse(&m, None);
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
        let a = parse(&m, None);
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
        let a = parse(&m, None);
        assert_eq!(a.pm1a_cnt, Some(AcpiReg::Memory(0xFED0_1004)));
        assert_eq!(a.sleep_control, None, "too short for the sleep registers");
    }

    #[test]
    fn rsdp_copy_is_used() {
        let m = world();
        let copy = m.bytes(0xFA000, 20).unwrap().to_vec();
        let a = parse(&m, Some(&RsdpInfo::Copy(copy)));
        assert_eq!(a.cpus, [0, 1]);
        assert_eq!(a.rsdp_addr, Some(0xFA000));
    }
}
