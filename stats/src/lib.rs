//! Exitscope's statistics vocabulary: the exit-reason table, the semantics of
//! the instrumentation CPUID leaves, lock-free per-vCPU counters and the
//! serial dump format. The hypervisor, the guest tool `exitstat` and
//! `cargo xtask` all use this one crate, so there is one copy of each.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod control;
pub mod counters;
pub mod detail;
pub mod dump;
pub mod leaf;
pub mod reasons;

pub use counters::{Snapshot, VcpuCounters};
pub use leaf::{CpuidRegs, StatsView};
pub use reasons::{ReasonSet, REASONS};
