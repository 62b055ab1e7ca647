//! A NAR going up: in one PUT from memory or a temporary file, or as a multipart upload to
//! a temporary key copied to its name; and the slots that bound uploads in flight.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::client::Client;
use super::{NewFile, PART_SIZE, S3Error, Staged, StorageError};

impl Client {
    /// Runs `upload` on a thread of its own once one of the `--uploads` slots is free
    /// (waiting here for it), and frees the slot when it ends.
    pub(super) fn in_slot<T: Send + 'static>(
        self: &Arc<Self>,
        upload: impl FnOnce(&Client) -> T + Send + 'static,
    ) -> JoinHandle<T> {
        self.slots.take();
        let c = self.clone();
        std::thread::spawn(move || {
            let r = upload(&c);
            c.slots.give();
            r
        })
    }
}

/// A NAR going up. Up to [`PART_SIZE`] it is held in memory and goes up in one PUT; up to
/// the spool limit it is held in a temporary file as well and goes up in one PUT, the file's
/// whole contents; beyond that it goes up as a multipart upload to a temporary key, parts of
/// [`PART_SIZE`] (growing), each on a thread of its own while the next fills, and is copied
/// to its name.
pub(super) struct Upload {
    pub(super) client: Arc<Client>,
    /// The temporary name a multipart upload goes to.
    pub(super) tmp_rel: String,
    pub(super) buf: Vec<u8>,
    /// The full parts written so far, while no multipart upload has started.
    pub(super) spool: Option<File>,
    /// How many bytes of `spool` were written whole (a failed write leaves more).
    pub(super) spooled: u64,
    pub(super) spool_limit: u64,
    pub(super) id: Option<String>,
    pub(super) etags: Vec<String>,
    pub(super) inflight: Option<JoinHandle<Result<String, S3Error>>>,
    pub(super) size: u64,
    /// A part failed: every later write fails with it.
    pub(super) failed: Option<String>,
}

impl Upload {
    pub(super) fn part_size(&self) -> usize {
        PART_SIZE << (self.etags.len() / 1000).min(9)
    }

    pub(super) fn wait_inflight(&mut self) -> Result<(), S3Error> {
        if let Some(h) = self.inflight.take() {
            let etag = h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?;
            self.etags.push(etag);
        }
        Ok(())
    }

    /// The buffer is a full part: into the spool while the NAR is within its limit (and the
    /// spool can be written), else up as the next part.
    pub(super) fn full_part(&mut self) -> Result<(), S3Error> {
        if self.id.is_none() && self.spool_part() {
            return Ok(());
        }
        self.send_part()
    }

    /// Appends the buffer to the spool, made on first use; false when the NAR is beyond the
    /// limit or the spool cannot be written (then it is given up for this NAR: what it holds
    /// past `spooled` is not to be trusted).
    pub(super) fn spool_part(&mut self) -> bool {
        if self.size > self.spool_limit {
            return false;
        }
        if self.spool.is_none() {
            // No temporary file is no failure: the NAR goes up in parts instead.
            self.spool = tempfile::tempfile_in(std::env::temp_dir()).ok();
        }
        let Some(f) = self.spool.as_mut() else { return false };
        if f.write_all(&self.buf).is_err() {
            self.spool_limit = 0;
            return false;
        }
        self.spooled += self.buf.len() as u64;
        self.buf.clear();
        true
    }

    /// Sends the buffer as the next part, on its own thread; the spool's parts go first.
    pub(super) fn send_part(&mut self) -> Result<(), S3Error> {
        let key = self.client.key(&self.tmp_rel);
        if self.id.is_none() {
            self.id = Some(self.client.create_multipart(&self.tmp_rel, &key)?);
        }
        if let Some(mut f) = self.spool.take() {
            let pending = std::mem::take(&mut self.buf);
            f.seek(io::SeekFrom::Start(0)).map_err(S3Error::Spool)?;
            let mut spooled = (&f).take(std::mem::take(&mut self.spooled));
            loop {
                let mut part = Vec::with_capacity(self.part_size());
                (&mut spooled)
                    .take(self.part_size() as u64)
                    .read_to_end(&mut part)
                    .map_err(S3Error::Spool)?;
                if part.is_empty() {
                    break;
                }
                self.buf = part;
                self.send_one()?;
            }
            self.buf = pending;
        }
        self.send_one()
    }

    pub(super) fn send_one(&mut self) -> Result<(), S3Error> {
        let key = self.client.key(&self.tmp_rel);
        self.wait_inflight()?;
        let data = std::mem::take(&mut self.buf);
        let id = self.id.clone().expect("started");
        let n = self.etags.len() + 1;
        self.inflight = Some(self.client.in_slot(move |c| c.upload_part(&key, &id, n, &data)));
        Ok(())
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(f) = &self.failed {
            return Err(io::Error::other(f.clone()));
        }
        let room = self.part_size() - self.buf.len();
        let n = data.len().min(room);
        self.buf.extend_from_slice(&data[..n]);
        self.size += n as u64;
        if self.buf.len() == self.part_size()
            && let Err(e) = self.full_part()
        {
            self.failed = Some(e.to_string());
            return Err(e.into_io());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl NewFile for Upload {
    fn stage(mut self: Box<Self>, dest: &str) -> Result<Staged, StorageError> {
        let client = self.client.clone();
        // One PUT: on a thread of its own (one of the upload slots), so that the pusher
        // goes on with the next path; committing waits for it, before any narinfo names it.
        let whole = if self.id.is_some() {
            None
        } else if self.spool.is_none() {
            Some(Whole::Memory(std::mem::take(&mut self.buf)))
        } else if self.spool_part() {
            Some(Whole::Spooled(self.spool.take().expect("spooled")))
        } else {
            None
        };
        if let Some(whole) = whole {
            let (rel, size) = (dest.to_owned(), self.size);
            let put = client.in_slot(move |c| match &whole {
                Whole::Memory(buf) => c.put(&rel, buf),
                Whole::Spooled(f) => c.put_file(&rel, f, size),
            });
            let rel = dest.to_owned();
            return Ok(Staged::new(dest, None, move || {
                let r = put.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                r.map_err(client.cache_err("upload", &rel))
            }));
        }
        let io = client.cache_err("upload", dest);
        if !self.buf.is_empty() || self.spool.is_some() {
            self.send_part().map_err(&io)?;
        }
        self.wait_inflight().map_err(&io)?;
        let key = self.client.key(&self.tmp_rel);
        let id = self.id.clone().expect("started");
        self.client.complete_multipart(&self.tmp_rel, &key, &id, &self.etags).map_err(&io)?;
        // Complete: nothing to abort any more; the temporary object goes after the copy.
        self.id = None;
        let copied = self.client.copy(&key, dest, self.size);
        let _ = self.client.delete(&self.tmp_rel);
        copied.map_err(&io)?;
        Ok(Staged::new(dest, None, || Ok(())))
    }
}

/// A NAR that goes up in one PUT.
pub(super) enum Whole {
    Memory(Vec<u8>),
    /// The whole of the file.
    Spooled(File),
}

impl Drop for Upload {
    fn drop(&mut self) {
        let _ = self.inflight.take().map(JoinHandle::join);
        if let Some(id) = self.id.take() {
            let _ = self.client.abort_multipart(&self.client.key(&self.tmp_rel), &id);
        }
    }
}
