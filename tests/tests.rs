//! culprit's integration tests: one binary, one module per pipeline step.
//!
//! Tests that need the larger data sets in `../shared` skip with a printed reason when it is
//! absent. Run them with `cargo test --release` (the README's test command).

mod act;
mod architecture;
mod audit;
mod cli;
mod common;
mod curvature;
mod dedup;
mod faults;
mod fuzz;
#[cfg(feature = "gpu")]
mod gpu;
mod gradients;
mod library;
mod lm;
mod loaders;
mod provenance;
mod query;
mod scan;
mod store;
mod training;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, watching the largest single allocation made on a thread while asked
/// (the fuzzers' "never a huge allocation"; `reset_largest_allocation`).
struct Watching;

thread_local! {
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` unchanged; the thread-locals are const-initialised
// `Cell`s, which never allocate.
unsafe impl GlobalAlloc for Watching {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size: usize) {
    let _ = WATCHING.try_with(|w| {
        if w.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

#[global_allocator]
static ALLOCATOR: Watching = Watching;

/// Starts (`watch`) or stops watching this thread's allocations; returns the largest single one
/// since the last call.
pub fn reset_largest_allocation(watch: bool) -> usize {
    WATCHING.with(|w| w.set(watch));
    LARGEST.with(|l| l.replace(0))
}
