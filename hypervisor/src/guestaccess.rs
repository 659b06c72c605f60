//! The one policy for which guest memory the hypervisor may touch on the
//! guest's behalf (emulated string I/O and descriptor-table accesses, the
//! instruction bytes and page tables read to emulate a write to a watched
//! page or to contain an access outside guest memory, the PAE PDPTEs):
//! RAM of the guest's identity layout (write-back in EPT), and anything
//! below 1 MiB; never the hypervisor's footprint, never past what the
//! host's page tables map. The guest's page tables may point anywhere:
//! every physical access they lead to is checked here.

use crate::bootinfo::PhysMem;
use crate::ept::{EptRange, MemType};
use crate::guestmem::PhysMemMut;

/// Guest memory as the hypervisor may access it for the guest.
#[derive(Clone, Copy)]
pub struct GuestMem<'a> {
    /// The guest's identity layout (sorted, disjoint).
    pub ranges: &'a [EptRange],
    /// The hypervisor's footprint `[start, end)`.
    pub footprint: (u64, u64),
    /// The end of what the host's page tables map.
    pub host_mapped: u64,
}

impl GuestMem<'static> {
    /// The policy of this run (after the shared state is set up).
    pub fn current() -> GuestMem<'static> {
        let sh = crate::state::shared();
        GuestMem { ranges: &sh.ept_ranges, footprint: sh.footprint, host_mapped: sh.phys_mapped }
    }
}

impl GuestMem<'_> {
    /// Whether the hypervisor may access `[pa, pa + len)` for the guest.
    pub fn allowed(&self, pa: u64, len: usize) -> bool {
        let Some(end) = pa.checked_add(len as u64) else { return false };
        let (hs, he) = self.footprint;
        if len == 0 || end > self.host_mapped || (pa < he && hs < end) {
            return false;
        }
        let mut page = pa & !0xFFF;
        while page < end {
            if !self.ram(page) {
                return false;
            }
            page += 0x1000;
        }
        true
    }

    fn ram(&self, pa: u64) -> bool {
        if pa < 1 << 20 {
            return true;
        }
        let r = self.ranges;
        r.get(r.partition_point(|x| x.end <= pa)).is_some_and(|x| x.start <= pa && x.ty == MemType::WriteBack)
    }
}

impl PhysMem for GuestMem<'_> {
    fn bytes(&self, pa: u64, len: usize) -> Option<&[u8]> {
        // SAFETY: guest RAM (checked above), identity-mapped by the host;
        // read at once, while the guest is stopped on this vCPU.
        self.allowed(pa, len).then(|| unsafe { crate::memory::phys_slice(pa, len) })
    }
}

impl PhysMemMut for GuestMem<'_> {
    fn write(&self, pa: u64, data: &[u8]) -> bool {
        if !self.allowed(pa, data.len()) {
            return false;
        }
        // SAFETY: as above: guest RAM, written as the guest's own
        // instruction would have written it.
        unsafe { core::ptr::copy_nonoverlapping(data.as_ptr(), crate::memory::phys_ptr::<u8>(pa), data.len()) };
        true
    }
}

impl GuestMem<'_> {
    /// ORs `bits` atomically into the guest's paging-structure entry at
    /// `pa` (8 bytes if `wide`, else 4): the accessed and dirty flags shadow
    /// paging sets as the CPU would, while other vCPUs may set flags in the
    /// same entry. False if the policy forbids the access or `pa` is not
    /// aligned to the entry.
    pub fn fetch_or(&self, pa: u64, wide: bool, bits: u64) -> bool {
        let len = if wide { 8 } else { 4 };
        if !pa.is_multiple_of(len as u64) || !self.allowed(pa, len) {
            return false;
        }
        // SAFETY: guest RAM (checked above), aligned, identity-mapped.
        unsafe { crate::memory::phys_fetch_or(pa, wide, bits) };
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_guest_ram_outside_the_footprint() {
        let ranges = [
            EptRange { start: 0, end: 0x9F000, ty: MemType::WriteBack, write: true },
            EptRange { start: 0x10_0000, end: 0x1000_0000, ty: MemType::WriteBack, write: true },
            EptRange { start: 0xFEC0_0000, end: 0xFEE0_1000, ty: MemType::Uncacheable, write: true },
        ];
        let m = GuestMem { ranges: &ranges, footprint: (0x0800_0000, 0x0900_0000), host_mapped: 0x1_0000_0000 };
        assert!(m.allowed(0x10_0000, 8));
        assert!(m.allowed(0xA0000, 2), "below 1 MiB: always (VGA memory, the BIOS)");
        assert!(m.allowed(0x07FF_F000, 0x1000));
        assert!(!m.allowed(0x07FF_FFFC, 8), "straddles into the footprint");
        assert!(!m.allowed(0x0850_0000, 1), "the footprint");
        assert!(!m.allowed(0xFEE0_0300, 4), "MMIO (the local APIC)");
        assert!(!m.allowed(0x1000_0000, 1), "not in the layout");
        assert!(!m.allowed(0x0FFF_FFFC, 8), "runs off the end of RAM");
        assert!(!m.allowed(0x10_0000, 0));
        assert!(!m.allowed(u64::MAX - 2, 8), "wraps");
        let small = GuestMem { host_mapped: 0x0400_0000, ..m };
        assert!(!small.allowed(0x0500_0000, 4), "past what the host maps");
    }
}
