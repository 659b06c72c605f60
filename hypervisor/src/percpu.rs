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
