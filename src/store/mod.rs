//! Where closures and path metadata come from.
//!
//! The Nix database (`<state>/db/db.sqlite`) is opened read-only: `ValidPaths` gives NarHash
//! (as `sha256:<hex>`), NarSize, deriver, signatures and CA; `Refs` the references;
//! `DerivationOutputs` the outputs of a `.drv`. When the database cannot be opened (a daemon
//! install, another user) the same facts come from `nix path-info --json`, whose output is a
//! list in older Nix and an object keyed by path in newer Nix.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::path::{Component, Path, PathBuf};

use rusqlite::{Connection, OptionalExtension};
use thiserror::Error;

mod db;
mod json;

use db::{DbQueries, QueryError, open_db};
use json::{JsonError, parse_path_info_json, run};

pub use crate::path_info::PathInfo;
use crate::signing::Signature;
use crate::store_path::{StoreDir, StorePath, StorePathError};

/// Where metadata is read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The database when it can be opened, else `nix path-info`.
    #[default]
    Auto,
    /// Only the Nix database.
    Db,
    /// Only `nix path-info --json` (and `nix-store --query`).
    Nix,
}

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("cannot access {}", path.display())]
    NotFound { path: PathBuf, source: io::Error },
    #[error("{} is not in the Nix store {store_dir} (give a store path or a symlink to one, such as ./result)", path.display())]
    NotInStore { path: PathBuf, store_dir: String },
    #[error(transparent)]
    BadPath(#[from] StorePathError),
    #[error("{0} is not a valid store path (not registered in the Nix database; build or realise it first)")]
    NotValid(String),
    #[error("cannot read the Nix database {}", db.display())]
    Db { db: PathBuf, source: rusqlite::Error },
    #[error("the Nix database has a bad {what} for {path}: {value:?}")]
    BadRow { path: String, what: &'static str, value: String },
    #[error("cannot run `{command}` (is Nix installed and on PATH?)")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot parse the output of `{command}`")]
    Json { command: String, source: serde_json::Error },
}

/// How to find a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// The logical store directory, written into narinfos.
    pub store_dir: StoreDir,
    /// The filesystem root the store lives under (`/`, or a chroot store's root).
    pub root: PathBuf,
    /// The database file, or a Nix state directory holding `db/db.sqlite`.
    pub db: Option<PathBuf>,
    pub source: Source,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            store_dir: StoreDir::default(),
            root: PathBuf::from("/"),
            db: None,
            source: Source::Auto,
        }
    }
}

enum Backend {
    Db { conn: Connection, path: PathBuf },
    Nix { store_arg: Option<String> },
}

/// Where a store's files are: its logical directory and where that is on this machine.
#[derive(Clone, Debug)]
pub struct StoreLocation {
    pub store_dir: StoreDir,
    pub real_dir: PathBuf,
}

impl StoreLocation {
    /// The store at `store_dir` on this machine (no chroot).
    pub fn local(store_dir: &StoreDir) -> StoreLocation {
        StoreLocation { store_dir: store_dir.clone(), real_dir: PathBuf::from(store_dir.as_str()) }
    }

    /// Where the path's files are on this machine.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        self.real_dir.join(p.as_str())
    }

    fn in_store(&self, p: &Path) -> Result<Option<StorePath>, StoreError> {
        let Ok(rest) = p.strip_prefix(&self.real_dir) else {
            return Ok(None);
        };
        let Some(Component::Normal(first)) = rest.components().next() else {
            return Ok(None);
        };
        let sp: StorePath = first.to_string_lossy().parse()?;
        let real = self.real_path(&sp);
        std::fs::symlink_metadata(&real).map_err(|source| StoreError::NotFound { path: real, source })?;
        Ok(Some(sp))
    }

    /// Turns a command-line argument (a store path, a path inside one, or a symlink chain
    /// into the store such as `./result`) into a store path. Never follows a symlink that is
    /// itself inside the store: a store path may be a symlink.
    pub fn resolve(&self, arg: &Path) -> Result<StorePath, StoreError> {
        let not_found = |source| StoreError::NotFound { path: arg.to_owned(), source };
        let mut p = normalize(&std::path::absolute(arg).map_err(not_found)?);
        for _ in 0..64 {
            if let Some(sp) = self.in_store(&p)? {
                return Ok(sp);
            }
            let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
                break;
            };
            let q = std::fs::canonicalize(parent).map_err(not_found)?.join(name);
            if let Some(sp) = self.in_store(&q)? {
                return Ok(sp);
            }
            let meta = std::fs::symlink_metadata(&q).map_err(not_found)?;
            if !meta.file_type().is_symlink() {
                break;
            }
            let target = std::fs::read_link(&q).map_err(not_found)?;
            p = normalize(&q.parent().unwrap_or(Path::new("/")).join(target));
        }
        Err(StoreError::NotInStore { path: arg.to_owned(), store_dir: self.store_dir.to_string() })
    }
}

/// How deep [`StoreLocation::roots`] walks directories of root links.
const ROOTS_DEPTH: usize = 16;

impl StoreLocation {
    /// The store paths `arg` names as a root: a store path, a link chain into the store
    /// (`./result`), or a directory of GC-root links such as `/nix/var/nix/gcroots`, walked as
    /// Nix walks it: its subdirectories, and a link to a directory outside the store
    /// (`gcroots/profiles`), are walked too; a dangling link or a link to anything else names
    /// nothing. Sorted, without duplicates.
    pub fn roots(&self, arg: &Path) -> Result<Vec<StorePath>, StoreError> {
        let mut found = BTreeSet::new();
        let mut seen = BTreeSet::new();
        let top =
            std::fs::metadata(arg).map_err(|source| StoreError::NotFound { path: arg.to_owned(), source })?;
        if top.is_dir() && self.resolve(arg).is_err() {
            self.walk_roots(arg, 0, &mut seen, &mut found);
        } else {
            found.insert(self.resolve(arg)?);
        }
        Ok(found.into_iter().collect())
    }

    fn walk_roots(
        &self,
        dir: &Path,
        depth: usize,
        seen: &mut BTreeSet<PathBuf>,
        found: &mut BTreeSet<StorePath>,
    ) {
        let Ok(real) = std::fs::canonicalize(dir) else { return };
        if depth > ROOTS_DEPTH || !seen.insert(real) {
            return;
        }
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            match self.resolve(&p) {
                Ok(sp) => {
                    found.insert(sp);
                }
                Err(_) if std::fs::metadata(&p).is_ok_and(|m| m.is_dir()) => {
                    self.walk_roots(&p, depth + 1, seen, found)
                }
                Err(_) => {}
            }
        }
    }
}

/// A Nix store read through its database or the `nix` command.
pub struct Store {
    store_dir: StoreDir,
    real_dir: PathBuf,
    backend: Backend,
}

/// Drops the leading `/` so a logical path can be placed under a root.
fn under_root(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

/// Lexically resolves `.` and `..` (symlinks are resolved one hop at a time by the caller).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

impl Store {
    pub fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let real_dir = under_root(&config.root, config.store_dir.as_str());
        let db_path = match &config.db {
            Some(p) if p.is_dir() => p.join("db/db.sqlite"),
            Some(p) => p.clone(),
            None => under_root(&config.root, "/nix/var/nix/db/db.sqlite"),
        };
        let store_arg = (config.root != Path::new("/")).then(|| config.root.display().to_string());
        let backend = match config.source {
            Source::Nix => Backend::Nix { store_arg },
            Source::Db => Backend::Db { conn: open_db(&db_path)?, path: db_path },
            Source::Auto => match open_db(&db_path) {
                Ok(conn) => Backend::Db { conn, path: db_path },
                Err(_) => Backend::Nix { store_arg },
            },
        };
        Ok(Store { store_dir: config.store_dir.clone(), real_dir, backend })
    }

    pub fn store_dir(&self) -> &StoreDir {
        &self.store_dir
    }

    /// The filesystem side of the store, which can be shared between threads.
    pub fn location(&self) -> StoreLocation {
        StoreLocation { store_dir: self.store_dir.clone(), real_dir: self.real_dir.clone() }
    }

    /// Where the path's files are on this machine.
    pub fn real_path(&self, p: &StorePath) -> PathBuf {
        self.real_dir.join(p.as_str())
    }

    /// A description of the metadata source, for messages.
    /// Whether metadata comes from the database (a query), not from `nix` commands.
    pub fn reads_database(&self) -> bool {
        matches!(self.backend, Backend::Db { .. })
    }

    pub fn source_name(&self) -> String {
        match &self.backend {
            Backend::Db { path, .. } => format!("database {}", path.display()),
            Backend::Nix { .. } => "nix path-info".to_owned(),
        }
    }

    /// Turns a command-line argument into a store path: see [`StoreLocation::resolve`].
    pub fn resolve(&self, arg: &Path) -> Result<StorePath, StoreError> {
        self.location().resolve(arg)
    }

    /// The valid store path whose hash part is `hash` (32 nixbase32 characters), as Nix's
    /// `queryPathFromHashPart` finds it: the first valid path at or after `<store>/<hash>`.
    pub fn path_from_hash_part(&self, hash: &str) -> Result<Option<StorePath>, StoreError> {
        let prefix = format!("{}/{hash}-", self.store_dir.as_str());
        let candidate = match &self.backend {
            Backend::Db { conn, path } => conn
                .query_row(
                    "SELECT path FROM ValidPaths WHERE path >= ?1 LIMIT 1",
                    [&prefix[..prefix.len() - 1]],
                    |r| r.get::<_, String>(0),
                )
                .optional()
                .map_err(|source| StoreError::Db { db: path.clone(), source })?,
            Backend::Nix { store_arg } => {
                // No query by hash part on the command line: look at the store's entries, then
                // ask Nix whether the one found is valid.
                let entries = std::fs::read_dir(&self.real_dir)
                    .map_err(|source| StoreError::NotFound { path: self.real_dir.clone(), source })?;
                let name = entries.filter_map(Result::ok).find_map(|e| {
                    let n = e.file_name().into_string().ok()?;
                    n.starts_with(&prefix[self.store_dir.as_str().len() + 1..]).then_some(n)
                });
                match name {
                    Some(n) => {
                        let abs = format!("{}/{n}", self.store_dir.as_str());
                        let mut args = vec!["--check-validity".to_owned(), abs.clone()];
                        if let Some(s) = store_arg {
                            args.extend(["--store".to_owned(), s.clone()]);
                        }
                        run("nix-store", &args).ok().map(|_| abs)
                    }
                    None => None,
                }
            }
        };
        Ok(candidate.filter(|c| c.starts_with(&prefix)).and_then(|c| self.store_dir.parse_path(&c).ok()))
    }

    /// The closure of `roots`, references before referrers is not promised: callers order.
    /// With `include_outputs`, the valid outputs of every derivation in the closure (and
    /// their closures) are included too.
    pub fn closure(&self, roots: &[StorePath], include_outputs: bool) -> Result<Vec<PathInfo>, StoreError> {
        match &self.backend {
            Backend::Db { conn, path } => {
                let db = |source| StoreError::Db { db: path.clone(), source };
                // One read transaction for the whole walk: SQLite otherwise takes and drops its
                // locks, and looks for a journal, for every statement (four fcntl and two stats
                // per path: a fifth of a re-push of 50,000 paths).
                let tx = conn.unchecked_transaction().map_err(db)?;
                let mut q = DbQueries::new(&tx).map_err(db)?;
                let mut seen: HashMap<StorePath, ()> = HashMap::new();
                let mut queue: VecDeque<StorePath> = roots.iter().cloned().collect();
                let mut out = Vec::new();
                while let Some(p) = queue.pop_front() {
                    if seen.insert(p.clone(), ()).is_some() {
                        continue;
                    }
                    let abs = self.store_dir.display(&p);
                    let (info, id) = q.info(&self.store_dir, &p, &abs).map_err(|e| match e {
                        QueryError::Sql(e) => db(e),
                        QueryError::Store(e) => e,
                    })?;
                    queue.extend(info.references.iter().filter(|r| !seen.contains_key(*r)).cloned());
                    if include_outputs && p.is_derivation() {
                        for o in q.outputs(id).map_err(db)? {
                            if let Ok(op) = self.store_dir.parse_path(&o)
                                && q.valid(&o).map_err(db)?
                            {
                                queue.push_back(op);
                            }
                        }
                    }
                    out.push(info);
                }
                Ok(out)
            }
            Backend::Nix { store_arg } => {
                let abs: Vec<String> = roots.iter().map(|r| self.store_dir.display(r)).collect();
                let mut args = vec!["--query".to_owned(), "--requisites".to_owned()];
                if include_outputs {
                    args.push("--include-outputs".to_owned());
                }
                if let Some(s) = store_arg {
                    args.extend(["--store".to_owned(), s.clone()]);
                }
                args.extend(abs);
                let listed = run("nix-store", &args)?;
                let paths: Vec<&str> = listed.lines().filter(|l| !l.is_empty()).collect();
                let mut out = Vec::with_capacity(paths.len());
                // Nix 2.8's path-info has no --stdin; chunks keep argv well under ARG_MAX.
                for chunk in paths.chunks(2000) {
                    let mut args: Vec<String> =
                        ["--extra-experimental-features", "nix-command", "path-info", "--json"]
                            .map(str::to_owned)
                            .to_vec();
                    if let Some(s) = store_arg {
                        args.extend(["--store".to_owned(), s.clone()]);
                    }
                    args.extend(chunk.iter().map(|p| p.to_string()));
                    let json = run("nix", &args)?;
                    out.extend(parse_path_info_json(&self.store_dir, &json).map_err(|e| match e {
                        JsonError::Json(source) => {
                            StoreError::Json { command: "nix path-info --json".into(), source }
                        }
                        JsonError::Store(e) => e,
                    })?);
                }
                Ok(out)
            }
        }
    }
}

/// Signatures Nix recorded; ones that do not parse are dropped, as Nix itself ignores them.
fn parse_sigs<'a>(it: impl Iterator<Item = &'a str>) -> Vec<Signature> {
    it.filter_map(|s| s.parse().ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::NixHash;

    const A: &str = "3pv9z5wf9s1kc2lf57q9m9mqdk449j6k-fixture-a";
    const B: &str = "4nj5ph38lrc6pay32lzyngz6mphaxmmh-fixture-b";
    const HASH: &str = "sha256:0p6hqr1aawhkcn1hwpxs4q94rgjl9ps3mapii9g4la7crvjd0jik";

    #[test]
    fn path_info_list_form() {
        // The shape Nix 2.8 prints.
        let json = format!(
            r#"[{{"path":"/nix/store/{B}","narHash":"{HASH}","narSize":576,"references":["/nix/store/{B}","/nix/store/{A}"],"deriver":"/nix/store/srj3m15bg07lhs08w5aq3gbar0i1qry2-fixture-b.drv","registrationTime":1,"signatures":["test-1:6zmDME6EPhzi59KmnIiTUK9mNi+qZN6uXnxQGeKGMnqZxgUpWtm0u9oQpeHHEZumc4jrJ39qckFHDI12Xv0bCg=="],"valid":true}}]"#
        );
        let infos = parse_path_info_json(&StoreDir::default(), &json).ok().unwrap();
        assert_eq!(infos.len(), 1);
        let i = &infos[0];
        assert_eq!(i.path.as_str(), B);
        assert_eq!(i.references.iter().map(|r| r.as_str()).collect::<Vec<_>>(), [A, B]);
        assert_eq!(i.nar_size, 576);
        assert_eq!(i.sigs.len(), 1);
        assert!(i.deriver.is_some());
    }

    #[test]
    fn path_info_object_form() {
        // Newer Nix: keyed by path, SRI hashes, null for invalid paths.
        let json = format!(
            r#"{{"/nix/store/{A}":{{"narHash":"sha256-ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=","narSize":8,"references":[],"deriver":null,"signatures":[],"ca":null}}}}"#
        );
        let infos = parse_path_info_json(&StoreDir::default(), &json).ok().unwrap();
        assert_eq!(infos[0].path.as_str(), A);
        assert_eq!(infos[0].nar_hash, NixHash::digest(b"abc"));
        let invalid = format!(r#"{{"/nix/store/{A}":null}}"#);
        assert!(matches!(
            parse_path_info_json(&StoreDir::default(), &invalid),
            Err(JsonError::Store(StoreError::NotValid(_)))
        ));
    }

    #[test]
    fn normalize_is_lexical() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
    }
}
