//! The same facts from Nix's commands (`nix path-info --json`), when the database cannot be
//! opened.

use std::collections::BTreeSet;
use std::process::{Command, Stdio};

use super::{PathInfo, StoreError, parse_sigs};
use crate::store_path::{StoreDir, StorePath};

pub(super) fn run(program: &str, args: &[String]) -> Result<String, StoreError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| StoreError::Spawn { command: command.clone(), source })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(StoreError::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(super) enum JsonError {
    Json(serde_json::Error),
    Store(StoreError),
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct JsonInfo {
    path: Option<String>,
    nar_hash: Option<String>,
    nar_size: Option<u64>,
    #[serde(default)]
    references: Vec<String>,
    deriver: Option<String>,
    #[serde(default)]
    signatures: Vec<String>,
    ca: Option<String>,
    valid: Option<bool>,
}

/// Parses `nix path-info --json`: a list of objects with `path` (Nix up to 2.18) or an object
/// keyed by path whose values may be `null` for invalid paths (newer Nix).
pub(super) fn parse_path_info_json(sd: &StoreDir, json: &str) -> Result<Vec<PathInfo>, JsonError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(JsonError::Json)?;
    let entries: Vec<(String, Option<JsonInfo>)> = match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| {
                let i: JsonInfo = serde_json::from_value(v)?;
                Ok((i.path.clone().unwrap_or_default(), Some(i)))
            })
            .collect::<Result<_, serde_json::Error>>()
            .map_err(JsonError::Json)?,
        serde_json::Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| Ok((k, if v.is_null() { None } else { Some(serde_json::from_value(v)?) })))
            .collect::<Result<_, serde_json::Error>>()
            .map_err(JsonError::Json)?,
        _ => {
            return Err(JsonError::Json(serde::de::Error::custom("expected a list or an object")));
        }
    };
    let path_of = |s: &str| -> Result<StorePath, StoreError> {
        if s.contains('/') { Ok(sd.parse_path(s)?) } else { Ok(s.parse()?) }
    };
    let mut out = Vec::new();
    for (abs, info) in entries {
        let info = match info {
            Some(i) if i.valid != Some(false) && i.nar_hash.is_some() => i,
            _ => return Err(JsonError::Store(StoreError::NotValid(abs))),
        };
        let bad =
            |what, value: String| JsonError::Store(StoreError::BadRow { path: abs.clone(), what, value });
        let hash = info.nar_hash.unwrap_or_default();
        let mut references: Vec<StorePath> = info
            .references
            .iter()
            .map(|r| path_of(r))
            .collect::<Result<BTreeSet<_>, _>>()
            .map_err(JsonError::Store)?
            .into_iter()
            .collect();
        references.sort();
        out.push(PathInfo {
            path: path_of(&abs).map_err(JsonError::Store)?,
            nar_hash: hash.parse().map_err(|_| bad("narHash", hash.clone()))?,
            nar_size: info.nar_size.unwrap_or(0),
            references,
            deriver: info.deriver.as_deref().and_then(|d| path_of(d).ok()),
            sigs: parse_sigs(info.signatures.iter().map(String::as_str)),
            ca: info.ca.filter(|c| !c.is_empty()),
        });
    }
    Ok(out)
}
