//! Which vCPU this CPU runs, readable from any context (the trap handlers,
//! the failure reporter, the statistics) without knowing the backend's
//! types: the host GS base points at the running vCPU's state block (the
//! backend sets it in its host state, `vmx/vcpu.rs`) and is 0 before, and
//! the backend keeps the vCPU number and the full reason of the exit it
//! handles last at the offsets named here (checked at compile time there).

/// Offset of the vCPU number (`usize`) in the state block.
pub const OFFSET_ID: usize = 128;
/// Offset of the last exit reason (`u32`) in the state block.
pub const OFFSET_LAST_EXIT: usize = 136;

/// The current vCPU, if this CPU is running one: its number and the full
/// exit reason it last handled.
pub fn current_vcpu() -> Option<(usize, u32)> {
    crate::state::try_shared()?;
    // Every CPU clears its GS base first thing (`cpu::clear_gs_base`).
    let gs = crate::cpu::gs_base();
    if gs == 0 {
        return None;
    }
    // SAFETY: the host GS base is the vCPU's state block (0 before), which
    // lives forever and holds these fields at these offsets.
    unsafe {
        let id = core::ptr::read_volatile((gs as usize + OFFSET_ID) as *const usize);
        let exit = core::ptr::read_volatile((gs as usize + OFFSET_LAST_EXIT) as *const u32);
        Some((id, exit))
    }
}

/// The backend's exit-path code that handles an exit without noting its
/// reason at `OFFSET_LAST_EXIT` (the VMX stub's CPUID fast path), and the
/// reason it handles: an exception or NMI there interrupted that exit.
static FAST_PATH: [core::sync::atomic::AtomicU64; 2] = [const { core::sync::atomic::AtomicU64::new(0) }; 2];
const FAST_PATH_REASON: u32 = 10;

/// Notes where the backend's fast path lies (CPUID exits, reason 10).
pub fn note_fast_path(code: core::ops::Range<u64>) {
    use core::sync::atomic::Ordering::Relaxed;
    FAST_PATH[0].store(code.start, Relaxed);
    FAST_PATH[1].store(code.end, Relaxed);
}

/// [`current_vcpu`] for a failure at `rip` (if known): in the fast path,
/// the exit being handled is a CPUID exit whatever the block says.
pub fn current_vcpu_at(rip: Option<u64>) -> Option<(usize, u32)> {
    use core::sync::atomic::Ordering::Relaxed;
    let (id, exit) = current_vcpu()?;
    Some((id, reason_at(FAST_PATH[0].load(Relaxed)..FAST_PATH[1].load(Relaxed), rip, exit)))
}

/// The exit a failure at `rip` interrupted, given the fast path's code and
/// the reason the state block holds.
fn reason_at(fast: core::ops::Range<u64>, rip: Option<u64>, noted: u32) -> u32 {
    if rip.is_some_and(|r| fast.contains(&r)) {
        FAST_PATH_REASON
    } else {
        noted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_in_the_fast_path_names_its_reason() {
        let fast = 0x1000..0x1100;
        assert_eq!(reason_at(fast.clone(), Some(0x1000), 18), 10);
        assert_eq!(reason_at(fast.clone(), Some(0x10ff), 18), 10);
        assert_eq!(reason_at(fast.clone(), Some(0x1100), 18), 18);
        assert_eq!(reason_at(fast.clone(), None, 18), 18);
        assert_eq!(reason_at(0..0, Some(0), 30), 30, "no fast path noted yet");
    }
}
