//! ringkv: a sharded key-value store on a consistent-hash ring of virtual nodes.
//!
//! The ring ([`ring`]) places keys and computes the move plan of a view change; the rest of
//! the crate turns it into a node that serves the course's HTTP API.

pub mod ring;
