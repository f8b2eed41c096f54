//! ringkv: a sharded key-value store on a consistent-hash ring of virtual nodes, with online
//! view changes that ship only the hash ranges whose owner changes.
//!
//! Data flows one way: [`api`] parses and validates → the node's [`view`] says who owns the
//! key → the local [`store`] or [`forward`] → one reply type renders every answer. Only
//! [`migrate`] changes the view; [`ring`] and [`store`] know nothing about HTTP.

pub mod api;
pub mod auth;
pub mod blocking;
pub mod causal;
pub mod change;
pub mod config;
pub mod consensus;
pub mod data;
pub mod datadir;
pub mod endpoint;
pub mod fault;
pub mod gossip;
pub mod header_timer;
pub mod join;
pub mod kv;
pub mod meta;
pub mod metrics;
pub mod migrate;
pub mod node;
pub mod parse_errors;
pub mod peers;
pub mod reclaim;
pub mod replica;
pub mod replicated;
pub mod replication;
pub mod ring;
pub mod rpc;
pub mod server;
pub mod shard;
pub mod shutdown;
pub mod store;
pub mod version;
pub mod view;
pub mod viz;
pub mod wire;
