//! Versions of replicated writes (assignment 4): every write a replica accepts gets a
//! [`Version`], and of two writes to one key the greater version wins, on every replica
//! alike, whatever order gossip brings them in. A deletion is a write too (a tombstone),
//! so a deleted key never comes back from a replica that missed the delete.
//!
//! The version's first part is a hybrid logical clock ([`Clock`]): wall-clock
//! milliseconds with a logical counter, never going back and always past every version
//! the replica has seen, so a write made after another one was seen wins over it. Ties
//! between replicas are broken by the replica's id, then by its write number.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, Bytes, BytesMut};

/// The version of one write.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Version {
    /// Hybrid logical time: milliseconds since the Unix epoch << 16 | a logical counter.
    pub time: u64,
    /// The replica that accepted the write (a hash of its address).
    pub origin: u64,
    /// The write's number among the writes its replica accepted (1, 2, ...).
    pub counter: u64,
}

/// A replica's hybrid logical clock.
#[derive(Debug, Default)]
pub struct Clock {
    last: AtomicU64,
}

const LOGICAL_BITS: u32 = 16;

/// How far ahead of the wall clock an observed time may pull this clock: one hour.
pub const MAX_DRIFT: u64 = 3_600_000 << LOGICAL_BITS;

fn wall() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        << LOGICAL_BITS
}

/// The hybrid-clock time `ago` before now (what a version taken then would at least be).
pub fn time_ago(ago: std::time::Duration) -> u64 {
    wall().saturating_sub((ago.as_millis() as u64) << LOGICAL_BITS)
}

impl Clock {
    /// A time greater than every time this clock gave or saw.
    pub fn tick(&self) -> u64 {
        let now = wall();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Takes in a time seen in another replica's write; one more than [`MAX_DRIFT`] ahead
    /// of this clock's wall time counts as that far ahead only (a peer's bad clock or a
    /// forged write must not push this clock to the end of time).
    pub fn observe(&self, time: u64) {
        let bound = wall().saturating_add(MAX_DRIFT);
        self.last.fetch_max(time.min(bound), Ordering::AcqRel);
    }
}

/// What a replicated store keeps for a key: the version of its last write and the value,
/// or `None` for a deletion (a tombstone).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub version: Version,
    pub value: Option<Bytes>,
}

/// Why stored or received bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a replicated record (short, unknown tag, or a tombstone with a value)")]
pub struct BadRecord;

const HEADER: usize = 1 + 3 * 8;

impl Record {
    /// The record in one buffer: a tag (1 value, 0 tombstone), the version, the value.
    pub fn encode(&self) -> Bytes {
        let value = self.value.as_deref().unwrap_or_default();
        let mut out = BytesMut::with_capacity(HEADER + value.len());
        out.put_u8(u8::from(self.value.is_some()));
        out.put_u64_le(self.version.time);
        out.put_u64_le(self.version.origin);
        out.put_u64_le(self.version.counter);
        out.put_slice(value);
        out.freeze()
    }

    pub fn decode(bytes: &Bytes) -> Result<Record, BadRecord> {
        if bytes.len() < HEADER || bytes[0] > 1 || (bytes[0] == 0 && bytes.len() > HEADER) {
            return Err(BadRecord);
        }
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(Record {
            version: Version {
                time: word(1),
                origin: word(9),
                counter: word(17),
            },
            value: (bytes[0] == 1).then(|| bytes.slice(HEADER..)),
        })
    }

    /// Whether this record replaces `current` (the greater version wins).
    pub fn wins_over(&self, current: Option<&Record>) -> bool {
        current.is_none_or(|c| self.version > c.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_never_goes_back_and_passes_what_it_saw() {
        let clock = Clock::default();
        let a = clock.tick();
        let b = clock.tick();
        assert!(b > a);
        let future = wall() + (60_000 << LOGICAL_BITS);
        clock.observe(future);
        assert!(clock.tick() > future);
        clock.observe(1);
        assert!(clock.tick() > future + 1);
        // A time at the end of the range pulls the clock one hour ahead at most.
        clock.observe(u64::MAX);
        let t = clock.tick();
        assert!(t < u64::MAX && t <= wall() + MAX_DRIFT + 1);
    }

    #[test]
    fn records_round_trip_and_short_ones_are_refused() {
        let version = Version {
            time: 7 << LOGICAL_BITS,
            origin: 42,
            counter: 3,
        };
        for value in [
            Some(Bytes::from_static(b"{\"a\":1}")),
            Some(Bytes::new()),
            None,
        ] {
            let record = Record { version, value };
            assert_eq!(Record::decode(&record.encode()), Ok(record));
        }
        assert_eq!(
            Record::decode(&Bytes::from_static(b"\x01abc")),
            Err(BadRecord)
        );
        let mut bad = Record {
            version,
            value: None,
        }
        .encode()
        .to_vec();
        bad[0] = 9;
        assert_eq!(Record::decode(&Bytes::from(bad.clone())), Err(BadRecord));
        bad[0] = 0;
        bad.push(b'1');
        assert_eq!(
            Record::decode(&Bytes::from(bad)),
            Err(BadRecord),
            "a tombstone with a value"
        );
    }

    #[test]
    fn the_greater_version_wins_whatever_the_order() {
        let at = |time: u64, origin: u64| Record {
            version: Version {
                time,
                origin,
                counter: 1,
            },
            value: None,
        };
        let (old, new, tie) = (at(5, 1), at(6, 1), at(6, 2));
        assert!(new.wins_over(Some(&old)) && !old.wins_over(Some(&new)));
        assert!(tie.wins_over(Some(&new)) && !new.wins_over(Some(&tie)));
        assert!(old.wins_over(None));
        assert!(
            !old.wins_over(Some(&old)),
            "the same write twice changes nothing"
        );
    }
}
