//! The .xz container, written one block at a time so that the blocks of one NAR can be
//! compressed on different threads and put together in order.
//!
//! A stream ([the .xz file format](https://tukaani.org/xz/xz-file-format.txt)) is
//!
//! ```text
//! stream = header block* index footer
//! header = FD 37 7A 58 5A 00 | flags 00 04 (CRC64) | CRC32(flags)
//! block  = block-header | LZMA2 data | zero padding to 4 | CRC64(uncompressed)
//! index  = 00 | count | (unpadded size, uncompressed size)* | zero padding to 4 | CRC32
//! footer = CRC32 | index size / 4 - 1 (u32 LE) | flags 00 04 | "YZ"
//! ```
//!
//! Every block header records both sizes and is as long as the header of the largest
//! possible block, padded with zeros: the layout of liblzma's multithreaded encoder. With the
//! same preset and block size (three dictionaries, at least 1 MiB), a stream made here is
//! byte for byte what `xz -T` and Nix's `parallel-compression` make, whichever thread
//! compressed which block. The LZMA2 data itself comes from liblzma's raw encoder.
//!
//! Like liblzma's multithreaded encoder, a block whose compressed form does not fit the
//! buffer it reserves (`lzma_block_buffer_bound64` of the block size) is stored instead
//! ([`Params::would_store`], [`BlockEncoder::stored`]): a header of its own size (exact
//! sizes, the smallest dictionary) and the input in 64 KiB uncompressed LZMA2 chunks, as
//! `lzma_block_uncomp_encode` writes it. Incompressible data (random bytes, compressed
//! files) comes out so, byte for byte.

use std::io::{self, Write};

use crc::{CRC_32_ISO_HDLC, CRC_64_XZ, Crc, Table};
use liblzma::stream::{Filters, LzmaOptions};

mod raw;

use raw::Raw;

static CRC32: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISO_HDLC);
static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);

const MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0];
const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Stream flags: no reserved bits, check type 0x04 (CRC64).
const FLAGS: [u8; 2] = [0, 0x04];
const CHECK_SIZE: u64 = 8;
const LZMA2_ID: u8 = 0x21;

/// The compression settings of a stream: an xz preset and the block size that goes with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    level: u32,
    block_size: u64,
}

impl Params {
    /// Preset `level` (0..=9), blocks of three dictionaries as liblzma's multithreaded encoder
    /// cuts them.
    pub fn new(level: u32) -> io::Result<Params> {
        let block_size = filters(level)?.mt_block_size();
        if block_size == 0 {
            return Err(io::Error::other(format!("no block size for xz level {level}")));
        }
        Ok(Params { level, block_size })
    }

    /// Bytes of input per block; only the last block of a stream is shorter.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// The blocks of an input of `len` bytes, as (offset, length).
    pub fn blocks(&self, len: u64) -> impl Iterator<Item = (u64, u64)> + use<> {
        let bs = self.block_size;
        (0..len.div_ceil(bs)).map(move |i| (i * bs, bs.min(len - i * bs)))
    }

    /// The header of a compressed block is this long: the length of the header of a block
    /// whose sizes are the largest possible (liblzma reserves it before compressing, then
    /// pads).
    fn header_size(&self) -> u64 {
        header_len(block_bound(self.block_size), self.block_size)
    }

    /// Whether liblzma's multithreaded encoder stores block `b` uncompressed: its header,
    /// data, padding and check do not fit the buffer of `lzma_block_buffer_bound64(block
    /// size)` bytes it compresses into.
    pub fn would_store(&self, b: &Block) -> bool {
        !b.stored
            && self.header_size() + b.compressed.next_multiple_of(4) + CHECK_SIZE
                > block_bound(self.block_size)
    }

    /// Whether a stream of `len` bytes can have a block that is stored: only when a block is
    /// more than half full, since LZMA2 never grows its input by more than a fraction of a
    /// percent. A shorter stream can be written by [`StreamWriter`], which keeps no input.
    pub fn may_store(&self, len: u64) -> bool {
        len > self.block_size / 2
    }

    fn header_of(&self, b: &Block) -> u64 {
        if b.stored { header_len(b.compressed, b.uncompressed) } else { self.header_size() }
    }

    /// The LZMA2 filter properties: the dictionary size in one byte.
    fn dict_byte(&self) -> u8 {
        let dict = PRESET_DICT[self.level as usize];
        (0u8..40).find(|&p| (2u64 | u64::from(p & 1)) << (p / 2 + 11) >= u64::from(dict)).unwrap_or(40)
    }
}

/// Dictionary sizes of the xz presets 0..=9 (`xz --help` and liblzma's `lzma_lzma_preset`).
const PRESET_DICT: [u32; 10] =
    [256 << 10, 1 << 20, 2 << 20, 4 << 20, 4 << 20, 8 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20];

fn filters(level: u32) -> io::Result<Filters> {
    let opts = LzmaOptions::new_preset(level).map_err(io::Error::other)?;
    let mut f = Filters::new();
    f.lzma2(&opts);
    Ok(f)
}

/// Bytes of input in one uncompressed LZMA2 chunk, at most.
const CHUNK: u64 = 1 << 16;

/// liblzma's `lzma2_bound`: `n` bytes as uncompressed LZMA2 chunks (3-byte headers) and the
/// end marker.
fn lzma2_bound(n: u64) -> u64 {
    n + n.div_ceil(CHUNK) * 3 + 1
}

/// liblzma's `lzma_block_buffer_bound64`: the most a block of `n` input bytes can take,
/// headers included (incompressible data is stored in 64 KiB chunks with 3-byte headers).
fn block_bound(n: u64) -> u64 {
    const HEADERS_BOUND: u64 = (1 + 1 + 2 * 9 + 3 + 4 + 64 + 3) & !3;
    HEADERS_BOUND + ((lzma2_bound(n) + 3) & !3)
}

/// The length of a block header that records both sizes and one LZMA2 filter.
fn header_len(compressed: u64, uncompressed: u64) -> u64 {
    let size = 1 + 1 + 4 + vli_len(compressed) + vli_len(uncompressed) + 3;
    (size + 3) & !3
}

fn vli_len(mut n: u64) -> u64 {
    let mut len = 1;
    while n >= 0x80 {
        n >>= 7;
        len += 1;
    }
    len
}

fn put_vli(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

/// What the container needs to know of one compressed block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub uncompressed: u64,
    /// Bytes of LZMA2 data, without header, padding and check.
    pub compressed: u64,
    pub crc64: u64,
    /// Stored as uncompressed chunks (see [`Params::would_store`]).
    pub stored: bool,
}

/// The 12-byte stream header.
pub fn stream_header() -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(&FLAGS);
    out.extend_from_slice(&CRC32.checksum(&FLAGS).to_le_bytes());
    out
}

/// The header that goes before a block's LZMA2 data.
pub fn block_header(params: &Params, b: &Block) -> Vec<u8> {
    let size = params.header_of(b);
    let mut out = vec![(size / 4 - 1) as u8, 0xC0];
    put_vli(&mut out, b.compressed);
    put_vli(&mut out, b.uncompressed);
    // A stored block names the smallest dictionary, 4 KiB (property byte 0).
    let dict = if b.stored { 0 } else { params.dict_byte() };
    out.extend_from_slice(&[LZMA2_ID, 1, dict]);
    out.resize(size as usize - 4, 0);
    let crc = CRC32.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// What goes after a block's LZMA2 data: padding and the check.
pub fn block_trailer(b: &Block) -> Vec<u8> {
    let mut out = vec![0u8; (4 - b.compressed % 4) as usize % 4];
    out.extend_from_slice(&b.crc64.to_le_bytes());
    out
}

/// The index of `blocks` and the stream footer.
pub fn index_and_footer(params: &Params, blocks: &[Block]) -> Vec<u8> {
    let mut out = vec![0u8];
    put_vli(&mut out, blocks.len() as u64);
    for b in blocks {
        put_vli(&mut out, params.header_of(b) + b.compressed + CHECK_SIZE);
        put_vli(&mut out, b.uncompressed);
    }
    pad4(&mut out);
    let crc = CRC32.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    let backward = (out.len() / 4 - 1) as u32;
    let mut tail = backward.to_le_bytes().to_vec();
    tail.extend_from_slice(&FLAGS);
    out.extend_from_slice(&CRC32.checksum(&tail).to_le_bytes());
    out.extend_from_slice(&tail);
    out.extend_from_slice(&FOOTER_MAGIC);
    out
}

/// Compresses the input of one block into raw LZMA2 data in `W`, or stores it.
pub struct BlockEncoder<W: Write> {
    inner: Inner<W>,
    crc: crc::Digest<'static, u64, Table<16>>,
    uncompressed: u64,
}

enum Inner<W: Write> {
    Lzma2 {
        raw: Raw,
        out: W,
    },
    /// Uncompressed LZMA2 chunks of a block of `len` bytes.
    Stored {
        out: W,
        len: u64,
    },
}

/// Bytes of LZMA2 data taken from liblzma per call.
impl<W: Write> BlockEncoder<W> {
    pub fn new(params: &Params, out: W) -> io::Result<Self> {
        let inner = Inner::Lzma2 { raw: Raw::start(params.level)?, out };
        Ok(BlockEncoder { inner, crc: CRC64.digest(), uncompressed: 0 })
    }

    /// An encoder that stores the `len` bytes of a block uncompressed, as
    /// `lzma_block_uncomp_encode` does: for a block that [would be stored](Params::would_store).
    pub fn stored(out: W, len: u64) -> Self {
        BlockEncoder { inner: Inner::Stored { out, len }, crc: CRC64.digest(), uncompressed: 0 }
    }

    /// Ends the LZMA2 data; returns the output and the block's sizes and check.
    pub fn finish(self) -> io::Result<(W, Block)> {
        let (uncompressed, crc64) = (self.uncompressed, self.crc.finalize());
        match self.inner {
            Inner::Lzma2 { mut raw, mut out } => {
                raw.code(&[], true, &mut out)?;
                let compressed = raw.total_out();
                raw.idle();
                Ok((out, Block { uncompressed, compressed, crc64, stored: false }))
            }
            Inner::Stored { mut out, len } => {
                if uncompressed != len {
                    return Err(io::Error::other(format!(
                        "a stored block of {len} bytes got {uncompressed}"
                    )));
                }
                out.write_all(&[0])?;
                Ok((out, Block { uncompressed, compressed: lzma2_bound(len), crc64, stored: true }))
            }
        }
    }
}

impl<W: Write> Write for BlockEncoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = match &mut self.inner {
            Inner::Lzma2 { raw, out } => {
                raw.code(buf, false, out)?;
                buf.len()
            }
            Inner::Stored { out, len } => {
                let pos = self.uncompressed;
                let left = len.saturating_sub(pos);
                if left == 0 {
                    return Err(io::Error::other("more input than the stored block's length"));
                }
                // A chunk header at each 64 KiB: the first resets the dictionary.
                let in_chunk = (CHUNK - pos % CHUNK).min(left);
                if pos.is_multiple_of(CHUNK) {
                    let size = in_chunk - 1;
                    out.write_all(&[if pos == 0 { 1 } else { 2 }, (size >> 8) as u8, size as u8])?;
                }
                let n = buf.len().min(in_chunk as usize);
                out.write_all(&buf[..n])?;
                n
            }
        };
        self.crc.update(&buf[..n]);
        self.uncompressed += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.inner {
            Inner::Lzma2 { out, .. } => out.flush(),
            Inner::Stored { out, .. } => out.flush(),
        }
    }
}

/// A whole stream on one thread: cuts the input into blocks, each held compressed in memory
/// until it is complete (its header records its size).
pub struct StreamWriter<W: Write> {
    params: Params,
    out: W,
    current: Option<BlockEncoder<Vec<u8>>>,
    blocks: Vec<Block>,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(params: Params, mut out: W) -> io::Result<Self> {
        out.write_all(&stream_header())?;
        Ok(StreamWriter { params, out, current: None, blocks: Vec::new() })
    }

    fn end_block(&mut self) -> io::Result<()> {
        if let Some(enc) = self.current.take() {
            let (data, b) = enc.finish()?;
            self.out.write_all(&block_header(&self.params, &b))?;
            self.out.write_all(&data)?;
            self.out.write_all(&block_trailer(&b))?;
            self.blocks.push(b);
        }
        Ok(())
    }

    /// Writes the last block, the index and the footer; returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.end_block()?;
        self.out.write_all(&index_and_footer(&self.params, &self.blocks))?;
        Ok(self.out)
    }
}

impl<W: Write> Write for StreamWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let enc = match &mut self.current {
            Some(e) => e,
            None => self.current.insert(BlockEncoder::new(&self.params, Vec::new())?),
        };
        let room = (self.params.block_size - enc.uncompressed) as usize;
        let n = enc.write(&buf[..buf.len().min(room)])?;
        if enc.uncompressed == self.params.block_size {
            self.end_block()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// liblzma's own multithreaded encoder, the reference.
    fn liblzma_mt(data: &[u8], level: u32, threads: u32) -> Vec<u8> {
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(threads)
            .preset(level)
            .check(liblzma::stream::Check::Crc64)
            .encoder()
            .unwrap();
        let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn ours(data: &[u8], level: u32) -> Vec<u8> {
        let mut w = StreamWriter::new(Params::new(level).unwrap(), Vec::new()).unwrap();
        // Odd-sized writes, to cross block boundaries mid-call.
        for chunk in data.chunks(100_003) {
            w.write_all(chunk).unwrap();
        }
        w.finish().unwrap()
    }

    /// Text-like data with long repeats and some noise.
    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x2545F4914F6CDD1Du64;
        let words: Vec<String> = (0..500).map(|i| format!("word{i} ")).collect();
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(17) {
                out.extend_from_slice(&x.to_le_bytes());
            } else {
                out.extend_from_slice(words[(x % 500) as usize].as_bytes());
            }
        }
        out.truncate(len);
        out
    }

    #[test]
    fn crc_check_values() {
        assert_eq!(CRC32.checksum(b"123456789"), 0xCBF43926);
        assert_eq!(CRC64.checksum(b"123456789"), 0x995DC9BBDF1939FA);
    }

    #[test]
    fn equals_liblzma_multithreaded_output() {
        // Level 0 has 1 MiB blocks: several blocks, a short last one, and one exactly full.
        let data = sample(3 << 20);
        for (len, level) in [(0, 0), (1, 6), (1000, 6), (300_000, 9), (3 << 20, 0), ((5 << 20) / 2, 0)] {
            let d = &data[..len];
            let want = liblzma_mt(d, level, 1);
            assert_eq!(want, liblzma_mt(d, level, 3), "liblzma itself depends on threads");
            assert_eq!(ours(d, level), want, "{len} bytes at level {level}");
        }
        for level in 0..=9 {
            assert_eq!(ours(b"x", level), liblzma_mt(b"x", level, 1), "dictionary byte of level {level}");
        }
    }

    #[test]
    fn a_kept_encoder_writes_what_a_new_one_writes() {
        // One thread's encoder through levels and sizes, against a new raw encoder each time;
        // a block abandoned half-way (its output failed) leaves nothing behind either.
        let data = sample(3 << 20);
        let fresh = |d: &[u8], level: u32| {
            let stream = liblzma::stream::Stream::new_raw_encoder(&filters(level).unwrap()).unwrap();
            let mut e = liblzma::write::XzEncoder::new_stream(Vec::new(), stream);
            e.write_all(d).unwrap();
            e.finish().unwrap()
        };
        let mut abandoned = BlockEncoder::new(&Params::new(6).unwrap(), Vec::new()).unwrap();
        abandoned.write_all(&data[..1 << 20]).unwrap();
        drop(abandoned);
        for (len, level) in [(3 << 20, 6), (1, 0), (3 << 20, 6), (100_000, 9), (0, 6), (3 << 20, 1)] {
            let d = &data[..len];
            let mut e = BlockEncoder::new(&Params::new(level).unwrap(), Vec::new()).unwrap();
            for piece in d.chunks(77_777) {
                e.write_all(piece).unwrap();
            }
            let (out, block) = e.finish().unwrap();
            assert_eq!(out, fresh(d, level), "{len} bytes at level {level}");
            assert_eq!((block.uncompressed, block.compressed), (len as u64, out.len() as u64));
        }
    }

    #[test]
    fn blocks_assemble_in_any_order() {
        let params = Params::new(0).unwrap();
        let data = sample((5 << 20) / 2);
        let ranges: Vec<_> = params.blocks(data.len() as u64).collect();
        assert_eq!(ranges, [(0, 1 << 20), (1 << 20, 1 << 20), (2 << 20, 1 << 19)]);
        // Compress the last block first, as another thread might.
        let mut done: Vec<_> = ranges
            .iter()
            .rev()
            .map(|&(off, len)| {
                let mut e = BlockEncoder::new(&params, Vec::new()).unwrap();
                e.write_all(&data[off as usize..(off + len) as usize]).unwrap();
                e.finish().unwrap()
            })
            .collect();
        done.reverse();
        let mut out = stream_header();
        for (bytes, b) in &done {
            out.extend(block_header(&params, b));
            out.extend(bytes);
            out.extend(block_trailer(b));
        }
        let blocks: Vec<Block> = done.iter().map(|(_, b)| *b).collect();
        out.extend(index_and_footer(&params, &blocks));
        assert_eq!(out, liblzma_mt(&data, 0, 2));
        let mut back = Vec::new();
        liblzma::read::XzDecoder::new(&out[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    /// Random bytes: no LZMA2 encoding of them is smaller than the input.
    fn noise(len: usize) -> Vec<u8> {
        let mut x = 0x9E3779B97F4A7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// Blocks as push makes them: compressed, or stored when liblzma would store them.
    fn by_blocks(data: &[u8], level: u32) -> (Vec<u8>, usize) {
        let params = Params::new(level).unwrap();
        let mut out = stream_header();
        let mut blocks = Vec::new();
        for (off, len) in params.blocks(data.len() as u64) {
            let input = &data[off as usize..(off + len) as usize];
            let mut e = BlockEncoder::new(&params, Vec::new()).unwrap();
            e.write_all(input).unwrap();
            let (mut bytes, mut b) = e.finish().unwrap();
            if params.would_store(&b) {
                let mut s = BlockEncoder::stored(Vec::new(), len);
                for piece in input.chunks(10_007) {
                    s.write_all(piece).unwrap();
                }
                (bytes, b) = s.finish().unwrap();
            }
            out.extend(block_header(&params, &b));
            out.extend(bytes);
            out.extend(block_trailer(&b));
            blocks.push(b);
        }
        out.extend(index_and_footer(&params, &blocks));
        (out, blocks.iter().filter(|b| b.stored).count())
    }

    #[test]
    fn incompressible_blocks_are_stored_as_liblzma_stores_them() {
        // 24 MiB blocks (levels 5 to 9) of noise overflow liblzma's buffer by a few dozen
        // bytes (12 MiB ones, at level 4, fit); a short last block does not.
        let data = noise((24 << 20) + (1 << 20) + 12_345);
        let (ours, stored) = by_blocks(&data, 5);
        assert_eq!(stored, 1, "the full block of noise is stored, the short last one is not");
        assert_eq!(ours, liblzma_mt(&data, 5, 2));
        let mut back = Vec::new();
        liblzma::read::XzDecoder::new(&ours[..]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        // Compressible data never is.
        let text = sample(3 << 20);
        assert_eq!(by_blocks(&text, 0), (liblzma_mt(&text, 0, 2), 0));
    }

    #[test]
    fn header_layout() {
        let p = Params::new(6).unwrap();
        assert_eq!(p.block_size(), 24 << 20);
        assert_eq!(p.header_size(), 20);
        assert_eq!(p.dict_byte(), 22);
        assert_eq!(Params::new(0).unwrap().header_size(), 16);
        assert_eq!(vli_len(0x7F), 1);
        assert_eq!(vli_len(0x80), 2);
        let mut v = Vec::new();
        put_vli(&mut v, 300);
        assert_eq!(v, [0xAC, 0x02]);
    }
}
