//! Partial caches: what a cache deliberately leaves to other caches, and why.
//!
//! A push with `--skip-signed-by`, `--skip-upstream` or `--exclude` leaves paths out of the
//! cache whose narinfos other narinfos still reference. The cache remembers that in
//! upstreams records under `.nixcache/` (see [`crate::layout::UPSTREAMS_PREFIX`]): the policy the push
//! applied, and every path it left out with the reason. verify and gc read them to tell a
//! deliberate hole from a broken closure, and a later push keeps the policy.
//!
//! This module is pure: the record's text form, and the decisions that need no network
//! ([`Policy::local_reason`]). Asking an upstream over HTTP is [`lookup`].

pub mod lookup;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use crate::path_info::PathInfo;
use crate::signing::{self, PublicKey};
use crate::store_path::{StoreDir, StorePath};

/// Why a path is not in the cache.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// The Nix database holds a valid signature by this key (its name).
    SignedBy(String),
    /// This upstream cache (its URL) had the path's narinfo.
    Upstream(String),
    /// Its name matched this `--exclude` expression.
    Excluded(String),
}

impl Reason {
    /// For summaries: `signed by cache.nixos.org-1`.
    pub fn describe(&self) -> String {
        match self {
            Reason::SignedBy(k) => format!("signed by {k}"),
            Reason::Upstream(u) => format!("on {u}"),
            Reason::Excluded(r) => format!("excluded by --exclude '{r}'"),
        }
    }

    /// Whether the path is expected to be found elsewhere (not merely withheld).
    pub fn elsewhere(&self) -> bool {
        !matches!(self, Reason::Excluded(_))
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::SignedBy(k) => write!(f, "signed-by {k}"),
            Reason::Upstream(u) => write!(f, "upstream {u}"),
            Reason::Excluded(r) => write!(f, "excluded {r}"),
        }
    }
}

impl FromStr for Reason {
    type Err = UpstreamsError;
    fn from_str(s: &str) -> Result<Self, UpstreamsError> {
        let bad = || UpstreamsError::Line(s.to_owned());
        let (kind, value) = s.split_once(' ').ok_or_else(bad)?;
        if value.is_empty() {
            return Err(bad());
        }
        Ok(match kind {
            "signed-by" => Reason::SignedBy(value.to_owned()),
            "upstream" => Reason::Upstream(value.to_owned()),
            "excluded" => Reason::Excluded(value.to_owned()),
            _ => return Err(bad()),
        })
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum UpstreamsError {
    #[error("does not start with `{HEADER}`: not an upstreams record nixcache wrote")]
    Header,
    #[error("has a line nixcache does not understand (written by a newer nixcache?): {0:?}")]
    Line(String),
    #[error("names a bad public key: {0}")]
    Key(signing::KeyError),
    #[error("names a bad store path base name: {0:?}")]
    Path(String),
}

/// The first line of every record, with the format's version.
pub const HEADER: &str = "nixcache-upstreams 1";

/// What a cache leaves to others: a push's policy and the paths it left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstreams {
    /// Keys whose valid signatures in the Nix database mean "an upstream has it".
    pub signed_by: Vec<PublicKey>,
    /// Upstream caches asked whether they have a path.
    pub upstreams: Vec<String>,
    /// Regular expressions over store path names that are never pushed.
    pub excludes: Vec<String>,
    /// Paths left out, by hash part: the base name (`<hash>-<name>`) and why.
    pub left: BTreeMap<String, (String, Reason)>,
}

impl Upstreams {
    pub fn is_empty(&self) -> bool {
        self.signed_by.is_empty()
            && self.upstreams.is_empty()
            && self.excludes.is_empty()
            && self.left.is_empty()
    }

    /// Records that `path` was left out for `reason`.
    pub fn leave(&mut self, path: &StorePath, reason: Reason) {
        self.left.insert(path.hash_part().to_owned(), (path.to_string(), reason));
    }

    /// Why the path with this hash part is not in the cache, if that was deliberate.
    pub fn covers(&self, hash_part: &str) -> Option<&Reason> {
        self.left.get(hash_part).map(|(_, r)| r)
    }

    /// Adds everything of `other` that this lacks.
    pub fn merge(&mut self, other: &Upstreams) {
        for k in &other.signed_by {
            if !self.signed_by.contains(k) {
                self.signed_by.push(k.clone());
            }
        }
        for (mine, theirs) in [(&mut self.upstreams, &other.upstreams), (&mut self.excludes, &other.excludes)]
        {
            for x in theirs {
                if !mine.contains(x) {
                    mine.push(x.clone());
                }
            }
        }
        for (h, v) in &other.left {
            self.left.entry(h.clone()).or_insert_with(|| v.clone());
        }
    }

    /// What `wanted` holds that this does not: the record a push must write, empty when all of
    /// it is recorded already.
    pub fn missing(&self, wanted: &Upstreams) -> Upstreams {
        Upstreams {
            signed_by: wanted.signed_by.iter().filter(|k| !self.signed_by.contains(k)).cloned().collect(),
            upstreams: wanted.upstreams.iter().filter(|u| !self.upstreams.contains(u)).cloned().collect(),
            excludes: wanted.excludes.iter().filter(|e| !self.excludes.contains(e)).cloned().collect(),
            left: wanted
                .left
                .iter()
                .filter(|(h, (_, r))| self.left.get(*h).is_none_or(|(_, mine)| mine != r))
                .map(|(h, v)| (h.clone(), v.clone()))
                .collect(),
        }
    }
}

impl fmt::Display for Upstreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{HEADER}")?;
        for k in &self.signed_by {
            writeln!(f, "signed-by {k}")?;
        }
        for u in &self.upstreams {
            writeln!(f, "upstream {u}")?;
        }
        for e in &self.excludes {
            writeln!(f, "exclude {e}")?;
        }
        for (name, reason) in self.left.values() {
            writeln!(f, "left {name} {reason}")?;
        }
        Ok(())
    }
}

impl FromStr for Upstreams {
    type Err = UpstreamsError;
    fn from_str(s: &str) -> Result<Self, UpstreamsError> {
        let mut lines = s.lines();
        if lines.next() != Some(HEADER) {
            return Err(UpstreamsError::Header);
        }
        let mut r = Upstreams::default();
        for line in lines {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = || UpstreamsError::Line(line.to_owned());
            let (kind, value) = line.split_once(' ').ok_or_else(bad)?;
            match kind {
                "signed-by" => r.signed_by.push(value.parse().map_err(UpstreamsError::Key)?),
                "upstream" if !value.is_empty() => r.upstreams.push(value.to_owned()),
                "exclude" if !value.is_empty() => r.excludes.push(value.to_owned()),
                "left" => {
                    let (name, reason) = value.split_once(' ').ok_or_else(bad)?;
                    let path: StorePath = name.parse().map_err(|_| UpstreamsError::Path(name.to_owned()))?;
                    r.left.insert(path.hash_part().to_owned(), (name.to_owned(), reason.parse()?));
                }
                _ => return Err(bad()),
            }
        }
        Ok(r)
    }
}

/// An `--exclude` expression that does not compile, or cannot be recorded.
#[derive(Debug, Error)]
pub enum ExcludeError {
    #[error("--exclude {0:?} is not a regular expression: {1}")]
    Regex(String, regex::Error),
    #[error("--exclude {0:?} holds a line break; match it with \\n instead")]
    Newline(String),
}

/// What a push leaves out, decided from the path alone (no network): `--exclude` first,
/// then `--skip-signed-by`.
#[derive(Debug, Default)]
pub struct Policy {
    pub signed_by: Vec<PublicKey>,
    excludes: Vec<(String, regex::Regex)>,
}

impl Policy {
    pub fn new(signed_by: Vec<PublicKey>, excludes: &[String]) -> Result<Policy, ExcludeError> {
        let excludes = excludes
            .iter()
            .map(|e| {
                if e.contains('\n') {
                    return Err(ExcludeError::Newline(e.clone()));
                }
                regex::Regex::new(e).map(|r| (e.clone(), r)).map_err(|x| ExcludeError::Regex(e.clone(), x))
            })
            .collect::<Result<_, _>>()?;
        Ok(Policy { signed_by, excludes })
    }

    pub fn excludes(&self) -> impl Iterator<Item = &str> {
        self.excludes.iter().map(|(s, _)| s.as_str())
    }

    /// The `--exclude` expression that matches the path's name, if any.
    pub fn excluded(&self, path: &StorePath) -> Option<&str> {
        self.excludes.iter().find(|(_, r)| r.is_match(path.name())).map(|(s, _)| s.as_str())
    }

    /// Why `info` is left out without asking anyone: excluded by name, or signed (validly) in
    /// the database by one of the keys.
    pub fn local_reason(&self, store_dir: &StoreDir, info: &PathInfo) -> Option<Reason> {
        if let Some(e) = self.excluded(&info.path) {
            return Some(Reason::Excluded(e.to_owned()));
        }
        if self.signed_by.is_empty() || info.sigs.is_empty() {
            return None;
        }
        let refs: Vec<String> = info.references.iter().map(|r| store_dir.display(r)).collect();
        let fp = signing::fingerprint(
            &store_dir.display(&info.path),
            &info.nar_hash,
            info.nar_size,
            refs.iter().map(String::as_str),
        );
        self.signed_by
            .iter()
            .find(|k| info.sigs.iter().any(|s| k.verify(&fp, s)))
            .map(|k| Reason::SignedBy(k.name().to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signing::SecretKey;

    const SK: &str =
        "test-1:DaVAtE34wRiYlkhMVRJG5spv2VArFiUHISv+7i+jdY4VzxifVsU1VuYoI7QhmnY9AdqH8BXoysHSEDOajn4/Kw==";

    fn path(s: &str) -> StorePath {
        s.parse().unwrap()
    }

    #[test]
    fn record_round_trips_and_rejects_what_it_does_not_know() {
        let sk: SecretKey = SK.parse().unwrap();
        let mut r = Upstreams {
            signed_by: vec![sk.public_key()],
            upstreams: vec!["https://cache.nixos.org".into()],
            excludes: vec!["^secret( |-)".into()],
            ..Default::default()
        };
        r.leave(&path("7rjj86a15146cq1d3qy068lml7n8ykzm-glibc-2.37"), Reason::SignedBy("test-1".into()));
        r.leave(
            &path("0c9y2jngqmmn3v7r9dmyk6qbi4i2sn5w-hello"),
            Reason::Upstream("https://cache.nixos.org".into()),
        );
        r.leave(
            &path("11m8q1hd1w1r4ij7jg2nqhqm9k1n7vkw-secret-key"),
            Reason::Excluded("^secret( |-)".into()),
        );
        let text = r.to_string();
        assert!(text.starts_with("nixcache-upstreams 1\nsigned-by test-1:"), "{text}");
        assert!(
            text.contains("left 11m8q1hd1w1r4ij7jg2nqhqm9k1n7vkw-secret-key excluded ^secret( |-)\n"),
            "{text}"
        );
        assert_eq!(text.parse::<Upstreams>().unwrap(), r);
        assert_eq!(r.covers("7rjj86a15146cq1d3qy068lml7n8ykzm"), Some(&Reason::SignedBy("test-1".into())));
        assert_eq!(r.covers("7rjj86a15146cq1d3qy068lml7n8ykzn"), None);

        assert_eq!("signed-by x\n".parse::<Upstreams>().unwrap_err(), UpstreamsError::Header);
        let later = format!("{HEADER}\nmirror https://x\n");
        assert!(matches!(later.parse::<Upstreams>().unwrap_err(), UpstreamsError::Line(_)));
        let bad_path = format!("{HEADER}\nleft ../etc upstream https://x\n");
        assert!(matches!(bad_path.parse::<Upstreams>().unwrap_err(), UpstreamsError::Path(_)));
        let no_reason = format!("{HEADER}\nleft 7rjj86a15146cq1d3qy068lml7n8ykzm-glibc\n");
        assert!(no_reason.parse::<Upstreams>().is_err());
    }

    #[test]
    fn missing_is_what_a_push_must_still_write() {
        let mut have = Upstreams { upstreams: vec!["https://a".into()], ..Default::default() };
        have.leave(&path("7rjj86a15146cq1d3qy068lml7n8ykzm-glibc"), Reason::Upstream("https://a".into()));
        let mut want = have.clone();
        assert!(have.missing(&want).is_empty());
        want.excludes.push("^x".into());
        want.leave(&path("0c9y2jngqmmn3v7r9dmyk6qbi4i2sn5w-hello"), Reason::Upstream("https://a".into()));
        let m = have.missing(&want);
        assert_eq!(m.excludes, vec!["^x".to_owned()]);
        assert!(m.upstreams.is_empty());
        assert_eq!(m.left.len(), 1);
        have.merge(&m);
        assert!(have.missing(&want).is_empty());
    }

    #[test]
    fn policy_skips_only_valid_signatures_and_excludes_by_name() {
        let sd = StoreDir::default();
        let sk: SecretKey = SK.parse().unwrap();
        let other = SecretKey::from_seed("other-1", &[7; 32]).unwrap();
        let mut info = PathInfo {
            path: path("7rjj86a15146cq1d3qy068lml7n8ykzm-glibc-2.37"),
            nar_hash: "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s".parse().unwrap(),
            nar_size: 120,
            references: vec![path("7rjj86a15146cq1d3qy068lml7n8ykzm-glibc-2.37")],
            deriver: None,
            sigs: vec![],
            ca: None,
        };
        let policy = Policy::new(vec![sk.public_key()], &["^secret-".into()]).unwrap();
        assert_eq!(policy.local_reason(&sd, &info), None);
        let refs = [sd.display(&info.references[0])];
        let fp = signing::fingerprint(
            &sd.display(&info.path),
            &info.nar_hash,
            120,
            refs.iter().map(String::as_str),
        );
        // A signature by a key of the same name that does not verify is no reason to skip.
        info.sigs = vec![other.sign(&fp)];
        let forged: crate::signing::Signature =
            info.sigs[0].to_string().replacen("other-1", "test-1", 1).parse().unwrap();
        info.sigs = vec![forged];
        assert_eq!(policy.local_reason(&sd, &info), None);
        info.sigs.push(sk.sign(&fp));
        assert_eq!(policy.local_reason(&sd, &info), Some(Reason::SignedBy("test-1".into())));
        // A signature over different contents does not count.
        info.nar_size = 121;
        assert_eq!(policy.local_reason(&sd, &info), None);
        info.path = path("11m8q1hd1w1r4ij7jg2nqhqm9k1n7vkw-secret-key");
        assert_eq!(policy.local_reason(&sd, &info), Some(Reason::Excluded("^secret-".into())));
        assert!(matches!(Policy::new(vec![], &["(".into()]), Err(ExcludeError::Regex(..))));
        assert!(matches!(Policy::new(vec![], &["a\nb".into()]), Err(ExcludeError::Newline(_))));
    }
}
