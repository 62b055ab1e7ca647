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
