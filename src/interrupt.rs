//! Ctrl-C and SIGTERM for the commands that write a cache: the temporary files this run
//! made are removed, the terminal's cursor is given back, `interrupted` is said, and the
//! process exits with 128 + the signal (130 for Ctrl-C, 143 for systemd's SIGTERM).
//!
//! What is published stays: every narinfo and NAR in place was complete when it was renamed
//! there. Without this, a temporary file would stay until the next push or gc, and `verify`
//! (the example gc unit's last step) would report it meanwhile.
//!
//! Writers register each temporary file while creating it, under one lock; the handler takes
//! that lock and never gives it back, so no file is created after it has looked.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

static TEMP_FILES: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

/// Runs `create` (which makes the temporary file `path`) with the file registered for
/// removal on interrupt. Blocks forever once an interrupt is being handled.
pub fn create_registered<T, E>(path: &Path, create: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let mut files = TEMP_FILES.lock().unwrap_or_else(|e| e.into_inner());
    let made = create()?;
    files.get_or_insert_with(HashSet::new).insert(path.to_owned());
    Ok(made)
}

/// `path` was renamed into place or removed: nothing to clean up for it.
pub fn forget(path: &Path) {
    if let Some(files) = TEMP_FILES.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        files.remove(path);
    }
}

/// Handles SIGINT and SIGTERM from now on, on a thread of its own.
pub fn install() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else { return };
    std::thread::Builder::new()
        .name("nixcache-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                stop(sig);
            }
        })
        .ok();
}

/// Removes every registered temporary file and keeps any more from being made: for a
/// process about to exit with writers still running (serve abandoning a fill). Returns how
/// many were removed.
pub fn remove_registered() -> usize {
    let files = TEMP_FILES.lock().unwrap_or_else(|e| e.into_inner());
    let removed = files.iter().flatten().filter(|f| std::fs::remove_file(f).is_ok()).count();
    // Held until exit, as on a signal.
    std::mem::forget(files);
    removed
}

fn stop(sig: i32) -> ! {
    let removed = remove_registered();
    let mut err = std::io::stderr().lock();
    let name = if sig == signal_hook::consts::SIGINT { "SIGINT" } else { "SIGTERM" };
    if std::io::stderr().is_terminal() {
        // Off the progress bars' line, and the cursor shown again.
        let _ = write!(err, "\r\x1b[J\x1b[?25h");
    }
    let _ = writeln!(
        err,
        "interrupted ({name}): {removed} temporary file{} of this run removed; what was published stays, and the next run goes on from there",
        if removed == 1 { "" } else { "s" }
    );
    let _ = err.flush();
    std::process::exit(128 + sig);
}
