//! `nix-cache-info`: what a client reads first (StoreDir, WantMassQuery, Priority). Pure.

use std::fmt;
use std::str::FromStr;

use crate::store_path::StoreDir;

/// The contents of `nix-cache-info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheInfo {
    pub store_dir: StoreDir,
    /// Absent (as `nix copy` writes it) means no, to Nix.
    pub want_mass_query: Option<bool>,
    pub priority: Option<u32>,
}

impl fmt::Display for CacheInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "StoreDir: {}", self.store_dir)?;
        if let Some(w) = self.want_mass_query {
            writeln!(f, "WantMassQuery: {}", u8::from(w))?;
        }
        if let Some(p) = self.priority {
            writeln!(f, "Priority: {p}")?;
        }
        Ok(())
    }
}

impl FromStr for CacheInfo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut store_dir, mut want_mass_query, mut priority) = (None, None, None);
        for line in s.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line.split_once(':').ok_or_else(|| format!("line {line:?} is not 'Key: value'"))?;
            let v = v.trim();
            match k {
                "StoreDir" => store_dir = Some(v.parse::<StoreDir>().map_err(|e| e.to_string())?),
                "WantMassQuery" => want_mass_query = Some(v == "1"),
                "Priority" => priority = Some(v.parse().map_err(|_| format!("bad Priority {v:?}"))?),
                _ => {}
            }
        }
        Ok(CacheInfo { store_dir: store_dir.ok_or("no StoreDir line")?, want_mass_query, priority })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_info_round_trip() {
        let ci =
            CacheInfo { store_dir: StoreDir::default(), want_mass_query: Some(true), priority: Some(30) };
        assert_eq!(ci.to_string(), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n");
        assert_eq!(ci.to_string().parse::<CacheInfo>().unwrap(), ci);
        // What `nix copy --to file://` writes: no newline, no other fields.
        let nix: CacheInfo = "StoreDir: /nix/store".parse().unwrap();
        assert_eq!(nix.priority, None);
        assert!("Priority: 1\n".parse::<CacheInfo>().is_err());
    }
}
