//! What a node does with each message another node sends it: the one place where a
//! message's sender and stamp are checked before anything acts on it, and where each
//! [`Request`] is mapped to the request path or a view-change phase, and each outcome to a
//! [`Response`].
//!
//! The checks, in order:
//! 1. the connection's handshake: with a cluster token both sides proved they hold it;
//!    without one the sender's address is as claimed (this node checks an identity only
//!    when it dials that address itself: a newer view is asked of the sender that way);
//! 2. a stamp with a newer epoch makes the node learn that view (once at a time, asked of
//!    the sender over this node's own connection to it, and only within
//!    [`crate::view::MAX_EPOCH_GAP`]);
//! 3. per message: forwarded keys and values are validated as the public API validates
//!    them, and refused when routed by another view of the same epoch; view-change phases
//!    are obeyed only from the change's coordinator; staged keys only from a participant,
//!    for keys this node owns under the new view, validated like forwarded ones; a commit
//!    only after this node shipped what it hands over, and only when the other members of
//!    its view know the change (see [`crate::migrate`]).

use std::sync::Arc;
use std::time::Instant;

use warp::http::{Method, StatusCode};

use crate::change::ChangeError;
use crate::data::{self, NotServed};
use crate::kv::{self, KvOp, KvOutcome};
use crate::meta::{Command, LeaderOp};
use crate::metrics::{self, RouteLabel};
use crate::migrate;
use crate::node::Node;
use crate::peers::stamp_of;
use crate::replicated;
use crate::rpc::client::Identity;
use crate::rpc::server::Handler;
use crate::rpc::{GiveUp, Refusal, Request, Response, Stamp};

impl Handler for Node {
    fn identity(&self) -> &Identity {
        self.identity()
    }

    fn stamp(&self) -> Stamp {
        stamp_of(&self.view())
    }

    async fn handle(
        self: Arc<Self>,
        from: Arc<str>,
        stamp: Stamp,
        request: Request,
    ) -> (Stamp, Response) {
        if self.faults().isolated() {
            // Cut off (a test's partition): as if the message never arrived.
            std::future::pending::<()>().await;
        }
        // A key routed by a newer view: catch up first (from the log, for a node that
        // applies one). Not for the log's own messages, which are how it catches up.
        if stamp.epoch > self.view().epoch && matches!(request, Request::Kv { .. }) {
            migrate::learn(&self, stamp.epoch, None, &from).await;
        }
        let response = match request {
            Request::Kv { key, op, give_up } => {
                serve_kv(&self, &key, op, give_up, stamp, &from).await
            }
            Request::State => Response::State(Box::new(self.node_state())),
            Request::Outcome { change_id } => Response::Outcome(self.log_outcome(change_id)),
            Request::Prepare(prepare) => {
                reply(migrate::prepare(&self, &from, prepare).await, |()| {
                    Response::Done
                })
            }
            Request::Transfer { change_id } => reply(
                migrate::transfer(&self, &from, change_id).await,
                Response::Shipped,
            ),
            Request::Stage {
                change_id,
                round,
                entries,
            } => reply(
                migrate::stage(&self, &from, change_id, round, entries).await,
                |()| Response::Done,
            ),
            Request::CatchUp { change_id } => reply(
                migrate::catch_up(&self, &from, change_id).await,
                Response::Shipped,
            ),
            Request::Commit { change_id } => reply(
                migrate::committed(&self, change_id).await,
                Response::Committed,
            ),
            Request::Raft { target, message } => match self.meta() {
                Some(meta) => Response::Raft(meta.handle(target, &message).await),
                None => Response::Refused(Refusal::Unsettled),
            },
            // A change is begun only in the name of the node that asks.
            Request::Lead(LeaderOp::Write(Command::Begin(change)))
                if change.coordinator != *from =>
            {
                Response::Refused(Refusal::NotMember(from.to_string()))
            }
            Request::Lead(op) => match self.meta() {
                Some(meta) => Response::Led(meta.lead(op).await),
                None => Response::Refused(Refusal::Unsettled),
            },
            Request::Driving { change_id } => Response::Outcome(if self.drives(change_id) {
                crate::wire::Outcome::Pending
            } else {
                crate::wire::Outcome::Unknown
            }),
            Request::Restarted { raft_id } => {
                self.note_restart(&from, raft_id);
                Response::Done
            }
            Request::Reset => reply(migrate::reset(&self, &from).await, Response::Reset),
            Request::ShardKv {
                key,
                method,
                body,
                give_up,
            } => match self.replication() {
                // Only a replica of the key's shard serves it; it never forwards again.
                Some(replication) if replication.serves(crate::ring::key_hash(key.as_bytes())) => {
                    let answer =
                        replicated::serve::as_replica(&self, &key, method, &body, Some(give_up));
                    match answer.await {
                        Ok(answer) => Response::ShardKv(answer),
                        // A change moved the key while it waited: the sender routes again.
                        Err(replicated::serve::Moved) => {
                            Response::Refused(Refusal::NotMember(self.address().to_string()))
                        }
                    }
                }
                _ => Response::Refused(Refusal::NotMember(self.address().to_string())),
            },
            request @ (Request::Pull { .. }
            | Request::Push { .. }
            | Request::Digests { .. }
            | Request::Snapshot { .. }) => {
                replicated::exchange::answer(&self, &from, stamp.epoch, request)
            }
        };
        (self.stamp(), response)
    }
}

/// A phase's result as an answer.
fn reply<T>(result: Result<T, ChangeError>, done: impl FnOnce(T) -> Response) -> Response {
    match result {
        Ok(value) => done(value),
        Err(error) => Response::Refused(refusal(error)),
    }
}

/// The one mapping of a participant's errors to what the coordinator is told.
fn refusal(error: ChangeError) -> Refusal {
    match error {
        ChangeError::InProgress => Refusal::InProgress,
        ChangeError::BadView(why) => Refusal::BadView(why.to_string()),
        ChangeError::StaleEpoch { offered, current } => Refusal::StaleEpoch { offered, current },
        ChangeError::EpochTooFar { offered, current } => Refusal::EpochTooFar { offered, current },
        ChangeError::UnknownChange(id) => Refusal::UnknownChange(id),
        ChangeError::NotCoordinator(sender) | ChangeError::NotParticipant(sender) => {
            Refusal::NotMember(sender)
        }
        ChangeError::NotShipped(id) => Refusal::NotShipped(id),
        ChangeError::NotIncoming(key) => Refusal::NotIncoming(key),
        ChangeError::Invalid(_, why) => Refusal::Invalid(why),
        ChangeError::Aborted(id) => Refusal::Aborted(id),
        ChangeError::OtherGroup(peer) => Refusal::NotMember(peer),
        ChangeError::Unreachable(peers) => Refusal::Unreachable(peers),
        ChangeError::Storage(error) => Refusal::Storage(error.to_string()),
    }
}

fn method_of(op: &KvOp) -> Method {
    match op {
        KvOp::Get => Method::GET,
        KvOp::Put(_) => Method::PUT,
        KvOp::Delete => Method::DELETE,
    }
}

/// A forwarded key request: checked as the public API checks it, then served by this
/// node as the key's owner.
async fn serve_kv(
    node: &Arc<Node>,
    key: &str,
    op: KvOp,
    give_up: GiveUp,
    stamp: Stamp,
    from: &str,
) -> Response {
    let started = Instant::now();
    let method = method_of(&op);
    let response = match kv::check(key, &op) {
        Err(invalid) => {
            tracing::warn!(from, key, %invalid, "refusing a forwarded request");
            Response::Refused(Refusal::Invalid(invalid))
        }
        Ok(()) => match data::serve_forwarded(node, key, op, give_up, stamp, from).await {
            Ok(outcome) => Response::Kv(outcome),
            Err(NotServed::Misdirected(newer)) => Response::Misdirected(newer),
            Err(NotServed::Unsettled) => Response::Refused(Refusal::Unsettled),
            Err(NotServed::ViewMismatch) => Response::Refused(Refusal::ViewMismatch),
            Err(NotServed::GaveUp) => {
                tracing::warn!(
                    from,
                    key,
                    "dropping a forward its sender has given up on (if every forward from \
                     it is dropped, the two nodes' clocks disagree by about the forwarding \
                     timeout)"
                );
                Response::Refused(Refusal::GaveUp)
            }
            Err(NotServed::Failed(error)) => Response::Refused(Refusal::Storage(error.to_string())),
        },
    };
    let status = match &response {
        Response::Kv(KvOutcome::Added) => StatusCode::CREATED,
        Response::Kv(KvOutcome::Absent) => StatusCode::NOT_FOUND,
        Response::Kv(_) => StatusCode::OK,
        Response::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
        Response::Refused(Refusal::Invalid(_)) => StatusCode::BAD_REQUEST,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    metrics::request(RouteLabel::Internal, &method, status, started.elapsed());
    response
}
