//! liblzma's raw LZMA2 encoder, kept on its thread from block to block: the one place in
//! nixcache's xz that calls C (and the crate's first of two exceptions to `unsafe_code`).

use std::io::{self, Write};

const OUT_CHUNK: usize = 64 << 10;

/// A raw LZMA2 encoder (`lzma_raw_encoder`), kept on its thread from block to block as
/// each thread of liblzma's multithreaded encoder keeps its own: initialized again for the
/// next block, it reuses its match finder's memory (about 94 MiB at level 6). A new encoder
/// per block faulted in fresh pages for every 24 MiB of input, seconds of system time on a
/// path of gigabytes.
pub(super) struct Raw {
    /// Boxed: liblzma is given its address.
    strm: Box<liblzma_sys::lzma_stream>,
    buf: Box<[u8]>,
}

thread_local! {
    /// This thread's encoder between blocks.
    static IDLE: std::cell::RefCell<Option<Raw>> = const { std::cell::RefCell::new(None) };
}

#[allow(unsafe_code)]
impl Raw {
    /// This thread's encoder (or a new one), set up for a block at preset `level`.
    pub(super) fn start(level: u32) -> io::Result<Raw> {
        let mut raw = IDLE.with(|r| r.borrow_mut().take()).unwrap_or_else(|| Raw {
            // SAFETY: all zeros is LZMA_STREAM_INIT, the state of a stream never initialized.
            strm: Box::new(unsafe { std::mem::zeroed() }),
            buf: vec![0u8; OUT_CHUNK].into_boxed_slice(),
        });
        // SAFETY: lzma_options_lzma is plain data that lzma_lzma_preset fills in.
        let mut opts: liblzma_sys::lzma_options_lzma = unsafe { std::mem::zeroed() };
        // SAFETY: `opts` is a valid, writable lzma_options_lzma.
        if unsafe { liblzma_sys::lzma_lzma_preset(&mut opts, level) } != 0 {
            return Err(io::Error::other(format!("no xz preset {level}")));
        }
        let filters = [
            liblzma_sys::lzma_filter {
                id: liblzma_sys::LZMA_FILTER_LZMA2,
                options: (&mut opts as *mut liblzma_sys::lzma_options_lzma).cast(),
            },
            liblzma_sys::lzma_filter { id: liblzma_sys::LZMA_VLI_UNKNOWN, options: std::ptr::null_mut() },
        ];
        // SAFETY: `strm` is LZMA_STREAM_INIT or a stream liblzma initialized (then it is
        // reinitialized in place, keeping what memory fits); the filter chain ends with
        // LZMA_VLI_UNKNOWN and its options are read during the call only.
        let ret = unsafe { liblzma_sys::lzma_raw_encoder(&mut *raw.strm, filters.as_ptr()) };
        if ret != liblzma_sys::LZMA_OK {
            return Err(io::Error::other(format!("cannot start the LZMA2 encoder (liblzma error {ret})")));
        }
        Ok(raw)
    }

    /// Feeds all of `input` (with `finish`, the rest of the block, then ends its data),
    /// writing the LZMA2 data to `out` as it comes.
    pub(super) fn code(&mut self, input: &[u8], finish: bool, out: &mut impl Write) -> io::Result<()> {
        if input.is_empty() && !finish {
            // liblzma answers a call that can make no progress with LZMA_BUF_ERROR.
            return Ok(());
        }
        let action = if finish { liblzma_sys::LZMA_FINISH } else { liblzma_sys::LZMA_RUN };
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = input.len();
        loop {
            self.strm.next_out = self.buf.as_mut_ptr();
            self.strm.avail_out = self.buf.len();
            // SAFETY: the stream is initialized (Raw::start); `next_in` and `next_out` point
            // at `avail_in` readable and `avail_out` writable bytes that outlive the call.
            let ret = unsafe { liblzma_sys::lzma_code(&mut *self.strm, action) };
            let produced = self.buf.len() - self.strm.avail_out;
            let (in_left, out_full) = (self.strm.avail_in, self.strm.avail_out == 0);
            self.strm.next_in = std::ptr::null();
            out.write_all(&self.buf[..produced])?;
            match ret {
                liblzma_sys::LZMA_STREAM_END => return Ok(()),
                liblzma_sys::LZMA_OK if !finish && in_left == 0 && !out_full => return Ok(()),
                liblzma_sys::LZMA_OK => {
                    let consumed = input.len() - in_left;
                    self.strm.next_in = input[consumed..].as_ptr();
                    self.strm.avail_in = in_left;
                }
                e => return Err(io::Error::other(format!("LZMA2 encoding failed (liblzma error {e})"))),
            }
        }
    }

    /// Bytes of LZMA2 data since [`Raw::start`].
    pub(super) fn total_out(&self) -> u64 {
        self.strm.total_out
    }

    /// Keeps the encoder for this thread's next block.
    pub(super) fn idle(self) {
        IDLE.with(|r| {
            let mut r = r.borrow_mut();
            if r.is_none() {
                *r = Some(self);
            }
        });
    }
}

#[allow(unsafe_code)]
impl Drop for Raw {
    fn drop(&mut self) {
        // SAFETY: the stream is LZMA_STREAM_INIT or initialized by liblzma; lzma_end frees
        // what it holds (nothing for the former).
        unsafe { liblzma_sys::lzma_end(&mut *self.strm) }
    }
}
