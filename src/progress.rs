//! Progress display: bars on a terminal, one plain line per path otherwise (a systemd
//! journal, a log file), nothing with `--quiet`. The pipeline gets a [`Progress`] handle and
//! never prints by itself; log lines go through [`Progress::println`] so bars don't tear.

use std::io::{self, IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `n` and the noun, plural unless `n` is 1: "1 path", "3 paths".
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// Writes a line to stderr. A failed write (a full disk under `2>log`, a closed pipe, a
/// journal that went away) is ignored: a log line is never worth a panic, and the exit
/// status still tells the outcome. Once [`write_in_background`] was called, the line is
/// queued instead, and never waits for stderr.
pub fn eprint(line: &str) {
    match BACKGROUND.get() {
        Some(b) => b.send(line),
        None => {
            let _ = writeln!(io::stderr().lock(), "{line}");
        }
    }
}

/// Lines waiting for stderr in the background, at most [`Background::CAPACITY`].
struct Background {
    tx: std::sync::mpsc::SyncSender<String>,
    /// Lines queued and not yet written.
    pending: std::sync::atomic::AtomicUsize,
    /// Lines dropped since the last written, the queue being full.
    dropped: AtomicU64,
}

static BACKGROUND: std::sync::OnceLock<Background> = std::sync::OnceLock::new();

impl Background {
    /// About 1 MiB of lines: a server whose stderr nobody reads holds no more.
    const CAPACITY: usize = 8192;

    fn send(&self, line: &str) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        if self.tx.try_send(line.to_owned()).is_err() {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// From now on, [`eprint`] (and so `elog!`) queues its lines for a thread of their own that
/// writes them, so that nothing but that thread ever waits for stderr: a server whose log
/// reader is stuck, or whose terminal is paused, goes on answering and stops when told. At
/// most [`Background::CAPACITY`] lines wait; past that they are counted, and the count is
/// said once stderr takes lines again.
pub fn write_in_background() {
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(Background::CAPACITY);
    let background = Background { tx, pending: Default::default(), dropped: AtomicU64::new(0) };
    if BACKGROUND.set(background).is_err() {
        return;
    }
    let _ = std::thread::Builder::new().name("nixcache-log".into()).spawn(move || {
        let b = BACKGROUND.get().expect("set above");
        let mut out = io::BufWriter::new(io::stderr());
        while let Ok(line) = rx.recv() {
            let (mut next, mut written) = (Some(line), 0);
            while let Some(line) = next {
                let dropped = b.dropped.swap(0, Ordering::Relaxed);
                if dropped > 0 {
                    let _ = writeln!(
                        out,
                        "warning: {} dropped: stderr was not read",
                        plural(dropped as usize, "log line")
                    );
                }
                let _ = writeln!(out, "{line}");
                written += 1;
                next = rx.try_recv().ok();
            }
            let _ = out.flush();
            // Counted as written once flushed: [`drain_background`] must not let the process
            // exit with lines still in the buffer.
            b.pending.fetch_sub(written, Ordering::SeqCst);
        }
    });
}

/// Waits up to `limit` for the lines queued by [`write_in_background`] to be written (at
/// exit, when stderr moves); never longer.
pub fn drain_background(limit: Duration) {
    let Some(b) = BACKGROUND.get() else { return };
    let end = Instant::now() + limit;
    while b.pending.load(Ordering::SeqCst) > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Writes a line to stdout, ignoring a failed write as [`eprint`] does.
pub fn print(line: &str) {
    let _ = writeln!(io::stdout().lock(), "{line}");
}

/// `eprintln!` that never panics: see [`eprint`].
#[macro_export]
macro_rules! elog {
    ($($t:tt)*) => { $crate::progress::eprint(&format!($($t)*)) };
}

/// `println!` that never panics: see [`print`].
#[macro_export]
macro_rules! outln {
    ($($t:tt)*) => { $crate::progress::print(&format!($($t)*)) };
}

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Bars,
    Lines,
    Quiet,
}

impl Mode {
    /// Bars when stderr is a terminal, lines otherwise, nothing when quiet.
    pub fn detect(quiet: bool) -> Mode {
        if quiet {
            Mode::Quiet
        } else if io::stderr().is_terminal() {
            Mode::Bars
        } else {
            Mode::Lines
        }
    }
}

/// The whole run's display.
pub struct Progress {
    mode: Mode,
    multi: MultiProgress,
    total: Option<ProgressBar>,
    /// Paths done and in all, and a note said after them (what crossed a link).
    paths: std::sync::Mutex<(usize, usize, String)>,
    /// In lines mode, a path still being read says how far it got this often.
    every: Duration,
}

/// How often a long path's progress is said in lines mode: 30 s, or
/// `NIXCACHE_PROGRESS_SECONDS` (for tests).
fn progress_interval() -> Duration {
    let secs = std::env::var("NIXCACHE_PROGRESS_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    Duration::from_secs(secs)
}

impl Progress {
    /// `total_bytes` is the sum of the NAR sizes that will be read.
    pub fn new(mode: Mode, verb: &str, total_paths: usize, total_bytes: u64) -> Progress {
        let multi = MultiProgress::with_draw_target(match mode {
            Mode::Bars => ProgressDrawTarget::stderr(),
            _ => ProgressDrawTarget::hidden(),
        });
        let total = (mode == Mode::Bars && total_bytes > 0).then(|| {
            let bar = multi.add(ProgressBar::new(total_bytes));
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar.set_prefix(verb.to_owned());
            bar.set_message(format!("0/{total_paths} paths"));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            mode,
            multi,
            total,
            paths: std::sync::Mutex::new((0, total_paths, String::new())),
            every: progress_interval(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Prints a line above the bars (or plainly), unless quiet.
    pub fn println(&self, line: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(line);
            }
            Mode::Lines => eprint(line),
            Mode::Quiet => {}
        }
    }

    /// Prints a warning or error even when quiet.
    pub fn warn(&self, line: &str) {
        match self.mode {
            Mode::Bars => {
                let _ = self.multi.println(line);
            }
            _ => eprint(line),
        }
    }

    /// A bar for one path of `size` NAR bytes.
    pub fn path(&self, name: &str, size: u64) -> PathProgress {
        let bar = (self.mode == Mode::Bars && size > 0).then(|| {
            let bar = self.multi.insert_from_back(0, ProgressBar::new(size));
            bar.set_style(
                ProgressStyle::with_template("  {bar:20} {bytes:>10}/{total_bytes:<10} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(name.to_owned());
            bar
        });
        let line = (self.mode == Mode::Lines && size > 0).then(|| LineProgress {
            name: name.to_owned(),
            size,
            started: Instant::now(),
            done: AtomicU64::new(0),
            next: AtomicU64::new(self.every.as_secs().max(1)),
            every: self.every.as_secs().max(1),
        });
        PathProgress { bar, total: self.total.clone(), line }
    }

    /// Adds bytes to the overall bar, for work not fed through a [`PathProgress`].
    pub fn advance(&self, bytes: u64) {
        if let Some(t) = &self.total {
            t.inc(bytes);
        }
    }

    /// Counts one finished path in the overall bar.
    pub fn path_done(&self, done: usize, of: usize) {
        let mut p = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        (p.0, p.1) = (done, of);
        self.show(&p);
    }

    /// Says `note` after the paths on the overall bar (say, the bytes a push has sent over a
    /// link so far), until the next note.
    pub fn note(&self, note: String) {
        let mut p = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        p.2 = note;
        self.show(&p);
    }

    fn show(&self, p: &(usize, usize, String)) {
        if let Some(t) = &self.total {
            let note = if p.2.is_empty() { String::new() } else { format!("; {}", p.2) };
            t.set_message(format!("{}/{} paths{note}", p.0, p.1));
        }
    }

    /// Removes the bars; the summary goes after this.
    pub fn finish(&self) {
        if let Some(t) = &self.total {
            t.finish_and_clear();
        }
        let _ = self.multi.clear();
    }
}

/// One path's bar, fed by the bytes that flow through the pipeline.
pub struct PathProgress {
    bar: Option<ProgressBar>,
    total: Option<ProgressBar>,
    line: Option<LineProgress>,
}

/// A path's progress in lines mode: a line when it takes long.
struct LineProgress {
    name: String,
    size: u64,
    started: Instant,
    done: AtomicU64,
    /// Seconds since `started` at which the next line is due.
    next: AtomicU64,
    every: u64,
}

impl PathProgress {
    /// Progress that is shown nowhere, for bytes already counted.
    pub fn none() -> PathProgress {
        PathProgress { bar: None, total: None, line: None }
    }

    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
        if let Some(t) = &self.total {
            t.inc(n);
        }
        if let Some(l) = &self.line {
            let done = l.done.fetch_add(n, Ordering::Relaxed) + n;
            let secs = l.started.elapsed().as_secs();
            let due = l.next.load(Ordering::Relaxed);
            // One thread says it, whichever crosses the time first.
            if secs >= due
                && l.next.compare_exchange(due, secs + l.every, Ordering::Relaxed, Ordering::Relaxed).is_ok()
            {
                eprint(&format!(
                    "still reading {}: {} of {} of NAR ({:.0}%) after {secs}s",
                    l.name,
                    bytes(done),
                    bytes(l.size),
                    100.0 * done as f64 / l.size.max(1) as f64
                ));
            }
        }
    }
}

impl Drop for PathProgress {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// A `Write` that reports the bytes written through it.
pub struct ProgressWriter<'a, W> {
    inner: W,
    progress: &'a PathProgress,
}

impl<'a, W: Write> ProgressWriter<'a, W> {
    pub fn new(inner: W, progress: &'a PathProgress) -> Self {
        ProgressWriter { inner, progress }
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

impl<W: Write> Write for ProgressWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.progress.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Formats a byte count for summaries.
pub fn bytes(n: u64) -> String {
    HumanBytes(n).to_string()
}
