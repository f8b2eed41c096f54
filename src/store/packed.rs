//! Keys and values packed back to back in one buffer: how a transfer batch is read out of
//! a store, sent and taken in, with no allocation per key on either side.
//!
//! Each entry is a LEB128 varint of the key's length, the key (UTF-8), a varint of the
//! value's length plus one (0 for a deletion), and the value. A buffer that came over the
//! network is checked whole when it is decoded (lengths inside it, keys UTF-8), so a
//! [`Packed`] always walks cleanly; its values are slices of the one buffer, so whatever
//! keeps one past the batch (a store, a staged copy) copies it.

use std::fmt;

use bytes::Bytes;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::Entry;

/// Builds a [`Packed`] batch.
#[derive(Debug, Default)]
pub struct Packer {
    buf: Vec<u8>,
    count: usize,
    bytes: usize,
}

impl Packer {
    /// Appends one key and its value (`None`: a deletion).
    pub fn push(&mut self, key: &[u8], value: Option<&[u8]>) {
        put_varint(&mut self.buf, key.len() as u64);
        self.buf.extend_from_slice(key);
        match value {
            Some(value) => {
                put_varint(&mut self.buf, value.len() as u64 + 1);
                self.buf.extend_from_slice(value);
            }
            None => put_varint(&mut self.buf, 0),
        }
        self.count += 1;
        self.bytes += key.len() + value.map_or(0, <[u8]>::len);
    }

    /// Entries pushed.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of keys and values pushed, as batches count them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn finish(self) -> Packed {
        Packed {
            buf: Bytes::from(self.buf),
            count: self.count,
            bytes: self.bytes,
        }
    }
}

/// A batch of entries in one buffer (see the module's documentation).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Packed {
    buf: Bytes,
    count: usize,
    bytes: usize,
}

/// Why a packed buffer from the network was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("a length runs past the end of the batch")]
    Truncated,
    #[error("a length does not fit")]
    Overflow,
    #[error("a key is not UTF-8")]
    NotUtf8,
}

impl Packed {
    /// Checks `buf` whole: every entry is complete and every key is UTF-8.
    pub fn decode(buf: Bytes) -> Result<Packed, Malformed> {
        let (mut at, mut count, mut bytes) = (0, 0, 0);
        while at < buf.len() {
            let (key, value, next) = entry_at(&buf, at)?;
            std::str::from_utf8(&buf[key.clone()]).map_err(|_| Malformed::NotUtf8)?;
            bytes += key.len() + value.map_or(0, |v| v.len());
            count += 1;
            at = next;
        }
        Ok(Packed { buf, count, bytes })
    }

    /// Entries in the batch.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of keys and values, as batches count them.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The entries in order: each key, and its value (`None`: a deletion) as a slice of the
    /// batch's buffer.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<Bytes>)> + '_ {
        let mut at = 0;
        std::iter::from_fn(move || {
            if at >= self.buf.len() {
                return None;
            }
            // Checked when the batch was built or decoded: a failure here cannot happen,
            // and would end the walk rather than panic.
            let (key, value, next) = entry_at(&self.buf, at).ok()?;
            let key = std::str::from_utf8(&self.buf[key]).ok()?;
            at = next;
            Some((key, value.map(|v| self.buf.slice(v))))
        })
    }

    /// The entries as [`Entry`]s.
    #[cfg(test)]
    pub fn to_entries(&self) -> Vec<Entry> {
        self.iter()
            .map(|(key, value)| Entry {
                key: key.to_string(),
                value,
            })
            .collect()
    }
}

impl<'a> FromIterator<&'a Entry> for Packed {
    fn from_iter<I: IntoIterator<Item = &'a Entry>>(entries: I) -> Packed {
        let mut packer = Packer::default();
        for entry in entries {
            packer.push(entry.key.as_bytes(), entry.value.as_deref());
        }
        packer.finish()
    }
}

impl fmt::Debug for Packed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

type Span = std::ops::Range<usize>;

/// The key and value spans of the entry at `at`, and where the next one starts.
fn entry_at(buf: &[u8], at: usize) -> Result<(Span, Option<Span>, usize), Malformed> {
    let (key_len, at) = varint_at(buf, at)?;
    let key = span(buf, at, key_len)?;
    let (tagged, at) = varint_at(buf, key.end)?;
    if tagged == 0 {
        return Ok((key, None, at));
    }
    let value = span(buf, at, tagged - 1)?;
    let next = value.end;
    Ok((key, Some(value), next))
}

fn span(buf: &[u8], at: usize, len: u64) -> Result<Span, Malformed> {
    let len = usize::try_from(len).map_err(|_| Malformed::Overflow)?;
    let end = at.checked_add(len).ok_or(Malformed::Overflow)?;
    if end > buf.len() {
        return Err(Malformed::Truncated);
    }
    Ok(at..end)
}

fn put_varint(buf: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        buf.push((n as u8) | 0x80);
        n >>= 7;
    }
    buf.push(n as u8);
}

fn varint_at(buf: &[u8], mut at: usize) -> Result<(u64, usize), Malformed> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.get(at).ok_or(Malformed::Truncated)?;
        at += 1;
        n |= u64::from(byte & 0x7f)
            .checked_shl(shift)
            .filter(|part| part >> shift == u64::from(byte & 0x7f))
            .ok_or(Malformed::Overflow)?;
        if byte & 0x80 == 0 {
            return Ok((n, at));
        }
    }
    Err(Malformed::Overflow)
}

impl Serialize for Packed {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.buf)
    }
}

impl<'de> Deserialize<'de> for Packed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Packed, D::Error> {
        struct Buffer;
        impl<'de> Visitor<'de> for Buffer {
            type Value = Packed;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a packed batch of entries")
            }
            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Packed, E> {
                Packed::decode(Bytes::copy_from_slice(bytes)).map_err(E::custom)
            }
            fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Packed, E> {
                Packed::decode(Bytes::from(bytes)).map_err(E::custom)
            }
        }
        deserializer.deserialize_bytes(Buffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Entry> {
        vec![
            Entry {
                key: "a".into(),
                value: Some(Bytes::from_static(b"\"1\"")),
            },
            Entry {
                key: "gone".into(),
                value: None,
            },
            Entry {
                key: "é".repeat(100),
                value: Some(Bytes::from(vec![b'x'; 300])),
            },
            Entry {
                key: "empty".into(),
                value: Some(Bytes::new()),
            },
        ]
    }

    #[test]
    fn entries_come_back_as_they_went_in_through_the_wire() {
        let entries = sample();
        let packed: Packed = entries.iter().collect();
        assert_eq!(packed.len(), 4);
        assert_eq!(
            packed.bytes(),
            entries.iter().map(Entry::size).sum::<usize>()
        );
        let wire = postcard::to_stdvec(&packed).unwrap();
        let back: Packed = postcard::from_bytes(&wire).unwrap();
        assert_eq!(back.to_entries(), entries);
        assert_eq!((back.len(), back.bytes()), (packed.len(), packed.bytes()));
        assert!(Packed::decode(Bytes::new()).unwrap().is_empty());
    }

    #[test]
    fn a_broken_buffer_is_refused_whole() {
        let packed: Packed = sample().iter().collect();
        let whole = packed.buf.to_vec();
        // Cut inside an entry: some length runs past the end. Cut between two: the
        // entries before the cut.
        let mut ends = Vec::new();
        let mut at = 0;
        while at < whole.len() {
            at = entry_at(&whole, at).unwrap().2;
            ends.push(at);
        }
        assert_eq!(ends.len(), 4);
        for cut in 1..whole.len() {
            let decoded = Packed::decode(Bytes::copy_from_slice(&whole[..cut]));
            match ends.iter().position(|&end| end == cut) {
                Some(entries) => assert_eq!(decoded.unwrap().len(), entries + 1),
                None => assert_eq!(decoded, Err(Malformed::Truncated), "cut at {cut}"),
            }
        }
        // A key that is not UTF-8.
        let mut bad = Packer::default();
        bad.push(&[0xff, 0xfe], Some(b"1"));
        assert_eq!(Packed::decode(bad.finish().buf), Err(Malformed::NotUtf8));
        // A length of more than 64 bits, and one as large as u64 can be.
        let long = Bytes::from(vec![0xff; 11]);
        assert_eq!(Packed::decode(long), Err(Malformed::Overflow));
        let mut huge = Vec::new();
        put_varint(&mut huge, u64::MAX);
        assert_eq!(Packed::decode(Bytes::from(huge)), Err(Malformed::Overflow));
        // Through the wire decoder too.
        let wire = postcard::to_stdvec(&serde_bytes_of(&whole[..whole.len() - 1])).unwrap();
        assert!(postcard::from_bytes::<Packed>(&wire).is_err());
    }

    /// `bytes` as postcard writes a byte string.
    fn serde_bytes_of(bytes: &[u8]) -> Packed {
        Packed {
            buf: Bytes::copy_from_slice(bytes),
            count: 0,
            bytes: 0,
        }
    }
}
