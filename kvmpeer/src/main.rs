//! `kvmpeer`: a minimal KVM user space, the peer of `cargo xtask bench
//! --peer kvm`. Inside the benchmark's Linux (booted natively in Bochs, with
//! `kvm` and `kvm_intel` loaded) it runs Exitscope's multiboot1 bench guest
//! on `/dev/kvm`, as a new user of KVM would: one vCPU, the CPUID KVM
//! supports, no in-kernel irqchip, and a COM1 in user space.
//!
//! ```text
//! kvmpeer GUEST.elf [GUEST COMMAND LINE...]
//! ```
//!
//! The guest is loaded as a multiboot1 loader would (guest-loader parses
//! the image and builds the information block) into 64 MiB of RAM and
//! entered in 32-bit protected mode, paging off, EAX = 0x2BADB002, EBX =
//! the block. Exits to user space:
//!
//! * I/O to COM1 (0x3F8-0x3FF): the transmit register's bytes are the
//!   guest's console, printed line by line as `kvm-guest: LINE`; the line
//!   status register reads "transmitter empty";
//! * any other I/O (the bench guest's OUT to port 0x8900): ignored (reads
//!   give all-ones), counted;
//! * HLT: the end of the run.
//!
//! CPUID, VMCALL and RDMSR never leave the kernel. At the end it prints
//! `KVMPEER exits io=N com1=N other_io=N hlt=N` and `KVMPEER DONE`, and
//! exits 0; on a triple fault, a failed entry or any other exit it prints
//! the registers and exits 1.

mod kvm;

use std::io::Write;
use std::process::ExitCode;

use guest_loader::memmap::{MemKind, MemoryMap, Region};
use guest_loader::multiboot;

/// Guest RAM, from guest-physical 0.
const MEMORY: usize = 64 << 20;
/// Where the multiboot information block goes (conventional memory).
const MBI_ADDR: u32 = 0x9000;
/// KVM's real-mode TSS (three pages), outside RAM, below 4 GiB.
const TSS_ADDR: u64 = 0xfffb_d000;
/// COM1's ports.
const COM1: u16 = 0x3F8;

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        eprintln!("usage: kvmpeer GUEST.elf [GUEST COMMAND LINE...]");
        return ExitCode::from(2);
    };
    let cmdline = std::iter::once(path.as_str()).chain(args[1..].iter().map(String::as_str)).collect::<Vec<_>>().join(" ");
    match run(path, &cmdline) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("KVMPEER FAIL: {e}");
            eprintln!("kvmpeer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The guest's COM1, as far as a polled, transmit-only driver needs it.
#[derive(Default)]
struct Uart {
    lcr: u8,
    line: Vec<u8>,
}

impl Uart {
    /// A write of `v` to `port` (COM1..COM1+7); returns a finished line.
    fn write(&mut self, port: u16, v: u8) -> Option<String> {
        match port - COM1 {
            0 if self.lcr & 0x80 == 0 => {
                if v == b'\n' {
                    let l = String::from_utf8_lossy(&self.line).trim_end_matches('\r').to_string();
                    self.line.clear();
                    return Some(l);
                }
                self.line.push(v);
            }
            3 => self.lcr = v,
            _ => {}
        }
        None
    }

    /// A read of `port` (COM1..COM1+7).
    fn read(&self, port: u16) -> u8 {
        match port - COM1 {
            3 => self.lcr,
            5 => 0x60, // LSR: transmit holding register and transmitter empty
            _ => 0,
        }
    }
}

/// What user space saw.
#[derive(Default, Debug, PartialEq, Eq)]
struct Counts {
    io: u64,
    com1: u64,
    other_io: u64,
    hlt: u64,
}

/// Copies the multiboot1 image and its information block into `mem`;
/// returns the entry point.
fn load(mem: &mut [u8], image: &[u8], cmdline: &str) -> Result<u32> {
    let mb = multiboot::parse(image).map_err(|e| format!("not a multiboot1 image: {e}"))?;
    for s in &mb.segments {
        let start = usize::try_from(s.paddr).map_err(|_| "segment address".to_string())?;
        let end = usize::try_from(s.end())
            .ok()
            .filter(|&e| e <= mem.len() && start >= 0x10_0000)
            .ok_or_else(|| format!("segment {:#x}..{:#x} outside the guest's RAM (1 MiB..{} MiB)", s.paddr, s.end(), mem.len() >> 20))?;
        let data = image.get(s.file_offset..s.file_offset + s.file_len).ok_or("segment beyond the end of the file")?;
        mem[start..start + data.len()].copy_from_slice(data);
        mem[start + data.len()..end].fill(0);
    }
    let map = MemoryMap::from_regions([Region::new(0, 0xA_0000, MemKind::Ram), Region::new(0x10_0000, mem.len() as u64, MemKind::Ram)]);
    let mbi = multiboot::build_mbi(MBI_ADDR, &multiboot::MbiInput { memory: &map, cmdline, modules: &[], loader_name: "kvmpeer" });
    let at = MBI_ADDR as usize;
    if at + mbi.len() > 0xA_0000 {
        return Err(format!("multiboot information of {} bytes does not fit below 640 KiB", mbi.len()));
    }
    mem[at..at + mbi.len()].copy_from_slice(&mbi);
    Ok(mb.entry)
}

/// The multiboot1 machine state (§3.2): flat 32-bit segments, CR0.PE, no paging.
fn multiboot_sregs(mut s: kvm::Sregs) -> kvm::Sregs {
    let flat = |selector: u16, type_: u8| kvm::Segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.cs = flat(0x08, 0xB); // execute/read, accessed
    for seg in [&mut s.ds, &mut s.es, &mut s.fs, &mut s.gs, &mut s.ss] {
        *seg = flat(0x10, 0x3); // read/write, accessed
    }
    s.cr0 = 0x11; // PE | ET
    s.cr3 = 0;
    s.cr4 = 0;
    s.efer = 0;
    s
}

fn run(path: &str, cmdline: &str) -> Result {
    let image = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
    let e = |e: std::io::Error| e.to_string();
    let k = kvm::Kvm::open().map_err(e)?;
    let api = k.api_version().map_err(e)?;
    if api != 12 {
        return Err(format!("KVM API version {api}, expected 12"));
    }
    let cpuid = k.supported_cpuid().map_err(e)?;
    let mut vm = k.create_vm().map_err(e)?;
    vm.set_tss_addr(TSS_ADDR).map_err(e)?;
    vm.add_memory(MEMORY).map_err(e)?;
    let entry = load(vm.memory(), &image, cmdline)?;
    let mut cpu = vm.create_vcpu().map_err(e)?;
    cpu.set_cpuid(&cpuid).map_err(e)?;
    cpu.set_sregs(multiboot_sregs(cpu.sregs().map_err(e)?)).map_err(e)?;
    cpu.set_regs(kvm::Regs {
        rax: u64::from(multiboot::BOOTLOADER_MAGIC),
        rbx: u64::from(MBI_ADDR),
        rip: u64::from(entry),
        rflags: 2,
        ..Default::default()
    })
    .map_err(e)?;
    println!("KVMPEER START api={api} cpuid_entries={} memory_mib={} entry={entry:#x} cmdline=\"{cmdline}\"", cpuid.len(), MEMORY >> 20);

    let mut uart = Uart::default();
    let mut n = Counts::default();
    let stdout = std::io::stdout();
    loop {
        match cpu.run().map_err(e)? {
            kvm::Exit::Io { out, size, port, count, data_offset } => {
                n.io += 1;
                let page = cpu.run_page();
                let off = usize::try_from(data_offset).unwrap_or(usize::MAX);
                let len = usize::from(size) * count as usize;
                let data = page.get_mut(off..off.saturating_add(len)).ok_or("I/O data outside the run page")?;
                if (COM1..COM1 + 8).contains(&port) {
                    n.com1 += 1;
                    if out {
                        for &b in data.iter() {
                            if let Some(line) = uart.write(port, b) {
                                // One write per line: the console is shared with the kernel.
                                let _ = stdout.lock().write_all(format!("kvm-guest: {line}\n").as_bytes());
                            }
                        }
                    } else {
                        data.fill(uart.read(port));
                    }
                } else {
                    n.other_io += 1;
                    if !out {
                        data.fill(0xFF);
                    }
                }
            }
            kvm::Exit::Hlt => {
                n.hlt += 1;
                break;
            }
            other => {
                let r = cpu.regs().map_err(e)?;
                return Err(format!("unexpected exit {other:?}; guest rip={:#x} rax={:#x} rsp={:#x}", r.rip, r.rax, r.rsp));
            }
        }
    }
    println!("KVMPEER exits io={} com1={} other_io={} hlt={}", n.io, n.com1, n.other_io, n.hlt);
    println!("KVMPEER DONE");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uart_collects_lines_and_reports_an_empty_transmitter() {
        let mut u = Uart::default();
        assert_eq!(u.read(COM1 + 5) & 0x20, 0x20);
        // The divisor latch (DLAB = 1) is not data.
        u.write(COM1 + 3, 0x80);
        assert_eq!(u.write(COM1, 1), None);
        u.write(COM1 + 3, 0x03);
        for &b in b"BENCH DONE\r" {
            assert_eq!(u.write(COM1, b), None);
        }
        assert_eq!(u.write(COM1, b'\n').as_deref(), Some("BENCH DONE"));
        assert_eq!(u.write(COM1, b'\n').as_deref(), Some(""));
    }

    #[test]
    fn multiboot_state_is_flat_protected_mode() {
        let s = multiboot_sregs(kvm::Sregs::default());
        assert_eq!((s.cs.selector, s.cs.type_, s.cs.db, s.cs.l, s.cs.limit), (8, 0xB, 1, 0, 0xFFFF_FFFF));
        assert_eq!((s.ss.selector, s.ss.type_, s.ss.present), (0x10, 3, 1));
        assert_eq!((s.cr0, s.efer), (0x11, 0));
    }

    #[test]
    fn rejects_what_is_not_multiboot() {
        let mut mem = vec![0u8; 4 << 20];
        assert!(load(&mut mem, b"\x7fELF not really", "x").unwrap_err().contains("not a multiboot1 image"));
    }
}
