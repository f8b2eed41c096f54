//! When freed memory may go back to the OS: not while a view change runs on this node.
//!
//! The binary gives freed pages back when a thread goes idle (`main.rs`). During a view
//! change every thread goes idle between batches, and each batch's buffers, given back
//! the moment they were freed, were faulted in and zeroed again by the next batch: the
//! kernel's `clear_page` took 17% of a receiving node's CPU in a 1M-key change. A
//! [`Hold`] (one per change in progress) defers that until the change ends; what the
//! change freed (a handed-over share) goes back at the next idle moment after it.

use std::sync::atomic::{AtomicUsize, Ordering};

static HOLDS: AtomicUsize = AtomicUsize::new(0);

/// Defers giving freed memory back to the OS while it lives.
#[derive(Debug)]
pub struct Hold(());

impl Hold {
    pub fn new() -> Hold {
        HOLDS.fetch_add(1, Ordering::Relaxed);
        Hold(())
    }
}

impl Default for Hold {
    fn default() -> Self {
        Hold::new()
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        HOLDS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether freed memory should stay with the allocator for now.
pub fn held() -> bool {
    HOLDS.load(Ordering::Relaxed) > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_held_while_a_hold_lives() {
        // Other tests of this binary may hold too: count this test's own hold only.
        let before = HOLDS.load(Ordering::Relaxed);
        let hold = Hold::new();
        assert!(held());
        assert_eq!(HOLDS.load(Ordering::Relaxed), before + 1);
        drop(hold);
        assert_eq!(HOLDS.load(Ordering::Relaxed), before);
    }
}
