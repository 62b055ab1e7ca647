//! A cache in a directory.
//!
//! The directory may be writable by others (a shared mount, an rsync target), so nothing in
//! it is trusted to be what its name says: `nar/`, `debuginfo/`, `log/` and `realisations/`
//! must be real directories (writers refuse a cache where one is a link or a file), every
//! file is opened without following links and without blocking, and only regular files are
//! read. A link or special file where a cache file belongs is a [`FileProblem`]: verify
//! reports it, push replaces it, gc removes the link itself, never what it points to.
//!
//! Every file is written under a temporary name starting with [`TEMP_PREFIX`] in the
//! directory it belongs to, made durable, renamed into place, and the directory fsync'd, so
//! a reader sees either nothing or the whole file. Temporary names never end in `.narinfo`,
//! so no client can fetch one. A batch is staged, made durable together ([`Backend::sync`]:
//! the files' fsyncs in parallel), then renamed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use super::{Backend, Leftover, Meta, NewFile, Reader, Staged};
use super::{FileProblem, StorageError, io_err};
use crate::layout::{LOCK_FILE, SUBDIRS, TEMP_PREFIX};

/// Cache files a web server must read whatever the pusher's umask: `open` and `mkdir` take
/// the umask off, `chmod` does not.
const FILE_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o755;

/// What a file type is, in words.
pub fn kind_of(ft: fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_file() {
        "regular file"
    } else {
        "special file"
    }
}

/// Opens `path` with `opts` only if it is a regular file: links are not followed (the open
/// fails on one), FIFOs do not block, and the open file is checked again. `None` when it
/// does not exist.
///
/// With `opts.create(true)` a missing file is created (never through a dangling link).
fn open_regular(path: &Path, opts: &mut OpenOptions) -> Result<Option<File>, FileProblem> {
    match fs::symlink_metadata(path) {
        Ok(m) if !m.is_file() => return Err(FileProblem::NotRegular(kind_of(m.file_type()))),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(FileProblem::Io(e)),
    }
    let f = match opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // Replaced by a link since the check.
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(FileProblem::NotRegular("symbolic link"));
        }
        Err(e) => return Err(FileProblem::Io(e)),
    };
    let m = f.metadata().map_err(FileProblem::Io)?;
    if !m.is_file() {
        return Err(FileProblem::NotRegular(kind_of(m.file_type())));
    }
    Ok(Some(f))
}

/// Opens the regular file `rel` (`name` or `sub/name`) of the cache at `dir` without following
/// a link at any step below `dir`: the subdirectory is opened with `O_NOFOLLOW | O_DIRECTORY`
/// and the file with `O_NOFOLLOW` relative to it (`openat`), so a subdirectory swapped for a
/// link after the cache was opened leads nowhere. The steps of `dir`'s own path are the
/// admin's and are followed (as `O_NOFOLLOW` does: it refuses a link only as the last step),
/// which saves opening `dir` itself on every request. FIFOs do not block; only a regular file
/// is returned, with its metadata. `None` when it does not exist.
fn open_beneath(dir: &Path, rel: &str) -> Result<Option<(File, fs::Metadata)>, FileProblem> {
    use rustix::fs::{CWD, Mode, OFlags, openat};
    let flags = OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    let found = |r: rustix::io::Result<std::os::fd::OwnedFd>| match r {
        Ok(fd) => Ok(Some(fd)),
        // Missing, or below something that is not a directory: not in the cache.
        Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => Ok(None),
        Err(rustix::io::Errno::LOOP) => Err(FileProblem::NotRegular("symbolic link")),
        Err(e) => Err(FileProblem::Io(e.into())),
    };
    let file = match rel.split_once('/') {
        Some((_, name)) if name.contains('/') => return Ok(None),
        Some((sub, name)) => {
            let parent = match found(openat(CWD, dir.join(sub), flags | OFlags::DIRECTORY, Mode::empty())) {
                Ok(Some(fd)) => fd,
                // Not a real directory (a link, a file): nothing under it is in the cache.
                Ok(None) | Err(FileProblem::NotRegular(_)) => return Ok(None),
                Err(e) => return Err(e),
            };
            openat(&parent, name, flags | OFlags::NONBLOCK, Mode::empty())
        }
        None => openat(CWD, dir.join(rel), flags | OFlags::NONBLOCK, Mode::empty()),
    };
    let Some(fd) = found(file)? else { return Ok(None) };
    let f = File::from(fd);
    let m = f.metadata().map_err(FileProblem::Io)?;
    if !m.is_file() {
        return Err(FileProblem::NotRegular(kind_of(m.file_type())));
    }
    Ok(Some((f, m)))
}

/// Creates the directory `p` (and its parents) when missing; one this call creates is
/// 0755. An existing one keeps its mode: it is the admin's.
fn make_dir(p: &Path) -> Result<(), StorageError> {
    if !p.exists() {
        match fs::create_dir_all(p) {
            Ok(()) => fs::set_permissions(p, fs::Permissions::from_mode(DIR_MODE))
                .map_err(io_err("set the mode of", p))?,
            Err(_) if p.exists() => {}
            Err(e) => return Err(io_err("create directory", p)(e)),
        }
    }
    if !p.is_dir() {
        return Err(StorageError::NotADirectory { path: p.to_owned() });
    }
    Ok(())
}

/// The subdirectories of `dir` that exist but are not real directories, with what they are.
fn bad_subdirs(dir: &Path) -> Vec<(&'static str, &'static str)> {
    SUBDIRS
        .into_iter()
        .filter_map(|sub| match fs::symlink_metadata(dir.join(sub)) {
            Ok(m) if !m.is_dir() => Some((sub, kind_of(m.file_type()))),
            _ => None,
        })
        .collect()
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A cache directory.
pub struct DirBackend {
    dir: PathBuf,
    lock: Option<File>,
}

impl DirBackend {
    /// Creates `dir` and its subdirectories when missing.
    pub fn create(dir: &Path) -> Result<DirBackend, StorageError> {
        if dir.exists() && !dir.is_dir() {
            return Err(StorageError::NotADirectory { path: dir.to_owned() });
        }
        for sub in ["", "nar", "log", "realisations"] {
            make_dir(&dir.join(sub))?;
        }
        Self::open(dir)
    }

    /// An existing cache directory.
    pub fn open(dir: &Path) -> Result<DirBackend, StorageError> {
        if !dir.exists() {
            return Err(StorageError::Missing { path: dir.to_owned() });
        }
        if !dir.is_dir() {
            return Err(StorageError::NotADirectory { path: dir.to_owned() });
        }
        Ok(DirBackend { dir: dir.to_owned(), lock: None })
    }

    fn temp_file(&self, sub: &str, suffix: &str) -> Result<TempFile, StorageError> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{TEMP_PREFIX}{}-{n}{suffix}", std::process::id());
        let path = self.dir.join(sub).join(name);
        let file = crate::interrupt::create_registered(&path, || {
            OpenOptions::new().write(true).create_new(true).open(&path).map_err(io_err("create", &path))
        })?;
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .map_err(io_err("set the mode of", &path))?;
        Ok(TempFile { path, file: Some(file), persisted: false })
    }
}

impl DirBackend {
    /// A temporary file beside `rel` holding `data`, with the modification time `modified`.
    fn written(
        &self,
        rel: &str,
        data: &[u8],
        modified: Option<SystemTime>,
    ) -> Result<TempFile, StorageError> {
        let sub = Path::new(rel).parent().and_then(Path::to_str).unwrap_or("");
        let mut t = self.temp_file(sub, ".part")?;
        t.file().write_all(data).map_err(io_err("write", &t.path))?;
        if let Some(m) = modified {
            t.file().set_modified(m).map_err(io_err("set the time of", &t.path))?;
        }
        Ok(t)
    }

    /// The entries of `sub` whose base names `keep` accepts, sorted by name, with their
    /// metadata (read only for those): never directories, and nothing when `sub` is missing
    /// or not a real directory.
    fn entries(&self, sub: &str, keep: impl Fn(&str) -> bool) -> Result<Vec<Meta>, StorageError> {
        let d = self.dir.join(sub);
        if !sub.is_empty() && fs::symlink_metadata(&d).is_ok_and(|m| !m.is_dir()) {
            return Ok(Vec::new());
        }
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("list", &d)(e)),
        };
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io_err("list", &d))?;
            let Ok(name) = e.file_name().into_string() else { continue };
            if !keep(&name) {
                continue;
            }
            // Gone since the listing: nothing to say about it.
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                continue;
            }
            let name = if sub.is_empty() { name } else { format!("{sub}/{name}") };
            out.push(meta(name, &m));
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
}

impl Backend for DirBackend {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn locate(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    fn bad_dirs(&self) -> Vec<(&'static str, &'static str)> {
        bad_subdirs(&self.dir)
    }

    fn create_subdir(&self, sub: &'static str) -> Result<(), StorageError> {
        let path = self.dir.join(sub);
        make_dir(&path)?;
        // Never a link to a directory elsewhere: what is written under it would land there.
        match fs::symlink_metadata(&path) {
            Ok(m) if !m.is_dir() => {
                Err(StorageError::NotARealDirectory { path, kind: kind_of(m.file_type()) })
            }
            Ok(_) => Ok(()),
            Err(e) => Err(io_err("inspect", &path)(e)),
        }
    }

    fn lock(
        &mut self,
        shared: bool,
        wait: Option<Duration>,
        on_wait: &mut dyn FnMut(Option<&str>),
    ) -> Result<(), StorageError> {
        let path = self.dir.join(LOCK_FILE);
        let f = if shared {
            // On read-only media there is no writer to wait for, and no lock is taken.
            let Ok(Some(f)) = open_regular(&path, File::options().read(true)) else { return Ok(()) };
            f
        } else {
            // Not through a link, nor creating through a dangling one.
            let mut opts = OpenOptions::new();
            let f = open_regular(&path, opts.create(true).truncate(false).write(true))
                .map_err(|source| match source {
                    FileProblem::Io(e)
                        if e.kind() == io::ErrorKind::PermissionDenied
                            || e.raw_os_error() == Some(libc::EROFS) =>
                    {
                        StorageError::NotWritable { dir: self.dir.clone(), source: e }
                    }
                    source => StorageError::BadFile { path: path.clone(), source },
                })?
                .ok_or_else(|| io_err("open lock file", &path)(io::ErrorKind::NotFound.into()))?;
            // Readers (verify, as another user) take it shared: readable by all.
            if f.metadata().is_ok_and(|m| m.permissions().mode() & 0o777 != FILE_MODE) {
                let _ = f.set_permissions(fs::Permissions::from_mode(FILE_MODE));
            }
            f
        };
        super::lock::acquire(&f, &path, shared, wait, on_wait)?;
        self.lock = Some(f);
        Ok(())
    }

    fn exclusive(&self) -> bool {
        true
    }

    /// Never through a subdirectory that is a link or a file: such a one lists as empty.
    fn list(&self, sub: &str) -> Result<Vec<Meta>, StorageError> {
        self.entries(sub, |_| true)
    }

    fn stat(&self, rel: &str) -> Result<Option<Meta>, FileProblem> {
        match fs::symlink_metadata(self.dir.join(rel)) {
            Ok(m) => Ok(Some(meta(rel.to_owned(), &m))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(FileProblem::Io(e)),
        }
    }

    fn open(&self, rel: &str) -> Result<Option<(Reader, u64)>, FileProblem> {
        Ok(self.local_file(rel)?.map(|(f, m)| (Box::new(f) as Reader, m.len())))
    }

    fn local_file(&self, rel: &str) -> Result<Option<(File, fs::Metadata)>, FileProblem> {
        open_beneath(&self.dir, rel)
    }

    fn create(&self, sub: &str, suffix: &str) -> Result<Box<dyn NewFile>, StorageError> {
        Ok(Box::new(DirNewFile { tmp: self.temp_file(sub, suffix)?, dir: self.dir.clone() }))
    }

    fn stage(&self, rel: &str, data: &[u8], modified: Option<SystemTime>) -> Result<Staged, StorageError> {
        Ok(self.written(rel, data, modified)?.stage(rel, self.dir.join(rel)))
    }

    /// The file is flushed through the descriptor it was written with: opening it again by
    /// name costs a lookup in a directory that may hold 100,000 entries.
    fn replace(&self, rel: &str, data: &[u8], modified: Option<SystemTime>) -> Result<(), StorageError> {
        let mut t = self.written(rel, data, modified)?;
        t.file().sync_all().map_err(io_err("sync", &t.path))?;
        t.file = None;
        t.rename(&self.dir.join(rel))
    }

    /// An fsync each, up to 16 at a time, so a batch of many small files waits for the disk
    /// once or twice rather than once per file.
    ///
    /// Not `syncfs`: that flushes everything waiting on the filesystem, such as the build
    /// that just wrote gigabytes to the store before a nightly push (measured: 0.5 s instead
    /// of 1.0-1.9 s for the medium closure with 2.3 GB dirty, on a fast virtual disk).
    fn sync(&self, staged: &[&Staged]) -> Result<(), StorageError> {
        let files: Vec<&Path> = staged.iter().filter_map(|s| s.durable()).collect();
        let sync = |p: &&Path| {
            File::options()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(p)
                .and_then(|f| f.sync_all())
                .map_err(io_err("sync", p))
        };
        let threads = files.len().min(16);
        if threads <= 1 {
            return files.iter().try_for_each(sync);
        }
        std::thread::scope(|s| {
            let files = &files;
            let handles: Vec<_> = (0..threads)
                .map(|t| s.spawn(move || files.iter().skip(t).step_by(threads).try_for_each(sync)))
                .collect();
            handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
        })
    }

    fn sync_dir(&self, sub: &str) -> Result<(), StorageError> {
        let dir = self.dir.join(sub);
        File::open(&dir).and_then(|d| d.sync_all()).map_err(io_err("sync directory", &dir))
    }

    /// Two system calls, no open: a re-push of 50,000 present paths touches every narinfo.
    /// The time is set on the name itself, never through a link (`AT_SYMLINK_NOFOLLOW`), so
    /// a file swapped for a link after the check changes nothing elsewhere.
    fn touch(&self, rel: &str) -> Result<(), StorageError> {
        use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, UTIME_NOW, UTIME_OMIT, utimensat};
        let path = self.dir.join(rel);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(m) => {
                let source = FileProblem::NotRegular(kind_of(m.file_type()));
                return Err(StorageError::BadFile { path, source });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        }
        let times = Timestamps {
            last_access: Timespec { tv_sec: 0, tv_nsec: UTIME_OMIT },
            last_modification: Timespec { tv_sec: 0, tv_nsec: UTIME_NOW },
        };
        utimensat(CWD, &path, &times, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_err("set the time of", &path)(e.into()))
    }

    fn remove(&self, rel: &str) -> Result<(), StorageError> {
        let path = self.dir.join(rel);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("remove", &path)(e)),
        }
    }

    fn scratch(&self) -> Result<File, StorageError> {
        let dir = self.dir.join("nar");
        tempfile::tempfile_in(&dir).map_err(io_err("create a scratch file in", &dir))
    }

    /// Only a temporary file's metadata is read: every push looks, and a cache of 50,000 paths
    /// would otherwise cost 100,000 stats.
    fn leftovers(&self) -> Result<Vec<Leftover>, StorageError> {
        let mut found = Vec::new();
        for sub in ["", "nar", "debuginfo", crate::layout::STATE_DIR] {
            for m in self.entries(sub, crate::layout::is_temp)? {
                found.push(Leftover { name: m.name, size: m.size, modified: m.modified, upload_id: None });
            }
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    fn remove_leftover(&self, l: &Leftover) -> Result<(), StorageError> {
        self.remove(&l.name)
    }
}

fn meta(name: String, m: &fs::Metadata) -> Meta {
    Meta {
        name,
        size: m.len(),
        modified: m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        not_regular: (!m.is_file()).then(|| kind_of(m.file_type())),
        etag: None,
    }
}

/// A file being written under a temporary name; removed on drop unless renamed into place.
struct TempFile {
    path: PathBuf,
    /// Open while being written.
    file: Option<File>,
    /// Renamed into place: nothing to remove on drop.
    persisted: bool,
}

impl TempFile {
    fn file(&mut self) -> &mut File {
        self.file.as_mut().expect("open until staged")
    }

    /// Closes the file, unsynced, to be renamed to `dest` once durable. Holds no file
    /// descriptor: any number of files can wait.
    fn stage(mut self, rel: &str, dest: PathBuf) -> Staged {
        self.file = None;
        let durable = self.path.clone();
        Staged::new(rel, Some(durable), move || self.rename(&dest))
    }

    fn rename(mut self, dest: &Path) -> Result<(), StorageError> {
        fs::rename(&self.path, dest).map_err(io_err("rename into place", dest))?;
        self.persisted = true;
        crate::interrupt::forget(&self.path);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = fs::remove_file(&self.path);
            crate::interrupt::forget(&self.path);
        }
    }
}

struct DirNewFile {
    tmp: TempFile,
    dir: PathBuf,
}

impl Write for DirNewFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tmp.file().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.tmp.file().flush()
    }
}

impl NewFile for DirNewFile {
    fn stage(self: Box<Self>, dest: &str) -> Result<Staged, StorageError> {
        let path = self.dir.join(dest);
        Ok(self.tmp.stage(dest, path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_beneath_sends_only_regular_files_below_the_cache() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("secret"), "x").unwrap();
        let root = tempfile::tempdir().unwrap();
        // The cache directory reached through a link is the admin's choice: it is followed.
        let dir = root.path().join("cache");
        fs::create_dir_all(root.path().join("real/nar")).unwrap();
        std::os::unix::fs::symlink(root.path().join("real"), &dir).unwrap();
        fs::write(dir.join("a.narinfo"), "narinfo").unwrap();
        fs::write(dir.join("nar/a.nar"), "nar").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.join("b.narinfo")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("log")).unwrap();
        fs::create_dir(dir.join("debuginfo")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.join("debuginfo/fifo"),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();

        let read = |rel| open_beneath(&dir, rel).map(|f| f.map(|(f, _)| io::read_to_string(f).unwrap()));
        assert_eq!(read("a.narinfo").unwrap().as_deref(), Some("narinfo"));
        assert_eq!(read("nar/a.nar").unwrap().as_deref(), Some("nar"));
        assert!(matches!(read("b.narinfo"), Err(FileProblem::NotRegular("symbolic link"))));
        assert!(matches!(read("log/secret"), Ok(None)), "a linked subdirectory leads nowhere");
        assert!(matches!(read("debuginfo/fifo"), Err(FileProblem::NotRegular(_))), "a FIFO is not sent");
        assert!(matches!(read("missing.narinfo"), Ok(None)));
        assert!(matches!(read("a.narinfo/x"), Ok(None)));
        assert!(matches!(read("nar/a.nar/x"), Ok(None)), "only name or sub/name");
        assert!(matches!(read("nar"), Err(FileProblem::NotRegular(_))), "a directory is not sent");
    }
}
