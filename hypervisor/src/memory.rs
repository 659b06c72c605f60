//! The hypervisor's own memory: one contiguous image (code, data, stacks and
//! a bump-allocated heap, the "arena"), linked in the top 2 GiB of virtual
//! memory, plus an identity map of all physical memory for touching guest
//! RAM, ACPI tables and devices.
//!
//! At boot the image sits where the loader put it (1 MiB, or wherever a
//! multiboot2 loader relocated it: [`set_multiboot_load_base`]). Before any guest
//! memory is laid out, [`relocate`] copies it to a 2 MiB-aligned region high
//! in RAM and remaps the virtual window there. From then on the hypervisor's
//! physical footprint is exactly [`footprint`], which EPT leaves unmapped and
//! the guest's memory map leaves out.
//!
//! The footprint is sized by [`plan`] from the number of vCPUs and the
//! memory map: the image carries a fixed boot arena ([`ARENA_SIZE`]) that
//! holds everything allocated before relocation (the heap, the host page
//! tables); when the vCPUs and the EPT tree need more, the footprint grows
//! past the image and the arena continues into that extension after
//! relocation.

use core::alloc::{GlobalAlloc, Layout};
use core::ptr;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

/// Size of the boot arena inside the image. Holds boot data, the heap, the
/// host page tables and (when they fit) the per-vCPU VMX structures, stacks
/// and the EPT tree; see [`plan`] for what extends it.
pub const ARENA_SIZE: usize = 12 << 20;
pub const PAGE: usize = 4096;

#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);

#[link_section = ".arena"]
static mut ARENA: Arena = Arena([0; ARENA_SIZE]);

/// Bytes of the arena handed out so far.
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

/// Bytes the arena may hand out: the boot arena, then (after [`relocate`])
/// up to the end of the planned footprint.
static ARENA_LIMIT: AtomicUsize = AtomicUsize::new(ARENA_SIZE);

/// Size of the footprint: the image until [`relocate`] sets the plan's.
static FOOTPRINT_SIZE: AtomicU64 = AtomicU64::new(0);

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static __boot_start: u8;
}

const KERNEL_VMA: u64 = 0xFFFF_FFFF_8000_0000;

/// Physical address of `__image_start`. Starts as the load address.
static IMAGE_PHYS: AtomicU64 = AtomicU64::new(0);

fn image_start_va() -> u64 {
    ptr::addr_of!(__image_start) as u64
}

fn image_end_va() -> u64 {
    ptr::addr_of!(__image_end) as u64
}

fn arena_base() -> usize {
    ptr::addr_of!(ARENA) as usize
}

/// Size of the image in memory, rounded to 2 MiB: the hypervisor's footprint.
pub fn image_size() -> u64 {
    (image_end_va() - image_start_va()).next_multiple_of(2 << 20)
}

/// Bytes from the start of the image to the start of the arena.
pub fn arena_offset() -> u64 {
    arena_base() as u64 - image_start_va()
}

fn footprint_size() -> u64 {
    match FOOTPRINT_SIZE.load(SeqCst) {
        0 => image_size(),
        n => n,
    }
}

/// Physical range the hypervisor occupies (valid after [`relocate`]).
pub fn footprint() -> (u64, u64) {
    let base = image_phys();
    (base, base + footprint_size())
}

/// Where a multiboot loader put `__boot_start` (0: not told, the UEFI path).
static MB_LOAD_BASE: AtomicU64 = AtomicU64::new(0);

/// Tells the core where the multiboot loader put the image's first byte
/// (entry.S computes it; a multiboot2 loader may relocate the image).
pub fn set_multiboot_load_base(base: u64) {
    MB_LOAD_BASE.store(base, SeqCst);
}

/// Physical address, as loaded, of the image byte linked at physical
/// `link_pa`: the loader shifts the whole image from `link_base` to
/// `load_base` (0: not shifted).
fn as_loaded(link_pa: u64, link_base: u64, load_base: u64) -> u64 {
    match load_base {
        0 => link_pa,
        b => link_pa - link_base + b,
    }
}

fn loaded(link_pa: u64) -> u64 {
    as_loaded(link_pa, ptr::addr_of!(__boot_start) as u64, MB_LOAD_BASE.load(SeqCst))
}

/// Physical range of the image as a multiboot loader placed it (before
/// relocation): the multiboot section through the end of the arena, the
/// link addresses shifted by the load delta.
pub fn multiboot_load_range() -> (u64, u64) {
    let boot = ptr::addr_of!(__boot_start) as u64;
    (loaded(boot), loaded(image_end_va() - KERNEL_VMA))
}

#[cfg(test)]
mod load_tests {
    use super::as_loaded;

    #[test]
    fn relocated_image_shifts_as_a_whole() {
        // Not relocated (multiboot1, or the UEFI path): link addresses.
        assert_eq!(as_loaded(0x101000, 0x100000, 0), 0x101000);
        assert_eq!(as_loaded(0x101000, 0x100000, 0x100000), 0x101000);
        // Loaded at 64 MiB: every byte moves by 63 MiB.
        assert_eq!(as_loaded(0x100000, 0x100000, 0x400_0000), 0x400_0000);
        assert_eq!(as_loaded(0x101000, 0x100000, 0x400_0000), 0x400_1000);
        assert_eq!(as_loaded(0xE00000, 0x100000, 0x400_0000), 0x4D0_0000);
        // Near the top of the 32-bit space (max_addr 4 GiB).
        assert_eq!(as_loaded(0xE00000, 0x100000, 0xF000_0000), 0xF0D0_0000);
    }
}

/// Where physical memory appears in the current address space: 0 with the
/// hypervisor's own page tables (and the multiboot entry's), the boot
/// loader's offset before relocation on the UEFI path.
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);

/// Tells the core where the boot loader mapped physical memory (UEFI entry,
/// before relocation).
pub fn set_phys_offset(offset: u64) {
    PHYS_OFFSET.store(offset, SeqCst);
}

fn image_phys() -> u64 {
    match IMAGE_PHYS.load(SeqCst) {
        0 => loaded(image_start_va() - KERNEL_VMA),
        p => p,
    }
}

/// Physical address of a hypervisor object (anything in the image).
pub fn virt_to_phys<T: ?Sized>(p: *const T) -> u64 {
    let va = p as *const u8 as u64;
    debug_assert!(va >= image_start_va() && va < image_start_va() + footprint_size(), "not an image address: {va:#x}");
    va - image_start_va() + image_phys()
}

/// A pointer to physical memory through the identity map (or, before
/// relocation on the UEFI path, the boot loader's physical-memory window).
#[inline(always)]
pub fn phys_ptr<T>(pa: u64) -> *mut T {
    pa.wrapping_add(PHYS_OFFSET.load(core::sync::atomic::Ordering::Relaxed)) as *mut T
}

/// The hypervisor's own physical memory, where every Rust object
/// (statics, stacks, heap, arena) lives: the footprint, once [`relocate`]
/// has run. `None` before: the image's physical extent is then not known
/// exactly ([`multiboot_load_range`] runs to `__image_end`, rounded up to
/// 2 MiB past the last load segment, and GRUB puts its boot information in
/// that padding, e.g. at 0xde0348 with the image ending at 0xdcd000; the
/// UEFI boot loader places the image in frames of its choosing), so
/// nothing is refused; the hypervisor writes no physical memory outside
/// its image before it relocates.
pub fn hypervisor_range() -> Option<(u64, u64)> {
    (FOOTPRINT_SIZE.load(SeqCst) != 0).then(footprint)
}

/// Whether `[pa, pa + len)` overlaps [`hypervisor_range`]. A range that
/// wraps around the address space counts as overlapping.
pub fn overlaps_hypervisor(pa: u64, len: u64) -> bool {
    overlaps(hypervisor_range(), pa, len)
}

/// Whether `[pa, pa + len)` overlaps `range` (`None`: nothing to refuse);
/// a range that wraps around the address space always does.
fn overlaps(range: Option<(u64, u64)>, pa: u64, len: u64) -> bool {
    match (pa.checked_add(len), range) {
        (None, _) => true,
        (Some(end), Some((lo, hi))) => len != 0 && pa < hi && end > lo,
        (Some(_), None) => false,
    }
}

#[cfg(test)]
mod overlap_tests {
    use super::overlaps;

    #[test]
    fn refuses_exactly_the_hypervisors_range() {
        let fp = Some((0x1f00_0000, 0x1fe0_0000));
        assert!(overlaps(fp, 0x1f00_0000, 1));
        assert!(overlaps(fp, 0x1eff_ffff, 2), "straddles the start");
        assert!(overlaps(fp, 0x1fdf_ffff, 0x1000), "straddles the end");
        assert!(overlaps(fp, 0x1000_0000, 0x1000_0000), "covers it");
        assert!(!overlaps(fp, 0x1eff_f000, 0x1000), "ends where it starts");
        assert!(!overlaps(fp, 0x1fe0_0000, 0x1000), "starts where it ends");
        assert!(!overlaps(fp, 0x1f80_0000, 0), "empty");
        assert!(overlaps(fp, u64::MAX - 1, 4), "wraps");
        assert!(!overlaps(None, 0x1f00_0000, 0x1000), "before relocation nothing is refused");
        assert!(overlaps(None, u64::MAX, 2), "but a wrapping range still is");
    }
}

/// Stops with a clear report if a physical access would reach the
/// hypervisor's own memory: such an access is a bug, never the guest's doing.
#[track_caller]
fn check_not_hypervisor(what: &str, pa: u64, len: u64) {
    if overlaps_hypervisor(pa, len) {
        let (lo, hi) = hypervisor_range().unwrap_or((0, u64::MAX));
        panic!("{what} of {len:#x} bytes at physical {pa:#x} would reach the hypervisor's own memory {lo:#x}-{hi:#x}");
    }
}

/// Copies `len` bytes between physical ranges (they may overlap).
///
/// # Safety
///
/// Both ranges are identity-mapped RAM outside the hypervisor's footprint
/// (checked: an overlap stops the hypervisor with a report), and no Rust
/// reference into `dst..dst + len` is live (a [`phys_slice`] or
/// [`IdentityMem`] view, an atomic in a page shared with an AP). The bytes
/// at `dst` are nobody else's: not firmware code or data in use, not memory
/// of a running guest.
pub unsafe fn phys_copy(dst: u64, src: u64, len: u64) {
    check_not_hypervisor("physical copy", dst, len);
    check_not_hypervisor("physical copy source", src, len);
    // SAFETY: per the contract above; the ranges may overlap (ptr::copy).
    unsafe { ptr::copy(phys_ptr::<u8>(src), phys_ptr::<u8>(dst), len as usize) }
}

/// Zeroes a physical range.
///
/// # Safety
///
/// As for [`phys_copy`]'s destination.
pub unsafe fn phys_zero(dst: u64, len: u64) {
    check_not_hypervisor("physical zeroing", dst, len);
    // SAFETY: per the contract above.
    unsafe { ptr::write_bytes(phys_ptr::<u8>(dst), 0, len as usize) }
}

/// Writes `bytes` to physical memory at `dst`.
///
/// # Safety
///
/// As for [`phys_copy`]'s destination.
pub unsafe fn phys_write(dst: u64, bytes: &[u8]) {
    check_not_hypervisor("physical write", dst, bytes.len() as u64);
    // SAFETY: per the contract above; `bytes` is hypervisor memory, which
    // the check keeps apart from `dst`.
    unsafe { ptr::copy_nonoverlapping(bytes.as_ptr(), phys_ptr::<u8>(dst), bytes.len()) }
}

/// [`phys_write`], then writes the cache back (WBINVD: the guest may read
/// the range uncached through EPT, as it does ACPI memory) and reads the
/// bytes back: false if they did not stick (ROM, write-protected shadow
/// RAM).
///
/// # Safety
///
/// As for [`phys_write`].
pub unsafe fn phys_write_verified(dst: u64, bytes: &[u8]) -> bool {
    // SAFETY: the caller's contract is phys_write's.
    unsafe { phys_write(dst, bytes) };
    crate::cpu::wbinvd();
    use crate::bootinfo::PhysMem;
    IdentityMem.bytes(dst, bytes.len()) == Some(bytes)
}

/// Reads a physical range into a slice view (for ACPI tables and modules).
///
/// # Safety
/// The range must be RAM or firmware tables outside the hypervisor's
/// footprint that nothing writes while the slice lives.
pub unsafe fn phys_slice<'a>(pa: u64, len: usize) -> &'a [u8] {
    check_not_hypervisor("physical read view", pa, len as u64);
    // SAFETY: per the contract above.
    unsafe { core::slice::from_raw_parts(phys_ptr::<u8>(pa), len) }
}

/// Physical memory through the identity map, for parsing what the boot
/// loader and the firmware left (boot information, ACPI tables): the
/// [`crate::bootinfo::PhysMem`] the parsers read through.
///
/// Its views rest on one rule of this module: the hypervisor writes
/// physical memory outside its footprint only through [`phys_copy`],
/// [`phys_zero`] and [`phys_write`], whose callers promise that no view of
/// the destination is live. Ranges that reach the hypervisor's own memory
/// are refused.
pub struct IdentityMem;

impl crate::bootinfo::PhysMem for IdentityMem {
    fn bytes(&self, pa: u64, len: usize) -> Option<&[u8]> {
        if pa == 0 || pa.checked_add(len as u64)? > 1 << 39 || overlaps_hypervisor(pa, len as u64) {
            return None;
        }
        // SAFETY: the identity map covers all physical memory the boot
        // information and ACPI tables can name; the range is not the
        // hypervisor's, and the module rule above keeps it unwritten while
        // the view lives.
        Some(unsafe { core::slice::from_raw_parts(phys_ptr::<u8>(pa), len) })
    }
}

/// A word of a device register block (MMIO) or firmware data area.
pub trait MmioWord: Copy {}
impl MmioWord for u8 {}
impl MmioWord for u16 {}
impl MmioWord for u32 {}
impl MmioWord for u64 {}

/// Reads a device register (or a firmware data word) at physical `pa`:
/// one volatile access through the identity map.
///
/// Safe: `pa` is checked to be outside the hypervisor's memory (an
/// overlap stops it with a report), so the access cannot reach a Rust
/// object; what the read does to the device is the caller's business.
#[track_caller]
pub fn mmio_read<T: MmioWord>(pa: u64) -> T {
    check_not_hypervisor("MMIO read", pa, core::mem::size_of::<T>() as u64);
    // SAFETY: identity-mapped, not the hypervisor's memory (checked above).
    unsafe { ptr::read_volatile(phys_ptr::<T>(pa)) }
}

/// Writes a device register at physical `pa`: one volatile access through
/// the identity map; checked as [`mmio_read`].
#[track_caller]
pub fn mmio_write<T: MmioWord>(pa: u64, v: T) {
    check_not_hypervisor("MMIO write", pa, core::mem::size_of::<T>() as u64);
    // SAFETY: as for mmio_read.
    unsafe { ptr::write_volatile(phys_ptr::<T>(pa), v) }
}

/// Out of hypervisor memory.
#[derive(Debug, Clone, Copy)]
pub struct OutOfMemory {
    pub wanted: usize,
}

impl core::fmt::Display for OutOfMemory {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "hypervisor heap exhausted: {} more bytes wanted, {} of {} KiB used",
            self.wanted,
            ARENA_USED.load(SeqCst) / 1024,
            ARENA_LIMIT.load(SeqCst) / 1024
        )
    }
}

/// Takes `size` bytes aligned to `align` from the arena (never freed).
pub fn arena_alloc(size: usize, align: usize) -> Result<*mut u8, OutOfMemory> {
    let base = arena_base();
    let mut cur = ARENA_USED.load(SeqCst);
    loop {
        let start = (base + cur).next_multiple_of(align) - base;
        let limit = ARENA_LIMIT.load(SeqCst);
        let end = start.checked_add(size).filter(|&e| e <= limit).ok_or(OutOfMemory { wanted: size })?;
        match ARENA_USED.compare_exchange(cur, end, SeqCst, SeqCst) {
            Ok(_) => return Ok((base + start) as *mut u8),
            Err(now) => cur = now,
        }
    }
}

/// Zeroed, page-aligned pages from the arena, with their physical address.
pub fn alloc_pages(n: usize) -> Result<(&'static mut [u8], u64), OutOfMemory> {
    let p = arena_alloc(n * PAGE, PAGE)?;
    // SAFETY: the arena hands out each range once; it is ours for good.
    let s = unsafe {
        ptr::write_bytes(p, 0, n * PAGE);
        core::slice::from_raw_parts_mut(p, n * PAGE)
    };
    Ok((s, virt_to_phys(p)))
}

/// Zeroed pages from the arena as page tables (512 entries each), with the
/// physical address of the first: shadow paging's pool (`ept=off`).
pub fn alloc_table_pages(n: usize) -> Result<(&'static mut [[u64; 512]], u64), OutOfMemory> {
    let (bytes, pa) = alloc_pages(n)?;
    // SAFETY: `bytes` is exclusive, page-aligned arena memory of n pages,
    // never freed; [u64; 512] has no invalid bit patterns.
    let tables = unsafe { core::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut [u64; 512], n) };
    Ok((tables, pa))
}

/// ORs `bits` atomically into the 8-byte (`wide`) or 4-byte word at
/// physical `pa` (naturally aligned), through the identity map.
///
/// # Safety
/// `pa` must be memory the caller may write (guest RAM checked by the
/// guest-memory policy), aligned to the word's size.
pub unsafe fn phys_fetch_or(pa: u64, wide: bool, bits: u64) {
    use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
    // SAFETY: the caller's contract; atomics have the plain integers' layout.
    unsafe {
        if wide {
            AtomicU64::from_ptr(phys_ptr::<u64>(pa)).fetch_or(bits, SeqCst);
        } else {
            AtomicU32::from_ptr(phys_ptr::<u32>(pa)).fetch_or(bits as u32, SeqCst);
        }
    }
}

/// Moves `v` into the arena for good: the one place a fresh `&'static mut`
/// comes out of arena memory.
pub fn arena_box<T>(v: T) -> Result<&'static mut T, OutOfMemory> {
    let p = arena_alloc(core::mem::size_of::<T>(), core::mem::align_of::<T>())? as *mut T;
    // SAFETY: the arena hands out each range once: fresh, aligned,
    // exclusive memory of the right size, never freed.
    unsafe {
        p.write(v);
        Ok(&mut *p)
    }
}

/// EPT tables (and other page tables) from the arena: [`crate::ept::Tables`]
/// over pages of [`alloc_pages`], addressed by their physical address.
pub struct ArenaTables;

impl crate::ept::Tables for ArenaTables {
    type Error = OutOfMemory;
    fn alloc(&mut self) -> Result<u64, Self::Error> {
        alloc_pages(1).map(|(_, pa)| pa)
    }
    /// The table at `pa`, which must be a page [`alloc`](Self::alloc) gave
    /// (checked: the footprint, page-aligned). Builders of one EPT tree
    /// run one at a time (the boot CPU before any vCPU, then under the
    /// lazy-EPT lock), and the `&mut` lives only as long as the borrow of
    /// `self`.
    fn table(&mut self, pa: u64) -> &mut [u64; 512] {
        let (lo, hi) = footprint();
        assert!(pa.is_multiple_of(PAGE as u64) && pa >= lo && pa + PAGE as u64 <= hi, "EPT table {pa:#x} is not an arena page");
        // SAFETY: an arena page from alloc() above (checked to be in the
        // footprint), identity-mapped; see the doc line for exclusivity.
        unsafe { &mut *phys_ptr::<[u64; 512]>(pa) }
    }
}

/// Arena statistics: (used, total) bytes.
pub fn arena_usage() -> (usize, usize) {
    (ARENA_USED.load(SeqCst), ARENA_LIMIT.load(SeqCst))
}

/// General-purpose heap (Vec, String, boxes), carved from the arena at
/// boot; it frees memory properly, unlike the arena's page allocations.
pub const HEAP_SIZE: usize = 4 << 20;

static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// Sets up the heap; must run before the first allocation.
pub fn init_heap() -> Result<(), OutOfMemory> {
    let p = arena_alloc(HEAP_SIZE, PAGE)?;
    // SAFETY: the range is fresh arena memory, ours for good, and the heap
    // is initialised once, before any allocation.
    unsafe { HEAP.lock().init(p, HEAP_SIZE) };
    Ok(())
}

/// The global allocator: the heap above.
pub struct HeapAllocator;

unsafe impl GlobalAlloc for HeapAllocator {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: forwarded to the heap with the caller's layout.
        unsafe { HEAP.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded; `p` came from alloc with this layout.
        unsafe { HEAP.dealloc(p, l) }
    }
}

// ---------------------------------------------------------------------------
// Host page tables and relocation.

const P: u64 = 1; // present
const W: u64 = 2; // writable
const PS: u64 = 1 << 7; // large page
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

/// The most the identity map can cover: the lower half of a 4-level
/// address space (PML4 entries 0..256; 511 holds the image window).
pub const IDENTITY_MAX: u64 = 1 << 47;

/// How far the host identity map reaches: with 1 GiB pages (`huge`), all of
/// MAXPHYADDR (`phys_bits`), so that guest RAM, ACPI tables and devices
/// anywhere in the physical address space can be touched; without them,
/// the end of the memory map (`map_end`) in 2 MiB pages, since 2^46 bytes
/// in 2 MiB pages would take 256 MiB of tables. At least 4 GiB, at most
/// [`IDENTITY_MAX`].
pub fn identity_limit(map_end: u64, phys_bits: u8, huge: bool) -> u64 {
    let want = if huge { (1u64 << phys_bits.min(52)).max(map_end) } else { map_end };
    want.max(4 * GIB).next_multiple_of(GIB).min(IDENTITY_MAX)
}

/// Tables [`identity_map`] allocates for `0..limit`.
pub fn identity_tables(limit: u64, huge: bool) -> u64 {
    let gib = limit.div_ceil(GIB);
    gib.div_ceil(512) + if huge { 0 } else { gib }
}

/// Identity-maps physical `0..limit` (rounded up to 1 GiB) into the PML4
/// at `pml4`: 1 GiB pages if `huge`, else 2 MiB pages. Page attributes are
/// write-back by PAT (PCD = PWT = 0), so the MTRRs decide each range's
/// memory type: RAM stays write-back and device memory uncacheable, as the
/// firmware set them. The tables come from `t` (the arena on the machine,
/// host memory in tests).
pub fn identity_map<T: crate::ept::Tables>(t: &mut T, pml4: u64, limit: u64, huge: bool) -> Result<(), T::Error> {
    assert!(limit <= IDENTITY_MAX, "identity map beyond 128 TiB");
    let gib = limit.div_ceil(GIB);
    for chunk in 0..gib.div_ceil(512) {
        let pdpt = t.alloc()?;
        t.table(pml4)[chunk as usize] = pdpt | P | W;
        for g in chunk * 512..gib.min(chunk * 512 + 512) {
            let e = if huge {
                (g * GIB) | P | W | PS
            } else {
                let pd = t.alloc()?;
                let tab = t.table(pd);
                for (i, e) in tab.iter_mut().enumerate() {
                    *e = (g * GIB + i as u64 * MIB2) | P | W | PS;
                }
                pd | P | W
            };
            t.table(pdpt)[(g % 512) as usize] = e;
        }
    }
    Ok(())
}

/// Tables the image window of `size` bytes at virtual `start` needs
/// (a PDPT, the PDs, 4 KiB page tables).
fn window_tables(start: u64, size: u64) -> u64 {
    let pts = (start + size).div_ceil(MIB2) - start / MIB2;
    let pds = (start + size).div_ceil(GIB) - start / GIB;
    1 + pds + pts
}

/// What the hypervisor's memory must hold; the inputs of [`plan`].
#[derive(Debug, Clone, Copy)]
pub struct PlanInput {
    /// vCPUs to be started (the boot CPU included).
    pub vcpus: u64,
    /// Arena bytes one vCPU takes (VMX regions, stacks, state, tables).
    pub per_vcpu: u64,
    /// 4 KiB tables of the EPT tree all vCPUs share, at most.
    pub ept_tables: u64,
    /// Tables of the host identity map ([`identity_tables`]).
    pub host_tables: u64,
    /// Arena bytes already used when planning (boot data, the heap).
    pub arena_used: u64,
    /// Bytes from the image start to the arena, and the image's own size
    /// (2 MiB multiple; its boot arena is [`ARENA_SIZE`]).
    pub arena_offset: u64,
    pub image: u64,
}

/// The hypervisor's memory plan: its footprint and what fills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Arena bytes per vCPU, page-rounded, and for all vCPUs.
    pub per_vcpu: u64,
    pub vcpus: u64,
    /// Arena bytes of the EPT tree and of the host page tables (the image
    /// window included).
    pub ept: u64,
    pub host: u64,
    /// Arena bytes needed in all; the arena's size after relocation.
    pub arena: u64,
    /// The footprint: image and arena, a 2 MiB multiple.
    pub footprint: u64,
}

/// Slack for small allocations (the bitmaps, boxed setup blocks, alignment).
const PLAN_SLACK: u64 = 256 << 10;

/// Plans the footprint from the vCPU count and the tables the memory map
/// needs. The host tables must fit the boot arena (they are built before
/// relocation); the rest may extend it. Pure, so the sizes for large
/// machines can be checked on the host.
pub fn plan(p: &PlanInput) -> MemoryPlan {
    let page = PAGE as u64;
    let per_vcpu = p.per_vcpu.next_multiple_of(page);
    let vcpus = per_vcpu * p.vcpus;
    let ept = p.ept_tables * page;
    // The image window grows with the footprint; a first guess covers the
    // image plus everything else, and its tables are a tiny share.
    let guess = p.image + vcpus + ept + p.host_tables * page + (64 << 20);
    let host = (p.host_tables + 1 + window_tables(KERNEL_VMA + (1 << 20), guess)) * page;
    let arena = p.arena_used + host + vcpus + ept + PLAN_SLACK;
    let footprint = (p.arena_offset + arena).next_multiple_of(MIB2).max(p.image);
    MemoryPlan { per_vcpu, vcpus, ept, host, arena: footprint - p.arena_offset, footprint }
}

/// Page tables built before relocation for use after it: allocated from the
/// boot arena, addressed by their physical address after the move.
struct BootTables {
    new_base: u64,
}

impl crate::ept::Tables for BootTables {
    type Error = OutOfMemory;
    fn alloc(&mut self) -> Result<u64, OutOfMemory> {
        let (s, _) = alloc_pages(1)?;
        Ok(s.as_ptr() as u64 - image_start_va() + self.new_base)
    }
    fn table(&mut self, pa: u64) -> &mut [u64; 512] {
        // SAFETY: `pa` came from alloc() above: a zeroed arena page of ours,
        // reached at its current (pre-relocation) virtual address.
        unsafe { &mut *((pa - self.new_base + image_start_va()) as *mut [u64; 512]) }
    }
}

/// Builds the hypervisor's page tables for an image at physical `new_base`:
/// identity map of physical `0..phys_limit` (see [`identity_map`]), and the
/// footprint (`size` bytes, image and arena) at the image's link address
/// with 4 KiB pages. Returns the new PML4's physical address *after*
/// relocation.
fn build_host_tables(new_base: u64, size: u64, phys_limit: u64, huge: bool) -> Result<u64, OutOfMemory> {
    use crate::ept::Tables;
    let mut t = BootTables { new_base };
    let pml4 = t.alloc()?;
    identity_map(&mut t, pml4, phys_limit, huge)?;
    // The image window: VA image_start.. -> new_base.., 4 KiB pages.
    let start = image_start_va();
    let pdpt_hi = t.alloc()?;
    t.table(pml4)[511] = pdpt_hi | P | W;
    for i in 0..size.div_ceil(PAGE as u64) {
        let va = start + i * PAGE as u64;
        let (pdpt_i, pd_i, pt_i) = (((va >> 30) & 511) as usize, ((va >> 21) & 511) as usize, ((va >> 12) & 511) as usize);
        if t.table(pdpt_hi)[pdpt_i] == 0 {
            let pd = t.alloc()?;
            t.table(pdpt_hi)[pdpt_i] = pd | P | W;
        }
        let pd = t.table(pdpt_hi)[pdpt_i] & !0xFFF;
        if t.table(pd)[pd_i] == 0 {
            let pt = t.alloc()?;
            t.table(pd)[pd_i] = pt | P | W;
        }
        let pt = t.table(pd)[pd_i] & !0xFFF;
        t.table(pt)[pt_i] = (new_base + i * PAGE as u64) | P | W;
    }
    Ok(pml4)
}

core::arch::global_asm!(
    // relocate_image(dst: rdi, src: rsi, len: rdx, cr3: rcx)
    // Copies the image (from its virtual address to the physical
    // destination as currently mapped) and switches to the new page
    // tables, which map the image's virtual addresses there. Nothing may touch
    // memory between the copy and the CR3 load: the return address on the
    // stack was copied along and is popped from the new copy.
    ".section .text.relocate, \"ax\"",
    ".global exitscope_relocate_image",
    "exitscope_relocate_image:",
    "    mov r8, rcx",
    "    mov rcx, rdx",
    "    shr rcx, 3",
    "    rep movsq",
    "    mov cr3, r8",
    "    ret",
);

unsafe extern "C" {
    fn exitscope_relocate_image(dst: u64, src: u64, len: u64, cr3: u64);
}

/// Moves the hypervisor image to physical `new_base` (2 MiB aligned, outside
/// everything still needed; `plan.footprint` bytes) and switches to page
/// tables that identity-map `0..phys_limit`. Only the used part of the
/// arena is copied; from then on the arena reaches to the footprint's end.
pub fn relocate(new_base: u64, plan: &MemoryPlan, phys_limit: u64, huge_pages: bool) -> Result<(), OutOfMemory> {
    assert!(new_base.is_multiple_of(2 << 20));
    let cr3 = build_host_tables(new_base, plan.footprint, phys_limit, huge_pages)?;
    let used_end = arena_base() as u64 + ARENA_USED.load(SeqCst) as u64;
    let len = (used_end - image_start_va()).next_multiple_of(8);
    let dst = phys_ptr::<u8>(new_base) as u64;
    // SAFETY: interrupts are off and we are the only CPU; the destination is
    // free RAM chosen by the caller; the new tables map everything the code
    // after this point touches.
    unsafe { exitscope_relocate_image(dst, image_start_va(), len, cr3) };
    IMAGE_PHYS.store(new_base, SeqCst);
    PHYS_OFFSET.store(0, SeqCst);
    FOOTPRINT_SIZE.store(plan.footprint, SeqCst);
    ARENA_LIMIT.store(plan.arena.max(ARENA_SIZE as u64) as usize, SeqCst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ept::{self, tests::HostTables, Tables};
    use guest_loader::memmap::{MemKind, MemoryMap, Region};
    use std::vec::Vec;

    /// Translates `va` through the 4-level tables at `pml4` as the CPU
    /// would: (physical address, page size, writable).
    fn walk(t: &mut HostTables, pml4: u64, va: u64) -> Option<(u64, u64, bool)> {
        let mut pa = pml4;
        for level in (2..=4).rev() {
            let shift = 12 + 9 * (level - 1);
            let e = t.table(pa)[((va >> shift) & 511) as usize];
            if e & P == 0 {
                return None;
            }
            if e & PS != 0 {
                let size = 1u64 << shift;
                return Some((e & 0x000F_FFFF_FFFF_F000 & !(size - 1) | va & (size - 1), size, e & W != 0));
            }
            assert!(level > 2, "a level-1 table in the identity map");
            pa = e & 0x000F_FFFF_FFFF_F000;
        }
        None
    }

    /// A machine with RAM to 2 TiB (the PCI hole below 4 GiB) and
    /// MAXPHYADDR 46: guest page walks in root mode reach all of it.
    fn two_tib() -> MemoryMap {
        MemoryMap::from_regions([
            Region { start: 0, end: 0x9F000, kind: MemKind::Ram },
            Region { start: 0x100000, end: 0xC000_0000, kind: MemKind::Ram },
            Region { start: 0x1_0000_0000, end: 2 << 40, kind: MemKind::Ram },
        ])
    }

    #[test]
    fn identity_map_reaches_maxphyaddr_with_1g_pages() {
        let end = two_tib().regions().last().unwrap().end;
        let limit = identity_limit(end, 46, true);
        assert_eq!(limit, 1 << 46, "MAXPHYADDR, not 512 GiB");
        let mut t = HostTables(Vec::new());
        let pml4 = t.alloc().unwrap();
        identity_map(&mut t, pml4, limit, true).unwrap();
        assert_eq!(t.0.len() as u64 - 1, identity_tables(limit, true));
        assert_eq!(identity_tables(limit, true), 128, "one PDPT per 512 GiB");
        for pa in
            [0u64, 0x9_F123, 0xFEE0_0300, 511 << 30, 512 << 30, (512 << 30) + 0x1234_5678, (2 << 40) - 8, 0x2345_6789_A000, (1 << 46) - 8]
        {
            let (got, size, w) = walk(&mut t, pml4, pa).unwrap_or_else(|| panic!("{pa:#x} not mapped"));
            assert_eq!((got, size, w), (pa, 1 << 30, true), "{pa:#x}");
        }
        // Every GiB up to MAXPHYADDR, nothing above.
        for g in 0..(1u64 << 16) {
            assert_eq!(walk(&mut t, pml4, g << 30).map(|l| l.0), Some(g << 30));
        }
        assert_eq!(walk(&mut t, pml4, 1 << 46), None);
        // Write-back by PAT: no PCD/PWT bits; the MTRRs type each range.
        let pdpt = t.table(pml4)[3] & !0xFFF;
        let e = t.table(pdpt)[5];
        assert_eq!(e & 0x18, 0);
    }

    #[test]
    fn identity_map_without_1g_pages_covers_the_memory_map() {
        let end = two_tib().regions().last().unwrap().end;
        let limit = identity_limit(end, 46, false);
        assert_eq!(limit, 2 << 40, "to the end of the memory map");
        // Small machines still get at least 4 GiB (the APIC, the IOAPIC, firmware).
        assert_eq!(identity_limit(512 << 20, 36, false), 4 << 30);
        assert_eq!(identity_limit(512 << 20, 52, true), IDENTITY_MAX, "at most 128 TiB");
        let mut t = HostTables(Vec::new());
        let pml4 = t.alloc().unwrap();
        identity_map(&mut t, pml4, limit, false).unwrap();
        assert_eq!(t.0.len() as u64 - 1, identity_tables(limit, false));
        assert_eq!(identity_tables(limit, false), 4 + 2048);
        for pa in [0u64, 0x20_0000, 0xFEE0_0300, (600 << 30) + 0x12_3456, (2 << 40) - 8] {
            let (got, size, _) = walk(&mut t, pml4, pa).unwrap();
            assert_eq!((got, size), (pa, 2 << 20), "{pa:#x}");
        }
        assert_eq!(walk(&mut t, pml4, 2 << 40), None);
    }

    /// 256 CPUs and 1 TiB of RAM (with the PCI hole and a watched APIC
    /// page), MAXPHYADDR 46: the plan the hypervisor would make.
    fn plan_for(large: (bool, bool), lazy: bool) -> (MemoryPlan, u64) {
        let map = MemoryMap::from_regions([
            Region { start: 0, end: 0x9F000, kind: MemKind::Ram },
            Region { start: 0x100000, end: 0xC000_0000, kind: MemKind::Ram },
            Region { start: 0x1_0000_0000, end: 1 << 40, kind: MemKind::Ram },
        ]);
        let top = ept::phys_top(&map, 46);
        let apic = 0xFEE0_0000;
        let fp = (0xB000_0000, 0xB400_0000);
        let ranges = ept::guest_ranges(&map, top, &[fp], &[(apic, apic + 4096)]);
        let ept_tables = ept::plan_tables(&ranges, ept::map_top(&map), large, lazy);
        let host = identity_tables(identity_limit(1 << 40, 46, large.1), large.1);
        let p = plan(&PlanInput {
            vcpus: 256,
            per_vcpu: crate::vcpu_arena_bytes() as u64,
            ept_tables,
            host_tables: host,
            arena_used: 4 << 20,
            arena_offset: 1 << 20,
            image: 14 << 20,
        });
        (p, ept_tables)
    }

    #[test]
    fn plan_for_256_cpus_and_1_tib() {
        for lazy in [false, true] {
            let (p1g, t1g) = plan_for((true, true), lazy);
            let (p2m, t2m) = plan_for((true, false), lazy);
            for (p, tables) in [(p1g, t1g), (p2m, t2m)] {
                // Per-CPU sizes and totals add up, and the plan fits.
                let per = (crate::vcpu_arena_bytes() as u64).next_multiple_of(4096);
                assert!(per >= 56 << 10, "VMXON, VMCS, 32 KiB stack, 8 KiB fault stack, state: {per}");
                assert_eq!(p.per_vcpu, per);
                assert_eq!(p.vcpus, 256 * per);
                assert_eq!(p.ept, tables * 4096);
                assert!(p.arena >= (4 << 20) + p.host + p.vcpus + p.ept, "{p:?}");
                assert_eq!(p.footprint, (1 << 20) + p.arena);
                assert_eq!(p.footprint % (2 << 20), 0);
                assert!(p.footprint <= 64 << 20, "{p:?}");
            }
            if lazy {
                // Filled on demand without 1 GiB pages either way.
                assert_eq!(t1g, t2m);
            } else {
                // One shared tree: with 1 GiB pages a few tables cover 64 TiB
                // (PML4, 128 PDPTs, the first GiBs' PDs and PTs).
                assert!(t1g < 150, "{t1g}");
                assert!(p2m.footprint > p1g.footprint);
            }
            // With 2 MiB pages, a PD per GiB of the memory map (1 TiB),
            // the rest of MAXPHYADDR on demand from a reserve.
            assert!(t2m > 1024 && t2m < 1024 + 64 + 32, "{t2m}");
            // A per-vCPU tree would take 256 times that: more than the plan.
            assert!(256 * t2m * 4096 > p2m.footprint);
        }
        // A small machine keeps the image's size (the boot arena suffices).
        let p = plan(&PlanInput {
            vcpus: 2,
            per_vcpu: 60 << 10,
            ept_tables: 12,
            host_tables: 5,
            arena_used: 4 << 20,
            arena_offset: 1 << 20,
            image: 14 << 20,
        });
        assert_eq!(p.footprint, 14 << 20);
    }
}
