//! The compressions a cache can use, as Nix names them.
//!
//! | name  | NAR file        | encoder                                         |
//! |-------|-----------------|-------------------------------------------------|
//! | xz    | `.nar.xz`       | [`crate::xz`]: liblzma's LZMA2 in blocks, CRC64 |
//! | bzip2 | `.nar.bz2`      | libbz2                                          |
//! | zstd  | `.nar.zst`      | libzstd; a large path on `--jobs` workers       |
//! | none  | `.nar`          | -                                               |
//!
//! xz is always cut into blocks the way liblzma's multithreaded encoder cuts it, whether the
//! blocks are compressed here one after another or by the push pipeline on several threads:
//! the bytes of a cache do not depend on `--jobs` or on the machine that pushed it. zstd
//! compresses a path of [`ZSTD_MT_MIN`] bytes of NAR or more in libzstd's multithreaded mode,
//! whose streamed output is the same for any number of workers from one up (zstd tests
//! this); smaller paths, which run in parallel with each other anyway, in its single-threaded
//! mode, which uses a quarter of the memory. Which mode a path gets depends on its NarSize
//! alone, so neither `--jobs` nor the machine changes the bytes.

use std::fmt;
use std::io::{self, BufRead, Read, Write};
use std::str::FromStr;

use thiserror::Error;

/// The NarSize from which zstd compresses a path on several threads. Below it, paths of a
/// closure keep every core busy by themselves, and the multithreaded mode would only cost
/// memory (the medium benchmark closure, whose largest path is 111 MiB, took 0.58 s and
/// 89 MiB with a 32 MiB threshold, 0.49 s and 15 MiB without).
pub const ZSTD_MT_MIN: u64 = 256 << 20;

use crate::xz;

/// A NAR compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Compression {
    #[default]
    Xz,
    Bzip2,
    Zstd,
    None,
}

/// A compression name Nix does not know, or a level out of range.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CompressionError {
    #[error("unknown compression {0:?} (expected xz, bzip2, zstd or none)")]
    Unknown(String),
    #[error("compression level {level} is out of range for {compression} ({min}..={max})")]
    Level { compression: Compression, level: i32, min: i32, max: i32 },
}

impl Compression {
    pub const ALL: [Compression; 4] =
        [Compression::Xz, Compression::Bzip2, Compression::Zstd, Compression::None];

    /// The narinfo `Compression:` value.
    pub fn name(self) -> &'static str {
        match self {
            Compression::Xz => "xz",
            Compression::Bzip2 => "bzip2",
            Compression::Zstd => "zstd",
            Compression::None => "none",
        }
    }

    /// The NAR file's suffix.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::Xz => ".nar.xz",
            Compression::Bzip2 => ".nar.bz2",
            Compression::Zstd => ".nar.zst",
            Compression::None => ".nar",
        }
    }

    /// Valid levels and the default (Nix's defaults: xz 6, bzip2 9, zstd 3).
    pub fn levels(self) -> (i32, i32, i32) {
        match self {
            Compression::Xz => (0, 9, 6),
            Compression::Bzip2 => (1, 9, 9),
            Compression::Zstd => (1, 19, 3),
            Compression::None => (0, 0, 0),
        }
    }

    /// Checks a level, or gives the default.
    pub fn level(self, level: Option<i32>) -> Result<i32, CompressionError> {
        let (min, max, default) = self.levels();
        match level {
            None => Ok(default),
            Some(l) if (min..=max).contains(&l) => Ok(l),
            Some(level) => Err(CompressionError::Level { compression: self, level, min, max }),
        }
    }

    /// Starts compressing into `w`, on this thread, at `level` (checked by
    /// [`Compression::level`]).
    pub fn encoder<W: Write>(self, w: W, level: i32) -> io::Result<Encoder<W>> {
        self.encoder_for(w, level, 0, 1)
    }

    /// Starts compressing `nar_size` bytes of NAR into `w`: zstd uses `jobs - 1` worker
    /// threads (at least one) for a NAR of at least [`ZSTD_MT_MIN`] bytes, the same bytes for
    /// any `jobs`.
    pub fn encoder_for<W: Write>(
        self,
        w: W,
        level: i32,
        nar_size: u64,
        jobs: usize,
    ) -> io::Result<Encoder<W>> {
        Ok(match self {
            Compression::Zstd if nar_size >= ZSTD_MT_MIN => {
                let mut e = zstd::stream::write::Encoder::new(w, level)?;
                // The pushing thread, which reads and hashes the NAR, is one more: jobs in all.
                // (Hashing on a thread of its own as well cost a third more CPU for no gain
                // in wall time on 2 cores: the serial SHA-256 is the limit either way.)
                e.multithread(jobs.saturating_sub(1).clamp(1, 256) as u32)?;
                Encoder::Zstd(e)
            }
            Compression::Xz => Encoder::Xz(xz::StreamWriter::new(xz::Params::new(level as u32)?, w)?),
            Compression::Bzip2 => {
                Encoder::Bzip2(bzip2::write::BzEncoder::new(w, bzip2::Compression::new(level as u32)))
            }
            Compression::Zstd => Encoder::Zstd(zstd::stream::write::Encoder::new(w, level)?),
            Compression::None => Encoder::None(w),
        })
    }

    /// Decompresses all of `r` into `w`; returns the bytes written. zstd reuses one
    /// decompression context per thread: creating and zeroing one cost more than decoding a
    /// small NAR (18% of `sign` over 50,001 of them).
    pub fn decode_to<R: BufRead, W: Write + ?Sized>(self, r: R, w: &mut W) -> io::Result<u64> {
        use std::cell::RefCell;
        use zstd::zstd_safe::{DCtx, ResetDirective};
        thread_local! {
            static DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
        }
        if self != Compression::Zstd {
            return io::copy(&mut self.decoder(r)?, w);
        }
        DCTX.with(|cell| {
            let Ok(mut slot) = cell.try_borrow_mut() else {
                return io::copy(&mut self.decoder(r)?, w);
            };
            let ctx = slot.get_or_insert_with(DCtx::create);
            // Whatever the last use left (an error mid-frame), start clean.
            ctx.reset(ResetDirective::SessionOnly)
                .map_err(|c| io::Error::other(zstd::zstd_safe::get_error_name(c)))?;
            io::copy(&mut zstd::stream::read::Decoder::with_context(r, ctx), w)
        })
    }

    /// Decompresses `r`.
    pub fn decoder<'a, R: BufRead + 'a>(self, r: R) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::Xz => Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(r)),
            Compression::Bzip2 => Box::new(bzip2::bufread::MultiBzDecoder::new(r)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(r)?),
            Compression::None => Box::new(r),
        })
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = CompressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| CompressionError::Unknown(s.to_owned()))
    }
}

/// A running compressor; [`Encoder::finish`] writes the trailer and returns the output.
pub enum Encoder<W: Write> {
    Xz(xz::StreamWriter<W>),
    Bzip2(bzip2::write::BzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
    None(W),
}

impl<W: Write> Encoder<W> {
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::Xz(e) => e.finish(),
            Encoder::Bzip2(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::Xz(e) => e.write(buf),
            Encoder::Bzip2(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::None(w) => w.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::Xz(e) => e.flush(),
            Encoder::Bzip2(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        let mut e = c.encoder(Vec::new(), c.level(None).unwrap()).unwrap();
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn zstd_bytes_do_not_depend_on_jobs() {
        // Compressible but not trivially: a large path's worth of NAR-like bytes.
        // The size declared is what picks the mode; fewer bytes are fed, to keep the test quick.
        let want = 40 << 20;
        let mut data = Vec::with_capacity(want + 64);
        let mut x = 0x9e3779b97f4a7c15u64;
        while data.len() < want {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(format!("entry {} {:x}\n", data.len() % 4099, x % 65536).as_bytes());
        }
        let mt = |jobs| {
            let mut e = Compression::Zstd.encoder_for(Vec::new(), 3, ZSTD_MT_MIN, jobs).unwrap();
            // Written in uneven pieces, as the NAR writer does.
            for piece in data.chunks(100_003) {
                e.write_all(piece).unwrap();
            }
            e.finish().unwrap()
        };
        let one = mt(1);
        assert!(mt(2) == one && mt(8) == one, "zstd's output depends on its workers");
        let mut back = Vec::new();
        Compression::Zstd.decoder(&one[..]).unwrap().read_to_end(&mut back).unwrap();
        assert!(back == data);
        // Below the threshold, single-threaded, whatever --jobs says.
        let small = &data[..1 << 20];
        let st = |jobs| {
            let mut e = Compression::Zstd.encoder_for(Vec::new(), 3, small.len() as u64, jobs).unwrap();
            e.write_all(small).unwrap();
            e.finish().unwrap()
        };
        assert!(st(1) == st(8) && st(1) == compress(Compression::Zstd, small));
    }

    #[test]
    fn decode_to_reuses_a_context_and_survives_a_bad_stream() {
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| (i % 97).to_le_bytes()).collect();
        for c in Compression::ALL {
            let z = compress(c, &data);
            // A stream cut short fails, and the next decode on this thread is still right.
            assert!(c == Compression::None || c.decode_to(&z[..z.len() / 2], &mut Vec::new()).is_err());
            for _ in 0..2 {
                let mut back = Vec::new();
                assert_eq!(c.decode_to(&z[..], &mut back).unwrap(), data.len() as u64);
                assert!(back == data, "{c}");
            }
        }
    }

    #[test]
    fn round_trip() {
        let data: Vec<u8> = (0..1_000_000u32).flat_map(|i| (i % 251).to_le_bytes()).collect();
        for c in Compression::ALL {
            let one = compress(c, &data);
            let mut back = Vec::new();
            c.decoder(&one[..]).unwrap().read_to_end(&mut back).unwrap();
            assert_eq!(back, data, "{c}");
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
        }
    }

    #[test]
    fn levels() {
        assert_eq!(Compression::Xz.level(None), Ok(6));
        assert!(Compression::Xz.level(Some(10)).is_err());
        assert!(Compression::Zstd.level(Some(19)).is_ok());
        assert!("lz4".parse::<Compression>().is_err());
    }
}
