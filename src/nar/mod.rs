//! The Nix ARchive (NAR) format.
//!
//! A NAR is a sequence of strings, each a little-endian u64 length, the bytes, and zero
//! padding to a multiple of 8:
//!
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" <bytes>
//! symlink   = "symlink" "target" <target>
//! directory = "directory" { "entry" "(" "name" <name> "node" node ")" }
//! ```
//!
//! Directory entries are sorted by the bytes of their names, with no duplicates and no `/`,
//! NUL, `.` or `..`. [`writer`] enforces this grammar in its types; [`dump`] feeds it from the
//! filesystem; [`listing`] is the `.ls` listing recorded while a NAR is written.

pub mod dump;
pub mod listing;
pub mod writer;

/// Wire tokens, each a complete padded string as it appears in the stream.
pub(crate) mod wire {
    /// Encodes a short token at compile time: u64 LE length, bytes, zero padding.
    const fn token<const N: usize>(s: &[u8]) -> [u8; N] {
        let mut out = [0u8; N];
        let len = s.len() as u64;
        let len_bytes = len.to_le_bytes();
        let mut i = 0;
        while i < 8 {
            out[i] = len_bytes[i];
            i += 1;
        }
        let mut j = 0;
        while j < s.len() {
            out[8 + j] = s[j];
            j += 1;
        }
        out
    }

    const fn padded(n: usize) -> usize {
        8 + n.div_ceil(8) * 8
    }

    macro_rules! tokens {
        ($($name:ident = $s:literal;)*) => {
            $(pub const $name: [u8; padded($s.len())] = token($s);)*
        };
    }

    tokens! {
        MAGIC = b"nix-archive-1";
        OPEN = b"(";
        CLOSE = b")";
        TYPE = b"type";
        REGULAR = b"regular";
        SYMLINK = b"symlink";
        DIRECTORY = b"directory";
        EXECUTABLE = b"executable";
        EMPTY = b"";
        CONTENTS = b"contents";
        TARGET = b"target";
        ENTRY = b"entry";
        NAME = b"name";
        NODE = b"node";
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn s(bytes: &[u8]) -> Vec<u8> {
            let mut v = (bytes.len() as u64).to_le_bytes().to_vec();
            v.extend_from_slice(bytes);
            v.resize(8 + bytes.len().div_ceil(8) * 8, 0);
            v
        }

        #[test]
        fn tokens_are_padded_strings() {
            assert_eq!(MAGIC.to_vec(), s(b"nix-archive-1"));
            assert_eq!(OPEN.to_vec(), s(b"("));
            assert_eq!(EMPTY.to_vec(), s(b""));
            assert_eq!(EXECUTABLE.to_vec(), s(b"executable"));
            assert_eq!(CONTENTS.to_vec(), s(b"contents"));
            assert_eq!(TYPE.to_vec(), s(b"type"));
            assert_eq!(REGULAR.to_vec(), s(b"regular"));
            assert_eq!(SYMLINK.to_vec(), s(b"symlink"));
            assert_eq!(DIRECTORY.to_vec(), s(b"directory"));
            assert_eq!(TARGET.to_vec(), s(b"target"));
            assert_eq!(ENTRY.to_vec(), s(b"entry"));
            assert_eq!(NAME.to_vec(), s(b"name"));
            assert_eq!(NODE.to_vec(), s(b"node"));
            assert_eq!(CLOSE.to_vec(), s(b")"));
        }
    }
}
