//! The access log: one line per request, stamped with the time unless stderr is the
//! journal, and queued for stderr without ever waiting for it ([`crate::progress::eprint`]
//! once serve has called [`crate::progress::write_in_background`]).

/// How access lines are written.
#[derive(Clone, Copy)]
pub(super) struct Logger {
    /// The journal stamps each line itself; a log file or terminal needs the time here.
    stamp: bool,
}

impl Logger {
    pub(super) fn start() -> Logger {
        Logger { stamp: std::env::var_os("JOURNAL_STREAM").is_none() }
    }

    pub(super) fn line(&self, line: String) {
        if self.stamp {
            let now = jiff::Timestamp::now()
                .round(jiff::Unit::Millisecond)
                .unwrap_or_else(|_| jiff::Timestamp::now());
            crate::elog!("{now} {line}");
        } else {
            crate::elog!("{line}");
        }
    }
}
