//! A streaming NAR writer whose types follow the grammar.
//!
//! [`NarWriter::root`] gives a [`Node`]; a node becomes exactly one file, symlink or
//! [`Directory`], each call consuming it. A directory hands out one entry node at a time and
//! checks that names are valid and strictly increasing by bytes. Memory depends on depth only:
//! file contents are copied through a fixed buffer.
//!
//! A writer made with [`NarWriter::window`] passes on only the bytes of one range of the NAR
//! (the input of one compressed block), skips the file contents before it with
//! [`Contents::skip`], and stops with [`is_window_end`] once the range is written.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;

use super::wire;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// The contents of a regular file: read in order, or skipped.
pub trait Contents: Read {
    /// Moves `n` bytes forward without passing them on.
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let mut buf = [0u8; 8192];
        let mut left = n;
        while left > 0 {
            let got = self.read(&mut buf[..left.min(8192) as usize])?;
            if got == 0 {
                break;
            }
            left -= got as u64;
        }
        Ok(())
    }
}

impl Contents for &[u8] {}

impl Contents for File {
    fn skip(&mut self, n: u64) -> io::Result<()> {
        let n = i64::try_from(n).map_err(io::Error::other)?;
        self.seek(SeekFrom::Current(n)).map(drop)
    }
}

/// Why a windowed writer stopped: the window is written.
#[derive(Debug)]
struct WindowEnd;

impl std::fmt::Display for WindowEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("end of the NAR window")
    }
}

impl std::error::Error for WindowEnd {}

/// Whether `e` is a windowed writer's signal that its range is complete (not a failure).
pub fn is_window_end(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<WindowEnd>())
}

/// Owns the output and the byte position in the NAR.
pub struct NarWriter<W> {
    w: W,
    pos: u64,
    started: bool,
    window: Option<Range<u64>>,
}

impl<W: Write> NarWriter<W> {
    pub fn new(w: W) -> Self {
        NarWriter { w, pos: 0, started: false, window: None }
    }

    /// A writer that passes on only the NAR bytes in `range`, and fails with an error for
    /// which [`is_window_end`] holds when asked to write past it.
    pub fn window(w: W, range: Range<u64>) -> Self {
        NarWriter { w, pos: 0, started: false, window: Some(range) }
    }

    /// A window writer that starts at NAR offset `pos` (at most `range.start`), inside a
    /// root directory whose tokens so far lie before `pos`: see
    /// [`NarWriter::resumed_directory`]. For a block's input resumed from a point recorded in
    /// an earlier pass, without walking what comes before it.
    pub fn resume(w: W, range: Range<u64>, pos: u64) -> Self {
        debug_assert!(pos <= range.start);
        NarWriter { w, pos, started: true, window: Some(range) }
    }

    /// The root directory of a [resumed](NarWriter::resume) writer: open, with the entries
    /// before the position already written. Set the entry before the next one with
    /// [`Directory::continue_after`].
    pub fn resumed_directory(&mut self) -> Directory<'_, W> {
        Directory { out: self, prev: None }
    }

    /// Writes the magic and returns the root node. Call once.
    pub fn root(&mut self) -> io::Result<Node<'_, W>> {
        if std::mem::replace(&mut self.started, true) {
            return Err(invalid("a NAR has exactly one root".into()));
        }
        self.raw(&wire::MAGIC)?;
        Ok(Node { out: self })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    pub fn into_inner(self) -> W {
        self.w
    }

    fn raw(&mut self, b: &[u8]) -> io::Result<()> {
        let (start, end) = (self.pos, self.pos + b.len() as u64);
        match &self.window {
            None => self.w.write_all(b)?,
            Some(w) if start >= w.end && !b.is_empty() => return Err(io::Error::other(WindowEnd)),
            Some(w) => {
                let from = w.start.clamp(start, end) - start;
                let to = w.end.clamp(start, end) - start;
                if from < to {
                    self.w.write_all(&b[from as usize..to as usize])?;
                }
            }
        }
        self.pos = end;
        Ok(())
    }

    /// How many of the next `n` bytes lie before the window and need not be produced.
    fn skippable(&self, n: u64) -> u64 {
        self.window.as_ref().map_or(0, |w| w.start.saturating_sub(self.pos).min(n))
    }

    fn padding(&mut self, len: u64) -> io::Result<()> {
        let pad = (8 - len % 8) % 8;
        self.raw(&[0u8; 8][..pad as usize])
    }

    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.raw(&(b.len() as u64).to_le_bytes())?;
        self.raw(b)?;
        self.padding(b.len() as u64)
    }
}

/// A place in the NAR where one node goes.
#[must_use = "a node must become a file, symlink or directory, or the NAR is truncated"]
pub struct Node<'a, W> {
    out: &'a mut NarWriter<W>,
}

impl<'a, W: Write> Node<'a, W> {
    /// Writes a regular file of exactly `size` bytes read from `contents`.
    ///
    /// Fails if `contents` ends early or has more than `size` bytes (a file that changed
    /// while it was read). Returns the offset of the contents in the NAR (the listing's
    /// `narOffset`).
    pub fn file(self, executable: bool, size: u64, contents: &mut dyn Contents) -> io::Result<u64> {
        let o = self.out;
        o.raw(&wire::OPEN)?;
        o.raw(&wire::TYPE)?;
        o.raw(&wire::REGULAR)?;
        if executable {
            o.raw(&wire::EXECUTABLE)?;
            o.raw(&wire::EMPTY)?;
        }
        o.raw(&wire::CONTENTS)?;
        o.raw(&size.to_le_bytes())?;
        let offset = o.pos;
        let mut left = size;
        let skip = o.skippable(size);
        if skip > 0 {
            contents.skip(skip)?;
            o.pos += skip;
            left -= skip;
        }
        let mut buf = vec![0u8; left.clamp(1, 256 * 1024) as usize];
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = match contents.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("file ended {left} bytes early (changed while being read)"),
                    ));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            o.raw(&buf[..n])?;
            left -= n as u64;
        }
        if contents.read(&mut buf[..1])? != 0 {
            return Err(invalid(format!("file has more than {size} bytes (changed while being read)")));
        }
        o.padding(size)?;
        o.raw(&wire::CLOSE)?;
        Ok(offset)
    }

    /// Writes a symlink.
    pub fn symlink(self, target: &[u8]) -> io::Result<()> {
        if target.is_empty() || target.contains(&0) {
            return Err(invalid(format!("invalid symlink target {:?}", String::from_utf8_lossy(target))));
        }
        let o = self.out;
        o.raw(&wire::OPEN)?;
        o.raw(&wire::TYPE)?;
        o.raw(&wire::SYMLINK)?;
        o.raw(&wire::TARGET)?;
        o.bytes(target)?;
        o.raw(&wire::CLOSE)
    }

    /// Starts a directory.
    pub fn directory(self) -> io::Result<Directory<'a, W>> {
        let o = self.out;
        o.raw(&wire::OPEN)?;
        o.raw(&wire::TYPE)?;
        o.raw(&wire::DIRECTORY)?;
        Ok(Directory { out: o, prev: None })
    }
}

/// An open directory: entries in strictly increasing byte order, then [`Directory::close`].
#[must_use = "a directory must be closed"]
pub struct Directory<'a, W> {
    out: &'a mut NarWriter<W>,
    prev: Option<Vec<u8>>,
}

impl<W: Write> Directory<'_, W> {
    /// The NAR offset the next entry starts at (before the previous entry's closing token).
    pub fn position(&self) -> u64 {
        self.out.pos
    }

    /// For a resumed directory: the entry written last before the position, whose closing
    /// token the next entry (or the directory's end) writes. `None` if there is none.
    pub fn continue_after(&mut self, prev: Option<&[u8]>) {
        self.prev = prev.map(<[u8]>::to_vec);
    }

    /// For a resumed directory: the directory that is the node of the entry written last
    /// (set by [`Directory::continue_after`]), open, with its tokens so far before the
    /// position. Close it before going on with this one.
    pub fn resumed_child(&mut self) -> Directory<'_, W> {
        Directory { out: &mut *self.out, prev: None }
    }

    /// Starts the entry `name`; the returned node must be written before the next entry.
    pub fn entry(&mut self, name: &[u8]) -> io::Result<Node<'_, W>> {
        let bad =
            name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0);
        if bad {
            return Err(invalid(format!("invalid NAR entry name {:?}", String::from_utf8_lossy(name))));
        }
        match &self.prev {
            Some(p) if p.as_slice() >= name => {
                return Err(invalid(format!(
                    "NAR entry {:?} after {:?}: names must be sorted and unique",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(p)
                )));
            }
            // Close the previous entry's parenthesis.
            Some(_) => self.out.raw(&wire::CLOSE)?,
            None => {}
        }
        self.prev = Some(name.to_vec());
        let o = &mut *self.out;
        o.raw(&wire::ENTRY)?;
        o.raw(&wire::OPEN)?;
        o.raw(&wire::NAME)?;
        o.bytes(name)?;
        o.raw(&wire::NODE)?;
        Ok(Node { out: o })
    }

    /// Ends the directory.
    pub fn close(self) -> io::Result<()> {
        if self.prev.is_some() {
            self.out.raw(&wire::CLOSE)?;
        }
        self.out.raw(&wire::CLOSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, b: &[u8]) {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
        out.resize(out.len() + (8 - b.len() % 8) % 8, 0);
    }

    fn expect(tokens: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for t in tokens {
            s(&mut v, t);
        }
        v
    }

    #[test]
    fn single_file() {
        let mut w = NarWriter::new(Vec::new());
        let off = w.root().unwrap().file(true, 5, &mut &b"hello"[..]).unwrap();
        let got = w.into_inner();
        let want = expect(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"hello",
            b")",
        ]);
        assert_eq!(got, want);
        // magic 24, "(" "type" "regular" 16 each, "executable" 24, "" 8, "contents" 16, size 8
        assert_eq!(off, 24 + 3 * 16 + 24 + 8 + 16 + 8);
        assert_eq!(&got[off as usize..off as usize + 5], b"hello");
    }

    #[test]
    fn directory_with_entries() {
        let mut w = NarWriter::new(Vec::new());
        let mut d = w.root().unwrap().directory().unwrap();
        d.entry(b"a").unwrap().symlink(b"/x").unwrap();
        let sub = d.entry(b"b").unwrap().directory().unwrap();
        sub.close().unwrap();
        d.entry(b"c").unwrap().file(false, 0, &mut &b""[..]).unwrap();
        d.close().unwrap();
        let want = expect(&[
            b"nix-archive-1",
            b"(",
            b"type",
            b"directory",
            b"entry",
            b"(",
            b"name",
            b"a",
            b"node",
            b"(",
            b"type",
            b"symlink",
            b"target",
            b"/x",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"b",
            b"node",
            b"(",
            b"type",
            b"directory",
            b")",
            b")",
            b"entry",
            b"(",
            b"name",
            b"c",
            b"node",
            b"(",
            b"type",
            b"regular",
            b"contents",
            b"",
            b")",
            b")",
            b")",
        ]);
        assert_eq!(w.into_inner(), want);
    }

    #[test]
    fn enforces_grammar() {
        let mut w = NarWriter::new(Vec::new());
        let mut d = w.root().unwrap().directory().unwrap();
        d.entry(b"b").unwrap().symlink(b"x").unwrap();
        assert!(d.entry(b"a").is_err(), "out of order");
        assert!(d.entry(b"b").is_err(), "duplicate");
        assert!(d.entry(b"..").is_err());
        assert!(d.entry(b"x/y").is_err());
        d.close().unwrap();
        assert!(w.root().is_err(), "second root");
    }

    /// A file whose reads are counted, so that a test sees what a window skipped.
    struct Counted<'a> {
        data: &'a [u8],
        read: &'a std::cell::Cell<usize>,
    }

    impl Read for Counted<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.data.read(buf)?;
            self.read.set(self.read.get() + n);
            Ok(n)
        }
    }

    impl Contents for Counted<'_> {
        fn skip(&mut self, n: u64) -> io::Result<()> {
            self.data = &self.data[(n as usize).min(self.data.len())..];
            Ok(())
        }
    }

    fn sample(w: &mut NarWriter<Vec<u8>>, read: &std::cell::Cell<usize>) -> io::Result<()> {
        let big: Vec<u8> = (0..5000u32).map(|i| (i % 253) as u8).collect();
        let mut d = w.root()?.directory()?;
        d.entry(b"a")?.file(false, big.len() as u64, &mut Counted { data: &big, read })?;
        d.entry(b"b")?.symlink(b"target")?;
        let mut sub = d.entry(b"c")?.directory()?;
        sub.entry(b"x")?.file(true, 13, &mut &b"hello, world!"[..])?;
        sub.close()?;
        d.close()
    }

    #[test]
    fn window_is_a_slice_of_the_nar() {
        let read = std::cell::Cell::new(0);
        let mut w = NarWriter::new(Vec::new());
        sample(&mut w, &read).unwrap();
        let full = w.into_inner();
        let len = full.len() as u64;
        for start in (0..len).step_by(37) {
            for end in [start, start + 1, start + 100, start + 4000, len] {
                let end = end.min(len);
                read.set(0);
                let mut w = NarWriter::window(Vec::new(), start..end);
                match sample(&mut w, &read) {
                    Ok(()) => assert_eq!(end, len),
                    Err(e) => assert!(is_window_end(&e), "{e}"),
                }
                assert_eq!(w.into_inner(), &full[start as usize..end as usize], "{start}..{end}");
                if start > 5300 {
                    // Past file "a": its 5000 bytes were skipped, not read (only the
                    // one-byte growth check reads).
                    assert!(read.get() <= 1, "read {} bytes for {start}..{end}", read.get());
                }
            }
        }
    }

    #[test]
    fn file_size_must_match() {
        let mut w = NarWriter::new(Vec::new());
        let short = w.root().unwrap().file(false, 10, &mut &b"abc"[..]);
        assert_eq!(short.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let mut w = NarWriter::new(Vec::new());
        assert!(w.root().unwrap().file(false, 2, &mut &b"abc"[..]).is_err());
    }
}
