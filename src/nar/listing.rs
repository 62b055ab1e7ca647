//! The `.ls` NAR listing Nix writes beside a narinfo (`write-nar-listing=true`), and the
//! `debuginfo/` index (`index-debug-info=true`) derived from it.
//!
//! ```text
//! {"version":1,"root":NODE}
//! NODE = {"type":"regular","size":N[,"executable":true],"narOffset":N}
//!      | {"type":"symlink","target":"…"}
//!      | {"type":"directory","entries":{"name":NODE,…}}
//! ```
//!
//! Keys in this order, entries sorted by name bytes, no whitespace, no trailing newline, as
//! Nix 2.8 writes it. `narOffset` is the offset of the file's contents in the NAR.

/// One node of a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Regular {
        size: u64,
        executable: bool,
        nar_offset: u64,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// Entries in NAR order (sorted by name bytes).
    Directory(Vec<(Vec<u8>, Entry)>),
}

/// Writes a JSON string the way Nix does: `"` and `\` escaped, control characters as
/// escapes, everything else (UTF-8 or not) passed through.
fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    for &c in s {
        match c {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c if c < 0x20 => out.extend_from_slice(format!("\\u{c:04x}").as_bytes()),
            c => out.push(c),
        }
    }
    out.push(b'"');
}

impl Entry {
    fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Entry::Regular { size, executable, nar_offset } => {
                out.extend_from_slice(format!("{{\"type\":\"regular\",\"size\":{size}").as_bytes());
                if *executable {
                    out.extend_from_slice(b",\"executable\":true");
                }
                out.extend_from_slice(format!(",\"narOffset\":{nar_offset}}}").as_bytes());
            }
            Entry::Symlink { target } => {
                out.extend_from_slice(b"{\"type\":\"symlink\",\"target\":");
                json_string(out, target);
                out.push(b'}');
            }
            Entry::Directory(entries) => {
                out.extend_from_slice(b"{\"type\":\"directory\",\"entries\":{");
                for (i, (name, e)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    json_string(out, name);
                    out.push(b':');
                    e.write_json(out);
                }
                out.extend_from_slice(b"}}");
            }
        }
    }

    /// The whole `.ls` file.
    pub fn to_listing_json(&self) -> Vec<u8> {
        let mut out = b"{\"version\":1,\"root\":".to_vec();
        self.write_json(&mut out);
        out.push(b'}');
        out
    }

    fn child(&self, name: &[u8]) -> Option<&Entry> {
        match self {
            Entry::Directory(es) => es.iter().find(|(n, _)| n == name).map(|(_, e)| e),
            _ => None,
        }
    }

    /// Debug files Nix indexes: regular files `lib/debug/.build-id/<2 hex>/<38 hex>.debug`.
    /// Returns `(index key, member path)`, e.g. `("ab0123….debug", "lib/debug/.build-id/ab/0123….debug")`.
    pub fn debug_files(&self) -> Vec<(String, String)> {
        let hex =
            |s: &[u8], n: usize| s.len() == n && s.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
        let Some(Entry::Directory(dirs)) =
            self.child(b"lib").and_then(|e| e.child(b"debug")).and_then(|e| e.child(b".build-id"))
        else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for (d, e) in dirs {
            let Entry::Directory(files) = e else { continue };
            if !hex(d, 2) {
                continue;
            }
            for (f, e) in files {
                let Some(stem) = f.strip_suffix(b".debug") else {
                    continue;
                };
                if matches!(e, Entry::Regular { .. }) && hex(stem, 38) {
                    let (d, f) = (String::from_utf8_lossy(d), String::from_utf8_lossy(f));
                    out.push((format!("{d}{f}"), format!("lib/debug/.build-id/{d}/{f}")));
                }
            }
        }
        out
    }
}

/// The `debuginfo/<key>` file's contents: where in which NAR the debug file is.
pub fn debuginfo_json(nar_url: &str, member: &str) -> Vec<u8> {
    let mut out = b"{\"archive\":".to_vec();
    json_string(&mut out, format!("../{nar_url}").as_bytes());
    out.extend_from_slice(b",\"member\":");
    json_string(&mut out, member.as_bytes());
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_like_nix() {
        let root = Entry::Directory(vec![
            (
                b"bin".to_vec(),
                Entry::Directory(vec![(
                    b"dep".to_vec(),
                    Entry::Regular { size: 19, executable: true, nar_offset: 400 },
                )]),
            ),
            (b"e\"\n".to_vec(), Entry::Symlink { target: "é".as_bytes().to_vec() }),
            (b"empty".to_vec(), Entry::Directory(vec![])),
        ]);
        assert_eq!(
            String::from_utf8(root.to_listing_json()).unwrap(),
            r#"{"version":1,"root":{"type":"directory","entries":{"bin":{"type":"directory","entries":{"dep":{"type":"regular","size":19,"executable":true,"narOffset":400}}},"e\"\n":{"type":"symlink","target":"é"},"empty":{"type":"directory","entries":{}}}}}"#
        );
    }

    #[test]
    fn debug_files_match_nix_rules() {
        let id = "0123456789abcdef0123456789abcdef012345";
        let reg = || Entry::Regular { size: 1, executable: false, nar_offset: 0 };
        let dir = |v: Vec<(&str, Entry)>| {
            Entry::Directory(v.into_iter().map(|(n, e)| (n.as_bytes().to_vec(), e)).collect())
        };
        let root = dir(vec![(
            "lib",
            dir(vec![(
                "debug",
                dir(vec![(
                    ".build-id",
                    dir(vec![
                        ("AB", dir(vec![(&format!("{id}.debug"), reg())])),
                        (
                            "ab",
                            dir(vec![
                                (&format!("{id}.debug"), reg()),
                                (&format!("{}.debug", &id[1..]), reg()),
                                (
                                    "ffffffffffffffffffffffffffffffffffffff.debug",
                                    Entry::Symlink { target: b"x".to_vec() },
                                ),
                                ("notes.txt", reg()),
                            ]),
                        ),
                    ]),
                )]),
            )]),
        )]);
        assert_eq!(
            root.debug_files(),
            vec![(format!("ab{id}.debug"), format!("lib/debug/.build-id/ab/{id}.debug"))]
        );
        assert_eq!(
            String::from_utf8(debuginfo_json("nar/x.nar.xz", "lib/debug/.build-id/ab/y.debug")).unwrap(),
            r#"{"archive":"../nar/x.nar.xz","member":"lib/debug/.build-id/ab/y.debug"}"#
        );
    }
}
