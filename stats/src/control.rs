//! The control interface: extra CPUID leaves, outside the four
//! instrumentation leaves (whose semantics never change), through which a
//! guest program (the `exitstat` tool, from user mode) reads detailed
//! statistics and controls the hypervisor.
//!
//! | leaf | input ECX | answer |
//! |---|---|---|
//! | `0x4FFFFFF0` INFO | ignored | EAX = interface version (1), EBX = vCPUs, ECX = flags (bit 0: detailed statistics built in; bit 1: timeline on), EDX = highest defined reason |
//! | `0x4FFFFFF1` CONTROL | command | 1 = print the statistics (human table and JSON lines) on serial now; 2 = reset all counters to zero. EAX = 0 done, 1 not available in this build, 0xFFFFFFFF unknown command |
//! | `0x4FFFFFF2` EXITS64 | reason, or 0xFFFFFFFF for all | EBX:ECX = exits (64 bits) |
//! | `0x4FFFFFF3` MIN | reason | EBX:ECX = shortest exit in cycles (0 if none) |
//! | `0x4FFFFFF4` MAX | reason | EBX:ECX = longest exit in cycles |
//! | `0x4FFFFFF5` HIST | reason \| bucket << 16 | EBX:ECX = exits with latency in bucket (see `detail::bucket`) |
//! | `0x4FFFFFF6` BREAKDOWN | kind \| index << 8 | entry `index` of breakdown `kind` (0 I/O port, 1 MSR, 2 CR, 3 EPT 2 MiB region, 4 CPUID leaf and subleaf, 5 exception vector; see `detail::BreakdownKind`), by count descending: EAX = key bits 31:0, EDX = key bits 62:32 with bit 31 set if the entry exists, EBX:ECX = count. Index 0xFFFFFF: the count of keys not tracked individually |
//! | `0x4FFFFFF7` SUMSQ | reason \| part << 16 | EBX:ECX = bits 63:0 (part 0) or 127:64 (part 1) of the sum of squared latencies |
//! | `0x4FFFFFF8` VCPU | vCPU number | EAX = exits bits 31:0, EDX = exits bits 63:32, EBX:ECX = cycles, of that vCPU |
//!
//! "EBX:ECX" means EBX holds bits 63:32 and ECX bits 31:0, as in the
//! cycles leaves. For a reason number the SDM does not define, every
//! per-reason leaf answers EAX=EBX=ECX=0, EDX=0xFFFFFFFF; for a defined
//! reason that is not enabled, all zeros. All figures follow the last
//! reset and the counting rule of the instrumentation leaves (the querying
//! exit itself is not included). A leaf in 0x4FFFFFF0..=0x4FFFFFFB that is
//! not listed answers all zeros.

pub const LEAF_INFO: u32 = 0x4FFF_FFF0;
pub const LEAF_CONTROL: u32 = 0x4FFF_FFF1;
pub const LEAF_EXITS64: u32 = 0x4FFF_FFF2;
pub const LEAF_MIN: u32 = 0x4FFF_FFF3;
pub const LEAF_MAX: u32 = 0x4FFF_FFF4;
pub const LEAF_HIST: u32 = 0x4FFF_FFF5;
pub const LEAF_BREAKDOWN: u32 = 0x4FFF_FFF6;
pub const LEAF_SUMSQ: u32 = 0x4FFF_FFF7;
pub const LEAF_VCPU: u32 = 0x4FFF_FFF8;

/// The control leaves (0x4FFFFFF0..=0x4FFFFFFB).
pub const fn is_control_leaf(leaf: u32) -> bool {
    leaf >= LEAF_INFO && leaf <= 0x4FFF_FFFB
}

pub const INTERFACE_VERSION: u32 = 1;
pub const FLAG_DETAILED: u32 = 1 << 0;
pub const FLAG_TIMELINE: u32 = 1 << 1;

pub const CMD_DUMP: u32 = 1;
pub const CMD_RESET: u32 = 2;

pub const STATUS_OK: u32 = 0;
pub const STATUS_UNAVAILABLE: u32 = 1;
pub const STATUS_UNKNOWN: u32 = 0xFFFF_FFFF;

/// "All reasons" for LEAF_EXITS64.
pub const ALL_REASONS: u32 = 0xFFFF_FFFF;
/// The "not tracked individually" entry of LEAF_BREAKDOWN.
pub const BREAKDOWN_OTHER: u32 = 0xFF_FFFF;
/// EDX bit 31 of LEAF_BREAKDOWN: the entry exists.
pub const BREAKDOWN_VALID: u32 = 1 << 31;
