//! Copies of a bucket's narinfos kept on this machine, so that a push that finds its paths
//! already in the bucket, a sign or a gc need not download every narinfo again.
//!
//! A copy is keyed by the object's key, its ETag and its size, as the server gave them when
//! the copy was made (the answer to the PUT that wrote it or to the GET that read it). It is
//! used only when the bucket's listing, taken by this run, shows the same ETag and size: an
//! object written since (by `sign`, another machine's push, anyone) has another ETag, and is
//! downloaded again. What a copy holds is treated like what the bucket answers: parsed and
//! compared with the store, never trusted further.
//!
//! The copies are a cache in the XDG sense: one SQLite file per endpoint and bucket, under
//! the directory the command gives (`$XDG_CACHE_HOME/nixcache/buckets`). Losing them costs
//! only the downloads; a file that is not a database is replaced; a write that fails stops
//! the copies being used for the rest of the run, never the run.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use thiserror::Error;

/// The schema's version, in `PRAGMA user_version`: a file of another version is started
/// afresh.
const VERSION: i64 = 1;

#[derive(Debug, Error)]
pub enum CopiesError {
    #[error("cannot create {}: {source}", dir.display())]
    Dir { dir: PathBuf, source: io::Error },
    #[error("cannot use {}: {source}", file.display())]
    Db { file: PathBuf, source: rusqlite::Error },
}

pub struct Copies {
    file: PathBuf,
    /// The one connection that writes: this process's writes queue here, not in SQLite's
    /// busy handler (which sleeps a millisecond or more on each collision).
    writer: Mutex<Connection>,
    /// Connections that read, not in use: one per thread that reads at once.
    idle: Mutex<Vec<Connection>>,
    /// A query failed: the copies are not used again in this run.
    broken: AtomicBool,
    /// Reads answered from a copy.
    used: AtomicU64,
}

impl Copies {
    /// Opens (or creates) the copies of the bucket `bucket` at `endpoint`, in `dir`.
    pub fn open(dir: &Path, endpoint: &str, bucket: &str) -> Result<Copies, CopiesError> {
        fs::create_dir_all(dir).map_err(|source| CopiesError::Dir { dir: dir.to_owned(), source })?;
        let file = dir.join(file_name(endpoint, bucket));
        let db = |source| CopiesError::Db { file: file.clone(), source };
        let conn = match create(&file) {
            Ok(c) => c,
            // Not a database (or a damaged one): it held only copies, so it starts afresh.
            Err(e) if is_damage(&e) => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = file.clone().into_os_string();
                    p.push(suffix);
                    let _ = fs::remove_file(p);
                }
                create(&file).map_err(db)?
            }
            Err(e) => return Err(db(e)),
        };
        Ok(Copies {
            file,
            writer: Mutex::new(conn),
            idle: Mutex::new(Vec::new()),
            broken: AtomicBool::new(false),
            used: AtomicU64::new(0),
        })
    }

    /// Where the copies are.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// How many reads a copy answered.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The copy of `key` made when it had `etag` and `size`, if there is one.
    pub fn get(&self, key: &str, etag: &str, size: u64) -> Option<Vec<u8>> {
        let found = self.read(|c| {
            c.prepare_cached("SELECT body FROM copies WHERE key = ?1 AND etag = ?2 AND size = ?3")?
                .query_row(params![key, etag, size as i64], |r| r.get::<_, Vec<u8>>(0))
                .optional()
        })??;
        // The size is part of the key; a body of another length is not what was kept.
        (found.len() as u64 == size).then(|| {
            self.used.fetch_add(1, Ordering::Relaxed);
            found
        })
    }

    /// Keeps `body` as the copy of `key`, which the server said has `etag`.
    pub fn put(&self, key: &str, etag: &str, body: &[u8]) {
        self.write(|c| {
            c.prepare_cached("INSERT OR REPLACE INTO copies (key, etag, size, body) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![key, etag, body.len() as i64, body])
        });
    }

    /// Drops the copy of `key` (it was removed from the bucket).
    pub fn forget(&self, key: &str) {
        self.write(|c| c.prepare_cached("DELETE FROM copies WHERE key = ?1")?.execute([key]));
    }

    fn write(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<usize>) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        if f(&self.writer.lock().unwrap_or_else(|e| e.into_inner())).is_err() {
            self.broken.store(true, Ordering::Relaxed);
        }
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Option<T> {
        if self.broken.load(Ordering::Relaxed) {
            return None;
        }
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => match connect(&self.file) {
                Ok(c) => c,
                Err(_) => {
                    self.broken.store(true, Ordering::Relaxed);
                    return None;
                }
            },
        };
        match f(&conn) {
            Ok(v) => {
                self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
                Some(v)
            }
            Err(_) => {
                self.broken.store(true, Ordering::Relaxed);
                None
            }
        }
    }
}

/// `<bucket>-<hash of endpoint and bucket>.sqlite`: readable, and distinct for the same
/// bucket name on two servers.
fn file_name(endpoint: &str, bucket: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{endpoint}\n{bucket}").as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    let readable: String = bucket
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '_' })
        .collect();
    format!("{}-{hex}.sqlite", readable.trim_start_matches('.'))
}

fn connect(file: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(file)?;
    // Two pushes to the same bucket share the file.
    conn.busy_timeout(Duration::from_secs(10))?;
    // Consistent after a crash, not durable: a copy lost costs one download.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

fn create(file: &Path) -> rusqlite::Result<Connection> {
    let conn = connect(file)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version != VERSION {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             DROP TABLE IF EXISTS copies;
             CREATE TABLE copies (key TEXT PRIMARY KEY, etag TEXT NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL);
             PRAGMA user_version = {VERSION};
             COMMIT;"
        ))?;
    }
    Ok(conn)
}

fn is_damage(e: &rusqlite::Error) -> bool {
    matches!(e.sqlite_error_code(), Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_used_only_with_its_etag_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let c = Copies::open(dir.path(), "http://127.0.0.1:1", "b").unwrap();
        assert_eq!(c.get("p/x.narinfo", "\"e1\"", 3), None);
        c.put("p/x.narinfo", "\"e1\"", b"abc");
        assert_eq!(c.get("p/x.narinfo", "\"e1\"", 3).as_deref(), Some(&b"abc"[..]));
        assert_eq!(c.get("p/x.narinfo", "\"e2\"", 3), None);
        assert_eq!(c.get("p/x.narinfo", "\"e1\"", 4), None);
        assert_eq!(c.get("q/x.narinfo", "\"e1\"", 3), None);
        c.put("p/x.narinfo", "\"e2\"", b"abcd");
        assert_eq!(c.get("p/x.narinfo", "\"e1\"", 3), None);
        assert_eq!(c.used(), 1);
        drop(c);
        // Kept across runs; gone once forgotten.
        let c = Copies::open(dir.path(), "http://127.0.0.1:1", "b").unwrap();
        assert_eq!(c.get("p/x.narinfo", "\"e2\"", 4).as_deref(), Some(&b"abcd"[..]));
        c.forget("p/x.narinfo");
        assert_eq!(c.get("p/x.narinfo", "\"e2\"", 4), None);
        // Another server's bucket of the same name is another file.
        let other = Copies::open(dir.path(), "http://127.0.0.1:2", "b").unwrap();
        assert_ne!(other.file(), c.file());
    }

    #[test]
    fn a_file_that_is_not_a_database_is_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(file_name("e", "b"));
        fs::write(&file, vec![0x5a; 8192]).unwrap();
        let c = Copies::open(dir.path(), "e", "b").unwrap();
        assert_eq!(c.get("k", "t", 1), None);
        c.put("k", "t", b"x");
        assert_eq!(c.get("k", "t", 1).as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn the_file_name_is_safe() {
        assert!(file_name("e", "../a/b").starts_with("_a_b-"));
        assert!(!file_name("e", "..").contains('/'));
    }
}
