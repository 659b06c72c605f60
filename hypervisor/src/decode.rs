//! Just enough x86 instruction decoding to emulate a memory access that
//! faulted: when the guest writes a page that EPT maps read-only (an MMIO
//! register), the EPT violation gives the guest-physical address, and this
//! says what was written, how wide, and how long the instruction is.
//!
//! Decoded forms (the ones compilers emit for MMIO register access):
//! - `88 /r`, `89 /r`: MOV r/m, r (stores)
//! - `8A /r`, `8B /r`: MOV r, r/m (loads)
//! - `C6 /0 ib`, `C7 /0 iw/id`: MOV r/m, imm (with REX.W: imm32
//!   sign-extended to 64 bits)
//! - `86 /r`, `87 /r`: XCHG r/m, r (some kernels write the local APIC so)
//! - `A0`-`A3`: MOV AL/eAX to and from a direct address (moffs)
//!
//! Prefixes: 66 (operand size), 67 (address size), F0 (LOCK, XCHG only),
//! the segment overrides 26/2E/36/3E/64/65 (accepted and ignored: the
//! address comes from the EPT violation), and REX (40-4F, 64-bit mode only;
//! as on the CPU, a REX followed by another prefix is ignored).
//!
//! Not supported (`Unsupported`): everything else, notably two-byte
//! opcodes (0F: MOVZX/MOVSX/MOVNTI, SSE/AVX moves), VEX/EVEX, string
//! instructions (MOVS/STOS), read-modify-write arithmetic (OR/AND/ADD to
//! memory), and the F2/F3 prefixes (REP, and XACQUIRE/XRELEASE hints).
//! LOCK on anything but XCHG is rejected as the CPU would (#UD), reported
//! as `Unsupported { opcode: 0xF0 }`.
//!
//! The effective address is not computed: only its encoded length matters
//! here.

use core::fmt;

/// The default operand and address sizes the code segment gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuMode {
    /// Real mode (and virtual-8086 mode): 16-bit operands and addresses.
    Real16,
    /// Protected mode, 16-bit code segment (CS.D = 0).
    Prot16,
    /// Protected mode, 32-bit code segment (CS.D = 1), or compatibility
    /// mode with such a segment.
    Prot32,
    /// 64-bit mode (EFER.LMA and CS.L): 32-bit operands, 64-bit addresses.
    Long64,
}

/// The register or immediate side of the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    /// General register `index` (RAX = 0, RCX = 1, ..., R15 = 15).
    /// `high_byte`: AH/CH/DH/BH (bits 15:8 of RAX/RCX/RDX/RBX, `index`
    /// 0-3), only for 8-bit operands without a REX prefix.
    Reg { index: u8, high_byte: bool },
    /// An immediate, already sign-extended to 64 bits where the
    /// instruction does that (`REX.W C7`).
    Imm(u64),
}

/// One decoded memory access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemAccess {
    /// The instruction writes memory (stores and XCHG).
    pub write: bool,
    /// Bytes accessed: 1, 2, 4 or 8.
    pub size: u8,
    /// For writes, the source; for loads (and XCHG), the destination
    /// register.
    pub value: Operand,
    /// The instruction's length in bytes, to advance RIP.
    pub len: u8,
    /// XCHG: write the register's value to memory, and load the old
    /// memory value into the register.
    pub xchg: bool,
}

/// Why an instruction could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Not one of the forms above (or a prefix this decoder refuses).
    Unsupported { opcode: u8 },
    /// The r/m operand is a register (ModRM.mod = 11): no memory access.
    RegisterOperand,
    /// Longer than the architectural limit of 15 bytes (#GP on the CPU).
    TooLong,
    /// The bytes end before the instruction does: fetch more.
    Truncated,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Unsupported { opcode } => write!(f, "unsupported instruction (byte {opcode:#04x})"),
            DecodeError::RegisterOperand => f.write_str("register operand: the instruction does not access memory"),
            DecodeError::TooLong => f.write_str("instruction longer than 15 bytes"),
            DecodeError::Truncated => f.write_str("instruction bytes end too early"),
        }
    }
}

/// The longest x86 instruction.
pub const MAX_LEN: usize = 15;

/// Reads instruction bytes, enforcing the 15-byte limit.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= MAX_LEN {
            return Err(DecodeError::TooLong);
        }
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }
    /// A little-endian value of `n` bytes.
    fn uint(&mut self, n: u8) -> Result<u64, DecodeError> {
        let mut v = 0;
        for i in 0..n {
            v |= u64::from(self.next()?) << (8 * i);
        }
        Ok(v)
    }
}

/// The operand size: REX.W, else 66 toggles the mode's default.
fn operand_size(mode: CpuMode, opsize: bool, rex: Option<u8>) -> u8 {
    match mode {
        CpuMode::Long64 if rex.is_some_and(|r| r & 8 != 0) => 8,
        CpuMode::Long64 | CpuMode::Prot32 => {
            if opsize {
                2
            } else {
                4
            }
        }
        CpuMode::Real16 | CpuMode::Prot16 => {
            if opsize {
                4
            } else {
                2
            }
        }
    }
}

/// The address size in bytes: 67 toggles the mode's default.
fn address_size(mode: CpuMode, addrsize: bool) -> u8 {
    match (mode, addrsize) {
        (CpuMode::Long64, false) => 8,
        (CpuMode::Long64, true) | (CpuMode::Prot32, false) | (CpuMode::Real16 | CpuMode::Prot16, true) => 4,
        (CpuMode::Prot32, true) | (CpuMode::Real16 | CpuMode::Prot16, false) => 2,
    }
}

/// Skips the SIB byte and displacement of a memory operand.
fn skip_memory_operand(c: &mut Cursor, md: u8, rm: u8, addr: u8) -> Result<(), DecodeError> {
    let disp = if addr == 2 {
        // 16-bit: mod 00 rm 110 is a bare disp16; no SIB.
        match md {
            0 if rm == 6 => 2,
            0 => 0,
            1 => 1,
            _ => 2,
        }
    } else {
        // 32/64-bit: rm 100 brings a SIB byte; mod 00 with rm 101 (RIP-
        // relative in 64-bit mode, absolute otherwise) or with SIB base
        // 101 (no base) takes a disp32. REX.B does not change this.
        let base = if rm == 4 { c.next()? & 7 } else { rm };
        match md {
            0 if base == 5 => 4,
            0 => 0,
            1 => 1,
            _ => 4,
        }
    };
    c.uint(disp).map(drop)
}

/// The register named by a 4-bit number for an access of `size` bytes.
fn register(index: u8, size: u8, rex: Option<u8>) -> Operand {
    if size == 1 && rex.is_none() && (4..8).contains(&index) {
        Operand::Reg { index: index - 4, high_byte: true }
    } else {
        Operand::Reg { index, high_byte: false }
    }
}

/// Decodes the instruction at the start of `bytes` (pass up to 15 bytes;
/// fewer give `Truncated` if the instruction is longer).
pub fn decode(bytes: &[u8], mode: CpuMode) -> Result<MemAccess, DecodeError> {
    let mut c = Cursor { bytes, pos: 0 };
    let (mut opsize, mut addrsize, mut lock) = (false, false, false);
    let mut rex: Option<u8> = None;
    let opcode = loop {
        let b = c.next()?;
        match b {
            0x66 => opsize = true,
            0x67 => addrsize = true,
            0xF0 => lock = true,
            0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 => {}
            0xF2 | 0xF3 => return Err(DecodeError::Unsupported { opcode: b }),
            0x40..=0x4F if mode == CpuMode::Long64 => {
                rex = Some(b);
                continue;
            }
            _ => break b,
        }
        // A legacy prefix after a REX: the REX is ignored.
        rex = None;
    };
    let full = operand_size(mode, opsize, rex);
    let addr = address_size(mode, addrsize);
    if lock && !matches!(opcode, 0x86 | 0x87) {
        return Err(DecodeError::Unsupported { opcode: 0xF0 });
    }

    // Direct-address forms: no ModRM, an address-sized offset.
    if let 0xA0..=0xA3 = opcode {
        c.uint(addr)?;
        return Ok(MemAccess {
            write: opcode >= 0xA2,
            size: if opcode & 1 == 0 { 1 } else { full },
            value: Operand::Reg { index: 0, high_byte: false },
            len: c.pos as u8,
            xchg: false,
        });
    }

    // (size, write, xchg, immediate)
    let (size, write, xchg, imm) = match opcode {
        0x88 => (1, true, false, false),
        0x89 => (full, true, false, false),
        0x8A => (1, false, false, false),
        0x8B => (full, false, false, false),
        0x86 => (1, true, true, false),
        0x87 => (full, true, true, false),
        0xC6 => (1, true, false, true),
        0xC7 => (full, true, false, true),
        _ => return Err(DecodeError::Unsupported { opcode }),
    };
    let modrm = c.next()?;
    let (md, reg, rm) = (modrm >> 6, (modrm >> 3) & 7, modrm & 7);
    if imm && reg != 0 {
        // C6/C7 with another /digit (XABORT, XBEGIN).
        return Err(DecodeError::Unsupported { opcode });
    }
    if md == 3 {
        return Err(DecodeError::RegisterOperand);
    }
    skip_memory_operand(&mut c, md, rm, addr)?;
    let value = if imm {
        // imm8, imm16, or imm32 (sign-extended for 64-bit operands).
        let v = c.uint(size.min(4))?;
        Operand::Imm(if size == 8 { v as u32 as i32 as i64 as u64 } else { v })
    } else {
        let r = rex.map_or(0, |r| (r & 4) << 1);
        register(reg | r, size, rex)
    };
    Ok(MemAccess { write, size, value, len: c.pos as u8, xchg })
}

/// The decoding mode from the guest's CR0, EFER and CS access rights (VMCS
/// format: L is bit 13, D/B bit 14): 64-bit mode with EFER.LMA and CS.L;
/// else CS.D decides 32- or 16-bit code. With CR0.PE = 0 it is `Real16`,
/// except when a 32-bit CS is still cached (right after clearing PE,
/// before the far jump), where the CPU keeps 32-bit defaults: `Prot32`.
/// Virtual-8086 mode has a 16-bit CS (VMX requires its access rights to
/// be 0xF3), so it comes out as `Prot16`, which decodes the same as
/// `Real16`.
pub fn mode_of(cr0: u64, efer: u64, cs_access_rights: u64) -> CpuMode {
    let pe = cr0 & crate::arch::CR0_PE != 0;
    let lma = efer & crate::arch::EFER_LMA != 0;
    let l = cs_access_rights & (1 << 13) != 0;
    let d = cs_access_rights & (1 << 14) != 0;
    match (pe, lma && l, d) {
        (true, true, _) => CpuMode::Long64,
        (_, _, true) => CpuMode::Prot32,
        (true, _, false) => CpuMode::Prot16,
        (false, _, false) => CpuMode::Real16,
    }
}

fn mask(v: u64, size: u8) -> u64 {
    if size >= 8 {
        v
    } else {
        v & ((1u64 << (8 * u32::from(size))) - 1)
    }
}

/// The value a write stores, `size` bytes wide: the immediate, or the
/// register read through `regs_get` (by index, RAX = 0 .. R15 = 15), bits
/// 15:8 of it for AH/CH/DH/BH.
pub fn reg_value(regs_get: impl Fn(u8) -> u64, op: &Operand, size: u8) -> u64 {
    match *op {
        Operand::Reg { index, high_byte } => {
            let v = regs_get(index);
            mask(if high_byte { v >> 8 } else { v }, size)
        }
        Operand::Imm(v) => mask(v, size),
    }
}

/// The destination register's new value after a load of `size` bytes
/// (`loaded`) into `op`, given its `old` value: 8- and 16-bit loads keep
/// the other bits (AH/CH/DH/BH go to bits 15:8), 32-bit loads zero the
/// upper half, 64-bit loads replace it. An `Imm` is no register: `old` is
/// returned.
pub fn load_into(old: u64, op: &Operand, size: u8, loaded: u64) -> u64 {
    match (*op, size) {
        (Operand::Imm(_), _) => old,
        (Operand::Reg { high_byte: true, .. }, _) => (old & !0xFF00) | (loaded & 0xFF) << 8,
        (_, 1) => (old & !0xFF) | (loaded & 0xFF),
        (_, 2) => (old & !0xFFFF) | (loaded & 0xFFFF),
        (_, 4) => loaded & 0xFFFF_FFFF,
        _ => loaded,
    }
}

#[cfg(test)]
mod tests {
    use super::CpuMode::*;
    use super::*;

    fn reg(index: u8) -> Operand {
        Operand::Reg { index, high_byte: false }
    }
    fn store(size: u8, value: Operand, len: u8) -> MemAccess {
        MemAccess { write: true, size, value, len, xchg: false }
    }
    fn load(size: u8, value: Operand, len: u8) -> MemAccess {
        MemAccess { write: false, size, value, len, xchg: false }
    }
    fn xchg(size: u8, value: Operand, len: u8) -> MemAccess {
        MemAccess { write: true, size, value, len, xchg: true }
    }

    /// Encodings from GNU as (objdump listing in the comments).
    #[test]
    fn long_mode_stores() {
        let cases: &[(&[u8], MemAccess)] = &[
            // mov %edi,0xffffffffff5fc0b0
            (&[0x89, 0x3C, 0x25, 0xB0, 0xC0, 0x5F, 0xFF], store(4, reg(7), 7)),
            // movl $0x12345678,0xffffffffff5fc0b0
            (&[0xC7, 0x04, 0x25, 0xB0, 0xC0, 0x5F, 0xFF, 0x78, 0x56, 0x34, 0x12], store(4, Operand::Imm(0x1234_5678), 11)),
            // mov %eax,0x0(%r13): REX.B, mod 01 rm 101 is r13 + disp8
            (&[0x41, 0x89, 0x45, 0x00], store(4, reg(0), 4)),
            // mov %eax,(%rdx)
            (&[0x89, 0x02], store(4, reg(0), 2)),
            // mov %ah,(%rax)
            (&[0x88, 0x20], store(1, Operand::Reg { index: 0, high_byte: true }, 2)),
            // mov %spl,(%rax): with any REX, 4 is SPL
            (&[0x40, 0x88, 0x20], store(1, reg(4), 3)),
            // mov %r9b,(%rax)
            (&[0x44, 0x88, 0x08], store(1, reg(9), 3)),
            // mov %rcx,0x8(%rdi)
            (&[0x48, 0x89, 0x4F, 0x08], store(8, reg(1), 4)),
            // mov %si,(%rdi)
            (&[0x66, 0x89, 0x37], store(2, reg(6), 3)),
            // mov %ebx,0x5b(%rip)
            (&[0x89, 0x1D, 0x5B, 0x00, 0x00, 0x00], store(4, reg(3), 6)),
            // mov %eax,0x10(%rbx,%rcx,4)
            (&[0x89, 0x44, 0x8B, 0x10], store(4, reg(0), 4)),
            // mov %eax,0x12345(%rbx,%rcx,8)
            (&[0x89, 0x84, 0xCB, 0x45, 0x23, 0x01, 0x00], store(4, reg(0), 7)),
            // mov %r10d,(%r12): REX.B with rm 100 still means SIB
            (&[0x45, 0x89, 0x14, 0x24], store(4, reg(10), 4)),
            // mov %eax,0x0(,%r9,2): SIB without base, disp32
            (&[0x42, 0x89, 0x04, 0x4D, 0x00, 0x00, 0x00, 0x00], store(4, reg(0), 8)),
            // movq $0xfffffffffffffffe,(%rdi): imm32 sign-extended
            (&[0x48, 0xC7, 0x07, 0xFE, 0xFF, 0xFF, 0xFF], store(8, Operand::Imm(0xFFFF_FFFF_FFFF_FFFE), 7)),
            // movw $0xbeef,0x4(%rdi)
            (&[0x66, 0xC7, 0x47, 0x04, 0xEF, 0xBE], store(2, Operand::Imm(0xBEEF), 6)),
            // movb $0x7f,(%rdi)
            (&[0xC6, 0x07, 0x7F], store(1, Operand::Imm(0x7F), 3)),
            // movl $0x80000000,(%rdi): no sign extension for 32-bit operands
            (&[0xC7, 0x07, 0x00, 0x00, 0x00, 0x80], store(4, Operand::Imm(0x8000_0000), 6)),
            // mov %eax,%gs:(%rdi)
            (&[0x65, 0x89, 0x07], store(4, reg(0), 3)),
            // mov %eax,(%edi): 67 gives 32-bit addresses
            (&[0x67, 0x89, 0x07], store(4, reg(0), 3)),
            // mov %eax,0x10(%r13d)
            (&[0x67, 0x41, 0x89, 0x45, 0x10], store(4, reg(0), 5)),
            // mov %r15,0x7fffffff(%r14,%r13,8)
            (&[0x4F, 0x89, 0xBC, 0xEE, 0xFF, 0xFF, 0xFF, 0x7F], store(8, reg(15), 8)),
            // movabs %eax,0xfee000b0 (moffs64)
            (&[0xA3, 0xB0, 0x00, 0xE0, 0xFE, 0x00, 0x00, 0x00, 0x00], store(4, reg(0), 9)),
            // movabs %rax,0x1122334455667788
            (&[0x48, 0xA3, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11], store(8, reg(0), 10)),
            // addr32 mov %al,0xfee000b0 (moffs32)
            (&[0x67, 0xA2, 0xB0, 0x00, 0xE0, 0xFE], store(1, reg(0), 6)),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(bytes, Long64), Ok(*want), "{bytes:02x?}");
            // Trailing bytes are not part of it.
            let mut more = bytes.to_vec();
            more.extend_from_slice(&[0x90; 8]);
            assert_eq!(decode(&more, Long64), Ok(*want), "{bytes:02x?} + nops");
            // Any shorter prefix of it is truncated.
            for n in 0..bytes.len() {
                assert_eq!(decode(&bytes[..n], Long64), Err(DecodeError::Truncated), "{:02x?}", &bytes[..n]);
            }
        }
    }

    #[test]
    fn long_mode_loads_and_xchg() {
        let cases: &[(&[u8], MemAccess)] = &[
            // mov (%rdi),%eax
            (&[0x8B, 0x07], load(4, reg(0), 2)),
            // mov (%rdi),%bh
            (&[0x8A, 0x3F], load(1, Operand::Reg { index: 3, high_byte: true }, 2)),
            // mov (%rdi),%r8
            (&[0x4C, 0x8B, 0x07], load(8, reg(8), 3)),
            // mov %fs:0x10,%eax
            (&[0x64, 0x8B, 0x04, 0x25, 0x10, 0x00, 0x00, 0x00], load(4, reg(0), 8)),
            // movabs 0xfee00030,%eax
            (&[0xA1, 0x30, 0x00, 0xE0, 0xFE, 0, 0, 0, 0], load(4, reg(0), 9)),
            // xchg %eax,(%rdi)
            (&[0x87, 0x07], xchg(4, reg(0), 2)),
            // lock xchg %eax,(%rdi)
            (&[0xF0, 0x87, 0x07], xchg(4, reg(0), 3)),
            // xchg %dh,(%rsi)
            (&[0x86, 0x36], xchg(1, Operand::Reg { index: 2, high_byte: true }, 2)),
            // xchg %r11,0x20(%rsi)
            (&[0x4C, 0x87, 0x5E, 0x20], xchg(8, reg(11), 4)),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(bytes, Long64), Ok(*want), "{bytes:02x?}");
        }
    }

    #[test]
    fn protected_32() {
        let cases: &[(&[u8], MemAccess)] = &[
            // mov %eax,0xfee000b0 (mod 00 rm 101: absolute, not RIP-relative)
            (&[0x89, 0x05, 0xB0, 0x00, 0xE0, 0xFE], store(4, reg(0), 6)),
            // mov %eax,0xfee000b0 (moffs32)
            (&[0xA3, 0xB0, 0x00, 0xE0, 0xFE], store(4, reg(0), 5)),
            // mov %eax,-0x11fff50(,%eax,1)
            (&[0x89, 0x04, 0x05, 0xB0, 0x00, 0xE0, 0xFE], store(4, reg(0), 7)),
            // movl $0x12345678,0x300(%ebx)
            (&[0xC7, 0x83, 0x00, 0x03, 0x00, 0x00, 0x78, 0x56, 0x34, 0x12], store(4, Operand::Imm(0x1234_5678), 10)),
            // mov %ax,(%edi)
            (&[0x66, 0x89, 0x07], store(2, reg(0), 3)),
            // mov %eax,(%bx): 67 gives 16-bit addresses
            (&[0x67, 0x89, 0x07], store(4, reg(0), 3)),
            // mov %eax,0x1234 with 16-bit addressing (mod 00 rm 110)
            (&[0x67, 0x89, 0x06, 0x34, 0x12], store(4, reg(0), 5)),
            // xchg %eax,(%esi)
            (&[0x87, 0x06], xchg(4, reg(0), 2)),
            // mov %al,(%ecx)
            (&[0x88, 0x01], store(1, reg(0), 2)),
        ];
        for (bytes, want) in cases {
            assert_eq!(decode(bytes, Prot32), Ok(*want), "{bytes:02x?}");
        }
        // 48 is DEC EAX outside 64-bit mode, not a REX prefix.
        assert_eq!(decode(&[0x48, 0x89, 0x07], Prot32), Err(DecodeError::Unsupported { opcode: 0x48 }));
    }

    #[test]
    fn sixteen_bit_addressing() {
        let cases: &[(&[u8], MemAccess)] = &[
            // mov %ax,(%bx)
            (&[0x89, 0x07], store(2, reg(0), 2)),
            // mov %ax,0x10(%bx,%si)
            (&[0x89, 0x40, 0x10], store(2, reg(0), 3)),
            // mov %ax,0x1234(%bp,%di)
            (&[0x89, 0x83, 0x34, 0x12], store(2, reg(0), 4)),
            // mov %ax,0x1234 (mod 00 rm 110: disp16, no base)
            (&[0x89, 0x06, 0x34, 0x12], store(2, reg(0), 4)),
            // mov %ax,0x0(%bp): mod 01 rm 110
            (&[0x89, 0x46, 0x00], store(2, reg(0), 3)),
            // mov %ax,0x1234 (moffs16)
            (&[0xA3, 0x34, 0x12], store(2, reg(0), 3)),
            // movw $0x5678,0x1234
            (&[0xC7, 0x06, 0x34, 0x12, 0x78, 0x56], store(2, Operand::Imm(0x5678), 6)),
            // mov %eax,(%bx)
            (&[0x66, 0x89, 0x07], store(4, reg(0), 3)),
            // movl $0xfee00000,(%si)
            (&[0x66, 0xC7, 0x04, 0x00, 0x00, 0xE0, 0xFE], store(4, Operand::Imm(0xFEE0_0000), 7)),
            // mov %ax,(%ebx): 67 gives 32-bit addresses
            (&[0x67, 0x89, 0x03], store(2, reg(0), 3)),
            // mov %ax,0x10(%esp): ... with SIB
            (&[0x67, 0x89, 0x44, 0x24, 0x10], store(2, reg(0), 5)),
            // mov %ah,(%di)
            (&[0x88, 0x25], store(1, Operand::Reg { index: 0, high_byte: true }, 2)),
            // mov (%bx),%cx
            (&[0x8B, 0x0F], load(2, reg(1), 2)),
        ];
        for mode in [Real16, Prot16] {
            for (bytes, want) in cases {
                assert_eq!(decode(bytes, mode), Ok(*want), "{mode:?} {bytes:02x?}");
            }
        }
    }

    #[test]
    fn rex_only_immediately_before_the_opcode() {
        // 48 66 89 07: the REX is ignored, 66 applies: mov %ax,(%rdi).
        assert_eq!(decode(&[0x48, 0x66, 0x89, 0x07], Long64), Ok(store(2, reg(0), 4)));
        // 66 48 89 07: REX.W wins over 66.
        assert_eq!(decode(&[0x66, 0x48, 0x89, 0x07], Long64), Ok(store(8, reg(0), 4)));
        // Two REX prefixes: the last one counts.
        assert_eq!(decode(&[0x4C, 0x40, 0x89, 0x07], Long64), Ok(store(4, reg(0), 4)));
        // An ignored REX still counts for length but not for AH..BH.
        assert_eq!(decode(&[0x40, 0x2E, 0x88, 0x20], Long64), Ok(store(1, Operand::Reg { index: 0, high_byte: true }, 4)));
    }

    #[test]
    fn rejects() {
        use DecodeError::*;
        // Register operands: mov %eax,%edi; movl $1,%eax; xchg %eax,%ecx (87 c8).
        assert_eq!(decode(&[0x89, 0xC7], Long64), Err(RegisterOperand));
        assert_eq!(decode(&[0xC7, 0xC0, 1, 0, 0, 0], Long64), Err(RegisterOperand));
        assert_eq!(decode(&[0x87, 0xC8], Prot32), Err(RegisterOperand));
        assert_eq!(decode(&[0x8A, 0xE0], Real16), Err(RegisterOperand));
        // Other opcodes and /digits.
        assert_eq!(decode(&[0x0F, 0xB6, 0x07], Long64), Err(Unsupported { opcode: 0x0F }));
        assert_eq!(decode(&[0x09, 0x07], Long64), Err(Unsupported { opcode: 0x09 }));
        assert_eq!(decode(&[0xC7, 0xF8, 0, 0, 0, 0], Long64), Err(Unsupported { opcode: 0xC7 }));
        assert_eq!(decode(&[0xC6, 0x0F, 0], Long64), Err(Unsupported { opcode: 0xC6 }));
        assert_eq!(decode(&[0xF3, 0xAB], Long64), Err(Unsupported { opcode: 0xF3 }));
        assert_eq!(decode(&[0xC5, 0xF9, 0x7F, 0x07], Long64), Err(Unsupported { opcode: 0xC5 }));
        // LOCK only on XCHG.
        assert_eq!(decode(&[0xF0, 0x89, 0x07], Long64), Err(Unsupported { opcode: 0xF0 }));
        // Truncated: no ModRM, no SIB, short displacement, short immediate.
        assert_eq!(decode(&[], Long64), Err(Truncated));
        assert_eq!(decode(&[0x66, 0x48], Long64), Err(Truncated));
        assert_eq!(decode(&[0x89], Long64), Err(Truncated));
        assert_eq!(decode(&[0x89, 0x04], Long64), Err(Truncated));
        assert_eq!(decode(&[0x89, 0x05, 0, 0], Long64), Err(Truncated));
        assert_eq!(decode(&[0xC7, 0x07, 0, 0, 0], Long64), Err(Truncated));
        // Longer than 15 bytes: 14 prefixes + a 2-byte instruction is 16.
        let mut long = [0x2Eu8; 16];
        long[14] = 0x89;
        long[15] = 0x07;
        assert_eq!(decode(&long, Long64), Err(TooLong));
        // 13 prefixes + 2 bytes is 15: fine.
        assert_eq!(decode(&long[1..], Long64), Ok(store(4, reg(0), 15)));
        // 15 bytes of prefixes then the end of the buffer, and more.
        assert_eq!(decode(&[0x66; 15], Long64), Err(TooLong));
        assert_eq!(decode(&[0x66; 20], Long64), Err(TooLong));
        // An immediate that crosses byte 15.
        let mut imm = [0x3Eu8; 17];
        imm[8..].copy_from_slice(&[0x48, 0xC7, 0x84, 0x24, 0, 0, 0, 0, 0]);
        assert_eq!(decode(&imm, Long64), Err(TooLong));
    }

    #[test]
    fn modes() {
        use crate::arch::{CR0_PE as PE, EFER_LMA as LMA};
        const L: u64 = 1 << 13;
        const D: u64 = 1 << 14;
        // 64-bit code segment: 0xA09B (G, L, P, S, type B).
        assert_eq!(mode_of(PE | (1 << 31), LMA | (1 << 8), 0xA09B), Long64);
        // Compatibility mode: LMA but CS.L = 0.
        assert_eq!(mode_of(PE | (1 << 31), LMA, 0xC09B), Prot32);
        assert_eq!(mode_of(PE | (1 << 31), LMA, 0x009B), Prot16);
        // Legacy protected mode: CS.L means nothing without LMA.
        assert_eq!(mode_of(PE, 0, 0xC09B), Prot32);
        assert_eq!(mode_of(PE, 0, L | 0x9B), Prot16);
        assert_eq!(mode_of(PE, 0, 0x9B), Prot16);
        // Real mode, virtual-8086 mode.
        assert_eq!(mode_of(0, 0, 0x93), Real16);
        assert_eq!(mode_of(0x10, 0, 0x9B), Real16);
        assert_eq!(mode_of(PE, 0, 0xF3), Prot16);
        // Real mode with a 32-bit CS still cached.
        assert_eq!(mode_of(0, 0, D | 0x9B), Prot32);
    }

    #[test]
    fn register_values() {
        let regs = |i: u8| (u64::from(i) + 1) * 0x0102_0304_0506_0708;
        let r = |index| Operand::Reg { index, high_byte: false };
        let h = |index| Operand::Reg { index, high_byte: true };
        assert_eq!(reg_value(|_| 0x1122_3344_5566_7788, &r(0), 8), 0x1122_3344_5566_7788);
        assert_eq!(reg_value(|_| 0x1122_3344_5566_7788, &r(0), 4), 0x5566_7788);
        assert_eq!(reg_value(|_| 0x1122_3344_5566_7788, &r(0), 2), 0x7788);
        assert_eq!(reg_value(|_| 0x1122_3344_5566_7788, &r(0), 1), 0x88);
        assert_eq!(reg_value(|_| 0x1122_3344_5566_7788, &h(0), 1), 0x77);
        // The right register is asked for.
        for i in 0..16 {
            assert_eq!(reg_value(regs, &r(i), 8), regs(i));
        }
        assert_eq!(reg_value(regs, &h(3), 1), (regs(3) >> 8) & 0xFF);
        assert_eq!(reg_value(|_| unreachable!(), &Operand::Imm(0xFFFF_FFFF_FFFF_FFFE), 4), 0xFFFF_FFFE);
        assert_eq!(reg_value(|_| unreachable!(), &Operand::Imm(0x1FF), 1), 0xFF);
        // Decoded then evaluated: mov %ah,(%rax) stores bits 15:8 of RAX.
        let a = decode(&[0x88, 0x20], Long64).unwrap();
        assert_eq!(reg_value(|i| if i == 0 { 0xABCD } else { 0 }, &a.value, a.size), 0xAB);
    }

    #[test]
    fn loads_merge_like_the_cpu() {
        let old = 0x1122_3344_5566_7788;
        let r = Operand::Reg { index: 0, high_byte: false };
        let h = Operand::Reg { index: 0, high_byte: true };
        assert_eq!(load_into(old, &r, 1, 0xAAAA), 0x1122_3344_5566_77AA);
        assert_eq!(load_into(old, &h, 1, 0xAAAA), 0x1122_3344_5566_AA88);
        assert_eq!(load_into(old, &r, 2, 0xBBBB_CCCC), 0x1122_3344_5566_CCCC);
        assert_eq!(load_into(old, &r, 4, 0xDDDD_EEEE_FFFF_0000), 0xFFFF_0000);
        assert_eq!(load_into(old, &r, 8, 0xDDDD_EEEE_FFFF_0000), 0xDDDD_EEEE_FFFF_0000);
        assert_eq!(load_into(old, &Operand::Imm(5), 4, 0), old);
    }
}
