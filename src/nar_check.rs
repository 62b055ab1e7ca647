//! Whether a NAR file in the cache is what its narinfo says: used by verify, by push's
//! `--repair` and by sign, which must not vouch for a NAR they have not checked.

use std::io::{self, BufReader, Read};

use crate::cache::{Cache, FileProblem};
use crate::compression::Compression;
use crate::hash::{HashingReader, HashingWriter, NixHash};
use crate::narinfo::NarInfo;

/// The NAR a compressed file of `file_size` bytes holds: its size and hash, read through
/// `file` once.
pub fn decoded_nar(compression: Compression, file: impl Read, file_size: u64) -> io::Result<(u64, NixHash)> {
    // No more buffer than the file needs: a megabyte each for 50,000 tiny NARs is a megabyte
    // of page faults each.
    let buffer = file_size.clamp(8 << 10, 1 << 20) as usize;
    let mut nar = HashingWriter::new(io::sink());
    compression.decode_to(BufReader::with_capacity(buffer, file), &mut nar)?;
    let (_, nar_size, nar_hash) = nar.finish();
    Ok((nar_size, nar_hash))
}

/// [`decoded_nar`] of an xz file on up to `threads` threads (liblzma decodes the blocks of a
/// multi-block file at once; nixcache and Nix's parallel compression write such files): what
/// a receiver checks an upload with, one NAR at a time, so the check of a large NAR does not
/// run on one core. `None` where the threaded decoder cannot say (not xz, one thread, or it
/// failed: a file of several concatenated streams, say): the caller asks [`decoded_nar`].
pub fn decoded_nar_threaded(
    compression: Compression,
    file: impl Read,
    file_size: u64,
    threads: u32,
) -> Option<(u64, NixHash)> {
    if compression != Compression::Xz || threads < 2 || file_size < (1 << 20) {
        return None;
    }
    let stream = liblzma::stream::MtStreamBuilder::new()
        .threads(threads)
        // Fewer threads rather than more than this much memory (a block's input and output
        // per thread); and no limit that would fail a file.
        .memlimit_threading(512 << 20)
        .memlimit_stop(u64::MAX)
        .decoder()
        .ok()?;
    let mut decoder =
        liblzma::bufread::XzDecoder::new_stream(BufReader::with_capacity(1 << 20, file), stream);
    let mut nar = HashingWriter::new(io::sink());
    io::copy(&mut decoder, &mut nar).ok()?;
    // Without `CONCATENATED` the decoder stops after one stream: what follows is not known.
    if decoder.total_in() != file_size {
        return None;
    }
    let (_, nar_size, nar_hash) = nar.finish();
    Some((nar_size, nar_hash))
}

/// A file that could not be read as it is: its kind of problem and what to do.
pub fn file_problem(e: &FileProblem) -> (&'static str, String) {
    let kind = match e {
        FileProblem::NotRegular(_) => "not-regular-file",
        FileProblem::TooLarge { .. } => "too-large",
        FileProblem::NotText | FileProblem::Io(_) => "unreadable",
    };
    let message = format!(
        "{} (not read; `nixcache push` replaces it, `nixcache gc` removes it)",
        crate::util::error_chain(e)
    );
    (kind, message)
}

/// Streams the NAR file once: FileSize and FileHash on the way in, NarSize and NarHash out
/// of the decompressor (unless `decompress` is off: then only the file's size and hash).
/// Reports each mismatch through `problem`; returns the NAR bytes checked.
pub fn check_nar(
    cache: &Cache,
    ni: &NarInfo,
    decompress: bool,
    problem: &mut impl FnMut(&'static str, String),
) -> u64 {
    let Ok(compression) = ni.compression.parse::<Compression>() else {
        problem("compression", format!("unknown compression {:?}", ni.compression));
        return 0;
    };
    let Some(rel) = ni.nar_file() else {
        problem("nar-url", format!("its URL {:?} does not name a file in the cache", ni.url));
        return 0;
    };
    let (f, size) = match cache.open_file(&rel) {
        Ok(Some(f)) => f,
        Ok(None) => {
            problem(
                "missing-nar",
                format!("its NAR {rel} is missing (`nixcache push` of the path repairs it)"),
            );
            return 0;
        }
        Err(e) => {
            let (kind, message) = file_problem(&e);
            problem(kind, format!("its NAR {rel} {message}"));
            return 0;
        }
    };
    if let Some(want) = ni.file_size
        && want != size
    {
        problem("file-size", format!("{rel} is {size} bytes, the narinfo says {want}"));
        return 0;
    }
    let mut file = HashingReader::new(f);
    let decoded = if decompress { decoded_nar(compression, &mut file, size).map(Some) } else { Ok(None) };
    let decoded = match decoded {
        Ok(d) => d,
        Err(e) => {
            problem("nar-corrupt", format!("{rel} does not decompress as {compression}: {e}"));
            return 0;
        }
    };
    // Hash whatever the decoder left unread, so FileHash covers the whole file.
    if let Err(e) = io::copy(&mut file, &mut io::sink()) {
        problem("unreadable", format!("cannot read {rel}: {e}"));
        return 0;
    }
    let (_, file_hash) = file.finish();
    if let Some(want) = ni.file_hash
        && want != file_hash
    {
        problem("file-hash", format!("{rel} hashes to {file_hash}, the narinfo says {want}"));
    }
    let Some((nar_size, nar_hash)) = decoded else { return 0 };
    if nar_size != ni.nar_size {
        problem("nar-size", format!("its NAR is {nar_size} bytes, the narinfo says {}", ni.nar_size));
    } else if nar_hash != ni.nar_hash {
        problem("nar-hash", format!("its NAR hashes to {nar_hash}, the narinfo says {}", ni.nar_hash));
    }
    nar_size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threaded_check_agrees_and_declines_what_it_cannot_vouch_for() {
        // 6 MiB that compress little, in 1 MiB blocks: a file the threads share.
        let mut data = Vec::with_capacity(6 << 20);
        let mut x: u64 = 0x9e3779b97f4a7c15;
        while data.len() < 6 << 20 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes()[..3]);
            data.extend_from_slice(b"nix");
        }
        let stream = liblzma::stream::MtStreamBuilder::new()
            .threads(2)
            .block_size(1 << 20)
            .preset(1)
            .encoder()
            .unwrap();
        let mut xz = Vec::new();
        io::copy(&mut liblzma::read::XzEncoder::new_stream(&data[..], stream), &mut xz).unwrap();
        assert!(xz.len() > 1 << 20, "{}", xz.len());
        let one = decoded_nar(Compression::Xz, &xz[..], xz.len() as u64).unwrap();
        assert_eq!(decoded_nar_threaded(Compression::Xz, &xz[..], xz.len() as u64, 2), Some(one));
        assert_eq!(one.0, data.len() as u64);
        // Two streams one after the other: one thread reads both; the threaded one declines.
        let mut two = xz.clone();
        two.extend_from_slice(&xz);
        let both = decoded_nar(Compression::Xz, &two[..], two.len() as u64).unwrap();
        assert_eq!(both.0, 2 * data.len() as u64);
        assert_eq!(decoded_nar_threaded(Compression::Xz, &two[..], two.len() as u64, 2), None);
        // Not xz, one thread, a small file: not its to say.
        assert_eq!(decoded_nar_threaded(Compression::Zstd, &xz[..], xz.len() as u64, 2), None);
        assert_eq!(decoded_nar_threaded(Compression::Xz, &xz[..], xz.len() as u64, 1), None);
        // A corrupt file: declined, and the one-thread check says what is wrong.
        let mut bad = xz.clone();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        assert_eq!(decoded_nar_threaded(Compression::Xz, &bad[..], bad.len() as u64, 2), None);
        assert!(decoded_nar(Compression::Xz, &bad[..], bad.len() as u64).is_err());
    }
}
