//! A streaming NAR writer whose types follow the grammar.
//!
//! [`NarWriter::root`] gives a [`Node`]; a node becomes exactly one file, symlink or
//! [`Directory`], each call consuming it. A directory hands out one entry node at a time and
//! checks that names are valid and strictly increasing by bytes. Memory depends on depth only:
//! file contents are copied through a fixed buffer.

use std::io::{self, Read, Write};

use super::wire;

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Owns the output and the byte position in the NAR.
pub struct NarWriter<W> {
    w: W,
    pos: u64,
    started: bool,
}

impl<W: Write> NarWriter<W> {
    pub fn new(w: W) -> Self {
        NarWriter { w, pos: 0, started: false }
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
        self.w.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
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
    pub fn file(self, executable: bool, size: u64, contents: &mut dyn Read) -> io::Result<u64> {
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

    #[test]
    fn file_size_must_match() {
        let mut w = NarWriter::new(Vec::new());
        let short = w.root().unwrap().file(false, 10, &mut &b"abc"[..]);
        assert_eq!(short.unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let mut w = NarWriter::new(Vec::new());
        assert!(w.root().unwrap().file(false, 2, &mut &b"abc"[..]).is_err());
    }
}
