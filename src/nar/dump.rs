//! The filesystem side of the NAR: serialize a path as `nix-store --dump` does.
//!
//! Symlinks are never followed; directory entries are sorted by raw bytes; a file is
//! executable when its owner-execute bit is set; files are read with `read()`, and a file
//! whose size changes while it is read is an error, never a silently different NAR.
//!
//! A range of the NAR (one xz block's input) is made either by walking from the start and
//! skipping (seeking over) what lies before it ([`dump_range`]), or from a [`ResumePoint`]
//! recorded by [`Marks`] in an earlier pass ([`dump_range_at`]): the start of the last
//! directory entry at or before the range, reached by listing only the directories on the
//! way to it. A path of 200,000 small files is then not walked again for every block.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::listing::Entry;
use super::writer::{Directory, NarWriter, Node, is_window_end};

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

/// Where a NAR can be resumed without walking what comes before: the start of a directory
/// entry (`pos`, before the previous entry's closing token) and the names of the entries
/// leading to it from the root, the entry itself last. An empty chain is the NAR's start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResumePoint {
    pub pos: u64,
    pub chain: Vec<Vec<u8>>,
}

/// Records, while a NAR is written, the [`ResumePoint`] of each of a set of offsets: the
/// last entry start at or before it. Memory: one chain of names per offset. A point is
/// final, and handed to the callback, as soon as the NAR has passed its offset and a later
/// entry starts (or the NAR ends), so work on a range can start before the pass is over.
pub struct Marks<'a> {
    /// Increasing.
    offsets: Vec<u64>,
    /// Offsets before `next` are passed: their points are final.
    next: usize,
    points: Vec<ResumePoint>,
    current: ResumePoint,
    /// Names of the entries being written, outermost first.
    stack: Vec<Vec<u8>>,
    on_point: Option<OnPoint<'a>>,
}

/// Told each offset's index and point as it becomes final.
pub type OnPoint<'a> = &'a mut dyn FnMut(usize, &ResumePoint);

impl<'a> Marks<'a> {
    pub fn new(offsets: Vec<u64>) -> Self {
        debug_assert!(offsets.windows(2).all(|w| w[0] < w[1]));
        let points = vec![ResumePoint::default(); offsets.len()];
        Marks { offsets, next: 0, points, current: ResumePoint::default(), stack: Vec::new(), on_point: None }
    }

    /// Calls `f(k, point)` once for each offset `k`, as its point becomes final.
    pub fn on_point(mut self, f: OnPoint<'a>) -> Self {
        self.on_point = Some(f);
        self
    }

    /// The point of the next offset is final.
    fn settle(&mut self) {
        let k = self.next;
        self.points[k] = self.current.clone();
        if let Some(f) = self.on_point.as_mut() {
            f(k, &self.points[k]);
        }
        self.next += 1;
    }

    /// The entry `name` of the directory being written starts at `pos`.
    fn entry(&mut self, pos: u64, name: &[u8]) {
        while self.offsets.get(self.next).is_some_and(|&o| o < pos) {
            self.settle();
        }
        if self.next < self.offsets.len() {
            let mut chain = self.stack.clone();
            chain.push(name.to_vec());
            self.current = ResumePoint { pos, chain };
        }
    }

    /// The point of each offset, in order. Call once the whole NAR is written.
    pub fn finish(mut self) -> Vec<ResumePoint> {
        while self.next < self.offsets.len() {
            self.settle();
        }
        self.points
    }
}

/// Writes the NAR of `path` to `w`. Returns the writer.
pub fn dump<W: Write>(path: &Path, w: W) -> Result<W, DumpError> {
    dump_listing(path, w, false).map(|(w, _)| w)
}

/// Writes the NAR of `path` to `w`, and records its listing when `listing` is set (its
/// memory grows with the number of files, so only on request).
pub fn dump_listing<W: Write>(path: &Path, w: W, listing: bool) -> Result<(W, Option<Entry>), DumpError> {
    dump_marked(path, w, listing, None)
}

/// [`dump_listing`] that also records resume points in `marks`.
pub fn dump_marked<W: Write>(
    path: &Path,
    w: W,
    listing: bool,
    marks: Option<&mut Marks<'_>>,
) -> Result<(W, Option<Entry>), DumpError> {
    let mut nar = NarWriter::new(w);
    let root = nar.root().map_err(at(path))?;
    let entry = dump_node(path, root, listing, marks)?;
    Ok((nar.into_inner(), entry))
}

/// Writes the bytes in `range` of the NAR of `path` to `w`: one block's input, made without
/// reading the file contents before it and stopping after it.
pub fn dump_range<W: Write>(path: &Path, range: Range<u64>, w: W) -> Result<W, DumpError> {
    let mut nar = NarWriter::window(w, range);
    let done = match nar.root() {
        Ok(root) => dump_node(path, root, false, None).map(drop),
        Err(e) => Err(at(path)(e)),
    };
    match done {
        Err(e) if !is_window_end(&e.source) => Err(e),
        _ => Ok(nar.into_inner()),
    }
}

/// [`dump_range`] from `from`, a point at or before `range.start` recorded by [`Marks`] for
/// the same path: only the directories on the way to it are listed again. If the path
/// changed since, the bytes differ (callers compare hashes).
pub fn dump_range_at<W: Write>(
    path: &Path,
    range: Range<u64>,
    from: &ResumePoint,
    w: W,
) -> Result<W, DumpError> {
    if from.chain.is_empty() {
        return dump_range(path, range, w);
    }
    let mut nar = NarWriter::resume(w, range, from.pos);
    match resume_dir(path, nar.resumed_directory(), &from.chain) {
        Err(e) if !is_window_end(&e.source) => Err(e),
        _ => Ok(nar.into_inner()),
    }
}

/// Goes on writing the open directory `path` from `chain`: into the entry `chain[0]` if
/// more follows, else from the entry `chain[0]` itself; then the entries after it.
fn resume_dir<W: Write>(path: &Path, mut dir: Directory<'_, W>, chain: &[Vec<u8>]) -> Result<(), DumpError> {
    let names = sorted_names(path)?;
    let (first, rest) = chain.split_first().expect("a resume chain is not empty");
    let first = first.as_slice();
    if rest.is_empty() {
        dir.continue_after(names.iter().map(|n| n.as_bytes()).rfind(|n| *n < first));
    } else {
        dir.continue_after(Some(first));
        resume_dir(&path.join(OsStr::from_bytes(first)), dir.resumed_child(), rest)?;
    }
    // The entry itself when resuming at its start, else the ones after it.
    let after = names.iter().filter(|n| n.as_bytes() > first || (rest.is_empty() && n.as_bytes() == first));
    write_entries(path, &mut dir, after, false, None)?;
    dir.close().map_err(at(path))
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
    mut marks: Option<&mut Marks<'_>>,
) -> Result<Vec<(Vec<u8>, Entry)>, DumpError> {
    let mut entries = Vec::new();
    for name in names {
        let child = path.join(name);
        if let Some(m) = marks.as_deref_mut() {
            m.entry(dir.position(), name.as_bytes());
            m.stack.push(name.as_bytes().to_vec());
        }
        let entry = dir.entry(name.as_bytes()).map_err(at(&child))?;
        let e = dump_node(&child, entry, listing, marks.as_deref_mut())?;
        if let Some(m) = marks.as_deref_mut() {
            m.stack.pop();
        }
        if let Some(e) = e {
            entries.push((name.as_bytes().to_vec(), e));
        }
    }
    Ok(entries)
}

fn dump_node<W: Write>(
    path: &Path,
    node: Node<'_, W>,
    listing: bool,
    marks: Option<&mut Marks<'_>>,
) -> Result<Option<Entry>, DumpError> {
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
        let entries = write_entries(path, &mut dir, names.iter(), listing, marks)?;
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
    fn ranges_are_slices_of_the_dump() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("big"), vec![42u8; 100_000]).unwrap();
        fs::write(root.join("d/small"), "small").unwrap();
        symlink("big", root.join("link")).unwrap();
        let full = dump(&root, Vec::new()).unwrap();
        let len = full.len() as u64;
        for (start, end) in [(0, len), (0, 10), (100, 50_000), (50_000, 100_100), (100_100, len), (len, len)]
        {
            let got = dump_range(&root, start..end, Vec::new()).unwrap();
            assert_eq!(got, &full[start as usize..end as usize], "{start}..{end}");
        }
    }

    #[test]
    fn ranges_resume_from_recorded_points() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("r");
        // Nested directories, files around the cuts, an empty directory, links.
        for d in ["a", "a/b", "a/b/c", "a/e", "z"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::create_dir(root.join("a/empty")).unwrap();
        for (i, f) in ["a/1", "a/b/2", "a/b/c/3", "a/b/c/4", "a/e/5", "m", "z/6", "z/7"].iter().enumerate() {
            fs::write(root.join(f), vec![b'a' + i as u8; 700 + 300 * i]).unwrap();
        }
        symlink("m", root.join("a/b/l")).unwrap();
        let full = dump(&root, Vec::new()).unwrap();
        let len = full.len() as u64;
        for step in [1, 7, 64, 333, 1000, 4096] {
            let offsets: Vec<u64> = (1..).map(|k| k * step).take_while(|&o| o < len).collect();
            let mut told = Vec::new();
            let mut tell = |k: usize, p: &ResumePoint| told.push((k, p.clone()));
            let mut marks = Marks::new(offsets.clone()).on_point(&mut tell);
            let (again, _) = dump_marked(&root, Vec::new(), false, Some(&mut marks)).unwrap();
            assert_eq!(again, full);
            let points = marks.finish();
            assert_eq!(told, points.iter().cloned().enumerate().collect::<Vec<_>>());
            assert_eq!(points.len(), offsets.len());
            for (o, p) in offsets.iter().zip(&points) {
                assert!(p.pos <= *o, "{p:?} is after {o}");
                let end = (o + step).min(len);
                let got = dump_range_at(&root, *o..end, p, Vec::new()).unwrap();
                assert_eq!(got, &full[*o as usize..end as usize], "step {step}, {o}..{end} from {p:?}");
            }
            // Deep points are used, not the start.
            assert!(step > 1000 || points.iter().any(|p| p.chain.len() >= 3), "{points:?}");
        }
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
