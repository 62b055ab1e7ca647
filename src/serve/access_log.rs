//! The access log: one line per request, written to stderr by a thread of its own.

use std::io;

/// Access lines go to stderr from a thread of their own, batched, so a slow journal never
/// holds up a response.
#[derive(Clone)]
pub(super) struct Logger(std::sync::mpsc::Sender<String>);

impl Logger {
    pub(super) fn start() -> Logger {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        // The journal stamps each line itself; a log file or terminal needs the time here.
        let stamp = std::env::var_os("JOURNAL_STREAM").is_none();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut out = io::BufWriter::new(io::stderr());
            let write = |out: &mut io::BufWriter<io::Stderr>, line: String| {
                if stamp {
                    let now = jiff::Timestamp::now()
                        .round(jiff::Unit::Millisecond)
                        .unwrap_or_else(|_| jiff::Timestamp::now());
                    writeln!(out, "{now} {line}")
                } else {
                    writeln!(out, "{line}")
                }
            };
            while let Ok(line) = rx.recv() {
                let _ = write(&mut out, line);
                while let Ok(line) = rx.try_recv() {
                    let _ = write(&mut out, line);
                }
                let _ = out.flush();
            }
        });
        Logger(tx)
    }

    pub(super) fn line(&self, line: String) {
        let _ = self.0.send(line);
    }
}
