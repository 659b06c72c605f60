//! The exit-reason modifier bits: the VM-exit reason field carries, above
//! the basic reason in bits 15:0, flags that the basic number drops (Intel
//! SDM Vol. 3C, "Basic VM-Exit Information", table "Format of Exit
//! Reason"). Exitscope counts each one as its own row, so no exit is
//! summarised away: an exit with bit 31 set (VM-entry failure) ends the run
//! before its basic reason is charged, and would otherwise appear nowhere.

/// One counted modifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    /// The bits of the exit-reason field this row counts.
    pub mask: u32,
    /// Identifier (JSON `key`).
    pub key: &'static str,
    /// What the SDM calls it.
    pub name: &'static str,
}

/// The rows, in this order everywhere (dump, JSON, counters). The last row
/// collects the bits the SDM does not define (16-25 and 30): a CPU that
/// sets one is reported rather than ignored.
pub const FLAGS: [Flag; 6] = [
    Flag { mask: 1 << 26, key: "BUS_LOCK", name: "bus lock detected (bit 26)" },
    Flag { mask: 1 << 27, key: "ENCLAVE_MODE", name: "incident to enclave mode (bit 27)" },
    Flag { mask: 1 << 28, key: "PENDING_MTF", name: "pending MTF VM exit (bit 28)" },
    Flag { mask: 1 << 29, key: "FROM_VMX_ROOT", name: "VM exit from VMX root operation (bit 29)" },
    Flag { mask: 1 << 31, key: "ENTRY_FAILURE", name: "VM-entry failure (bit 31)" },
    Flag { mask: UNDEFINED_BITS, key: "UNDEFINED_BITS", name: "bits the SDM does not define (16-25, 30)" },
];

/// Number of flag rows.
pub const FLAG_ROWS: usize = FLAGS.len();

/// Bits 16-25 and 30.
pub const UNDEFINED_BITS: u32 = 0x03FF_0000 | 1 << 30;

/// Every bit above the basic reason: an exit whose reason field has none
/// of them set has nothing to count here (one test on the exit path).
pub const MODIFIER_MASK: u32 = 0xFFFF_0000;

/// The rows an exit-reason field counts in (a field may set several).
pub fn rows_of(reason: u32) -> impl Iterator<Item = usize> {
    FLAGS.iter().enumerate().filter(move |(_, f)| reason & f.mask != 0).map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_modifier_bit_has_exactly_one_row() {
        for bit in 16..32 {
            let rows: Vec<usize> = rows_of(1 << bit).collect();
            assert_eq!(rows.len(), 1, "bit {bit}");
        }
        let all = FLAGS.iter().fold(0, |a, f| {
            assert_eq!(a & f.mask, 0, "{} overlaps", f.key);
            a | f.mask
        });
        assert_eq!(all, MODIFIER_MASK);
        // A basic reason alone counts nowhere; several flags in several rows.
        assert_eq!(rows_of(10).count(), 0);
        assert_eq!(rows_of(0xFFFF).count(), 0);
        assert_eq!(rows_of(1 << 31 | 33).collect::<Vec<_>>(), [4]);
        assert_eq!(rows_of(1 << 29 | 1 << 28 | 1 << 17 | 12).collect::<Vec<_>>(), [2, 3, 5]);
    }
}
