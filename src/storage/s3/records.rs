//! A bucket's own objects, which stand in for what a directory gets from its file system:
//! push records (a push's closure, written before it looks: gc's modification times), gc's
//! markers, and the temporary names of uploads (what a killed run leaves).

use std::time::SystemTime;

use super::{Backend, Leftover, Meta, RECORD_LIMIT, RECORD_PATHS, Record, S3Backend, S3Error, StorageError};
use crate::layout::TEMP_PREFIX;

/// Where push records live, under the prefix.
pub(super) const RECORDS: &str = ".nixcache/pushes";

/// Where a gc says it is deleting ([`Backend::start_deleting`]).
pub(super) const GC_MARKERS: &str = ".nixcache/gc";

/// 128 random bits, in hex: a name no other run picks.
pub(super) fn random_id() -> Result<String, S3Error> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b)
        .map_err(|e| S3Error::BadAnswer { what: "drawing random bits".into(), reason: e.to_string() })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `<dir>/<ms since the epoch, 13 digits>-<random id>`: the name of a push record (which adds
/// `-<n>`) or a gc's marker, unique without coordination and sorted by when it was written.
pub(super) fn stamped_name(dir: &str) -> Result<String, S3Error> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Ok(format!("{dir}/{:013}-{}", now.as_millis(), random_id()?))
}

/// Whether `rel` is a temporary name a nixcache run gives: directly under the cache (or its
/// `nar/` or `debuginfo/`), [`TEMP_PREFIX`] and then only name characters. Nothing else is
/// ever aborted or removed as a leftover: not another program's upload, not another cache's
/// under a longer prefix.
pub fn is_own_temp(rel: &str) -> bool {
    let name = match rel.split_once('/') {
        None => rel,
        Some((sub, name)) if (sub == "nar" || sub == "debuginfo") && !name.contains('/') => name,
        Some(_) => return false,
    };
    name.strip_prefix(TEMP_PREFIX)
        .is_some_and(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)))
}

/// Whether `name` (under `.nixcache/pushes/`) is a push record's name: milliseconds, a dash,
/// then a run's id.
pub(super) fn is_record_name(name: &str) -> bool {
    name.split_once('-').is_some_and(|(ms, id)| {
        ms.len() == 13
            && ms.bytes().all(|b| b.is_ascii_digit())
            && !id.is_empty()
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    })
}

/// Hands each hash part of a push record to `each`; the first line that is not one is the
/// error (what came before it was handed on: a record is only ever more generous).
pub(super) fn parse_record(bytes: &[u8], mut each: impl FnMut(&str)) -> Result<(), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not text".to_owned())?;
    for (n, line) in text.lines().enumerate() {
        if line.len() != crate::store_path::HASH_LEN || crate::nixbase32::decode::<20>(line).is_err() {
            return Err(format!("line {} is not a store path's hash part", n + 1));
        }
        each(line);
    }
    Ok(())
}

impl S3Backend {
    /// What [`super::Backend::record_push`] does.
    pub(super) fn write_push_record(&self, hash_parts: &[&str]) -> Result<Option<String>, StorageError> {
        let run = stamped_name(RECORDS).map_err(self.io("name the push record in", RECORDS))?;
        let mut first = None;
        // A record holds at most RECORD_PATHS: a larger closure writes several.
        for (n, chunk) in hash_parts.chunks(RECORD_PATHS).enumerate() {
            let name = format!("{run}-{n}");
            let mut body = String::with_capacity(chunk.len() * 33);
            for h in chunk {
                body.push_str(h);
                body.push('\n');
            }
            self.client.put(&name, body.as_bytes()).map_err(self.io("write the push record", &name))?;
            first.get_or_insert(name);
        }
        Ok(first)
    }

    /// What [`super::Backend::push_records`] answers.
    pub(super) fn read_push_records(
        &self,
        skip: &dyn Fn(&str) -> bool,
        each: &mut dyn FnMut(&str, SystemTime),
    ) -> Result<Vec<Record>, StorageError> {
        let c = &self.client;
        // Every key below, not only the direct ones: a misplaced object is found (and goes with
        // the window) instead of lying there forever.
        let dir = c.key(&format!("{RECORDS}/"));
        let listed = c.list_keys(&dir, false, None).map_err(self.io("list", RECORDS))?.unwrap_or_default();
        let mut out = Vec::new();
        for m in listed {
            let name = m.name.strip_prefix(&format!("{RECORDS}/")).unwrap_or(&m.name);
            let problem = if skip(&m.name) {
                None
            } else if !is_record_name(name) {
                Some("is not a push record's name (nixcache writes .nixcache/pushes/<ms>-<id>)".to_owned())
            } else {
                match self.read(&m.name, RECORD_LIMIT) {
                    // Gone since the listing: another gc removed it.
                    Ok(None) => continue,
                    Ok(Some(bytes)) => parse_record(&bytes, |h| each(h, m.modified)).err(),
                    Err(e) if e.is_established() => Some(e.to_string()),
                    // Not read: what it names is unknown, so nothing may be concluded.
                    Err(source) => return Err(StorageError::BadFile { path: self.locate(&m.name), source }),
                }
            };
            out.push(Record { name: m.name, modified: m.modified, problem });
        }
        Ok(out)
    }

    /// What [`super::Backend::start_deleting`] does.
    pub(super) fn write_gc_marker(&self) -> Result<Option<String>, StorageError> {
        let name = stamped_name(GC_MARKERS).map_err(self.io("name the gc marker in", GC_MARKERS))?;
        let body = b"a nixcache gc is deleting; pushes check their closure at the end while this is here\n";
        self.client.put(&name, body).map_err(self.io("write the gc marker", &name))?;
        Ok(Some(name))
    }

    /// What [`super::Backend::deleting`] answers.
    pub(super) fn gc_markers(&self) -> Result<Vec<Meta>, StorageError> {
        let dir = self.client.key(&format!("{GC_MARKERS}/"));
        let listed = self.client.list_keys(&dir, false, None).map_err(self.io("list", GC_MARKERS))?;
        Ok(listed.unwrap_or_default())
    }

    /// What [`super::Backend::leftovers`] answers: temporary objects and incomplete uploads
    /// of nixcache's own names.
    pub(super) fn own_leftovers(&self) -> Result<Vec<Leftover>, StorageError> {
        let mut found = Vec::new();
        for sub in ["", "nar", "debuginfo"] {
            for m in self.list_once(sub)? {
                if is_own_temp(&m.name) {
                    found.push(Leftover {
                        name: m.name,
                        size: m.size,
                        modified: m.modified,
                        upload_id: None,
                    });
                }
            }
        }
        let uploads = self.client.list_uploads().map_err(self.io("list the uploads of", ""))?;
        for u in uploads.into_iter().filter(|u| is_own_temp(&u.rel)) {
            found.push(Leftover {
                name: format!("{} (incomplete upload)", u.rel),
                size: 0,
                modified: u.initiated,
                upload_id: Some(u.id),
            });
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_names() {
        for own in ["nar/.nixcache-tmp-0123abcd.nar.xz", ".nixcache-tmp-1-2", "debuginfo/.nixcache-tmp-x"] {
            assert!(is_own_temp(own), "{own}");
        }
        for other in [
            "b/nar/.nixcache-tmp-1.nar.xz",
            "backup.tar",
            "nar/x.nar.xz",
            "log/.nixcache-tmp-1",
            "nar/.nixcache-tmp-",
            "nar/.nixcache-tmp-a b",
        ] {
            assert!(!is_own_temp(other), "{other}");
        }
        assert!(is_record_name("1764660000000-0123abcd-0") && is_record_name("1764660000000-123-4"));
        assert!(
            !is_record_name("x/1764660000000-1")
                && !is_record_name("176466-1")
                && !is_record_name("1764660000000-")
        );
        let h = "0123456789abcdfghijklmnpqrsvwxyz";
        let mut seen = Vec::new();
        assert!(parse_record(format!("{h}\n{h}\n").as_bytes(), |x| seen.push(x.to_owned())).is_ok());
        assert_eq!(seen.len(), 2);
        assert!(parse_record(b"not a hash\n", |_| {}).is_err());
        assert!(parse_record(&[0xff], |_| {}).is_err());
    }
}
