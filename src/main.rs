//! The nixcache command. Exit status: 0 success, 1 failure, 2 usage error (from clap, or
//! [`cmd::Usage`] for what is found after parsing); 128 + the signal when interrupted.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::Parser;
use nixcache::cli::{Cli, Command};
use nixcache::cmd;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Push(_) | Command::Sign(_) | Command::Gc(_) | Command::Verify(_)) {
        nixcache::interrupt::install();
    }
    let result = match &cli.command {
        Command::Push(a) => match a.check() {
            Ok(()) => cmd::push::run(a),
            Err(e) => e.exit(),
        },
        Command::Keygen(a) => cmd::keygen::run(a).map(|()| true),
        Command::Sign(a) => cmd::sign::run(a),
        Command::Gc(a) => cmd::gc::run(a),
        Command::Serve(a) => match a.check() {
            Ok(()) => cmd::serve::run(a),
            Err(e) => e.exit(),
        },
        Command::Verify(a) => return cmd::verify::run(a),
        Command::Receive(a) => cmd::receive::run(a),
        Command::Completions(a) => {
            // Rendered into memory: clap_complete panics when its writer fails.
            let mut script = Vec::new();
            nixcache::cli::completions(a.shell, &mut script);
            let mut out = io::stdout().lock();
            out.write_all(&script)
                .and_then(|()| out.flush())
                .map(|()| true)
                .map_err(|e| anyhow::Error::new(e).context("cannot write the completion script"))
        }
    };
    let code = match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) if e.downcast_ref::<cmd::Usage>().is_some() => {
            nixcache::elog!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            // A closed pipe (`nixcache … | head`) is not a failure.
            if e.chain()
                .any(|c| c.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe))
            {
                return ExitCode::SUCCESS;
            }
            nixcache::elog!("error: {}", nixcache::error_chain(e.as_ref()));
            ExitCode::from(1)
        }
    };
    // serve's last lines, if stderr takes them soon; a stuck log reader does not hold the exit.
    nixcache::progress::drain_background(std::time::Duration::from_secs(2));
    code
}
