//! The bytes of files being sent, shared between connections and bounded in total.
//!
//! A response body is sent a chunk at a time; hyper keeps the chunk it is writing until the
//! client has taken all of it, so a client that stops reading holds one chunk for as long as
//! the timeout allows. Read once per connection, 3,000 such clients held 3,000 chunks (about
//! 800 MiB). Here a chunk is the aligned block `[i * CHUNK, (i + 1) * CHUNK)` of one file,
//! read once and shared by every connection that sends it while any of them holds it: clients
//! of the same NAR share its blocks, so stalled ones cost at most the file's size between them.
//! Blocks alive at once are bounded by [`BUDGET`] bytes; past it a body is sent in
//! [`SMALL_CHUNK`] pieces of its own, so clients of many different files cost little each.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use bytes::Bytes;

/// Bytes of a file per shared block.
pub const CHUNK: u64 = 256 << 10;

/// The bytes of shared blocks alive at once, across all connections.
pub const BUDGET: usize = 16 << 20;

/// Bytes sent per piece once the budget is spent.
pub const SMALL_CHUNK: u64 = 8 << 10;

/// Which file a block is of: a file replaced under its name is another file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
}

impl FileId {
    pub fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
        }
    }
}

type Key = (FileId, u64);

/// The blocks alive, by file and index, and their bytes.
#[derive(Default)]
struct Blocks {
    alive: Mutex<HashMap<Key, Weak<Block>>>,
    bytes: AtomicUsize,
}

static BLOCKS: LazyLock<Blocks> = LazyLock::new(Blocks::default);

/// One block's bytes; gone from the table when its last holder drops it.
struct Block {
    key: Key,
    data: Vec<u8>,
}

impl Drop for Block {
    fn drop(&mut self) {
        BLOCKS.bytes.fetch_sub(self.data.len(), Ordering::Relaxed);
        let mut alive = BLOCKS.alive.lock().unwrap_or_else(|e| e.into_inner());
        // Another connection may have read the block again since this one's count fell to 0.
        if alive.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
            alive.remove(&self.key);
        }
    }
}

/// A [`Block`] as the bytes a body sends.
struct Shared(Arc<Block>);

impl AsRef<[u8]> for Shared {
    fn as_ref(&self) -> &[u8] {
        &self.0.data
    }
}

/// The next piece of `file` (identified by `id`) to send from `offset`, at most `remaining`
/// bytes: a slice of a shared block, or, past the budget, a small piece of its own. Fails when
/// the file has fewer bytes than it had when opened.
pub fn next(file: &File, id: FileId, offset: u64, remaining: u64) -> io::Result<Bytes> {
    let index = offset / CHUNK;
    let key = (id, index);
    let start = index * CHUNK;
    let found = BLOCKS.alive.lock().unwrap_or_else(|e| e.into_inner()).get(&key).and_then(Weak::upgrade);
    let block = match found {
        Some(b) => b,
        None if BLOCKS.bytes.load(Ordering::Relaxed) >= BUDGET => {
            let mut buf = vec![0; SMALL_CHUNK.min(remaining) as usize];
            read_full(file, &mut buf, offset)?;
            return Ok(Bytes::from(buf));
        }
        None => {
            let len = CHUNK.min(id.size.saturating_sub(start));
            let mut data = vec![0; len as usize];
            read_full(file, &mut data, start)?;
            BLOCKS.bytes.fetch_add(data.len(), Ordering::Relaxed);
            let block = Arc::new(Block { key, data });
            let mut alive = BLOCKS.alive.lock().unwrap_or_else(|e| e.into_inner());
            // Read by two connections at once: the first in the table is the one shared.
            match alive.get(&key).and_then(Weak::upgrade) {
                Some(other) => other,
                None => {
                    alive.insert(key, Arc::downgrade(&block));
                    block
                }
            }
        }
    };
    let from = (offset - start) as usize;
    let to = (from as u64 + remaining).min(block.data.len() as u64) as usize;
    if from >= to {
        return Err(shrank());
    }
    Ok(Bytes::from_owner(Shared(block)).slice(from..to))
}

/// Bytes of shared blocks alive now.
#[cfg(test)]
fn alive_bytes() -> usize {
    BLOCKS.bytes.load(Ordering::Relaxed)
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
        .map_err(|e| if e.kind() == io::ErrorKind::UnexpectedEof { shrank() } else { e })
}

fn shrank() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was sent")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(len: usize) -> (tempfile::NamedTempFile, File, FileId) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        t.write_all(&data).unwrap();
        let f = File::open(t.path()).unwrap();
        let id = FileId::of(&f.metadata().unwrap());
        (t, f, id)
    }

    #[test]
    fn connections_share_blocks_and_pieces_are_the_file_s_bytes() {
        let len = 3 * CHUNK as usize + 1000;
        let (_t, f, id) = file(len);
        let want: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        // Sent from an unaligned offset to the end, in the pieces `next` gives.
        let (mut offset, mut got) = (100u64, Vec::new());
        while offset < len as u64 {
            let b = next(&f, id, offset, len as u64 - offset).unwrap();
            offset += b.len() as u64;
            got.extend_from_slice(&b);
        }
        assert_eq!(got, want[100..]);
        // Two holders of one block: one block's bytes alive, gone when both are.
        let before = alive_bytes();
        let a = next(&f, id, 0, 10).unwrap();
        let b = next(&f, id, 5, 10).unwrap();
        assert_eq!(alive_bytes() - before, CHUNK as usize);
        assert_eq!((&a[..], &b[..]), (&want[0..10], &want[5..15]));
        drop((a, b));
        assert_eq!(alive_bytes(), before);
    }

    #[test]
    fn a_file_that_shrank_is_an_error() {
        let (t, f, id) = file(CHUNK as usize * 2);
        t.as_file().set_len(10).unwrap();
        assert!(next(&f, id, CHUNK, CHUNK).is_err());
    }
}
