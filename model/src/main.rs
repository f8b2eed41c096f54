//! Model check of ringkv's view-change protocol (one key, one range move), with
//! [stateright](https://docs.rs/stateright).
//!
//! # What is modelled
//!
//! One key `k` whose hash range moves from the old owner **O** to the new owner **N** in a
//! view change (epoch e -> e+1), driven by a coordinator **C**, a process of its own that
//! can pause or crash (in ringkv C may be the same node as O; modelling it apart gives it
//! the most freedom). A client writes `W1`, then `W2` (the second only once the first was
//! acknowledged or failed); the key starts absent (`Absent`, which is also what a tombstone
//! ships).
//!
//! The phases, as in `src/migrate`:
//! 1. *Begin*: the change is recorded; every node knows it is pending (the initial state).
//! 2. *Prepare*: O records writes to `k` as dirty (O starts prepared).
//! 3. *Transfer*: C sends `Ship` to O; O sends N `Stage(Transfer, value)`; N stages it (not
//!    live) and acks; O then acks `Transferred` to C.
//! 4. *CatchUp*: C sends `CatchUp` to O; O freezes `k` (it neither reads nor writes it any
//!    more: requests wait) and, if `k` is dirty, sends `Stage(CatchUp, value)`; once N acked
//!    (or at once if clean) O acks `Shipped` to C.
//! 5. *Commit*, which is where the two protocols differ:
//!    * **NEW** (the metadata log decides): C, on `Shipped`, proposes `Commit` to the
//!      decision register D; a participant's watchdog may propose `Abort` at any time. D is
//!      the replicated log abstracted to a linearizable register: the first proposal wins,
//!      later ones are no-ops. A node learns the outcome only by *applying* D, an `Apply`
//!      step of its own that can come arbitrarily late (while the node is paused, cut off...).
//!    * **OLD** (C decides alone): C, on `Shipped`, decides Commit and sends `Commit` to O
//!      and N. A participant's watchdog, when it fires before it heard Commit, asks the other
//!      participant and C (`Query`/`Reply`); if nobody answered "committed" and C did not
//!      answer "pending" (C paused or crashed, or a query or reply lost) it aborts on its own.
//!      A participant that aborted refuses a later Commit; O that commits drops `k`.
//! 6. *Apply*: Commit -> N makes its staged value live and serves `k`, O drops `k` (it
//!    forwards); Abort -> N discards what it staged, O unfreezes and serves `k` again.
//!
//! Faults: messages are lost (`Drop`), reordered (any in-flight message may be delivered
//! next) and duplicated (a message is delivered at most twice; the old protocol's run bounds
//! how many messages get a second delivery, [`ViewChange::max_duplicates`]); up to
//! [`ViewChange::max_pauses`] pauses (a paused node takes no step until it resumes); C may
//! crash (it stops forever).
//!
//! # Properties
//!
//! The write-loss property: in every *settled* state (no client request in flight, and
//! either no outcome yet or every participant knows it) a read returns the last acknowledged
//! write, or the initial `Absent` if none was. A read goes to whoever serves `k`; if nobody
//! does before any outcome, O (frozen, still the owner of record) answers once it unfreezes;
//! if nobody serves `k` once every participant knows the outcome, the key is gone, which is a
//! violation too; if two nodes serve `k`, both must hold the value. It is checked as two
//! `always` properties, split on whether a write was acknowledged, so that each gets its own
//! counterexample (the shortest violation of the whole acknowledges no write):
//! * **no acknowledged write lost** (some write was acknowledged);
//! * **before any write is acknowledged, k keeps its initial value**.
//!
//! And:
//! * `always` **at most one node serves k**;
//! * `sometimes` **the change commits with both writes acknowledged** (the happy path is
//!   reachable; liveness is not checked).
//!
//! `main` checks three variants with breadth-first search and exits 0 only if the new
//! protocol's `always` properties hold (exhaustively, within the bounds) with its happy path
//! reachable, and the old protocol violates "no acknowledged write lost". The third variant
//! is informational. A counterexample is the checker's path, greedily shortened (an action
//! is left out while the rest still replays to a violation): the checker keeps the last
//! violating path it met, not the shortest.
//!
//! # Abstraction choices
//!
//! * One key and one moving range: the protocol treats keys independently, and a batch of
//!   entries is one `Stage` message carrying the key's value.
//! * Reads are not actions: they change nothing, so the property computes what a read would
//!   return in each settled state instead of enumerating read requests.
//! * A write is applied and acknowledged in one step (the ack cannot be lost); a failed
//!   write is one dropped before it was applied. A request routed to a node that cannot
//!   serve `k` when it arrives waits (its `ServeWrite` step is not enabled) or fails.
//! * The client routes by the nodes' current state: to O if O serves `k` (not frozen, not
//!   committed), to N if N committed, to either if both serve (which is itself a violation).
//! * Answers are matched to requests, as ringkv's RPC layer matches a response to its call:
//!   a `StageAck` names the round (transfer or catch-up) it answers, and C only takes the
//!   ack of the phase it waits for. Nothing is retransmitted: a lost message stalls the run,
//!   which is enough for safety (a duplicate covers a late retry).
//! * With [`ViewChange::ordered_stages`] N keeps the newest round it staged and ignores a
//!   late copy of the transfer batch that arrives after the catch-up batch. ringkv's
//!   `Change::stage` overwrites whatever it holds, so there it is the transport's job: a
//!   batch is answered before the next is sent, and an answered request must never be
//!   applied again. The `new-unordered-stages` variant drops the assumption and loses a write.
//! * Timeouts are nondeterministic, except the OLD watchdog's decision to give up on an
//!   answer: it may do so only when the node asked is paused or crashed, or the query or
//!   its reply was lost (no longer in flight). So an OLD counterexample says which fault let
//!   the participant abort. The NEW watchdog may propose Abort at any step.
//! * Pauses: in an asynchronous model a paused node is just one that is not scheduled, so a
//!   pause only matters where a step depends on it (the OLD watchdog); it is kept in both
//!   protocols for the same fault budget.
//! * Once a participant knows the outcome it ignores the change's messages (ringkv: the
//!   change has ended there), except that an OLD participant still answers queries.
//! * A message whose delivery can no longer do anything (its receiver moved past the step
//!   it serves) is dropped at once: a drop is a legal step anyway, and it keeps equivalent
//!   states from being told apart.
//! * Bounds: 3 processes, 1 key, 2 writes; the new protocol with 2 pauses and every message
//!   deliverable twice (explored exhaustively, well under a second); the old one with
//!   2 pauses, one duplicated message and one watchdog round per participant (its queries
//!   make its state space far larger; the search stops at its first discoveries).

use std::collections::BTreeMap;
use std::fmt;
use std::process::ExitCode;
use std::time::Instant;

use stateright::{Checker, Expectation, Model, Property};

/// The value of `k`. `Absent` is the initial value, and what a tombstone ships.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    Absent,
    W1,
    W2,
}

/// The processes: old owner, new owner, coordinator.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    O,
    N,
    C,
}

impl Node {
    fn index(self) -> usize {
        self as usize
    }

    /// The other participant.
    fn peer(self) -> Node {
        match self {
            Node::O => Node::N,
            Node::N => Node::O,
            Node::C => unreachable!("C is not a participant"),
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Decision {
    Commit,
    Abort,
}

/// Which shipment a `Stage` belongs to; `Transfer < CatchUp`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Round {
    Transfer,
    CatchUp,
}

/// An OLD participant's or C's answer to a watchdog's query.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Answer {
    Committed,
    NotCommitted,
    Pending,
}

/// A message in flight; each has one destination ([`Msg::to`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
enum Msg {
    /// C -> O: start the bulk transfer.
    Ship,
    /// O -> N: the key's value, to stage.
    Stage(Round, Val),
    /// N -> O: staged (answers the `Stage` of that round).
    StageAck(Round),
    /// O -> C: the transfer is done.
    Transferred,
    /// C -> O: freeze and ship what is dirty.
    CatchUp,
    /// O -> C: the catch-up is done.
    Shipped,
    /// OLD, C -> a participant: commit.
    Commit(Node),
    /// OLD: a participant's watchdog asks another node whether the change committed.
    Query { from: Node, to: Node },
    /// OLD: the answer to a `Query`.
    Reply {
        from: Node,
        to: Node,
        answer: Answer,
    },
}

impl Msg {
    fn to(self) -> Node {
        match self {
            Msg::Ship | Msg::StageAck(_) | Msg::CatchUp => Node::O,
            Msg::Stage(..) => Node::N,
            Msg::Transferred | Msg::Shipped => Node::C,
            Msg::Commit(to) | Msg::Query { to, .. } | Msg::Reply { to, .. } => to,
        }
    }
}

/// O's progress through the phases.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum OPhase {
    Prepared,
    /// Sent `Stage(Transfer)`, waits for N's ack.
    Transferring,
    Transferred,
    /// Frozen, sent `Stage(CatchUp)`, waits for N's ack.
    CatchingUp,
    Shipped,
}

/// An OLD watchdog's round of questions in progress.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Asking {
    peer_silent: bool,
    coordinator_silent: bool,
    heard_committed: bool,
    heard_pending: bool,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Watchdog {
    /// OLD: how many more times it may fire.
    rounds_left: u8,
    asking: Option<Asking>,
}

/// The old owner.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Owner {
    value: Val,
    dirty: bool,
    frozen: bool,
    phase: OPhase,
    /// NEW: the decision O applied; OLD: O's own outcome.
    outcome: Option<Decision>,
    watchdog: Watchdog,
}

/// The new owner.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Receiver {
    staged: Option<(Round, Val)>,
    /// The value N serves once it committed.
    live: Val,
    outcome: Option<Decision>,
    watchdog: Watchdog,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum CPhase {
    Begin,
    AwaitTransferred,
    AwaitShipped,
    /// NEW: proposed Commit; OLD: decided Commit.
    Decided,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Coordinator {
    phase: CPhase,
    crashed: bool,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Client {
    /// Writes sent so far (W1, then W2).
    issued: u8,
    /// The write in flight and the node it was routed to.
    in_flight: Option<(Val, Node)>,
    /// Bit 0: W1 acknowledged; bit 1: W2 acknowledged.
    acked: u8,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct State {
    /// NEW: the decision register D (the metadata log). Always `None` in OLD.
    decision: Option<Decision>,
    o: Owner,
    n: Receiver,
    c: Coordinator,
    client: Client,
    /// Messages in flight; the flag says the message was already delivered once.
    net: BTreeMap<Msg, bool>,
    /// Indexed by [`Node::index`].
    paused: [bool; 3],
    pauses_left: u8,
    duplicates_left: u8,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Action {
    /// C starts the transfer: `Ship` to O.
    BeginTransfer,
    /// A message is delivered and consumed.
    Deliver(Msg),
    /// A message is delivered and a copy stays in flight (its second and last delivery).
    Duplicate(Msg),
    /// A message is lost.
    Drop(Msg),
    /// The client sends its next write, routed to a node that serves `k` now.
    Write(Val, Node),
    /// The node the write went to applies it, and the client gets the ack.
    ServeWrite,
    /// The write in flight fails (lost, or timed out while it waited); never applied.
    FailWrite,
    /// A participant's watchdog fires. NEW: it proposes Abort to D. OLD: it asks the other
    /// participant and C whether the change committed.
    Watchdog(Node),
    /// OLD: the participant stops waiting for answers and acts on what it heard.
    WatchdogDecides(Node),
    /// NEW: a participant applies D's decision.
    Apply(Node),
    Pause(Node),
    Resume(Node),
    /// C stops forever.
    Crash,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    New,
    Old,
}

/// One variant of the model and its bounds.
#[derive(Clone, Debug)]
struct ViewChange {
    name: &'static str,
    protocol: Protocol,
    /// N ignores a `Stage` of an older round than the one it holds.
    ordered_stages: bool,
    max_pauses: u8,
    /// How many messages of a run may be delivered a second time; `None`: every one.
    max_duplicates: Option<u8>,
    /// OLD: how many times each participant's watchdog may fire.
    watchdog_rounds: u8,
    coordinator_may_crash: bool,
}

const NO_WRITE_LOST: &str = "no acknowledged write lost";
const KEY_KEPT: &str = "before any write is acknowledged, k keeps its initial value";
const ONE_SERVER: &str = "at most one node serves k";
const HAPPY_PATH: &str = "the change commits with both writes acknowledged";

fn write_bit(value: Val) -> u8 {
    match value {
        Val::W1 => 1,
        Val::W2 => 2,
        Val::Absent => 0,
    }
}

impl State {
    fn outcome(&self, node: Node) -> Option<Decision> {
        match node {
            Node::O => self.o.outcome,
            Node::N => self.n.outcome,
            Node::C => None,
        }
    }

    fn watchdog(&mut self, node: Node) -> &mut Watchdog {
        match node {
            Node::O => &mut self.o.watchdog,
            Node::N => &mut self.n.watchdog,
            Node::C => unreachable!("C has no watchdog"),
        }
    }

    /// Whether `node` serves `k` now: O until it committed, unless frozen; N once committed.
    fn serves(&self, node: Node) -> bool {
        match node {
            Node::O => !self.o.frozen && self.o.outcome != Some(Decision::Commit),
            Node::N => self.n.outcome == Some(Decision::Commit),
            Node::C => false,
        }
    }

    fn value_at(&self, node: Node) -> Val {
        match node {
            Node::O => self.o.value,
            Node::N => self.n.live,
            Node::C => unreachable!("C holds no data"),
        }
    }

    /// Whether `node` can take a step.
    fn runs(&self, node: Node) -> bool {
        let crashed = node == Node::C && self.c.crashed;
        !self.paused[node.index()] && !crashed
    }

    /// Puts a message in flight (a crashed C receives nothing).
    fn send(&mut self, msg: Msg) {
        if msg.to() == Node::C && self.c.crashed {
            return;
        }
        self.net.insert(msg, false);
    }

    /// Whether `asker` may stop waiting for `asked`'s answer: `asked` is paused or crashed,
    /// or the query or its reply was lost.
    fn unresponsive(&self, asker: Node, asked: Node) -> bool {
        !self.runs(asked)
            || !self.net.keys().any(|m| match *m {
                Msg::Query { from, to } => from == asker && to == asked,
                Msg::Reply { from, to, .. } => from == asked && to == asker,
                _ => false,
            })
    }

    /// The last acknowledged write, or the initial value.
    fn expected(&self) -> Val {
        if self.client.acked & 2 != 0 {
            Val::W2
        } else if self.client.acked & 1 != 0 {
            Val::W1
        } else {
            Val::Absent
        }
    }

    /// `node` learns (NEW: applies) the outcome of the change.
    fn settle(&mut self, node: Node, decision: Decision) {
        match (node, decision) {
            (Node::O, Decision::Commit) => {
                // O drops k; it forwards from now on.
                self.o.value = Val::Absent;
                self.o.frozen = false;
            }
            (Node::O, Decision::Abort) => self.o.frozen = false,
            (Node::N, Decision::Commit) => {
                self.n.live = self.n.staged.map_or(Val::Absent, |(_, v)| v);
                self.n.staged = None;
            }
            (Node::N, Decision::Abort) => self.n.staged = None,
            (Node::C, _) => unreachable!("C is not a participant"),
        }
        if node == Node::O {
            // Canonical form: the phase and dirty bit mean nothing once the change ended.
            self.o.dirty = false;
            self.o.phase = OPhase::Prepared;
            self.o.outcome = Some(decision);
        } else {
            self.n.outcome = Some(decision);
        }
        *self.watchdog(node) = Watchdog {
            rounds_left: 0,
            asking: None,
        };
    }
}

impl ViewChange {
    /// No outcome anywhere yet.
    fn undecided(&self, s: &State) -> bool {
        match self.protocol {
            Protocol::New => s.decision.is_none(),
            Protocol::Old => {
                s.c.phase != CPhase::Decided && s.o.outcome.is_none() && s.n.outcome.is_none()
            }
        }
    }

    /// The states the write-loss property speaks of: no request in flight, and no outcome
    /// yet or every participant knows its outcome.
    fn settled(&self, s: &State) -> bool {
        s.client.in_flight.is_none()
            && (self.undecided(s) || (s.o.outcome.is_some() && s.n.outcome.is_some()))
    }

    /// What a read could return: the value of each node that serves `k`; O's if nobody does
    /// before any outcome (O is frozen and still the owner of record); nothing if nobody
    /// serves `k` after the outcome.
    fn read_values(&self, s: &State) -> Vec<Val> {
        let serving: Vec<Val> = [Node::O, Node::N]
            .into_iter()
            .filter(|&n| s.serves(n))
            .map(|n| s.value_at(n))
            .collect();
        if serving.is_empty() && self.undecided(s) {
            vec![s.o.value]
        } else {
            serving
        }
    }

    /// Whether delivering `msg` would do nothing, now and in every later state (the state
    /// it depends on only moves forward). Such messages are dropped at once: a drop is a
    /// legal step anyway, and the state space shrinks.
    fn useless(&self, s: &State, msg: Msg) -> bool {
        let o_ended = s.o.outcome.is_some();
        match msg {
            Msg::Ship => o_ended || !matches!(s.o.phase, OPhase::Prepared | OPhase::Transferring),
            Msg::StageAck(Round::Transfer) => {
                o_ended || !matches!(s.o.phase, OPhase::Prepared | OPhase::Transferring)
            }
            Msg::StageAck(Round::CatchUp) => o_ended || s.o.phase == OPhase::Shipped,
            Msg::CatchUp => o_ended || matches!(s.o.phase, OPhase::CatchingUp | OPhase::Shipped),
            Msg::Stage(..) => s.n.outcome.is_some(),
            Msg::Transferred => matches!(s.c.phase, CPhase::AwaitShipped | CPhase::Decided),
            Msg::Shipped => s.c.phase == CPhase::Decided,
            Msg::Commit(to) => s.outcome(to).is_some(),
            // Answered whatever the state.
            Msg::Query { .. } => false,
            // Only an asking participant reads replies, and one that may ask no more never will.
            Msg::Reply { to, .. } => {
                let watchdog = match to {
                    Node::O => s.o.watchdog,
                    _ => s.n.watchdog,
                };
                s.outcome(to).is_some() || (watchdog.asking.is_none() && watchdog.rounds_left == 0)
            }
        }
    }

    /// Delivers `msg` to its destination, which runs.
    fn handle(&self, s: &mut State, msg: Msg) {
        match msg {
            // O ships its current value (again, on a duplicate `Ship` before N's ack).
            Msg::Ship => {
                if s.o.outcome.is_none()
                    && matches!(s.o.phase, OPhase::Prepared | OPhase::Transferring)
                {
                    s.o.phase = OPhase::Transferring;
                    s.send(Msg::Stage(Round::Transfer, s.o.value));
                }
            }
            // N stages the batch (not live) and acks it, unless the change ended there.
            Msg::Stage(round, value) => {
                if s.n.outcome.is_none() {
                    let stale =
                        self.ordered_stages && s.n.staged.is_some_and(|(held, _)| held > round);
                    if !stale {
                        s.n.staged = Some((round, value));
                    }
                    s.send(Msg::StageAck(round));
                }
            }
            // O takes N's ack for the round it waits on, and reports to C.
            Msg::StageAck(round) => {
                if s.o.outcome.is_none() {
                    match (s.o.phase, round) {
                        (OPhase::Transferring, Round::Transfer) => {
                            s.o.phase = OPhase::Transferred;
                            s.send(Msg::Transferred);
                        }
                        (OPhase::CatchingUp, Round::CatchUp) => {
                            s.o.phase = OPhase::Shipped;
                            s.send(Msg::Shipped);
                        }
                        _ => {}
                    }
                }
            }
            // C starts the catch-up.
            Msg::Transferred => {
                if s.c.phase == CPhase::AwaitTransferred {
                    s.c.phase = CPhase::AwaitShipped;
                    s.send(Msg::CatchUp);
                }
            }
            // O freezes k and ships it again if it changed since prepare.
            Msg::CatchUp => {
                if s.o.outcome.is_none() && s.o.phase == OPhase::Transferred {
                    s.o.frozen = true;
                    if s.o.dirty {
                        s.o.phase = OPhase::CatchingUp;
                        s.send(Msg::Stage(Round::CatchUp, s.o.value));
                    } else {
                        s.o.phase = OPhase::Shipped;
                        s.send(Msg::Shipped);
                    }
                }
            }
            // C commits: NEW proposes Commit to D; OLD tells the participants.
            Msg::Shipped => {
                if s.c.phase == CPhase::AwaitShipped {
                    s.c.phase = CPhase::Decided;
                    match self.protocol {
                        Protocol::New => {
                            if s.decision.is_none() {
                                s.decision = Some(Decision::Commit);
                            }
                        }
                        Protocol::Old => {
                            s.send(Msg::Commit(Node::O));
                            s.send(Msg::Commit(Node::N));
                        }
                    }
                }
            }
            // OLD: a participant commits, unless it aborted (then it refuses).
            Msg::Commit(to) => {
                if s.outcome(to).is_none() {
                    s.settle(to, Decision::Commit);
                }
            }
            // OLD: C says pending until it decided; a participant says whether it committed.
            Msg::Query { from, to } => {
                let answer = match to {
                    Node::C if s.c.phase == CPhase::Decided => Answer::Committed,
                    Node::C => Answer::Pending,
                    _ if s.outcome(to) == Some(Decision::Commit) => Answer::Committed,
                    _ => Answer::NotCommitted,
                };
                s.send(Msg::Reply {
                    from: to,
                    to: from,
                    answer,
                });
            }
            // OLD: the asking participant notes the answer.
            Msg::Reply { from, to, answer } => {
                if s.outcome(to).is_none() {
                    if let Some(asking) = s.watchdog(to).asking.as_mut() {
                        if from == Node::C {
                            asking.coordinator_silent = false;
                        } else {
                            asking.peer_silent = false;
                        }
                        asking.heard_committed |= answer == Answer::Committed;
                        asking.heard_pending |= answer == Answer::Pending;
                    }
                }
            }
        }
    }
}

impl Model for ViewChange {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let watchdog = Watchdog {
            rounds_left: match self.protocol {
                Protocol::New => 0,
                Protocol::Old => self.watchdog_rounds,
            },
            asking: None,
        };
        vec![State {
            decision: None,
            o: Owner {
                value: Val::Absent,
                dirty: false,
                frozen: false,
                phase: OPhase::Prepared,
                outcome: None,
                watchdog,
            },
            n: Receiver {
                staged: None,
                live: Val::Absent,
                outcome: None,
                watchdog,
            },
            c: Coordinator {
                phase: CPhase::Begin,
                crashed: false,
            },
            client: Client {
                issued: 0,
                in_flight: None,
                acked: 0,
            },
            net: BTreeMap::new(),
            paused: [false; 3],
            pauses_left: self.max_pauses,
            duplicates_left: self.max_duplicates.unwrap_or(1),
        }]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        // C starts the change (Begin and Prepare are done in the initial state).
        if s.c.phase == CPhase::Begin && s.runs(Node::C) {
            actions.push(Action::BeginTransfer);
        }
        // The network: any message in flight may be delivered next (to a running node), a
        // second time once, or lost.
        for (&msg, &delivered_once) in &s.net {
            if s.runs(msg.to()) {
                actions.push(Action::Deliver(msg));
                if !delivered_once && s.duplicates_left > 0 {
                    actions.push(Action::Duplicate(msg));
                }
            }
            actions.push(Action::Drop(msg));
        }
        // The client: one write at a time, routed to a node serving k; it is applied when
        // that node serves k and runs, or fails.
        match s.client.in_flight {
            None if s.client.issued < 2 => {
                let value = [Val::W1, Val::W2][usize::from(s.client.issued)];
                for node in [Node::O, Node::N] {
                    if s.serves(node) {
                        actions.push(Action::Write(value, node));
                    }
                }
            }
            None => {}
            Some((_, to)) => {
                if s.serves(to) && s.runs(to) {
                    actions.push(Action::ServeWrite);
                }
                actions.push(Action::FailWrite);
            }
        }
        // The participants' own steps: watchdog, and (NEW) applying the log's decision.
        for p in [Node::O, Node::N] {
            if !s.runs(p) {
                continue;
            }
            match self.protocol {
                Protocol::New => {
                    if s.decision.is_none() {
                        actions.push(Action::Watchdog(p));
                    }
                    if s.decision.is_some() && s.outcome(p).is_none() {
                        actions.push(Action::Apply(p));
                    }
                }
                Protocol::Old => {
                    let watchdog = match p {
                        Node::O => s.o.watchdog,
                        _ => s.n.watchdog,
                    };
                    match watchdog.asking {
                        None if watchdog.rounds_left > 0 && s.outcome(p).is_none() => {
                            actions.push(Action::Watchdog(p));
                        }
                        // It may stop waiting once each node it asked answered or is
                        // unresponsive (paused, crashed, query or reply lost).
                        Some(a)
                            if (!a.peer_silent || s.unresponsive(p, p.peer()))
                                && (!a.coordinator_silent || s.unresponsive(p, Node::C)) =>
                        {
                            actions.push(Action::WatchdogDecides(p));
                        }
                        _ => {}
                    }
                }
            }
        }
        // Faults: pause and resume (bounded), the coordinator's crash.
        for node in [Node::O, Node::N, Node::C] {
            if s.paused[node.index()] {
                actions.push(Action::Resume(node));
            } else if s.pauses_left > 0 && s.runs(node) {
                actions.push(Action::Pause(node));
            }
        }
        if self.coordinator_may_crash && !s.c.crashed {
            actions.push(Action::Crash);
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::BeginTransfer => {
                s.c.phase = CPhase::AwaitTransferred;
                s.send(Msg::Ship);
            }
            Action::Deliver(msg) => {
                s.net.remove(&msg);
                self.handle(&mut s, msg);
            }
            Action::Duplicate(msg) => {
                s.net.insert(msg, true);
                if self.max_duplicates.is_some() {
                    s.duplicates_left -= 1;
                }
                self.handle(&mut s, msg);
            }
            Action::Drop(msg) => {
                s.net.remove(&msg);
            }
            Action::Write(value, to) => {
                s.client.issued += 1;
                s.client.in_flight = Some((value, to));
            }
            Action::ServeWrite => {
                let (value, to) = s.client.in_flight.take()?;
                match to {
                    Node::O => {
                        s.o.value = value;
                        // Prepared and no outcome yet: the catch-up must ship it.
                        if s.o.outcome.is_none() {
                            s.o.dirty = true;
                        }
                    }
                    Node::N => s.n.live = value,
                    Node::C => unreachable!("writes go to O or N"),
                }
                s.client.acked |= write_bit(value);
            }
            Action::FailWrite => s.client.in_flight = None,
            Action::Watchdog(p) => match self.protocol {
                // First proposal wins: D was undecided (the action is only enabled then).
                Protocol::New => s.decision = Some(Decision::Abort),
                Protocol::Old => {
                    let watchdog = s.watchdog(p);
                    watchdog.rounds_left -= 1;
                    watchdog.asking = Some(Asking {
                        peer_silent: true,
                        coordinator_silent: true,
                        heard_committed: false,
                        heard_pending: false,
                    });
                    s.send(Msg::Query {
                        from: p,
                        to: p.peer(),
                    });
                    s.send(Msg::Query {
                        from: p,
                        to: Node::C,
                    });
                }
            },
            Action::WatchdogDecides(p) => {
                let asking = s.watchdog(p).asking.take()?;
                if asking.heard_committed {
                    s.settle(p, Decision::Commit);
                } else if !asking.heard_pending {
                    // The bug: nobody said committed, C did not say pending: abort alone.
                    s.settle(p, Decision::Abort);
                }
            }
            Action::Apply(p) => s.settle(p, s.decision?),
            Action::Pause(node) => {
                s.paused[node.index()] = true;
                s.pauses_left -= 1;
            }
            Action::Resume(node) => s.paused[node.index()] = false,
            Action::Crash => {
                s.c.crashed = true;
                s.paused[Node::C.index()] = false;
                s.net.retain(|m, _| m.to() != Node::C);
            }
        }
        let net = std::mem::take(&mut s.net);
        s.net = net
            .into_iter()
            .filter(|&(m, _)| !self.useless(&s, m))
            .collect();
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always(NO_WRITE_LOST, no_write_lost),
            Property::always(KEY_KEPT, key_kept),
            Property::always(ONE_SERVER, one_server),
            Property::sometimes(HAPPY_PATH, happy_path),
        ]
    }
}

/// Whether, in a settled state, a read returns the last acknowledged write (or the
/// initial value), from every node that serves `k`, and some node does.
fn reads_expected(model: &ViewChange, s: &State) -> bool {
    !model.settled(s) || {
        let values = model.read_values(s);
        !values.is_empty() && values.iter().all(|&v| v == s.expected())
    }
}

/// The write-loss property where some write was acknowledged.
fn no_write_lost(model: &ViewChange, s: &State) -> bool {
    s.client.acked == 0 || reads_expected(model, s)
}

/// The same before any write was acknowledged: the key must not vanish or change either.
/// With [`no_write_lost`] it makes the whole property (a separate name so that each gets
/// its own counterexample: the shortest violation of the whole acknowledges no write).
fn key_kept(model: &ViewChange, s: &State) -> bool {
    s.client.acked != 0 || reads_expected(model, s)
}

fn one_server(_: &ViewChange, s: &State) -> bool {
    !(s.serves(Node::O) && s.serves(Node::N))
}

fn happy_path(_: &ViewChange, s: &State) -> bool {
    s.o.outcome == Some(Decision::Commit)
        && s.n.outcome == Some(Decision::Commit)
        && s.client.acked == 3
}

fn node_name(node: Node) -> &'static str {
    match node {
        Node::O => "O",
        Node::N => "N",
        Node::C => "C",
    }
}

impl fmt::Display for Msg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Msg::Ship => write!(f, "Ship C->O"),
            Msg::Stage(round, value) => write!(f, "Stage({round:?}, {value:?}) O->N"),
            Msg::StageAck(round) => write!(f, "StageAck({round:?}) N->O"),
            Msg::Transferred => write!(f, "Transferred O->C"),
            Msg::CatchUp => write!(f, "CatchUp C->O"),
            Msg::Shipped => write!(f, "Shipped O->C"),
            Msg::Commit(to) => write!(f, "Commit C->{}", node_name(to)),
            Msg::Query { from, to } => write!(f, "Query {}->{}", node_name(from), node_name(to)),
            Msg::Reply { from, to, answer } => write!(
                f,
                "Reply({answer:?}) {}->{}",
                node_name(from),
                node_name(to)
            ),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::BeginTransfer => write!(f, "C begins the transfer"),
            Action::Deliver(msg) => write!(f, "deliver {msg}"),
            Action::Duplicate(msg) => write!(f, "deliver {msg} (a copy stays in flight)"),
            Action::Drop(msg) => write!(f, "lose {msg}"),
            Action::Write(value, to) => {
                write!(f, "client sends write {value:?} to {}", node_name(to))
            }
            Action::ServeWrite => write!(f, "the write is applied and acknowledged"),
            Action::FailWrite => write!(f, "the write fails"),
            Action::Watchdog(p) => write!(f, "{}'s watchdog fires", node_name(p)),
            Action::WatchdogDecides(p) => {
                write!(f, "{}'s watchdog stops waiting for answers", node_name(p))
            }
            Action::Apply(p) => write!(f, "{} applies the decision", node_name(p)),
            Action::Pause(node) => write!(f, "{} pauses", node_name(node)),
            Action::Resume(node) => write!(f, "{} resumes", node_name(node)),
            Action::Crash => write!(f, "C crashes"),
        }
    }
}

/// What the protagonists look like in a state, for the end of a counterexample.
fn summary(model: &ViewChange, s: &State) -> String {
    let outcome = |o: Option<Decision>| o.map_or("no outcome".to_string(), |d| format!("{d:?}"));
    let mut serving: Vec<String> = [Node::O, Node::N]
        .into_iter()
        .filter(|&n| s.serves(n))
        .map(|n| format!("{} ({:?})", node_name(n), s.value_at(n)))
        .collect();
    if serving.is_empty() {
        serving.push("nobody".to_string());
    }
    let decision = match model.protocol {
        Protocol::New => format!("D: {}; ", outcome(s.decision)),
        Protocol::Old => String::new(),
    };
    format!(
        "{decision}O: {}, N: {}; serving k: {}; last acknowledged write: {:?}",
        outcome(s.o.outcome),
        outcome(s.n.outcome),
        serving.join(" and "),
        s.expected()
    )
}

/// Replays `actions` from the initial state; returns how many of them lead to the first
/// state where `found` holds, or `None` if an action is not enabled or it never holds.
fn replay(
    model: &ViewChange,
    actions: &[Action],
    found: fn(&ViewChange, &State) -> bool,
) -> Option<usize> {
    let mut state = model.init_states().remove(0);
    if found(model, &state) {
        return Some(0);
    }
    let mut enabled = Vec::new();
    for (i, &action) in actions.iter().enumerate() {
        enabled.clear();
        model.actions(&state, &mut enabled);
        if !enabled.contains(&action) {
            return None;
        }
        state = model.next_state(&state, action)?;
        if found(model, &state) {
            return Some(i + 1);
        }
    }
    None
}

/// Greedily removes actions from a discovered path while it still reaches a state where
/// `found` holds (the checker keeps the last path it found, not the shortest).
fn shrink(
    model: &ViewChange,
    mut actions: Vec<Action>,
    found: fn(&ViewChange, &State) -> bool,
) -> Vec<Action> {
    if let Some(len) = replay(model, &actions, found) {
        actions.truncate(len);
    }
    loop {
        let mut shrunk = false;
        let mut i = 0;
        while i < actions.len() {
            let mut candidate = actions.clone();
            candidate.remove(i);
            if let Some(len) = replay(model, &candidate, found) {
                candidate.truncate(len);
                actions = candidate;
                shrunk = true;
            } else {
                i += 1;
            }
        }
        if !shrunk {
            return actions;
        }
    }
}

fn final_state(model: &ViewChange, actions: &[Action]) -> State {
    actions.iter().fold(model.init_states().remove(0), |s, &a| {
        model.next_state(&s, a).unwrap_or(s)
    })
}

/// The outcome of checking one variant.
struct Verdict {
    /// Property name -> whether the checker found a discovery for it.
    discovered: BTreeMap<&'static str, bool>,
    complete: bool,
}

fn check(model: ViewChange, threads: usize) -> Verdict {
    println!("== {} ==", model.name);
    println!(
        "   bounds: 1 key, 2 writes, {} pause(s), {}, coordinator crash {}{}",
        model.max_pauses,
        match model.max_duplicates {
            None => "every message may be delivered twice".to_string(),
            Some(n) => format!("{n} message(s) per run may be delivered twice"),
        },
        if model.coordinator_may_crash {
            "allowed"
        } else {
            "not allowed"
        },
        match model.protocol {
            Protocol::Old => format!(", {} watchdog round(s) each", model.watchdog_rounds),
            Protocol::New => String::new(),
        }
    );
    let started = Instant::now();
    let checker = model.clone().checker().threads(threads).spawn_bfs().join();
    let elapsed = started.elapsed();
    let discoveries = checker.discoveries();
    let properties = model.properties();
    let complete = discoveries.len() < properties.len();
    println!(
        "   states: {} unique, {} total, max depth {}, {:.1} s{}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        elapsed.as_secs_f64(),
        if complete {
            " (exhaustive)"
        } else {
            " (stopped once every property had a discovery)"
        }
    );
    let mut discovered = BTreeMap::new();
    for property in &properties {
        let path = discoveries.get(property.name);
        discovered.insert(property.name, path.is_some());
        let (kind, verdict) = match (&property.expectation, path) {
            (Expectation::Sometimes, Some(_)) => ("sometimes", "reachable"),
            (Expectation::Sometimes, None) => ("sometimes", "NOT REACHABLE"),
            (_, Some(_)) => ("always", "VIOLATED"),
            (_, None) => ("always", "holds"),
        };
        println!("   [{verdict}] {kind} \"{}\"", property.name);
        let Some(path) = path else { continue };
        let is_failure = property.expectation != Expectation::Sometimes;
        // The states the path must reach: a violation, or an example.
        let found: fn(&ViewChange, &State) -> bool = match property.name {
            NO_WRITE_LOST => |m, s| !no_write_lost(m, s),
            KEY_KEPT => |m, s| !key_kept(m, s),
            ONE_SERVER => |m, s| !one_server(m, s),
            _ => property.condition,
        };
        let raw = path.clone().into_actions();
        let actions = shrink(&model, raw.clone(), found);
        if is_failure {
            println!(
                "      counterexample ({} actions, shrunk from the checker's {}):",
                actions.len(),
                raw.len()
            );
            for (i, action) in actions.iter().enumerate() {
                println!("      {:>3}. {action}", i + 1);
            }
            println!(
                "      then: {}",
                summary(&model, &final_state(&model, &actions))
            );
        } else {
            println!("      example: {} actions", actions.len());
        }
    }
    println!();
    Verdict {
        discovered,
        complete,
    }
}

fn main() -> ExitCode {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let new = ViewChange {
        name: "new: the metadata log decides",
        protocol: Protocol::New,
        ordered_stages: true,
        max_pauses: 2,
        max_duplicates: None,
        watchdog_rounds: 0,
        coordinator_may_crash: true,
    };
    let old = ViewChange {
        name: "old: the coordinator decides, a participant's watchdog may abort alone",
        protocol: Protocol::Old,
        // Smaller bounds: the old protocol's state space is much larger (the watchdog's
        // queries and replies), and the search stops at its first discoveries anyway.
        max_duplicates: Some(1),
        watchdog_rounds: 1,
        ..new.clone()
    };
    let unordered = ViewChange {
        name: "new-unordered-stages: the new protocol, N applies a stale stage batch",
        ordered_stages: false,
        ..new.clone()
    };

    let new_verdict = check(new, threads);
    let old_verdict = check(old, threads);
    let unordered_verdict = check(unordered, threads);

    let new_ok = new_verdict.complete
        && !new_verdict.discovered[NO_WRITE_LOST]
        && !new_verdict.discovered[KEY_KEPT]
        && !new_verdict.discovered[ONE_SERVER]
        && new_verdict.discovered[HAPPY_PATH];
    let old_ok = old_verdict.discovered[NO_WRITE_LOST];
    println!(
        "new protocol: {}",
        if new_ok {
            "safe within the bounds, and the happy path is reachable (as expected)"
        } else {
            "NOT AS EXPECTED"
        }
    );
    println!(
        "old protocol: {}",
        if old_ok {
            "loses an acknowledged write (as expected: the old bug)"
        } else {
            "NOT AS EXPECTED: the old bug was not found"
        }
    );
    println!(
        "new-unordered-stages (informational): {}",
        if unordered_verdict.discovered[NO_WRITE_LOST] {
            "loses a write: the protocol needs N to ignore a stale stage batch"
        } else {
            "no write lost"
        }
    );
    if new_ok && old_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
