//! Exitscope's statistics vocabulary: the exit-reason table, the semantics of
//! the instrumentation CPUID leaves, lock-free per-vCPU counters and the
//! serial dump format. The hypervisor, the guest tool `exitstat` and
//! `cargo xtask` all use this one crate, so there is one copy of each.
#![cfg_attr(not(test), no_std)]

// The detailed statistics, the JSON dump and the timeline need a heap; the
// table, the leaves, the counters and the text dump do not (bare-metal
// test guests use the crate without `alloc`).
#[cfg(feature = "alloc")]
extern crate alloc;

pub mod control;
pub mod counters;
#[cfg(feature = "alloc")]
pub mod detail;
pub mod dump;
pub mod flags;
pub mod intercept;
#[cfg(feature = "alloc")]
pub mod json;
pub mod leaf;
#[cfg(feature = "alloc")]
pub mod meta;
pub mod reasons;
pub mod shadow;
#[cfg(feature = "alloc")]
pub mod symbols;
#[cfg(feature = "alloc")]
pub mod timeline;
pub mod timesplit;

pub use counters::{Snapshot, VcpuCounters};
pub use leaf::{CpuidRegs, StatsView};
pub use reasons::{ReasonSet, REASONS};
