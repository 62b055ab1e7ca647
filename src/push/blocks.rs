//! A path of several xz blocks: read once and cut into blocks as it is read, each block's
//! input waiting in an unnamed spool file (the page cache, not the heap) until a thread
//! compresses it, the compressed blocks appended in order.

use std::cmp::Reverse;
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex};

use thiserror::Error;

use super::cache_write::{ToCache, scratch, tag, write_err};
use super::plan::check_hash;
use super::queue::Unit;
use super::{Done, FILE_BUFFER, INPUT_PIECE, NAR_BUFFER, Outcome, PushError, Run, SPILL_IN_MEMORY};
use crate::cache::{Cache, NewFile};
use crate::hash::{HashingWriter, NixHash};
use crate::nar::dump::dump_listing;
use crate::nar::listing::Entry;
use crate::path_info::PathInfo;
use crate::progress::PathProgress;
use crate::xz;

impl Run<'_> {
    /// Opens the output of a path compressed a block per unit.
    pub(super) fn open_blocks(
        &self,
        i: usize,
        params: xz::Params,
        outcome: Outcome,
    ) -> Result<Blocked, PushError> {
        let info = &self.infos[i];
        let tmp = self.cache.create_file("nar", self.opts.compression.extension())?;
        let mut out = HashingWriter::new(BufWriter::with_capacity(FILE_BUFFER, ToCache(tmp)));
        out.write_all(&xz::stream_header()).map_err(write_err)?;
        Ok(Blocked {
            params,
            outcome,
            bar: self.progress.path(info.path.as_str(), info.nar_size),
            limit: self.opts.jobs.max(1) + 1,
            spool: scratch(self.cache).map_err(write_err)?,
            state: Mutex::new(BlockedState {
                out: Some(out),
                input: Vec::new(),
                free: Vec::new(),
                slots: 0,
                untaken: 0,
                held: 0,
                waiting: Vec::new(),
                next: 0,
                blocks: Vec::new(),
                read: None,
                left: 1,
                error: None,
            }),
            freed: Condvar::new(),
        })
    }

    /// Reads the NAR of a path compressed a block per unit (unit `u`), once: hashes it and
    /// cuts it into blocks, each queued as a unit as soon as it is cut, so other threads
    /// compress while this one reads. With `limit` blocks held, this thread compresses the
    /// oldest one no thread has taken, or waits for one to finish. Nothing is published
    /// unless the NarHash of what was read is the one the database records. Returns the
    /// path's result if this was its last unit.
    pub(super) fn read_blocks(&self, i: usize, b: &Blocked, u: Unit) -> Option<Result<Done, PushError>> {
        let info = &self.infos[i];
        let want_listing = self.opts.nar_listing || self.opts.index_debug_info;
        let cutter = Cutter { run: self, b, unit: u, slot: None, len: 0 };
        let nar = HashingWriter::new(cutter);
        let nar = BufWriter::with_capacity(NAR_BUFFER, nar);
        let read = dump_listing(&self.store.real_path(&info.path), nar, want_listing)
            .map_err(PushError::from)
            .and_then(|(nar, listing)| {
                let (mut cutter, nar_size, nar_hash) =
                    nar.into_inner().map_err(|e| write_err(e.into_error()))?.finish();
                cutter.cut(false).map_err(write_err)?;
                check_hash(&self.store.store_dir.display(&info.path), info, nar_hash, nar_size)?;
                Ok(ReadPass { listing, nar_size, nar_hash })
            });
        {
            let mut st = b.lock();
            match read {
                Ok(p) => st.read = Some(p),
                // A corrupt path says more than a block's error; a block's error is why
                // the read stopped.
                Err(e @ PushError::Corrupt { .. }) => st.error = Some(e),
                Err(e) => {
                    st.error.get_or_insert(e);
                }
            }
        }
        // The blocks no thread has taken yet are units in the queue, taken in their turn.
        let mut st = b.lock();
        st.left -= 1;
        (st.left == 0).then(|| self.finish_blocks(info, b, &mut st))
    }

    /// Compresses block `k` of path `i` unless the reading thread already took it. Returns
    /// the path's result when this was its last unit to finish.
    pub(super) fn block(&self, i: usize, b: &Blocked, k: usize) -> Option<Result<Done, PushError>> {
        let input = b.lock().input[k].take();
        if let Some(input) = input {
            self.compress_block(b, k, input);
        }
        let mut st = b.lock();
        st.left -= 1;
        (st.left == 0).then(|| self.finish_blocks(&self.infos[i], b, &mut st))
    }

    /// Compresses block `k` (its `input`, read back from the path's spool file), or stores
    /// it as liblzma's multithreaded encoder would, then appends every block that is next in
    /// order to the output. Skipped once the path has failed.
    pub(super) fn compress_block(&self, b: &Blocked, k: usize, input: Input) {
        let compressed = if b.lock().error.is_some() {
            None
        } else {
            let mut piece = vec![0u8; INPUT_PIECE.min(input.len as usize)];
            let mut encode = |stored: bool| {
                let spill = Spill { cache: self.cache, data: SpillData::Memory(Vec::new()) };
                let mut enc = if stored {
                    xz::BlockEncoder::stored(spill, input.len)
                } else {
                    xz::BlockEncoder::new(&b.params, spill)?
                };
                let mut done = 0;
                while done < input.len {
                    let n = (input.len - done).min(piece.len() as u64) as usize;
                    b.spool.read_exact_at(&mut piece[..n], input.offset(&b.params) + done).map_err(tag)?;
                    enc.write_all(&piece[..n])?;
                    done += n as u64;
                    // Progress is what is compressed (counted once: a stored block was first
                    // compressed), which is what the push waits for.
                    if !stored {
                        b.bar.inc(n as u64);
                    }
                }
                enc.finish().map(|(spill, block)| (spill.data, block))
            };
            Some(encode(false).and_then(|(spill, block)| {
                if !b.params.would_store(&block) {
                    return Ok((spill, block));
                }
                drop(spill);
                encode(true)
            }))
        };
        let mut st = b.lock();
        st.release(input);
        b.freed.notify_all();
        match compressed {
            Some(Ok(done)) => st.waiting[k] = Some(done),
            Some(Err(e)) => {
                st.error.get_or_insert(write_err(e));
            }
            None => {}
        }
        if st.error.is_none()
            && let Err(e) = st.append_ready(&b.params)
        {
            st.error = Some(write_err(e));
        }
    }

    /// Once every unit of a path compressed a block per unit is done: ends the stream and
    /// puts its NAR in place.
    pub(super) fn finish_blocks(
        &self,
        info: &PathInfo,
        b: &Blocked,
        st: &mut BlockedState,
    ) -> Result<Done, PushError> {
        if let Some(e) = st.error.take() {
            return Err(e);
        }
        let pass = st.read.take().expect("the read succeeded when nothing failed");
        debug_assert_eq!(st.next, st.input.len(), "every block is appended");
        let mut out = st.out.take().expect("finished once");
        out.write_all(&xz::index_and_footer(&b.params, &st.blocks)).map_err(write_err)?;
        let (buffered, file_size, file_hash) = out.finish();
        let ToCache(tmp) = buffered.into_inner().map_err(|e| write_err(e.into_error()))?;
        let nar = (pass.nar_size, pass.nar_hash);
        self.publish_nar(info, tmp, b.outcome, nar, (file_size, file_hash), pass.listing.as_ref())
    }
}

/// What the read of a path compressed a block per unit learns of its NAR.
pub(super) struct ReadPass {
    listing: Option<Entry>,
    nar_size: u64,
    nar_hash: NixHash,
}

/// A NAR file being written, hashed on its way to the cache.
pub(super) type CacheOut = HashingWriter<BufWriter<ToCache<Box<dyn NewFile>>>>;

/// A path whose xz blocks are compressed as separate units.
pub(super) struct Blocked {
    params: xz::Params,
    outcome: Outcome,
    bar: PathProgress,
    /// Blocks of input held at most (cut and not yet compressed): one more than `--jobs`,
    /// so that a block is ready for each thread that finishes one while the reading thread
    /// compresses another.
    limit: usize,
    /// An unnamed file holding the input of the blocks cut and not yet compressed, a block
    /// size per slot: in the page cache, which the kernel can write out, not on the heap.
    /// Slots are reused, so it grows to `limit` + 1 blocks at most.
    spool: File,
    state: Mutex<BlockedState>,
    /// A block's input was let go.
    freed: Condvar,
}

impl Blocked {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, BlockedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the input of the oldest block no thread has taken (none once the path failed).
    pub(super) fn take_next(&self, st: &mut BlockedState) -> Option<(usize, Input)> {
        while st.untaken < st.input.len() {
            let k = st.untaken;
            st.untaken += 1;
            if let Some(input) = st.input[k].take() {
                if st.error.is_some() {
                    st.release(input);
                    continue;
                }
                return Some((k, input));
            }
        }
        None
    }
}

/// The input of a block cut and not yet compressed: `len` bytes in slot `slot` of its path's
/// spool file.
#[derive(Clone, Copy, Debug)]
pub(super) struct Input {
    slot: u64,
    len: u64,
}

impl Input {
    pub(super) fn offset(&self, params: &xz::Params) -> u64 {
        self.slot * params.block_size()
    }
}

pub(super) struct BlockedState {
    out: Option<CacheOut>,
    /// The input of each block cut, until a thread takes it.
    input: Vec<Option<Input>>,
    /// Slots of the spool file no block holds.
    free: Vec<u64>,
    /// Slots of the spool file so far.
    slots: u64,
    /// Blocks before this one have been taken.
    untaken: usize,
    /// Blocks of input cut and not yet compressed.
    held: usize,
    /// Blocks compressed but not yet appended (a later block finished first).
    waiting: Vec<Option<(SpillData, xz::Block)>>,
    /// The next block to append.
    next: usize,
    /// Blocks appended, for the index.
    blocks: Vec<xz::Block>,
    /// What the read found, once it is done.
    read: Option<ReadPass>,
    /// Units not yet done: the read and the blocks queued.
    left: usize,
    error: Option<PushError>,
}

impl BlockedState {
    /// A slot of the spool file for the next block's input.
    pub(super) fn take_slot(&mut self) -> u64 {
        self.free.pop().unwrap_or_else(|| {
            self.slots += 1;
            self.slots - 1
        })
    }

    /// The input of a block is compressed (or will never be): its slot is free again.
    pub(super) fn release(&mut self, input: Input) {
        self.held -= 1;
        self.free.push(input.slot);
    }

    /// Appends the blocks that are next in order.
    pub(super) fn append_ready(&mut self, params: &xz::Params) -> io::Result<()> {
        let out = self.out.as_mut().expect("open until finished");
        while let Some(Some((spill, block))) = self.waiting.get_mut(self.next).map(Option::take) {
            out.write_all(&xz::block_header(params, &block))?;
            spill.copy_to(out)?;
            out.write_all(&xz::block_trailer(&block))?;
            self.blocks.push(block);
            self.next += 1;
        }
        Ok(())
    }
}

/// The end of the read of a path compressed a block per unit: cuts the NAR into blocks of
/// the block size, written to a slot of the path's spool file, and queues each.
pub(super) struct Cutter<'r, 'a> {
    run: &'r Run<'a>,
    b: &'r Blocked,
    unit: Unit,
    /// The slot the block being cut is written to.
    slot: Option<u64>,
    /// Bytes of the block being cut.
    len: u64,
}

/// The read stopped because a block of the path failed (that error is the path's).
#[derive(Debug, Error)]
#[error("stopped: a block of this path failed")]
struct Stopped;

impl Cutter<'_, '_> {
    /// Queues the bytes read since the last cut as a block; then, unless this was the last
    /// cut (`more` is false), holds the read while `limit` blocks are held: compresses the
    /// oldest one no thread has taken, or waits.
    pub(super) fn cut(&mut self, more: bool) -> io::Result<()> {
        let b = self.b;
        let mut st = b.lock();
        if st.error.is_some() {
            return Err(io::Error::other(Stopped));
        }
        if let Some(slot) = self.slot.take() {
            let k = st.input.len();
            let len = std::mem::take(&mut self.len);
            st.input.push(Some(Input { slot, len }));
            st.waiting.push(None);
            st.held += 1;
            st.left += 1;
            self.run.queue.add([Unit { bytes: Reverse(len), block: k + 1, ..self.unit }]);
        }
        while more && st.held >= b.limit && st.error.is_none() {
            match b.take_next(&mut st) {
                Some((k, data)) => {
                    drop(st);
                    self.run.compress_block(b, k, data);
                    st = b.lock();
                }
                None => st = b.freed.wait(st).unwrap_or_else(|e| e.into_inner()),
            }
        }
        if st.error.is_some() {
            return Err(io::Error::other(Stopped));
        }
        Ok(())
    }
}

impl Write for Cutter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let b = self.b;
        let size = b.params.block_size();
        let slot = match self.slot {
            Some(slot) => slot,
            None => *self.slot.insert(b.lock().take_slot()),
        };
        let n = buf.len().min((size - self.len) as usize);
        b.spool.write_all_at(&buf[..n], slot * size + self.len).map_err(tag)?;
        self.len += n as u64;
        if self.len == size {
            self.cut(true)?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A finished block's compressed bytes: in memory while small, then in an unnamed file.
pub(super) struct Spill<'a> {
    cache: &'a Cache,
    data: SpillData,
}

pub(super) enum SpillData {
    Memory(Vec<u8>),
    File(File),
}

impl SpillData {
    pub(super) fn copy_to(self, out: &mut impl Write) -> io::Result<()> {
        match self {
            SpillData::Memory(v) => out.write_all(&v),
            SpillData::File(mut f) => {
                f.seek(SeekFrom::Start(0))?;
                io::copy(&mut f, out).map(drop)
            }
        }
    }
}

impl Write for Spill<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let SpillData::Memory(v) = &mut self.data
            && v.len() + buf.len() > SPILL_IN_MEMORY
        {
            let mut f = scratch(self.cache)?;
            f.write_all(v).map_err(tag)?;
            self.data = SpillData::File(f);
        }
        match &mut self.data {
            SpillData::Memory(v) => v.write(buf),
            SpillData::File(f) => f.write(buf).map_err(tag),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
