//! The guest's own view of its paging registers, also under `ept=off`
//! (where the VMCS holds the shadow's CR3 and the hardware's CR0/CR4
//! bits): for every walk of the guest's tables the hypervisor makes. A
//! leaf module (VMCS reads only), so that the guest-memory code can use it
//! without depending on the shadow's machinery (`shadowvm.rs`).

use super::{control, guest, vmread};
use crate::guestmem::PagingState;
use crate::state::MAX_CPUS;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The guest's CR0 as the guest sees it (owned bits from the read shadow).
pub fn guest_cr0() -> u64 {
    let m = vmread(control::CR0_GUEST_HOST_MASK);
    (vmread(guest::CR0) & !m) | (vmread(control::CR0_READ_SHADOW) & m)
}

/// The guest's CR4 as the guest sees it.
pub fn guest_cr4() -> u64 {
    let m = vmread(control::CR4_GUEST_HOST_MASK);
    (vmread(guest::CR4) & !m) | (vmread(control::CR4_READ_SHADOW) & m)
}

/// Each vCPU's guest CR3 while it runs on its shadow, else [`NOT_SHADOW`]:
/// for the code that walks the guest's tables without the state block at
/// hand ([`current_guest_paging`]).
static SHADOW_CR3: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(NOT_SHADOW) }; MAX_CPUS];
const NOT_SHADOW: u64 = u64::MAX;

/// Records vCPU `id`'s guest CR3 (`None`: not in the shadow phase).
pub fn publish(id: usize, guest_cr3: Option<u64>) {
    SHADOW_CR3[id].store(guest_cr3.unwrap_or(NOT_SHADOW), Relaxed);
}

/// vCPU `id`'s guest CR3 while it runs on its shadow.
pub fn shadow_cr3(id: usize) -> Option<u64> {
    match SHADOW_CR3[id].load(Relaxed) {
        NOT_SHADOW => None,
        cr3 => Some(cr3),
    }
}

/// [`guest_paging`] of the vCPU running on this CPU (its VMCS is current).
pub fn current_guest_paging() -> PagingState {
    let shadow_cr3 = crate::percpu::current_vcpu().map_or(NOT_SHADOW, |(id, _)| SHADOW_CR3[id].load(Relaxed));
    let cr3 = if shadow_cr3 == NOT_SHADOW { vmread(guest::CR3) } else { shadow_cr3 };
    PagingState { cr0: guest_cr0(), cr3, cr4: guest_cr4(), efer: vmread(guest::IA32_EFER_FULL) }
}
