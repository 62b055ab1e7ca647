//! The filesystem side of the NAR: serialize a path as `nix-store --dump` does.
//!
//! Symlinks are never followed; directory entries are sorted by raw bytes; a file is
//! executable when its owner-execute bit is set; files are read with `read()`, and a file
//! whose size changes while it is read is an error, never a silently different NAR.

use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::listing::Entry;
use super::writer::{Directory, NarWriter, Node};

/// A filesystem object that could not be serialized.
#[derive(Debug, Error)]
#[error("cannot archive {}", path.display())]
pub struct DumpError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> DumpError + '_ {
    move |source| DumpError { path: path.to_owned(), source }
}

/// Writes the NAR of `path` to `w`. Returns the writer.
pub fn dump<W: Write>(path: &Path, w: W) -> Result<W, DumpError> {
    dump_listing(path, w, false).map(|(w, _)| w)
}

/// Writes the NAR of `path` to `w`, and records its listing when `listing` is set (its
/// memory grows with the number of files, so only on request).
pub fn dump_listing<W: Write>(path: &Path, w: W, listing: bool) -> Result<(W, Option<Entry>), DumpError> {
    let mut nar = NarWriter::new(w);
    let root = nar.root().map_err(at(path))?;
    let entry = dump_node(path, root, listing)?;
    Ok((nar.into_inner(), entry))
}

/// A directory's entry names, sorted by bytes as in a NAR.
fn sorted_names(path: &Path) -> Result<Vec<OsString>, DumpError> {
    let mut names: Vec<_> = fs::read_dir(path)
        .map_err(at(path))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(at(path))?;
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Writes the entries `names` of the directory `path` into `dir`.
fn write_entries<'n, W: Write>(
    path: &Path,
    dir: &mut Directory<'_, W>,
    names: impl Iterator<Item = &'n OsString>,
    listing: bool,
) -> Result<Vec<(Vec<u8>, Entry)>, DumpError> {
    let mut entries = Vec::new();
    for name in names {
        let child = path.join(name);
        let entry = dir.entry(name.as_bytes()).map_err(at(&child))?;
        if let Some(e) = dump_node(&child, entry, listing)? {
            entries.push((name.as_bytes().to_vec(), e));
        }
    }
    Ok(entries)
}

fn dump_node<W: Write>(path: &Path, node: Node<'_, W>, listing: bool) -> Result<Option<Entry>, DumpError> {
    let meta = fs::symlink_metadata(path).map_err(at(path))?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(at(path))?;
        let target = target.as_os_str().as_bytes();
        node.symlink(target).map_err(at(path))?;
        Ok(listing.then(|| Entry::Symlink { target: target.to_vec() }))
    } else if ft.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        let mut f = File::open(path).map_err(at(path))?;
        let size = meta.len();
        let nar_offset = node.file(executable, size, &mut f).map_err(at(path))?;
        Ok(listing.then_some(Entry::Regular { size, executable, nar_offset }))
    } else if ft.is_dir() {
        let names = sorted_names(path)?;
        let mut dir = node.directory().map_err(at(path))?;
        let entries = write_entries(path, &mut dir, names.iter(), listing)?;
        dir.close().map_err(at(path))?;
        Ok(listing.then_some(Entry::Directory(entries)))
    } else {
        Err(DumpError {
            path: path.to_owned(),
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                "not a regular file, directory or symlink (a NAR cannot hold it)",
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn sorts_by_bytes_and_keeps_modes() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        fs::create_dir(&root).unwrap();
        for n in ["b", "B", "a", "ä", "_"] {
            fs::write(root.join(n), n).unwrap();
        }
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o755)).unwrap();
        symlink("../nowhere", root.join("l")).unwrap();
        let nar = dump(&root, Vec::new()).unwrap();
        let text = String::from_utf8_lossy(&nar);
        let order: Vec<usize> = ["B", "_", "a", "b", "l", "ä"]
            .iter()
            .map(|n| {
                text.find(&format!("name\0\0\0\0\x01\0\0\0\0\0\0\0{n}"))
                    .or_else(|| text.find(&format!("\0{n}\0")))
                    .unwrap()
            })
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert!(text.contains("executable"));
        assert!(text.contains("../nowhere"));
    }

    #[test]
    fn refuses_special_files() {
        let t = tempfile::tempdir().unwrap();
        let sock = t.path().join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = dump(&sock, Vec::new()).unwrap_err();
        assert_eq!(err.path, sock);
    }
}
