//! Shadow paging (`ept=off`): the guest's translations done by page tables
//! the hypervisor builds from the guest's own, one set per vCPU.
//!
//! # Design: a software TLB
//!
//! The shadow tables are a cache of the guest's translations with exactly
//! the lifetime rules of a TLB, not a mirror of its page tables. A shadow
//! entry (always a 4 KiB page, guest-virtual to host-physical) is made
//! only when the guest touches a page the shadow does not map: the page
//! fault exits (exception bitmap bit 14, basic reason 0), [`walk`] walks
//! the guest's tables as the CPU would, and either the guest gets its own
//! #PF (error code and CR2 as the CPU would give them) or the entry is
//! filled and the guest resumes. Entries go away when the guest would lose
//! the TLB entry: INVLPG, a CR3 load, INVPCID, a change of the CR0/CR4/EFER
//! bits that select or qualify translation, and a #PF the guest takes on the
//! address. A TLB may drop any entry at any time, so flushing more than the
//! architecture requires (global pages on a CR3 load, every PCID on
//! INVLPG) is always correct, only slower; keeping an entry longer never
//! happens. So the guest's page tables are never write-protected, and a
//! guest that changes a present entry without invalidating it sees the old
//! translation, as on hardware.
//!
//! Consequences the tests predict exactly:
//! - The first touch of a page in a fresh address space is one #PF exit;
//!   a read then a write of a clean page are two (the read maps it
//!   read-only so that the write can set the guest's dirty flag first); a
//!   first write is one, and sets A and D together.
//! - A CR3 load without PCID (or with PCID and without the no-flush bit
//!   63) empties that context's shadow: its pages fault again.
//!
//! # Rights
//!
//! A shadow leaf has the guest's effective U/S and XD (with EFER.NXE), so
//! SMEP and SMAP, which the hardware applies with the guest's CR4, work on
//! the shadow directly. R/W is the guest's only once the guest's dirty flag
//! is set. The hardware runs with CR0.WP = 1 whatever the guest's CR0 says
//! (the CR0 read shadow shows the guest its own WP); for a guest with WP = 0
//! a supervisor write to a read-only page is allowed by mapping the page
//! writable and supervisor-only, and, with SMEP and EFER.NXE, not
//! executable (KVM's rule); a later user access or fetch faults and refills
//! the entry. Known gaps of that case, which Linux never meets (it keeps
//! WP = 1): with SMEP but without NXE, and with SMAP, the supervisor may
//! fetch from or touch such a user page while it is mapped that way.
//!
//! # Isolation
//!
//! Every frame a walk yields goes through the host's [`Frame`] policy
//! before it is mapped: the hypervisor's footprint and unbacked addresses
//! are never mapped, whatever the guest's tables say, and an access there
//! is [`PfOutcome::Contain`]ed by the same policy as an EPT violation with
//! EPT. Guest page tables in such places are never read
//! ([`PfOutcome::Stop`]).
//!
//! # The pool
//!
//! Shadow tables come from a fixed pool of 4 KiB pages per vCPU. When it
//! runs out, every shadow root is dropped and the current one emptied in
//! place (its address, the hardware CR3, stays): the guest's pages fault in
//! again. This is never an error. Flushes keep the current root's address
//! the same way; only [`Shadow::load_cr3`] (whose answer is the new
//! hardware CR3) and [`Shadow::drop_all`] (for a change of format) move it.
//! Up to [`MAX_ROOTS`] contexts are kept: with CR4.PCIDE each PCID has its
//! own root, so a CR3 load with the no-flush bit finds its entries again;
//! the least recently used root goes when a new one is needed.
//!
//! # Formats
//!
//! 32-bit and PAE guests run on PAE shadow tables (the hypervisor sets
//! CR4.PAE in the real CR4; the guest sees its own), 4-level guests on
//! 4-level shadow tables. A PAE root is a PDPT with its four page
//! directories allocated up front (so its PDPTEs, which VM entry loads
//! from CR3 without EPT, never change); the pool must lie below 4 GiB for
//! that. 5-level paging is not supported (LA57 is hidden from the guest).
//!
//! A guest large page is shadowed by 4 KiB entries; the shadow entry above
//! them is marked (bit 9, ignored by the CPU) so that an INVLPG anywhere in
//! the large page drops all of its pieces, as it drops the one TLB entry
//! of the large page.

pub mod phase;
pub mod walk;

use crate::emulate::Invpcid;
use crate::ept::EptRange;
use crate::guestmem::{PagingMode, PagingState};
use alloc::vec::Vec;
pub use walk::{Access, GuestTables, WalkCtx, WalkFault, Walked};
use walk::{A, D, P, PF_ID, PF_P, PF_RSVD, PF_U, PF_W, RW, US, XD};

/// Contexts (PCIDs) whose shadows are kept at once.
pub const MAX_ROOTS: usize = 8;
/// The smallest pool: one PAE root with its four directories and room for
/// the tables of one address (three for a 4-level root).
pub const MIN_POOL: usize = 8;

/// Ignored by the CPU in non-leaf entries: "this table holds the pieces of
/// one guest large page".
const LARGE_MARK: u64 = 1 << 9;
const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
use crate::arch::{
    CR0_PE, CR0_PG, CR0_WP, CR4_LA57, CR4_PAE, CR4_PCIDE, CR4_PGE, CR4_PKE, CR4_PSE, CR4_SMAP, CR4_SMEP, EFER_LMA, EFER_NXE,
};
/// CR4 bits whose change flushes every shadow: PSE, PAE, PGE, PCIDE, SMEP,
/// SMAP, LA57 (and PKE, which is hidden).
pub const CR4_FLUSH_BITS: u64 = CR4_PSE | CR4_PAE | CR4_PGE | CR4_LA57 | CR4_PCIDE | CR4_SMEP | CR4_SMAP | CR4_PKE;
/// CR0 bits whose change flushes every shadow: PG, WP (the shadow's rights
/// depend on WP), PE.
pub const CR0_FLUSH_BITS: u64 = CR0_PG | CR0_WP | CR0_PE;
/// EFER bits: NXE, LMA.
pub const EFER_FLUSH_BITS: u64 = EFER_NXE | EFER_LMA;

/// The pages of one vCPU's pool: `pages()` consecutive 4 KiB pages at
/// physical `base()`. On the machine, pages of the hypervisor's arena; in
/// host tests, a vector.
pub trait PoolMem {
    fn base(&self) -> u64;
    fn pages(&self) -> usize;
    fn page(&mut self, index: usize) -> &mut [u64; 512];
}

/// Shadow table format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// PAE tables (for 32-bit and PAE guests).
    Pae,
    /// 4-level tables.
    Level4,
}

impl Format {
    /// The format for the guest's paging mode; `None` with paging off or
    /// 5-level paging.
    pub fn of(p: &PagingState) -> Option<Format> {
        match p.mode() {
            PagingMode::Bits32 | PagingMode::Pae => Some(Format::Pae),
            PagingMode::Level4 => Some(Format::Level4),
            PagingMode::Off | PagingMode::Level5 => None,
        }
    }

    fn top_level(self) -> u32 {
        match self {
            Format::Pae => 3,
            Format::Level4 => 4,
        }
    }
}

/// What the host allows at a guest-physical frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// Guest RAM or device memory the guest owns: mapped as the guest says.
    Open,
    /// Mapped, but never writable (a watched page): writes are contained.
    ReadOnly,
    /// The hypervisor's footprint, or no memory: never mapped.
    Forbidden,
}

/// What the host allows at `gpa` under the EPT policy: the same ranges the
/// identity EPT maps (`ept::guest_ranges`, sorted and disjoint: everything
/// below the top except the hypervisor's footprint; watched pages without
/// write), so that a guest is contained the same way with and without EPT.
pub fn frame_of(ranges: &[EptRange], gpa: u64) -> Frame {
    let i = ranges.partition_point(|r| r.end <= gpa);
    match ranges.get(i) {
        Some(r) if r.start <= gpa && r.write => Frame::Open,
        Some(r) if r.start <= gpa => Frame::ReadOnly,
        _ => Frame::Forbidden,
    }
}

/// What the exit handler does after a shadow page fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PfOutcome {
    /// The shadow now maps the page: resume the guest (the instruction runs again).
    Filled,
    /// Deliver #PF to the guest with this error code, CR2 = `cr2`.
    Inject { error_code: u32, cr2: u64 },
    /// The guest's own translation leads to a frame the host does not map
    /// (or maps read-only, for a write): handle the access like an EPT
    /// violation at `gpa` with EPT (emulate or stop the guest).
    Contain { gpa: u64, access: Access },
    /// A paging-structure entry of the guest's walk is at `gpa`, a place the
    /// guest may not use: stop the guest, as a guest page walk into the
    /// footprint does with EPT.
    Stop { gpa: u64 },
    /// The walk cannot be done (paging off, 5-level paging, a
    /// non-canonical address): a hypervisor error to report.
    Unsupported,
}

/// Counters of one vCPU's shadow, for the dump and the tests (the dump's
/// vocabulary: `exitscope_stats::shadow`).
pub use exitscope_stats::shadow::ShadowCounts as Stats;

struct Root {
    pcid: u16,
    format: Format,
    page: usize,
    last_use: u64,
}

/// One vCPU's shadow page tables.
pub struct Shadow<M: PoolMem> {
    mem: M,
    free: Vec<usize>,
    roots: Vec<Root>,
    current: Option<usize>,
    clock: u64,
    pub stats: Stats,
}

/// Why a pool cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolError {
    TooSmall { pages: usize },
    Above4G { end: u64 },
    Unaligned { base: u64 },
}

/// The CR3 value's PCID and whether bit 63 asks to keep the TLB, under the
/// guest's CR4.PCIDE (PCIDs only with PCIDE, which needs long mode).
pub fn cr3_pcid(cr3: u64, p: &PagingState) -> (u16, bool) {
    if p.cr4 & CR4_PCIDE != 0 && p.mode() == PagingMode::Level4 {
        ((cr3 & 0xFFF) as u16, cr3 & (1 << 63) != 0)
    } else {
        (0, false)
    }
}

/// Whether a change of the guest's control registers from `old` to `new`
/// flushes every shadow (see the `*_FLUSH_BITS`).
pub fn control_change_flushes(old: &PagingState, new: &PagingState) -> bool {
    (old.cr0 ^ new.cr0) & CR0_FLUSH_BITS != 0 || (old.cr4 ^ new.cr4) & CR4_FLUSH_BITS != 0 || (old.efer ^ new.efer) & EFER_FLUSH_BITS != 0
}

impl<M: PoolMem> Shadow<M> {
    pub fn new(mut mem: M) -> Result<Shadow<M>, PoolError> {
        let (base, pages) = (mem.base(), mem.pages());
        if pages < MIN_POOL {
            return Err(PoolError::TooSmall { pages });
        }
        if base & 0xFFF != 0 {
            return Err(PoolError::Unaligned { base });
        }
        let end = base + pages as u64 * 4096;
        if end > 1 << 32 {
            return Err(PoolError::Above4G { end });
        }
        for i in 0..pages {
            *mem.page(i) = [0; 512];
        }
        Ok(Shadow {
            mem,
            free: (0..pages).rev().collect(),
            roots: Vec::with_capacity(MAX_ROOTS),
            current: None,
            clock: 0,
            stats: Stats::default(),
        })
    }

    /// Pool pages in use.
    pub fn pages_used(&self) -> usize {
        self.mem.pages() - self.free.len()
    }

    /// Contexts with a root.
    pub fn roots(&self) -> usize {
        self.roots.len()
    }

    fn pa(&self, page: usize) -> u64 {
        self.mem.base() + page as u64 * 4096
    }

    fn index(&self, pa: u64) -> usize {
        ((pa & ADDR) - self.mem.base()) as usize / 4096
    }

    fn alloc(&mut self) -> Option<usize> {
        let i = self.free.pop()?;
        *self.mem.page(i) = [0; 512];
        Some(i)
    }

    /// Frees a table at `level` and everything below it.
    fn free_tree(&mut self, page: usize, level: u32) {
        if level > 1 {
            for e in 0..512 {
                let v = self.mem.page(page)[e];
                if v & P != 0 {
                    let child = self.index(v);
                    self.free_tree(child, level - 1);
                }
            }
        }
        self.free.push(page);
    }

    fn drop_root(&mut self, i: usize) {
        let r = self.roots.swap_remove(i);
        self.free_tree(r.page, r.format.top_level());
        self.current = match self.current {
            Some(c) if c == i => None,
            // swap_remove moved the last root into slot i.
            Some(c) if c == self.roots.len() => Some(i),
            c => c,
        };
    }

    /// A new root for (pcid, format), making room as needed.
    fn new_root(&mut self, pcid: u16, format: Format) -> usize {
        if self.roots.len() == MAX_ROOTS {
            let lru = (0..self.roots.len()).min_by_key(|&i| self.roots[i].last_use).expect("MAX_ROOTS > 0");
            self.drop_root(lru);
            self.stats.root_evictions += 1;
        }
        let need = if format == Format::Pae { 5 } else { 1 };
        if self.free.len() < need {
            self.reset_pool();
            if self.free.len() < need {
                // The current root is being replaced: it goes too.
                while !self.roots.is_empty() {
                    self.drop_root(self.roots.len() - 1);
                }
            }
        }
        let page = self.alloc().expect("an empty pool holds a root");
        if format == Format::Pae {
            for k in 0..4 {
                let pd = self.alloc().expect("an empty pool holds a PAE root");
                let pa = self.pa(pd);
                self.mem.page(page)[k] = pa | P;
            }
        }
        self.clock += 1;
        self.roots.push(Root { pcid, format, page, last_use: self.clock });
        self.roots.len() - 1
    }

    /// Empties root `i` but keeps its page (and a PAE root's directories),
    /// so that a hardware CR3 pointing at it stays valid.
    fn clear_root(&mut self, i: usize) {
        let (format, page) = (self.roots[i].format, self.roots[i].page);
        match format {
            Format::Level4 => self.clear_table(page, 3),
            // The directories stay; the page tables under them go.
            Format::Pae => {
                for k in 0..4 {
                    let e = self.mem.page(page)[k];
                    let pd = self.index(e);
                    self.clear_table(pd, 1);
                }
            }
        }
    }

    /// Frees every table under `page`, whose children are at `child_level`.
    fn clear_table(&mut self, page: usize, child_level: u32) {
        for e in 0..512 {
            let v = self.mem.page(page)[e];
            if v & P != 0 {
                let child = self.index(v);
                self.free_tree(child, child_level);
                self.mem.page(page)[e] = 0;
            }
        }
    }

    /// Drops every root but the current one, and empties that.
    fn drop_all_but_current(&mut self) {
        for i in (0..self.roots.len()).rev() {
            if Some(i) != self.current {
                self.drop_root(i);
            }
        }
        if let Some(c) = self.current {
            self.clear_root(c);
        }
    }

    /// The pool ran out: everything goes; the current root stays, empty, at
    /// the same address (the hardware CR3 need not change).
    fn reset_pool(&mut self) {
        self.drop_all_but_current();
        self.stats.pool_resets += 1;
    }

    /// Flushes every shadow (CR0/CR4/EFER changes, INVPCID types 2 and 3).
    /// The current root stays, empty, at the same address.
    pub fn flush_all(&mut self) {
        self.drop_all_but_current();
        self.stats.full_flushes += 1;
    }

    /// Flushes the shadow of one PCID (INVPCID type 1, CR3 loads). The
    /// current root stays at the same address.
    pub fn flush_pcid(&mut self, pcid: u16) {
        if let Some(i) = self.roots.iter().position(|r| r.pcid == pcid) {
            if Some(i) == self.current {
                self.clear_root(i);
            } else {
                self.drop_root(i);
            }
            self.stats.context_flushes += 1;
        }
    }

    /// Forgets every root, the current one too (a change of the shadow
    /// format: the caller loads CR3 again).
    pub fn drop_all(&mut self) {
        while !self.roots.is_empty() {
            self.drop_root(self.roots.len() - 1);
        }
        self.stats.full_flushes += 1;
    }

    /// A MOV to CR3 (or the CR3 the guest runs with after a VM entry that
    /// starts shadow paging): flushes what the load flushes and returns the
    /// physical address of the shadow root for the hardware CR3. `p` is the
    /// guest's paging state with the new CR3. `None` if the guest is not in
    /// a mode shadow paging handles.
    pub fn load_cr3(&mut self, p: &PagingState) -> Option<u64> {
        let format = Format::of(p)?;
        let (pcid, keep) = cr3_pcid(p.cr3, p);
        if !keep {
            self.flush_pcid(pcid);
        }
        let i = match self.roots.iter().position(|r| r.pcid == pcid && r.format == format) {
            Some(i) => i,
            None => self.new_root(pcid, format),
        };
        self.clock += 1;
        self.roots[i].last_use = self.clock;
        self.current = Some(i);
        Some(self.pa(self.roots[i].page))
    }

    /// The physical address of the current root (the hardware CR3).
    pub fn root_pa(&self) -> Option<u64> {
        self.current.map(|i| self.pa(self.roots[i].page))
    }

    /// Walks the shadow of root `r` to the leaf slot of `la`: (page, index)
    /// of each level from the top, as far as tables exist, and how many.
    fn path(&mut self, r: usize, la: u64) -> ([(usize, usize); 4], usize) {
        let (format, mut page) = (self.roots[r].format, self.roots[r].page);
        let mut out = [(0, 0); 4];
        let mut n = 0;
        for level in (1..=format.top_level()).rev() {
            let idx = slot(format, level, la);
            out[n] = (page, idx);
            n += 1;
            if level == 1 {
                break;
            }
            let e = self.mem.page(page)[idx];
            if e & P == 0 {
                break;
            }
            page = self.index(e);
        }
        (out, n)
    }

    /// The shadow leaf entry for `la` in the current context, if any.
    pub fn lookup(&mut self, la: u64) -> Option<u64> {
        let r = self.current?;
        let (path, n) = self.path(r, la);
        if n < self.roots[r].format.top_level() as usize {
            return None;
        }
        let (page, idx) = path[n - 1];
        let e = self.mem.page(page)[idx];
        (e & P != 0).then_some(e)
    }

    /// Installs `leaf` for `la` in the current context; `large` is the size
    /// of the guest page it is a piece of. Resets the pool if it runs out.
    fn fill(&mut self, la: u64, leaf: u64, large: u64) {
        if self.try_fill(la, leaf, large).is_none() {
            self.reset_pool();
            self.try_fill(la, leaf, large).expect("a pool with only the current root holds one translation");
        }
        self.stats.fills += 1;
    }

    fn try_fill(&mut self, la: u64, leaf: u64, large: u64) -> Option<()> {
        let r = self.current?;
        let format = self.roots[r].format;
        let mut page = self.roots[r].page;
        for level in (1..=format.top_level()).rev() {
            let idx = slot(format, level, la);
            if level == 1 {
                self.mem.page(page)[idx] = leaf;
                return Some(());
            }
            let mut e = self.mem.page(page)[idx];
            if e & P == 0 {
                let t = self.alloc()?;
                e = self.pa(t) | P | RW | US | A;
                self.mem.page(page)[idx] = e;
            }
            // Mark the table that holds all the pieces of a guest large page:
            // the PDE's table for a 2 MiB or 4 MiB page, the PDPTE's for 1 GiB.
            let mark =
                (level == 2 && (large == 1 << 21 || large == 1 << 22)) || (level == 3 && large == 1 << 30 && format == Format::Level4);
            if mark && e & LARGE_MARK == 0 {
                e |= LARGE_MARK;
                self.mem.page(page)[idx] = e;
            }
            page = self.index(e);
        }
        None
    }

    /// Drops the translation of `la` from root `r`: its 4 KiB entry, or, if
    /// `la` lies in a guest large page, every piece of it.
    fn invalidate_in(&mut self, r: usize, la: u64, bits32: bool) {
        let format = self.roots[r].format;
        let (path, n) = self.path(r, la);
        // A marked entry on the way: drop the whole table below it.
        for (depth, &(page, idx)) in path[..n].iter().enumerate() {
            let level = format.top_level() as usize - depth;
            let e = self.mem.page(page)[idx];
            if level >= 2 && e & P != 0 && e & LARGE_MARK != 0 {
                // With 32-bit paging a 4 MiB page spans two PAE directories' entries.
                let span: &[usize] = if bits32 && level == 2 { &[idx & !1, idx | 1] } else { core::slice::from_ref(&idx) };
                for &k in span {
                    let e = self.mem.page(page)[k];
                    if e & P != 0 && e & LARGE_MARK != 0 {
                        let child = self.index(e);
                        self.free_tree(child, level as u32 - 1);
                        self.mem.page(page)[k] = 0;
                    }
                }
                return;
            }
        }
        if n == format.top_level() as usize {
            let (page, idx) = path[n - 1];
            self.mem.page(page)[idx] = 0;
        }
    }

    /// INVLPG `la`: the address's translations in every context (INVLPG
    /// needs only the current PCID's and the global ones; more is allowed).
    pub fn invlpg(&mut self, la: u64, p: &PagingState) {
        let (la, bits32) = Self::canonical_la(la, p);
        for r in 0..self.roots.len() {
            self.invalidate_in(r, la, bits32);
        }
    }

    fn canonical_la(la: u64, p: &PagingState) -> (u64, bool) {
        match p.mode() {
            PagingMode::Bits32 => (la & 0xFFFF_FFFF, true),
            PagingMode::Pae => (la & 0xFFFF_FFFF, false),
            _ => (la, false),
        }
    }

    /// INVPCID (checked and decoded by `emulate::invpcid`) for `pcid` (the
    /// descriptor's low 12 bits): one address in one PCID (global
    /// translations of it need not go), one PCID, or everything.
    pub fn invpcid(&mut self, op: Invpcid, pcid: u16, p: &PagingState) {
        match op {
            Invpcid::Address(la) => {
                if let Some(r) = self.roots.iter().position(|r| r.pcid == pcid) {
                    let (la, bits32) = Self::canonical_la(la, p);
                    self.invalidate_in(r, la, bits32);
                }
            }
            Invpcid::Context => self.flush_pcid(pcid),
            Invpcid::All | Invpcid::AllButGlobal => self.flush_all(),
        }
    }

    /// A guest page fault exit at `la` with the hardware's error code `ec`:
    /// walk the guest's tables, then fill, inject, contain or stop (see
    /// [`PfOutcome`]). `host` says what the host allows at a guest frame.
    pub fn page_fault(&mut self, mem: &mut impl GuestTables, ctx: &WalkCtx, la: u64, ec: u32, host: impl Fn(u64) -> Frame) -> PfOutcome {
        let p = &ctx.paging;
        if self.current.is_none() && self.load_cr3(p).is_none() {
            return PfOutcome::Unsupported;
        }
        let acc = Access::from_error_code(ec);
        let (la, _) = Self::canonical_la(la, p);
        let w = match walk::walk(mem, ctx, la, acc) {
            Ok(w) => w,
            Err(WalkFault::Page { error_code }) => {
                // Delivering a #PF drops the address's TLB entries.
                if let Some(r) = self.current {
                    self.invalidate_in(r, la, p.mode() == PagingMode::Bits32);
                }
                self.stats.injected += 1;
                return PfOutcome::Inject { error_code, cr2: la };
            }
            Err(WalkFault::Forbidden { gpa }) => return PfOutcome::Stop { gpa },
            Err(WalkFault::NonCanonical | WalkFault::Unsupported) => return PfOutcome::Unsupported,
        };
        let frame_policy = host(w.frame);
        if frame_policy == Frame::Forbidden || (frame_policy == Frame::ReadOnly && acc.write) {
            self.stats.contained += 1;
            return PfOutcome::Contain { gpa: w.frame | (la & 0xFFF), access: acc };
        }
        let leaf = shadow_leaf(&w, acc, p, frame_policy == Frame::Open);
        // The hardware faulted on an entry that already says what the guest's
        // tables say: a fault the walk does not model (an implicit supervisor
        // access under SMAP). It is the guest's.
        if ec & PF_P != 0 && self.lookup(la) == Some(leaf) {
            self.stats.injected += 1;
            return PfOutcome::Inject { error_code: ec & (PF_P | PF_W | PF_U | PF_RSVD | PF_ID), cr2: la };
        }
        self.fill(la, leaf, w.page_size);
        PfOutcome::Filled
    }
}

/// The index of `la`'s entry in a shadow table at `level`.
fn slot(format: Format, level: u32, la: u64) -> usize {
    if format == Format::Pae && level == 3 {
        ((la >> 30) & 3) as usize
    } else {
        ((la >> (12 + 9 * (level - 1))) & 0x1FF) as usize
    }
}

/// The shadow leaf for a walked page and the access that caused the walk.
pub fn shadow_leaf(w: &Walked, acc: Access, p: &PagingState, host_writable: bool) -> u64 {
    let nxe = p.efer & (1 << 11) != 0;
    let mut user = w.user;
    // Writable only once the guest's dirty flag is set.
    let mut writable = w.writable && w.dirty;
    let mut exec = w.executable;
    if p.cr0 & CR0_WP == 0 && !acc.user && acc.write && !w.writable {
        // WP = 0: the supervisor may write a read-only page. The hardware runs
        // with WP = 1, so the page is made writable for the supervisor only.
        writable = true;
        if user {
            user = false;
            if p.cr4 & CR4_SMEP != 0 {
                exec = false;
            }
        }
    }
    // A and D preset: the CPU never writes the shadow, and an entry reads
    // back exactly as it was made.
    let mut e = w.frame | P | A | D | w.cache;
    if writable && host_writable {
        e |= RW;
    }
    if user {
        e |= US;
    }
    if !exec && nxe {
        e |= XD;
    }
    e
}

#[cfg(test)]
mod tests;
