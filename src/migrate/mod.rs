//! Online view change. [`coordinator`] drives prepare → transfer → catch-up → commit across
//! the nodes of the old and new view; [`participant`] is what each phase does on one node,
//! [`transfer`] ships key ranges, [`journal`] keeps a durable node's change on disk, and
//! [`learn`] catches a node up with a view change it heard of. The state of a change in
//! progress is [`crate::change::Migration`].

pub mod coordinator;
mod journal;
mod learn;
mod participant;
mod transfer;

pub use learn::{follow_while_removed, learn};
pub mod apply;

pub(crate) use apply::reset;
pub(crate) use participant::{catch_up, committed, orphan_watch, prepare, stage, transfer};
