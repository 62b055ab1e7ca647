//! `nixcache receive` on the far side of the system's `ssh`: its config, agent and
//! known_hosts apply, with `NIX_SSHOPTS` added as Nix adds them. Requests are framed on the
//! receiver's standard input ([`wire`]) and may be sent before earlier ones are answered:
//! the answers come back in order, read by a thread of their own, so several paths are in
//! flight at once and a round trip per path is not what bounds a push.

use std::collections::VecDeque;
use std::io::{self, BufReader, BufWriter, Read, Seek, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::wire::{self, Verb};
use super::{Answer, Body, RemoteDest, RemoteError, RemoteUrl, Transport};

/// The largest answer read (a "have" answer for a batch of paths is the largest).
const ANSWER_LIMIT: u64 = 512 << 20;

type Waiter = mpsc::Sender<Result<Answer, String>>;

#[derive(Default)]
struct Pending {
    waiting: VecDeque<Waiter>,
    /// Why no more answers will come.
    ended: Option<String>,
}

pub struct Ssh {
    host: String,
    writer: Mutex<Option<BufWriter<ChildStdin>>>,
    pending: Arc<Mutex<Pending>>,
    child: Mutex<Child>,
}

/// A word quoted for the remote shell.
fn quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,".contains(&b)) {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command run on the remote machine.
fn remote_command(program: &str, path: &str) -> String {
    // The program may be a command line of its own (`sudo -u cache nixcache`), as rsync's
    // --rsync-path is.
    format!("{program} receive --dest {}", quote(path))
}

/// ssh's arguments: `NIX_SSHOPTS` (split at white space, as Nix splits it), then ours.
fn ssh_args(target: &str, port: Option<u16>, command: &str) -> Vec<String> {
    let mut args: Vec<String> =
        std::env::var("NIX_SSHOPTS").unwrap_or_default().split_whitespace().map(str::to_owned).collect();
    // No X11 or agent forwarding, no terminal: the stream is binary.
    args.extend(["-x", "-a", "-T"].map(str::to_owned));
    if let Some(p) = port {
        args.extend(["-p".to_owned(), p.to_string()]);
    }
    args.extend(["--".to_owned(), target.to_owned(), command.to_owned()]);
    args
}

impl Ssh {
    /// Runs the receiver and waits for its greeting.
    pub fn start(dest: &RemoteDest) -> Result<Ssh, RemoteError> {
        let RemoteUrl::Ssh { target, port, path, .. } = &dest.url else {
            unreachable!("an ssh:// destination")
        };
        let host = target.clone();
        let mut child = Command::new("ssh")
            .args(ssh_args(target, *port, &remote_command(&dest.program, path)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(RemoteError::Spawn)?;
        let stdin = child.stdin.take().expect("piped");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
        if let Err(e) = wire::read_greeting(&mut stdout) {
            drop(stdin);
            let status = child.wait().ok();
            let code = status.and_then(|s| s.code());
            return Err(match code {
                Some(127) => RemoteError::NotInstalled { host, program: dest.program.clone() },
                Some(255) => RemoteError::SshFailed { host, code: "255".into() },
                Some(c) if e.kind() == io::ErrorKind::UnexpectedEof => RemoteError::Lost {
                    host,
                    reason: format!(
                        "`{}` exited with {c} before it was ready (its message is above)",
                        dest.program
                    ),
                },
                _ => RemoteError::Lost { host, reason: e.to_string() },
            });
        }
        let pending = Arc::new(Mutex::new(Pending::default()));
        let reader = pending.clone();
        std::thread::Builder::new()
            .name("receiver-answers".into())
            .spawn(move || read_answers(stdout, &reader))
            .map_err(RemoteError::Spawn)?;
        Ok(Ssh {
            host,
            writer: Mutex::new(Some(BufWriter::with_capacity(256 << 10, stdin))),
            pending,
            child: Mutex::new(child),
        })
    }

    fn lost(&self, reason: impl Into<String>) -> RemoteError {
        RemoteError::Lost { host: self.host.clone(), reason: reason.into() }
    }
}

/// Hands each answer to the request waiting longest; when the stream ends or breaks, every
/// request still waiting is told why.
fn read_answers(stdout: BufReader<ChildStdout>, pending: &Mutex<Pending>) {
    let mut r = stdout;
    let reason = loop {
        let head = match wire::read_answer(&mut r) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break "the connection closed".to_owned(),
            Err(e) => break e.to_string(),
        };
        if head.len > ANSWER_LIMIT {
            break format!("an answer of {} bytes is more than this side reads", head.len);
        }
        let mut body = Vec::with_capacity(head.len as usize);
        if let Err(e) = (&mut r).take(head.len).read_to_end(&mut body) {
            break e.to_string();
        }
        if (body.len() as u64) < head.len {
            break "the connection closed in the middle of an answer".to_owned();
        }
        let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).waiting.pop_front();
        match waiter {
            Some(w) => {
                let _ = w.send(Ok(Answer { status: head.status, size: head.size, body }));
            }
            None => break "the receiver answered a request that was not made".to_owned(),
        }
    };
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    p.ended = Some(reason.clone());
    for w in p.waiting.drain(..) {
        let _ = w.send(Err(reason.clone()));
    }
}

impl Transport for Ssh {
    fn send(&self, verb: Verb, rel: &str, body: Body<'_>, _limit: u64) -> Result<Answer, RemoteError> {
        let (tx, rx) = mpsc::channel();
        {
            let mut guard = self.writer.lock().unwrap_or_else(|e| e.into_inner());
            let Some(w) = guard.as_mut() else { return Err(self.lost("the connection was closed")) };
            {
                let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(reason) = &p.ended {
                    return Err(self.lost(reason.clone()));
                }
                p.waiting.push_back(tx);
            }
            let sent = (|| -> io::Result<()> {
                wire::write_request(w, verb, rel, body.len())?;
                match body {
                    Body::Empty => {}
                    Body::Bytes(b) => w.write_all(b)?,
                    Body::File(mut f, len) => {
                        f.rewind()?;
                        let n = io::copy(&mut f.take(len), w)?;
                        if n != len {
                            return Err(io::Error::other(format!(
                                "the file to send ended after {n} of {len} bytes"
                            )));
                        }
                    }
                }
                w.flush()
            })();
            if let Err(e) = sent {
                // The stream is broken mid-request: nothing more can be sent on it.
                *guard = None;
                return Err(self.lost(format!("cannot send to the receiver: {e}")));
            }
        }
        match rx.recv() {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(reason)) => Err(self.lost(reason)),
            Err(_) => Err(self.lost("the connection closed")),
        }
    }
}

impl Drop for Ssh {
    /// Closes the receiver's input (it ends when it has answered everything) and waits for it.
    fn drop(&mut self) {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.child.lock().unwrap_or_else(|e| e.into_inner()).wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_command_is_quoted() {
        assert_eq!(remote_command("nixcache", "/var/lib/cache"), "nixcache receive --dest /var/lib/cache");
        assert_eq!(remote_command("nixcache", "my cache's"), r"nixcache receive --dest 'my cache'\''s'");
        assert_eq!(
            remote_command("/opt/bin/nixcache", "c;rm -rf ~"),
            "/opt/bin/nixcache receive --dest 'c;rm -rf ~'"
        );
        let args = ssh_args("root@pi", Some(2222), "x");
        assert_eq!(args[args.len() - 5..], ["-p", "2222", "--", "root@pi", "x"]);
    }
}
