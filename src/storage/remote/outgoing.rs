//! NARs on their way to the receiver. A worker that has compressed a NAR hands it to the
//! uploaders here and goes on compressing the next path: sending overlaps compressing, so on
//! a slow link the push takes about as long as the slower of the two, not their sum. A NAR
//! waits for its turn in its temporary file (disk, not memory); its narinfo is sent only once
//! the receiver has taken it ([`Staged::commit`] waits for that answer).

use std::fs::File;
use std::io::{self, Seek, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::{Body, Counts, NewFile, Staged, StorageError, Transport, put};

/// A NAR to send, and where its answer goes.
struct Job {
    file: File,
    len: u64,
    dest: String,
    done: mpsc::Sender<Result<(), StorageError>>,
}

/// Threads that send NARs, in the order they were handed over.
pub(super) struct Uploaders {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Uploaders {
    /// `n` threads sending through `transport`.
    pub(super) fn start(
        n: usize,
        transport: &Arc<dyn Transport>,
        counts: &Arc<Counts>,
        url: &str,
    ) -> Uploaders {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..n.max(1))
            .filter_map(|i| {
                let (rx, transport, counts, url) =
                    (rx.clone(), transport.clone(), counts.clone(), url.to_owned());
                std::thread::Builder::new()
                    .name(format!("nixcache-upload-{i}"))
                    .spawn(move || {
                        loop {
                            let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                            let Ok(job) = job else { break };
                            let sent =
                                put(&*transport, &counts, &url, &job.dest, Body::File(&job.file, job.len));
                            let _ = job.done.send(sent);
                        }
                    })
                    .ok()
            })
            .collect();
        Uploaders { jobs: Mutex::new(Some(tx)), threads }
    }

    fn hand_over(&self, job: Job) -> Result<(), Job> {
        match self.jobs.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

impl Drop for Uploaders {
    /// Lets the threads finish what was handed over, then ends them.
    fn drop(&mut self) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A NAR being written: to a temporary file here, handed to the uploaders when named.
pub(super) struct Outgoing {
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) uploaders: Arc<Uploaders>,
}

impl Write for Outgoing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl NewFile for Outgoing {
    /// Hands the NAR over to be sent; committing the staged file waits until the receiver
    /// has taken it (it keeps it out of sight until its narinfo comes).
    fn stage(mut self: Box<Self>, dest: &str) -> Result<Staged, StorageError> {
        let io_err = |source| StorageError::Io { action: "read back", path: std::env::temp_dir(), source };
        self.file.flush().and_then(|()| self.file.rewind()).map_err(io_err)?;
        let (done, answer) = mpsc::channel();
        let job = Job { file: self.file, len: self.len, dest: dest.to_owned(), done };
        self.uploaders.hand_over(job).map_err(|_| io_err(io::Error::other("the uploads have ended")))?;
        Ok(Staged::new(dest, None, move || {
            answer.recv().unwrap_or_else(|_| Err(io_err(io::Error::other("the upload thread ended"))))
        }))
    }
}
