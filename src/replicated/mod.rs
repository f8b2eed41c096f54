//! The replicated mode's request path ([`serve`]) and the exchange of writes between the
//! replicas of a shard ([`exchange`]), over a node's [`crate::replication::Replication`].

pub mod exchange;
pub mod serve;
