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

use core::alloc::{GlobalAlloc, Layout};
use core::ptr;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

/// Heap size. Holds boot data, per-vCPU VMX structures, stacks and EPT tables.
pub const ARENA_SIZE: usize = 12 << 20;
pub const PAGE: usize = 4096;

#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);

#[link_section = ".arena"]
static mut ARENA: Arena = Arena([0; ARENA_SIZE]);

/// Bytes of the arena handed out so far.
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

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

/// Physical range the hypervisor occupies (valid after [`relocate`]).
pub fn footprint() -> (u64, u64) {
    let base = image_phys();
    (base, base + image_size())
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
    debug_assert!(va >= image_start_va() && va < image_end_va(), "not an image address: {va:#x}");
    va - image_start_va() + image_phys()
}

/// A pointer to physical memory through the identity map (or, before
/// relocation on the UEFI path, the boot loader's physical-memory window).
#[inline(always)]
pub fn phys_ptr<T>(pa: u64) -> *mut T {
    pa.wrapping_add(PHYS_OFFSET.load(core::sync::atomic::Ordering::Relaxed)) as *mut T
}

/// Copies `len` bytes between physical ranges (they may overlap).
pub fn phys_copy(dst: u64, src: u64, len: u64) {
    // SAFETY: the caller (the guest loader) owns both ranges: they are guest
    // RAM or the module staging area, never hypervisor memory.
    unsafe { ptr::copy(phys_ptr::<u8>(src), phys_ptr::<u8>(dst), len as usize) }
}

/// Zeroes a physical range.
pub fn phys_zero(dst: u64, len: u64) {
    // SAFETY: as for phys_copy.
    unsafe { ptr::write_bytes(phys_ptr::<u8>(dst), 0, len as usize) }
}

/// Reads a physical range into a slice view (for ACPI tables and modules).
///
/// # Safety
/// The range must be RAM or firmware tables that stay unchanged while the
/// slice lives.
pub unsafe fn phys_slice<'a>(pa: u64, len: usize) -> &'a [u8] {
    // SAFETY: per the contract above.
    unsafe { core::slice::from_raw_parts(phys_ptr::<u8>(pa), len) }
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
            ARENA_SIZE / 1024
        )
    }
}

/// Takes `size` bytes aligned to `align` from the arena (never freed).
pub fn arena_alloc(size: usize, align: usize) -> Result<*mut u8, OutOfMemory> {
    let base = arena_base();
    let mut cur = ARENA_USED.load(SeqCst);
    loop {
        let start = (base + cur).next_multiple_of(align) - base;
        let end = start.checked_add(size).filter(|&e| e <= ARENA_SIZE).ok_or(OutOfMemory { wanted: size })?;
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

/// Arena statistics: (used, total) bytes.
pub fn arena_usage() -> (usize, usize) {
    (ARENA_USED.load(SeqCst), ARENA_SIZE)
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

/// Builds the hypervisor's page tables for an image at physical `new_base`:
/// identity map of physical `0..phys_limit` (1 GiB pages if `huge`, else
/// 2 MiB pages), and the image window at its link address with 4 KiB pages.
/// Returns the new PML4's physical address *after* relocation.
fn build_host_tables(new_base: u64, phys_limit: u64, huge: bool) -> Result<u64, OutOfMemory> {
    let after = |p: *const u8| p as u64 - image_start_va() + new_base;
    let table = |n| alloc_pages(n).map(|(s, _)| s.as_mut_ptr() as *mut u64);

    let pml4 = table(1)?;
    let gib = phys_limit.div_ceil(1 << 30).clamp(4, 512);
    // Identity map through PML4[0].
    let pdpt = table(1)?;
    // SAFETY (all writes below): the tables were just allocated, zeroed and
    // are exclusively ours; indices stay within 512 entries.
    unsafe {
        *pml4 = after(pdpt as *const u8) | P | W;
        if huge {
            for g in 0..gib {
                *pdpt.add(g as usize) = (g << 30) | P | W | PS;
            }
        } else {
            let pds = table(gib as usize)?;
            for i in 0..gib * 512 {
                *pds.add(i as usize) = (i << 21) | P | W | PS;
            }
            for g in 0..gib {
                *pdpt.add(g as usize) = after(pds.add(g as usize * 512) as *const u8) | P | W;
            }
        }
        // The image window: VA image_start.. -> new_base.., 4 KiB pages.
        let start = image_start_va();
        let pages = (image_end_va() - start).div_ceil(PAGE as u64);
        let pdpt_hi = table(1)?;
        *pml4.add(511) = after(pdpt_hi as *const u8) | P | W;
        let mut pd_cur: (u64, *mut u64) = (u64::MAX, ptr::null_mut());
        for i in 0..pages {
            let va = start + i * PAGE as u64;
            let (pdpt_i, pd_i, pt_i) = ((va >> 30) & 511, (va >> 21) & 511, (va >> 12) & 511);
            let pd = if pd_cur.0 == pdpt_i {
                pd_cur.1
            } else {
                let pd = table(1)?;
                *pdpt_hi.add(pdpt_i as usize) = after(pd as *const u8) | P | W;
                pd_cur = (pdpt_i, pd);
                pd
            };
            let e = pd.add(pd_i as usize);
            if *e == 0 {
                *e = after(table(1)? as *const u8) | P | W;
            }
            let pt_va = (*e & !0xFFF) - new_base + image_start_va();
            *(pt_va as *mut u64).add(pt_i as usize) = (new_base + i * PAGE as u64) | P | W;
        }
    }
    Ok(after(pml4 as *const u8))
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
/// everything still needed) and switches to page tables that identity-map
/// `0..phys_limit`. Only the used part of the arena is copied.
pub fn relocate(new_base: u64, phys_limit: u64, huge_pages: bool) -> Result<(), OutOfMemory> {
    assert!(new_base.is_multiple_of(2 << 20));
    let cr3 = build_host_tables(new_base, phys_limit, huge_pages)?;
    let used_end = arena_base() as u64 + ARENA_USED.load(SeqCst) as u64;
    let len = (used_end - image_start_va()).next_multiple_of(8);
    let dst = phys_ptr::<u8>(new_base) as u64;
    // SAFETY: interrupts are off and we are the only CPU; the destination is
    // free RAM chosen by the caller; the new tables map everything the code
    // after this point touches.
    unsafe { exitscope_relocate_image(dst, image_start_va(), len, cr3) };
    IMAGE_PHYS.store(new_base, SeqCst);
    PHYS_OFFSET.store(0, SeqCst);
    Ok(())
}
