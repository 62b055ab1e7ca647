//! The units of a push's work and the queue that hands them to its threads.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex};

/// One thread's worth of work: a path (`block == 0`) or block `block - 1` of a path's xz
/// stream. The derived order is the order of work: the most bytes to compress first (the
/// read of a path cut into blocks before anything, since it makes the work of the others),
/// then the largest path, its blocks in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Unit {
    pub(super) bytes: Reverse<u64>,
    pub(super) rank: usize,
    pub(super) block: usize,
    pub(super) path: usize,
}

/// Hands out units, the largest first, to `--jobs` threads.
///
/// A path of several xz blocks (24 MiB of NAR each at level 6) becomes a unit per block
/// as its read cuts them: every thread compresses one block at a time with one match
/// finder, and a large path is spread over all cores. Blocks and paths are taken by their
/// bytes, largest first (a 17 MiB path before the 15 MiB last block of a larger one), so
/// that the cores finish together: what is left at the end is small.
pub(super) struct Queue {
    state: Mutex<QueueState>,
    changed: Condvar,
}

pub(super) struct QueueState {
    ready: BinaryHeap<Reverse<Unit>>,
    /// Units added and not yet done (ready or running).
    open: usize,
}

impl Queue {
    pub(super) fn new(units: impl IntoIterator<Item = Unit>) -> Self {
        let ready: BinaryHeap<_> = units.into_iter().map(Reverse).collect();
        let open = ready.len();
        Queue { state: Mutex::new(QueueState { ready, open }), changed: Condvar::new() }
    }

    /// The next unit, or `None` once every unit is done.
    pub(super) fn next(&self) -> Option<Unit> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(Reverse(u)) = st.ready.pop() {
                return Some(u);
            }
            if st.open == 0 {
                return None;
            }
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Adds units; called by a running unit, before it is done.
    pub(super) fn add(&self, units: impl IntoIterator<Item = Unit>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = st.ready.len();
        st.ready.extend(units.into_iter().map(Reverse));
        st.open += st.ready.len() - before;
        self.changed.notify_all();
    }

    pub(super) fn done(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.open -= 1;
        if st.open == 0 {
            self.changed.notify_all();
        }
    }
}
