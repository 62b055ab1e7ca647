//! The writers' lock of a cache directory: `flock` on `.nixcache.lock`, exclusive for
//! writers and shared for readers, waited for as long as it takes or a bounded time, and
//! who holds it, as far as `/proc/locks` tells.

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::StorageError;
use super::io_err;

/// Locks `f` (exclusive or shared), calling `on_wait` once if someone else holds it.
pub(super) fn acquire(
    f: &File,
    path: &Path,
    shared: bool,
    wait: Option<Duration>,
    on_wait: &mut dyn FnMut(Option<&str>),
) -> Result<(), StorageError> {
    let try_lock = || if shared { f.try_lock_shared() } else { f.try_lock() };
    let holders = || f.metadata().ok().and_then(|m| lock_holders(m.ino()));
    match try_lock() {
        Ok(()) => return Ok(()),
        Err(fs::TryLockError::WouldBlock) => on_wait(holders().as_deref()),
        Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", path)(e)),
    }
    let Some(wait) = wait else {
        return if shared { f.lock_shared() } else { f.lock() }.map_err(io_err("lock", path));
    };
    // Bounded: flock has no timeout, so it is tried again, more slowly as the wait goes on.
    let end = Instant::now() + wait;
    let mut pause = Duration::from_millis(10);
    loop {
        let now = Instant::now();
        if now >= end {
            return Err(StorageError::LockTimeout {
                path: path.to_owned(),
                waited: wait,
                holders: holders(),
            });
        }
        std::thread::sleep(pause.min(end - now));
        pause = (pause * 2).min(Duration::from_millis(250));
        match try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) => {}
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", path)(e)),
        }
    }
}

/// Who holds a lock on the file with inode `ino`, from `/proc/locks`: `pid 1234 (flock, user
/// alice)`, as far as this user may see.
fn lock_holders(ino: u64) -> Option<String> {
    let locks = fs::read_to_string("/proc/locks").ok()?;
    let mut found = Vec::new();
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 3124 00:2a:1234 0 EOF"; a waiter's line has "->" and
        // holds nothing.
        if line.contains("->") {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(pid), Some(id)) = (fields.get(4), fields.get(5)) else { continue };
        if id.rsplit(':').next().and_then(|i| i.parse::<u64>().ok()) != Some(ino) {
            continue;
        }
        let comm =
            fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.trim().to_owned()).unwrap_or_default();
        let uid = fs::metadata(format!("/proc/{pid}")).map(|m| m.uid()).ok();
        let user = uid.map(|u| user_name(u).unwrap_or_else(|| u.to_string())).unwrap_or_default();
        found.push(format!("pid {pid} ({comm}, user {user})"));
    }
    found.dedup();
    (!found.is_empty()).then(|| format!("held by {}", found.join(", ")))
}

/// The name of user `uid` in /etc/passwd.
fn user_name(uid: u32) -> Option<String> {
    fs::read_to_string("/etc/passwd").ok()?.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_owned())
    })
}
