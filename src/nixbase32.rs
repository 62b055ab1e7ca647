//! Nix's base-32 encoding ("nix32").
//!
//! Alphabet `0123456789abcdfghijklmnpqrsvwxyz` (no `e`, `o`, `u`, `t`). Unlike RFC 4648 the
//! bytes are read as one little-endian number and the digits are written most significant
//! first, so a 32-byte SHA-256 becomes 52 characters and a 20-byte store path digest 32.

use thiserror::Error;

const ALPHABET: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// Why a string is not nix32.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid nix32 character {0:?}")]
    Character(char),
    #[error("nix32 string has length {got}, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("nix32 string encodes more bits than fit")]
    Overflow,
}

/// Number of characters that encode `len` bytes.
pub const fn encoded_len(len: usize) -> usize {
    if len == 0 { 0 } else { (len * 8 - 1) / 5 + 1 }
}

/// Encodes bytes as nix32.
pub fn encode(bytes: &[u8]) -> String {
    let len = encoded_len(bytes.len());
    let mut out = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let low = bytes[i] >> j;
        let high = if i + 1 < bytes.len() {
            // j is at most 7, so the shift is at least 1 and fits u16 arithmetic.
            ((bytes[i + 1] as u16) << (8 - j)) as u8
        } else {
            0
        };
        out.push(ALPHABET[((low | high) & 0x1f) as usize] as char);
    }
    out
}

fn digit(c: u8) -> Result<u8, DecodeError> {
    ALPHABET.iter().position(|&a| a == c).map(|p| p as u8).ok_or(DecodeError::Character(c as char))
}

/// Decodes a nix32 string into exactly `N` bytes.
pub fn decode<const N: usize>(s: &str) -> Result<[u8; N], DecodeError> {
    let s = s.as_bytes();
    if s.len() != encoded_len(N) {
        return Err(DecodeError::Length { got: s.len(), expected: encoded_len(N) });
    }
    let mut out = [0u8; N];
    for (n, &c) in s.iter().rev().enumerate() {
        let d = digit(c)?;
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= d << j;
        let carry = (d as u16) >> (8 - j);
        if i + 1 < N {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(DecodeError::Overflow);
        }
    }
    Ok(out)
}

/// True when every byte of `s` is a nix32 digit.
pub fn is_nix32(s: &str) -> bool {
    s.bytes().all(|c| ALPHABET.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Golden values printed by `nix-hash --type sha256 --to-base32`.
    const SHA256_EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const SHA256_ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn unhex(s: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    #[test]
    fn golden() {
        assert_eq!(encode(&unhex(SHA256_EMPTY)), "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73");
        assert_eq!(encode(&unhex(SHA256_ABC)), "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s");
    }

    #[test]
    fn round_trip() {
        for seed in 0u8..=255 {
            let bytes: [u8; 20] = std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8 * 7));
            let s = encode(&bytes);
            assert_eq!(s.len(), 32);
            assert_eq!(decode::<20>(&s).unwrap(), bytes);
        }
        assert_eq!(decode::<32>(&encode(&unhex(SHA256_ABC))).unwrap(), unhex(SHA256_ABC));
    }

    #[test]
    fn rejects() {
        assert_eq!(decode::<20>("e").unwrap_err(), DecodeError::Length { got: 1, expected: 32 });
        let bad = "0000000000000000000000000000000e";
        assert_eq!(decode::<20>(bad).unwrap_err(), DecodeError::Character('e'));
        // The top digit of a 32-byte hash has only one meaningful bit.
        let over = format!("z{}", "0".repeat(51));
        assert_eq!(decode::<32>(&over).unwrap_err(), DecodeError::Overflow);
    }
}
