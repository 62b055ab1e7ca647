//! Reading the Nix database: read-only, immutable where it cannot be opened otherwise.

use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{PathInfo, StoreError, parse_sigs};
use crate::hash::NixHash;
use crate::store_path::{StoreDir, StorePath};

/// Opens the Nix database read-only.
///
/// Nix keeps it in WAL mode, where even a reader must create `db.sqlite-shm` beside it: a
/// user who may read the database but not write its directory (nixcache under its own
/// account, a hardened unit) cannot. Such a reader opens the main file immutable instead. It
/// then misses only what a running Nix has not yet checkpointed: paths registered that very
/// moment, which push then reports as not valid. A valid path's row never changes, so
/// nothing read is wrong (and every NAR is checked against its NarHash anyway).
pub(super) fn open_db(path: &Path) -> Result<Connection, StoreError> {
    let db = |source| StoreError::Db { db: path.to_owned(), source };
    let open = |conn: Connection| -> rusqlite::Result<Connection> {
        conn.busy_timeout(std::time::Duration::from_secs(60))?;
        // Opening is lazy: make it fail now if the file is not readable or not Nix's.
        conn.query_row("SELECT count(*) FROM ValidPaths WHERE id = 0", [], |_| Ok(()))?;
        Ok(conn)
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let err = match Connection::open_with_flags(path, flags).and_then(open) {
        Ok(conn) => return Ok(conn),
        Err(e) => e,
    };
    let readonly_dir = matches!(&err, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::ReadOnly || f.code == rusqlite::ErrorCode::CannotOpen);
    if !readonly_dir {
        return Err(db(err));
    }
    let escaped = path.display().to_string().replace('%', "%25").replace('?', "%3f").replace('#', "%23");
    let uri = format!("file:{escaped}?immutable=1");
    Connection::open_with_flags(uri, flags | OpenFlags::SQLITE_OPEN_URI).and_then(open).map_err(db)
}

pub(super) enum QueryError {
    Sql(rusqlite::Error),
    Store(StoreError),
}

impl From<rusqlite::Error> for QueryError {
    fn from(e: rusqlite::Error) -> Self {
        QueryError::Sql(e)
    }
}

pub(super) struct DbQueries<'c> {
    info: rusqlite::Statement<'c>,
    refs: rusqlite::Statement<'c>,
    outputs: rusqlite::Statement<'c>,
}

impl<'c> DbQueries<'c> {
    pub(super) fn new(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(DbQueries {
            info: conn
                .prepare("SELECT id, hash, deriver, narSize, sigs, ca FROM ValidPaths WHERE path = ?1")?,
            refs: conn.prepare(
                "SELECT p.path FROM Refs r JOIN ValidPaths p ON r.reference = p.id WHERE r.referrer = ?1",
            )?,
            outputs: conn.prepare("SELECT path FROM DerivationOutputs WHERE drv = ?1")?,
        })
    }

    pub(super) fn valid(&mut self, abs: &str) -> rusqlite::Result<bool> {
        Ok(self.info.query_row([abs], |_| Ok(())).optional()?.is_some())
    }

    pub(super) fn outputs(&mut self, id: i64) -> rusqlite::Result<Vec<String>> {
        self.outputs.query_map([id], |r| r.get(0))?.collect()
    }

    pub(super) fn info(
        &mut self,
        sd: &StoreDir,
        p: &StorePath,
        abs: &str,
    ) -> Result<(PathInfo, i64), QueryError> {
        type Row = (i64, String, Option<String>, Option<i64>, Option<String>, Option<String>);
        let row: Option<Row> = self
            .info
            .query_row([abs], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))
            .optional()?;
        let (id, hash, deriver, nar_size, sigs, ca) =
            row.ok_or_else(|| QueryError::Store(StoreError::NotValid(abs.to_owned())))?;
        let bad =
            |what, value: String| QueryError::Store(StoreError::BadRow { path: abs.to_owned(), what, value });
        let nar_hash: NixHash = hash.parse().map_err(|_| bad("hash", hash.clone()))?;
        let mut references = Vec::new();
        for r in self.refs.query_map([id], |r| r.get::<_, String>(0))? {
            let r = r?;
            references.push(sd.parse_path(&r).map_err(|_| bad("reference", r.clone()))?);
        }
        references.sort();
        let info = PathInfo {
            path: p.clone(),
            nar_hash,
            nar_size: nar_size.unwrap_or(0).max(0) as u64,
            references,
            deriver: deriver.filter(|d| !d.is_empty()).and_then(|d| sd.parse_path(&d).ok()),
            sigs: parse_sigs(sigs.as_deref().unwrap_or("").split_ascii_whitespace()),
            ca: ca.filter(|c| !c.is_empty()),
        };
        Ok((info, id))
    }
}
