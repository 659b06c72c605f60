//! Thin wrappers around the KVM ioctls this tool uses (`linux/kvm.h`, API
//! version 12). Every `unsafe` of the crate is here; each wrapper checks
//! the return value and turns it into an error that names the call.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const KVM_GET_API_VERSION: u64 = 0xAE00;
const KVM_CREATE_VM: u64 = 0xAE01;
const KVM_GET_VCPU_MMAP_SIZE: u64 = 0xAE04;
/// `_IOWR(KVMIO, 0x05, struct kvm_cpuid2)`.
const KVM_GET_SUPPORTED_CPUID: u64 = 0xC008_AE05;
const KVM_CREATE_VCPU: u64 = 0xAE41;
/// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_AE46;
const KVM_SET_TSS_ADDR: u64 = 0xAE47;
const KVM_RUN: u64 = 0xAE80;
/// `_IOR(KVMIO, 0x81, struct kvm_regs)`.
const KVM_GET_REGS: u64 = 0x8090_AE81;
const KVM_SET_REGS: u64 = 0x4090_AE82;
/// `_IOR(KVMIO, 0x83, struct kvm_sregs)`.
const KVM_GET_SREGS: u64 = 0x8138_AE83;
const KVM_SET_SREGS: u64 = 0x4138_AE84;
/// `_IOW(KVMIO, 0x90, struct kvm_cpuid2)`.
const KVM_SET_CPUID2: u64 = 0x4008_AE90;

/// `struct kvm_regs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// `struct kvm_segment`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
    pub padding: u8,
}

/// `struct kvm_dtable`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DTable {
    pub base: u64,
    pub limit: u16,
    pub padding: [u16; 3],
}

/// `struct kvm_sregs`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DTable,
    pub idt: DTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
    pub interrupt_bitmap: [u64; 4],
}

/// `struct kvm_cpuid_entry2`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub padding: [u32; 3],
}

/// Most CPUID entries asked for (KVM answers E2BIG if it has more).
const MAX_CPUID: usize = 256;

/// `struct kvm_cpuid2` with room for [`MAX_CPUID`] entries.
#[repr(C)]
struct Cpuid2 {
    nent: u32,
    padding: u32,
    entries: [CpuidEntry; MAX_CPUID],
}

/// `struct kvm_userspace_memory_region`.
#[repr(C)]
struct MemoryRegion {
    slot: u32,
    flags: u32,
    guest_phys_addr: u64,
    memory_size: u64,
    userspace_addr: u64,
}

// The layouts the ioctl numbers encode.
const _: () = assert!(size_of::<Regs>() == 144);
const _: () = assert!(size_of::<Sregs>() == 312);
const _: () = assert!(size_of::<CpuidEntry>() == 40);
const _: () = assert!(size_of::<MemoryRegion>() == 32);

fn check(what: &str, r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    } else {
        Ok(r)
    }
}

/// ioctl with an integer (or no) argument.
fn ioctl_val(fd: &impl AsRawFd, what: &str, req: u64, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the requests passed here take an integer argument, not a pointer.
    check(what, unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) })
}

/// ioctl with a pointer to `T`, whose layout is the one `req` encodes.
fn ioctl_ptr<T>(fd: &impl AsRawFd, what: &str, req: u64, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: every caller passes a valid pointer to the `#[repr(C)]` struct
    // whose size and direction `req` encodes (asserted above).
    check(what, unsafe { libc::ioctl(fd.as_raw_fd(), req as _, arg) })
}

fn fd_from(what: &str, r: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(what, r)?;
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An anonymous private mapping, unmapped on drop.
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(len: usize, fd: Option<&OwnedFd>) -> io::Result<Mapping> {
        let (flags, raw) = match fd {
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1),
            Some(f) => (libc::MAP_SHARED, f.as_raw_fd()),
        };
        // SAFETY: a fresh mapping chosen by the kernel; nothing else refers to it.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, raw, 0) };
        if p == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("mmap of {len} bytes: {e}")));
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` readable bytes for as long as `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only reference
        // from this process (KVM writes only while `run` is in progress).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// `/dev/kvm`.
pub struct Kvm(File);

impl Kvm {
    pub fn open() -> io::Result<Kvm> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| io::Error::new(e.kind(), format!("/dev/kvm: {e} (are kvm and kvm_intel loaded?)")))?;
        Ok(Kvm(f))
    }

    pub fn api_version(&self) -> io::Result<i32> {
        ioctl_val(&self.0, "KVM_GET_API_VERSION", KVM_GET_API_VERSION, 0)
    }

    pub fn supported_cpuid(&self) -> io::Result<Vec<CpuidEntry>> {
        let mut c = Box::new(Cpuid2 { nent: MAX_CPUID as u32, padding: 0, entries: [CpuidEntry::default(); MAX_CPUID] });
        ioctl_ptr(&self.0, "KVM_GET_SUPPORTED_CPUID", KVM_GET_SUPPORTED_CPUID, &mut *c)?;
        Ok(c.entries[..(c.nent as usize).min(MAX_CPUID)].to_vec())
    }

    pub fn create_vm(&self) -> io::Result<Vm> {
        // SAFETY: KVM_CREATE_VM takes the machine type (0) and returns a new fd.
        let fd = fd_from("KVM_CREATE_VM", unsafe { libc::ioctl(self.0.as_raw_fd(), KVM_CREATE_VM as _, 0 as libc::c_ulong) })?;
        let run_size = ioctl_val(&self.0, "KVM_GET_VCPU_MMAP_SIZE", KVM_GET_VCPU_MMAP_SIZE, 0)? as usize;
        Ok(Vm { fd, run_size, memory: None })
    }
}

/// A VM with (at most) one memory slot.
pub struct Vm {
    fd: OwnedFd,
    run_size: usize,
    memory: Option<Mapping>,
}

impl Vm {
    /// Where KVM keeps the real-mode TSS (three pages below 4 GiB, outside RAM).
    pub fn set_tss_addr(&self, addr: u64) -> io::Result<()> {
        ioctl_val(&self.fd, "KVM_SET_TSS_ADDR", KVM_SET_TSS_ADDR, addr as libc::c_ulong).map(|_| ())
    }

    /// Gives the guest `len` bytes of zeroed RAM at guest-physical 0 (slot 0).
    pub fn add_memory(&mut self, len: usize) -> io::Result<()> {
        let m = Mapping::new(len, None)?;
        let mut r = MemoryRegion { slot: 0, flags: 0, guest_phys_addr: 0, memory_size: len as u64, userspace_addr: m.ptr as u64 };
        ioctl_ptr(&self.fd, "KVM_SET_USER_MEMORY_REGION", KVM_SET_USER_MEMORY_REGION, &mut r)?;
        self.memory = Some(m);
        Ok(())
    }

    /// The guest's RAM (empty before [`Self::add_memory`]).
    pub fn memory(&mut self) -> &mut [u8] {
        self.memory.as_mut().map_or(&mut [], Mapping::as_mut_slice)
    }

    pub fn create_vcpu(&self) -> io::Result<Vcpu> {
        // SAFETY: KVM_CREATE_VCPU takes the vCPU id and returns a new fd.
        let fd = fd_from("KVM_CREATE_VCPU", unsafe { libc::ioctl(self.fd.as_raw_fd(), KVM_CREATE_VCPU as _, 0 as libc::c_ulong) })?;
        let run = Mapping::new(self.run_size, Some(&fd))?;
        Ok(Vcpu { fd, run })
    }
}

/// Offsets in `struct kvm_run`.
const RUN_EXIT_REASON: usize = 8;
/// Start of the exit-specific union.
const RUN_UNION: usize = 32;

/// Why `KVM_RUN` returned (`KVM_EXIT_*`), with the I/O details.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `KVM_EXIT_IO` (2): `count` accesses of `size` bytes at `port`; the
    /// data is at `data_offset` in the run structure.
    Io { out: bool, size: u8, port: u16, count: u32, data_offset: u64 },
    /// `KVM_EXIT_HLT` (5).
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (8): a triple fault.
    Shutdown,
    /// Any other `KVM_EXIT_*` number (`FAIL_ENTRY` 9, `INTERNAL_ERROR` 17, ...).
    Other(u32),
}

/// A vCPU and its shared `kvm_run` page.
pub struct Vcpu {
    fd: OwnedFd,
    run: Mapping,
}

impl Vcpu {
    pub fn set_cpuid(&self, entries: &[CpuidEntry]) -> io::Result<()> {
        if entries.len() > MAX_CPUID {
            return Err(io::Error::other(format!("{} CPUID entries, at most {MAX_CPUID}", entries.len())));
        }
        let mut c = Box::new(Cpuid2 { nent: entries.len() as u32, padding: 0, entries: [CpuidEntry::default(); MAX_CPUID] });
        c.entries[..entries.len()].copy_from_slice(entries);
        ioctl_ptr(&self.fd, "KVM_SET_CPUID2", KVM_SET_CPUID2, &mut *c).map(|_| ())
    }

    pub fn regs(&self) -> io::Result<Regs> {
        let mut r = Regs::default();
        ioctl_ptr(&self.fd, "KVM_GET_REGS", KVM_GET_REGS, &mut r)?;
        Ok(r)
    }

    pub fn set_regs(&self, mut r: Regs) -> io::Result<()> {
        ioctl_ptr(&self.fd, "KVM_SET_REGS", KVM_SET_REGS, &mut r).map(|_| ())
    }

    pub fn sregs(&self) -> io::Result<Sregs> {
        let mut s = Sregs::default();
        ioctl_ptr(&self.fd, "KVM_GET_SREGS", KVM_GET_SREGS, &mut s)?;
        Ok(s)
    }

    pub fn set_sregs(&self, mut s: Sregs) -> io::Result<()> {
        ioctl_ptr(&self.fd, "KVM_SET_SREGS", KVM_SET_SREGS, &mut s).map(|_| ())
    }

    /// Runs the guest until its next exit to user space (EINTR is retried).
    pub fn run(&mut self) -> io::Result<Exit> {
        loop {
            match ioctl_val(&self.fd, "KVM_RUN", KVM_RUN, 0) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
                Ok(_) => break,
            }
        }
        Ok(decode_exit(self.run.as_slice()))
    }

    /// The run structure (to read or write an I/O exit's data).
    pub fn run_page(&mut self) -> &mut [u8] {
        self.run.as_mut_slice()
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Decodes the exit of a `struct kvm_run` (pure: unit-tested).
pub fn decode_exit(run: &[u8]) -> Exit {
    match u32_at(run, RUN_EXIT_REASON) {
        2 => {
            let u = RUN_UNION;
            Exit::Io {
                out: run[u] == 1,
                size: run[u + 1],
                port: u16::from_le_bytes([run[u + 2], run[u + 3]]),
                count: u32_at(run, u + 4),
                data_offset: u64::from_le_bytes(run[u + 8..u + 16].try_into().unwrap()),
            }
        }
        5 => Exit::Hlt,
        8 => Exit::Shutdown,
        n => Exit::Other(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_io_and_hlt_exits() {
        let mut run = vec![0u8; 4096];
        run[8] = 2; // KVM_EXIT_IO
        run[32] = 1; // out
        run[33] = 1; // size
        run[34..36].copy_from_slice(&0x3F8u16.to_le_bytes());
        run[36..40].copy_from_slice(&1u32.to_le_bytes());
        run[40..48].copy_from_slice(&4096u64.to_le_bytes());
        assert_eq!(decode_exit(&run), Exit::Io { out: true, size: 1, port: 0x3F8, count: 1, data_offset: 4096 });
        run[8] = 5;
        assert_eq!(decode_exit(&run), Exit::Hlt);
        run[8] = 17;
        assert_eq!(decode_exit(&run), Exit::Other(17));
    }
}
