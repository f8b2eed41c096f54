//! The replicated mode's request path ([`serve`]), the exchange of writes between the
//! replicas of a shard ([`exchange`]: pulls and refills) and the push of a new write to
//! them ([`push`]), over a node's [`crate::replication::Replication`].

pub mod exchange;
pub mod push;
pub mod serve;
