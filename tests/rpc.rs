//! The node-to-node RPC protocol on the wire: a raw blocking client speaks it to real nodes
//! as a peer would, or as an attacker would, and checks every answer frame by frame. Bad
//! handshakes and bad frames close the connection and leave the node serving; messages
//! from a sender that is not who it should be (a made-up coordinator, a stamp from nowhere,
//! a value no client could store, keys for ranges the sender does not hand over) are
//! refused, and nothing is dropped, adopted or stored. A fake peer named in a view change
//! learns neither the token nor any data.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use common::{Client, Cluster, TestNode};
use ringkv::auth::ClusterToken;
use ringkv::kv::{Invalid, KvOp, KvOutcome};
use ringkv::meta::{Applied, Change, Command, LeadError, LeaderOp, Refusal as MetaRefusal};
use ringkv::ring::DEFAULT_VNODES;
use ringkv::rpc::{
    decode_answer, encode_answer, encode_cancel, encode_json, encode_request, next_frame,
    next_frame_within, GiveUp, Hello, HelloAnswer, Proof, Refusal, Request, Response, Stamp, MAGIC,
    MAX_HELLO,
};
use ringkv::store::Entry;
use ringkv::view::View;
use ringkv::wire::{Outcome, Prepare};
use serde_json::{json, Value};

/// How long a raw connection waits for a byte before the test fails.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A handshake nonce: 16 random bytes in hex.
fn nonce() -> String {
    (0..16)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Whether `needle` occurs anywhere in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The stamp a node's own messages carry (its epoch and view id, from /cluster/state).
fn stamp_of(client: &Client, node: &str) -> Stamp {
    let state = client.state(node);
    Stamp {
        epoch: state["epoch"].as_u64().unwrap(),
        view_id: state["view_id"].as_u64().unwrap(),
    }
}

/// A stamp with another epoch than the node's.
fn stamped(stamp: Stamp, epoch: u64) -> Stamp {
    Stamp { epoch, ..stamp }
}

fn put(key: &str, value: &'static str) -> Request {
    Request::Kv {
        key: key.to_string(),
        op: KvOp::Put(Bytes::from_static(value.as_bytes())),
        give_up: GiveUp::after(Duration::from_secs(30)),
    }
}

fn get(key: &str) -> Request {
    Request::Kv {
        key: key.to_string(),
        op: KvOp::Get,
        give_up: GiveUp::after(Duration::from_secs(30)),
    }
}

/// A raw RPC connection to a node, speaking for `from`.
struct Peer {
    stream: TcpStream,
    buffer: BytesMut,
    /// Every byte the node sent on this connection.
    received: Vec<u8>,
    node: String,
    from: String,
    /// The nonce of our hello.
    nonce: String,
    next_id: u64,
}

impl Peer {
    fn connect(node: &str) -> TcpStream {
        let stream = TcpStream::connect(node).unwrap();
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    fn over(stream: TcpStream, node: &str, from: &str) -> Peer {
        Peer {
            stream,
            buffer: BytesMut::new(),
            received: Vec::new(),
            node: node.to_string(),
            from: from.to_string(),
            nonce: nonce(),
            next_id: 1,
        }
    }

    /// Connects to `node` and sends the magic and a hello naming `from`.
    fn open(node: &str, from: &str, vnodes: u32) -> Peer {
        let mut peer = Peer::over(Peer::connect(node), node, from);
        let mut hello = BytesMut::from(&MAGIC[..]);
        encode_json(
            &mut hello,
            &Hello {
                from: from.to_string(),
                vnodes,
                repl_factor: 0,
                nonce: peer.nonce.clone(),
            },
        );
        peer.write(&hello);
        peer
    }

    /// Opens a connection and completes the handshake: the node answers 200 as itself
    /// and, with `token`, proves it holds it; then this side proves the same.
    fn handshake(node: &str, from: &str, token: Option<&str>) -> Peer {
        let mut peer = Peer::open(node, from, DEFAULT_VNODES);
        let answer = peer.hello_answer();
        assert_eq!(
            (
                answer.status,
                answer.error.as_deref(),
                answer.address.as_str()
            ),
            (200, None, node),
            "hello answer of {node}"
        );
        if let Some(token) = token {
            let token = ClusterToken::new(token).unwrap();
            let proof = answer
                .proof
                .as_deref()
                .expect("a proof from a node with a token");
            assert!(
                token.verify(proof, "server", &peer.nonce, node, from),
                "{node}'s proof does not verify"
            );
            let proof = token.prove("client", &answer.nonce, from, node);
            peer.send_json(&Proof { proof });
        } else {
            assert_eq!(answer.proof, None, "a proof from a node without a token");
        }
        peer
    }

    fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn send_json<T: serde::Serialize>(&mut self, message: &T) {
        let mut frame = BytesMut::new();
        encode_json(&mut frame, message);
        self.write(&frame);
    }

    /// The next frame, `None` once the node closed the connection, or the read error.
    fn try_frame(&mut self) -> std::io::Result<Option<Bytes>> {
        loop {
            if let Some(frame) = next_frame(&mut self.buffer).unwrap() {
                return Ok(Some(frame));
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    self.received.extend_from_slice(&chunk[..n]);
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    /// The next frame, or `None` once the node closed the connection.
    fn frame(&mut self) -> Option<Bytes> {
        self.try_frame()
            .unwrap_or_else(|e| panic!("{}: no frame and no close: {e}", self.node))
    }

    fn hello_answer(&mut self) -> HelloAnswer {
        let frame = self.frame().expect("a hello answer");
        serde_json::from_slice(&frame).unwrap()
    }

    /// Asserts that the node closes the connection without sending another frame.
    fn assert_closed(&mut self, what: &str) {
        match self.try_frame() {
            Ok(None) => {}
            Ok(Some(frame)) => panic!(
                "{what}: the connection stayed open and sent {:?}",
                decode_answer(frame.clone()).map_err(|_| frame)
            ),
            Err(e) => panic!("{what}: the connection stayed open, silent: {e}"),
        }
    }

    /// Sends one request; its id.
    fn send(&mut self, stamp: Stamp, request: &Request) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut frame = BytesMut::new();
        encode_request(&mut frame, id, stamp, request);
        self.write(&frame);
        id
    }

    /// The next answer: its id, the node's stamp and the response.
    fn answer(&mut self) -> (u64, Stamp, Response) {
        let frame = self.frame().expect("an answer, not a close");
        decode_answer(frame).unwrap()
    }

    /// Sends one request and waits for its answer.
    fn call(&mut self, stamp: Stamp, request: &Request) -> Response {
        let id = self.send(stamp, request);
        let (answered, _, response) = self.answer();
        assert_eq!(answered, id, "answer to {request:?}");
        response
    }
}

// ---------------------------------------------------------------------------------------
// The protocol.

#[test]
fn requests_in_one_write_are_answered_by_id() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let client = Client::new();
    let stamp = stamp_of(&client, &node.address);
    let mut peer = Peer::handshake(&node.address, &common::fresh_address(), None);

    let value = Bytes::from_static(br#"{"a":[1,2]}"#);
    let requests: [(u64, &str, KvOp); 5] = [
        (10, "k1", KvOp::Put(value.clone())),
        (11, "k1", KvOp::Get),
        (12, "absent", KvOp::Get),
        (13, "k1", KvOp::Delete),
        (14, "k1", KvOp::Get),
    ];
    let mut batch = BytesMut::new();
    for (id, key, op) in &requests {
        let request = Request::Kv {
            key: key.to_string(),
            op: op.clone(),
            give_up: GiveUp::after(Duration::from_secs(30)),
        };
        encode_request(&mut batch, *id, stamp, &request);
    }
    peer.write(&batch);
    let mut answers = BTreeMap::new();
    while answers.len() < requests.len() {
        let (id, answered_with, response) = peer.answer();
        assert_eq!(answered_with, stamp, "the node's stamp on answer {id}");
        assert!(answers.insert(id, response).is_none(), "answer {id} twice");
    }
    let expected: BTreeMap<u64, Response> = [
        (10, Response::Kv(KvOutcome::Added)),
        (11, Response::Kv(KvOutcome::Found(value))),
        (12, Response::Kv(KvOutcome::Absent)),
        (13, Response::Kv(KvOutcome::Deleted)),
        (14, Response::Kv(KvOutcome::Absent)),
    ]
    .into_iter()
    .collect();
    assert_eq!(answers, expected);
    assert_eq!(client.key_count(&node.address), 0);
}

#[test]
fn bad_handshakes_and_bad_frames_close_the_connection_and_nothing_else() {
    const TOKEN: &str = "rpc-Secret-7Qx2";
    let token = TOKEN;
    let secret = ClusterToken::new(token).unwrap();
    let other = ClusterToken::new("not-the-token").unwrap();
    let node = TestNode::start(&common::fresh_address(), &[], &["--cluster-token", token]);
    let a = node.address.clone();
    let client = Client::new();
    let stamp = stamp_of(&client, &a);
    let from = common::fresh_address();
    // Every byte the node sent on any connection, to check that the token is in none.
    let mut sent_by_node: Vec<u8> = Vec::new();
    // Keys some request tried to store on a connection that should have been closed first.
    let mut never_stored: Vec<String> = Vec::new();

    // Another vnode count: 409, then closed.
    let mut peer = Peer::open(&a, &from, DEFAULT_VNODES / 2);
    let answer = peer.hello_answer();
    assert_eq!((answer.status, answer.address.as_str()), (409, a.as_str()));
    let error = answer.error.unwrap_or_default();
    assert!(error.contains("vnode count mismatch"), "{error}");
    peer.assert_closed("another vnode count");
    sent_by_node.extend(&peer.received);

    // A sender that is not a canonical ip:port: 400, then closed.
    for bad in ["localhost:13800", "127.0.0.1:013800", "127.0.0.1", ""] {
        let mut peer = Peer::open(&a, bad, DEFAULT_VNODES);
        let answer = peer.hello_answer();
        assert_eq!(answer.status, 400, "from {bad:?}: {answer:?}");
        peer.assert_closed(&format!("from {bad:?}"));
        sent_by_node.extend(&peer.received);
    }

    // Without the right proof, nothing that follows is served.
    type Offer = fn(&HelloAnswer, &Peer, &ClusterToken, &ClusterToken) -> Option<String>;
    let offers: [(&str, Offer); 7] = [
        ("no proof at all", |_, _, _, _| None),
        ("a proof under another token", |answer, peer, _, other| {
            Some(other.prove("client", &answer.nonce, &peer.from, &peer.node))
        }),
        ("the node's own proof sent back", |answer, _, _, _| {
            answer.proof.clone()
        }),
        ("a proof of the server role", |answer, peer, secret, _| {
            Some(secret.prove("server", &answer.nonce, &peer.from, &peer.node))
        }),
        (
            "a proof for our nonce, not the node's",
            |_, peer, secret, _| Some(secret.prove("client", &peer.nonce, &peer.from, &peer.node)),
        ),
        ("a proof for another sender", |answer, peer, secret, _| {
            Some(secret.prove("client", &answer.nonce, "127.0.0.1:9", &peer.node))
        }),
        ("the token itself as the proof", |_, _, _, _| {
            Some(TOKEN.to_string())
        }),
    ];
    for (i, (what, offer)) in offers.iter().enumerate() {
        let mut peer = Peer::open(&a, &from, DEFAULT_VNODES);
        let answer = peer.hello_answer();
        assert_eq!(answer.status, 200, "{what}: {answer:?}");
        let key = format!("unproven{i}");
        // Without one, the request comes where the proof should be.
        if let Some(proof) = offer(&answer, &peer, &secret, &other) {
            peer.send_json(&Proof { proof });
        }
        peer.send(stamp, &put(&key, "\"stolen\""));
        peer.assert_closed(what);
        sent_by_node.extend(&peer.received);
        never_stored.push(key);
    }
    // An empty JSON object where the proof should be.
    let mut peer = Peer::open(&a, &from, DEFAULT_VNODES);
    assert_eq!(peer.hello_answer().status, 200);
    peer.write(&[2, 0, 0, 0, b'{', b'}']);
    peer.send(stamp, &put("unproven-empty", "1"));
    peer.assert_closed("an empty proof message");
    sent_by_node.extend(&peer.received);
    never_stored.push("unproven-empty".into());

    // The right proof: served.
    let mut peer = Peer::handshake(&a, &from, Some(token));
    assert_eq!(
        peer.call(stamp, &put("proven", "\"ok\"")),
        Response::Kv(KvOutcome::Added)
    );
    assert_eq!(
        peer.call(stamp, &get("proven")),
        Response::Kv(KvOutcome::Found(Bytes::from_static(b"\"ok\"")))
    );
    // A cancel of a request that is not waiting is no bad frame.
    let mut cancel = BytesMut::new();
    encode_cancel(&mut cancel, 999);
    peer.write(&cancel);
    assert_eq!(
        peer.call(stamp, &get("proven")),
        Response::Kv(KvOutcome::Found(Bytes::from_static(b"\"ok\"")))
    );
    drop(peer);

    // A hello over 4 KiB is refused without an answer, before it has all arrived: a
    // length alone closes the connection (well before the 10 s handshake timeout).
    let mut peer = Peer::over(Peer::connect(&a), &a, &from);
    peer.stream
        .set_read_timeout(Some(Duration::from_secs(6)))
        .unwrap();
    let mut hello = BytesMut::from(&MAGIC[..]);
    hello.put_u32_le(MAX_HELLO as u32 + 1);
    peer.write(&hello);
    peer.assert_closed("a hello length over 4 KiB");
    assert_eq!(peer.received, b"", "an answer to a hello over 4 KiB");
    let mut peer = Peer::open(&a, &"1".repeat(MAX_HELLO), DEFAULT_VNODES);
    peer.assert_closed("a whole hello over 4 KiB");
    assert_eq!(peer.received, b"", "an answer to a hello over 4 KiB");

    // Bad frames after a proven handshake, each followed in the same write by a PUT that
    // must not be served.
    let header = |id: u64, kind: u8, body: &[u8]| {
        let mut frame = BytesMut::new();
        frame.put_u32_le((9 + body.len()) as u32);
        frame.put_u64_le(id);
        frame.put_u8(kind);
        frame.put_slice(body);
        frame.to_vec()
    };
    let mut an_answer = BytesMut::new();
    encode_answer(&mut an_answer, 5, stamp, &Response::Done);
    let mut bad_key = BytesMut::new();
    bad_key.put_u32_le(0);
    bad_key.put_u64_le(5);
    bad_key.put_u8(0);
    // Stamp (0, 0), Request::Kv (variant 0), a 2-byte key that is not UTF-8, Get.
    bad_key.put_slice(&[0, 0, 0, 2, 0xff, 0xfe, 0]);
    let len = (bad_key.len() - 4) as u32;
    bad_key[..4].copy_from_slice(&len.to_le_bytes());
    let bad_frames: [(&str, Vec<u8>); 7] = [
        ("an undecodable request", header(5, 0, &[0xff; 6])),
        ("a request with a key not UTF-8", bad_key.to_vec()),
        ("an unknown variant", header(5, 0, &[0, 0, 77])),
        ("an unknown frame kind", header(5, 9, &[])),
        ("an answer from the caller", an_answer.to_vec()),
        ("a frame shorter than its head", vec![3, 0, 0, 0, 1, 2, 3]),
        (
            "a frame length over the limit",
            u32::MAX.to_le_bytes().to_vec(),
        ),
    ];
    for (i, (what, bad)) in bad_frames.iter().enumerate() {
        let mut peer = Peer::handshake(&a, &from, Some(token));
        let key = format!("after-bad-frame{i}");
        let mut bytes = bad.clone();
        let mut after = BytesMut::new();
        encode_request(&mut after, 6, stamp, &put(&key, "1"));
        bytes.extend_from_slice(&after);
        peer.write(&bytes);
        peer.assert_closed(what);
        sent_by_node.extend(&peer.received);
        never_stored.push(key);
    }

    // The magic cut short, then silence: no answer (not an HTTP error either), and it is
    // not taken for HTTP once the rest of the magic comes.
    let mut silent = Peer::over(Peer::connect(&a), &a, &from);
    silent.write(&MAGIC[..3]);
    let mut split = Peer::over(Peer::connect(&a), &a, &from);
    split.write(&MAGIC[..3]);
    // Not a synchronisation: only makes it likely that the node reads the first part alone.
    std::thread::sleep(Duration::from_millis(200));
    silent
        .stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut byte = [0u8; 1];
    match silent.stream.read(&mut byte) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("the cut-short magic got an answer or a close: {other:?}"),
    }
    let mut rest = BytesMut::from(&MAGIC[3..]);
    encode_json(
        &mut rest,
        &Hello {
            from: from.clone(),
            vnodes: DEFAULT_VNODES,
            repl_factor: 0,
            nonce: split.nonce.clone(),
        },
    );
    split.write(&rest);
    let answer = split.hello_answer();
    assert_eq!((answer.status, answer.address.as_str()), (200, a.as_str()));
    sent_by_node.extend(&split.received);

    // The node still serves HTTP, and served nothing it should not have.
    let answer = client.put_key(&a, "still", &json!("serving"));
    assert_eq!(answer.status, 201, "{answer:?}");
    let answer = client.get_key(&a, "still");
    assert_eq!(
        (answer.status, &answer.body["value"]),
        (200, &json!("serving"))
    );
    common::assert_absent(&client, std::slice::from_ref(&a), &never_stored);
    assert_eq!(client.key_count(&a), 2, "proven and still");
    assert!(
        !contains(&sent_by_node, token.as_bytes()),
        "the node sent its token"
    );
}

#[test]
fn the_node_proves_the_token_without_sending_it() {
    let token = "proof-Token-9kV";
    let other_token = "proof-Other-3mW";
    let secret = ClusterToken::new(token).unwrap();
    let other = ClusterToken::new(other_token).unwrap();
    let with_token = TestNode::start(&common::fresh_address(), &[], &["--cluster-token", token]);
    let with_other = TestNode::start(
        &common::fresh_address(),
        &[],
        &["--cluster-token", other_token],
    );
    let without = TestNode::start(&common::fresh_address(), &[], &[]);
    let from = common::fresh_address();
    let client = Client::new();

    // The node's proof binds the token, our nonce, its address and ours.
    let a = &with_token.address;
    let mut peer = Peer::open(a, &from, DEFAULT_VNODES);
    let answer = peer.hello_answer();
    assert_eq!((answer.status, answer.address.as_str()), (200, a.as_str()));
    let proof = answer.proof.clone().expect("a proof");
    assert!(secret.verify(&proof, "server", &peer.nonce, a, &from));
    assert!(!other.verify(&proof, "server", &peer.nonce, a, &from));
    assert!(!secret.verify(&proof, "server", &nonce(), a, &from));
    assert!(!secret.verify(&proof, "server", &peer.nonce, &from, a));
    assert!(!secret.verify(&proof, "client", &peer.nonce, a, &from));
    assert!(!secret.verify(&proof, "server", &peer.nonce, a, "127.0.0.1:9"));
    assert_ne!(answer.nonce, peer.nonce, "the node's nonce is its own");
    peer.send_json(&Proof {
        proof: secret.prove("client", &answer.nonce, &from, a),
    });
    let stamp = stamp_of(&client, a);
    assert_eq!(
        peer.call(stamp, &put("k", "1")),
        Response::Kv(KvOutcome::Added)
    );
    assert_eq!(
        peer.call(stamp, &get("k")),
        Response::Kv(KvOutcome::Found(Bytes::from_static(b"1")))
    );
    let mut received = std::mem::take(&mut peer.received);
    // Two hellos get two nonces, so two different proofs.
    let mut again = Peer::open(a, &from, DEFAULT_VNODES);
    let second = again.hello_answer();
    assert_ne!(second.nonce, answer.nonce);
    assert_ne!(second.proof.as_deref(), Some(proof.as_str()));
    received.extend(&again.received);
    assert!(!contains(&received, token.as_bytes()), "the token was sent");

    // A node with another token: its proof does not verify with ours, and ours does not
    // get us in.
    let b = &with_other.address;
    let mut peer = Peer::open(b, &from, DEFAULT_VNODES);
    let answer = peer.hello_answer();
    assert_eq!(answer.status, 200);
    let proof = answer.proof.clone().expect("a proof");
    assert!(!secret.verify(&proof, "server", &peer.nonce, b, &from));
    assert!(other.verify(&proof, "server", &peer.nonce, b, &from));
    peer.send_json(&Proof {
        proof: secret.prove("client", &answer.nonce, &from, b),
    });
    peer.send(stamp_of(&client, b), &put("k", "1"));
    peer.assert_closed("a proof under another token");
    assert!(!contains(&peer.received, other_token.as_bytes()));
    assert_eq!(client.key_count(b), 0);

    // A node without a token proves nothing: a client with one has nothing to verify.
    let mut peer = Peer::open(&without.address, &from, DEFAULT_VNODES);
    let answer = peer.hello_answer();
    assert_eq!((answer.status, answer.proof), (200, None));
}

// ---------------------------------------------------------------------------------------
// Attacks.

/// Asserts that each of `nodes` serves `view` at epoch 0 with no change pending.
fn assert_untouched(client: &Client, nodes: &[String], view: &[String]) {
    common::assert_states(client, nodes, 0, view);
}

/// Waits until `node` has applied the decision of the change it had prepared.
fn wait_until_settled(client: &Client, node: &str) {
    common::poll_until(Duration::from_secs(5), "the abort applied", || {
        client.state(node)["pending"].is_null().then_some(())
    });
}

/// A change the fake peer at `coordinator` writes to the log of the node it talks to.
fn fake_change(
    change_id: u64,
    epoch: u64,
    view: &[String],
    coordinator: &str,
    participants: &[String],
) -> Change {
    Change {
        change_id,
        epoch,
        view: view.to_vec(),
        coordinator: coordinator.to_string(),
        participants: participants.to_vec(),
        joining: BTreeMap::new(),
        merging: Vec::new(),
        layout: None,
    }
}

fn prepare_of(change: &Change) -> Request {
    Request::Prepare(Prepare {
        change_id: change.change_id,
        epoch: change.epoch,
        view: change.view.clone(),
        coordinator: change.coordinator.clone(),
        participants: change.participants.clone(),
        merging: change.merging.clone(),
        layout: change.layout.clone(),
    })
}

fn write(command: Command) -> Request {
    Request::Lead(LeaderOp::Write(command))
}

#[test]
fn a_fake_coordinator_cannot_commit_or_steer_a_change() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let a = node.address.clone();
    let view = vec![a.clone()];
    let client = Client::new();
    let mut data = common::sample_data("fake", 40);
    common::load(&client, &view, &data);
    let stamp = stamp_of(&client, &a);
    // Nothing listens at any of these.
    let fake = common::fresh_address();
    let ghost = common::fresh_address();
    let intruder = common::fresh_address();
    let change_id = 0x5eed_0001;
    let participants = vec![a.clone(), ghost.clone(), fake.clone()];
    let change = |coordinator: &str| {
        fake_change(
            change_id,
            1,
            std::slice::from_ref(&ghost),
            coordinator,
            &participants,
        )
    };

    // A Prepare the log has not begun: refused, whoever it names.
    let mut coordinator = Peer::handshake(&a, &fake, None);
    assert_eq!(
        coordinator.call(stamp, &prepare_of(&change(&fake))),
        Response::Refused(Refusal::UnknownChange(change_id))
    );
    // A change begun in the log in another node's name.
    for named in [&intruder, &a, &ghost] {
        assert_eq!(
            coordinator.call(stamp, &write(Command::Begin(change(named)))),
            Response::Refused(Refusal::NotMember(fake.clone())),
            "a change naming {named} as coordinator"
        );
    }
    assert_untouched(&client, &view, &view);

    // The fake's own change, begun in the log (no token: the sender is who it says).
    assert_eq!(
        coordinator.call(stamp, &write(Command::Begin(change(&fake)))),
        Response::Led(Ok(Applied::Done))
    );
    assert_eq!(
        coordinator.call(stamp, &prepare_of(&change(&fake))),
        Response::Done
    );
    assert_eq!(client.state(&a)["pending"], json!(change_id));

    // Its phases from another sender.
    let mut other = Peer::handshake(&a, &intruder, None);
    for request in [
        Request::Transfer { change_id },
        Request::CatchUp { change_id },
    ] {
        assert_eq!(
            other.call(stamp, &request),
            Response::Refused(Refusal::NotMember(intruder.clone())),
            "{request:?} from a sender that is not the coordinator"
        );
    }
    assert_eq!(
        other.call(stamp, &Request::Outcome { change_id }),
        Response::Outcome(Outcome::Pending)
    );
    // Not frozen by that catch-up: a write to a range the change would hand over lands.
    let answer = Client::with_timeout(Duration::from_secs(5)).put_key(&a, "during", &json!(1));
    assert_eq!(answer.status, 201, "{answer:?}");
    data.insert("during".into(), json!(1));

    // Asked to confirm a commit the log does not hold: refused at once.
    assert_eq!(
        coordinator.call(stamp, &Request::Commit { change_id }),
        Response::Refused(Refusal::UnknownChange(change_id))
    );
    // The log's abort ends it; a commit after it changes nothing.
    assert_eq!(
        coordinator.call(stamp, &write(Command::Abort { change_id })),
        Response::Led(Ok(Applied::Decided(Outcome::Aborted)))
    );
    assert_eq!(
        coordinator.call(stamp, &write(Command::Commit { change_id })),
        Response::Led(Ok(Applied::Decided(Outcome::Aborted)))
    );
    assert_eq!(
        coordinator.call(stamp, &Request::Outcome { change_id }),
        Response::Outcome(Outcome::Aborted)
    );

    wait_until_settled(&client, &a);
    assert_untouched(&client, &view, &view);
    assert_eq!(client.key_count(&a), data.len() as u64);
    common::assert_contents(&client, &view, &view, &data);
}

#[test]
fn changes_with_epochs_out_of_reach_are_refused_by_the_log() {
    let mut cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let addresses = cluster.addresses();
    let data = common::sample_data("reach", 30);
    common::load(&client, &addresses, &data);
    let a = addresses[0].clone();
    let stamp = stamp_of(&client, &a);
    let fake = common::fresh_address();
    let mut peer = Peer::handshake(&a, &fake, None);
    let participants: Vec<String> = addresses.iter().cloned().chain([fake.clone()]).collect();
    for (i, epoch) in [u64::MAX, 1 << 21, (1 << 20) + 1].into_iter().enumerate() {
        let change = fake_change(0xfa4 + i as u64, epoch, &addresses, &fake, &participants);
        let answer = peer.call(stamp, &write(Command::Begin(change)));
        // Refused by the log wherever the leader is (this node forwards nothing itself).
        let refused = Response::Led(Ok(Applied::Refused(MetaRefusal::EpochTooFar {
            offered: epoch,
            current: 0,
        })));
        let elsewhere = matches!(answer, Response::Led(Err(LeadError::NotLeader(_))));
        assert!(
            answer == refused || elsewhere,
            "a change at epoch {epoch}: {answer:?}"
        );
    }
    assert_untouched(&client, &addresses, &addresses);

    // A real view change still goes through, at epoch 1.
    let third = common::fresh_address();
    let mut full = addresses.clone();
    full.push(third.clone());
    cluster.nodes.push(TestNode::start(&third, &full, &[]));
    let answer = client.view_change(&a, &full.join(","));
    common::assert_view_change_ok(&client, &answer, &full);
    common::assert_states(&client, &full, 1, &full);
    common::assert_contents(&client, &full, &full, &data);
}

#[test]
fn a_higher_stamp_from_an_unproven_sender_adopts_nothing() {
    let cluster = Cluster::start(2, &[]);
    let client = Client::new();
    let addresses = cluster.addresses();
    let data = common::sample_data("stamp", 20);
    common::load(&client, &addresses, &data);
    let a = addresses[0].clone();
    let b = addresses[1].clone();
    let stamp = stamp_of(&client, &a);
    let our_state = |client: &Client| {
        let state = client.state(&a);
        (state["epoch"].clone(), state["view"].clone())
    };
    let before = our_state(&client);
    let check_state = |response: Response, what: &str| match response {
        Response::State(state) => {
            assert_eq!(
                (state.epoch, state.view, state.pending),
                (0, addresses.clone(), None),
                "{what}"
            )
        }
        other => panic!("{what}: {other:?}"),
    };

    // A made-up sender, where nothing listens.
    let nowhere = common::fresh_address();
    let mut peer = Peer::handshake(&a, &nowhere, None);
    for epoch in [5, 1 << 20, u64::MAX] {
        let what = format!("state stamped {epoch} from nowhere");
        check_state(peer.call(stamped(stamp, epoch), &Request::State), &what);
        assert_eq!(our_state(&client), before, "{what}");
    }
    let (key, value) = data.iter().next().unwrap();
    let owner = View::new(0, addresses.clone(), DEFAULT_VNODES)
        .unwrap()
        .ring
        .owner(key.as_bytes())
        .to_string();
    let mut to_owner = Peer::handshake(&owner, &nowhere, None);
    assert_eq!(
        to_owner.call(stamped(stamp, 5), &get(key)),
        Response::Kv(KvOutcome::Found(Bytes::from(value.to_string())))
    );

    // A real member of this cluster, which serves epoch 0, named as the sender of epoch 5:
    // the node asks it and hears epoch 0.
    let mut peer = Peer::handshake(&a, &b, None);
    check_state(
        peer.call(stamped(stamp, 5), &Request::State),
        "state stamped 5 from a member at epoch 0",
    );
    assert_eq!(our_state(&client), before);

    // A real node of another one-node cluster, at epoch 0.
    let x_address = common::fresh_address();
    let x = TestNode::start(&x_address, &[], &[]);
    let mut peer = Peer::handshake(&a, &x.address, None);
    check_state(
        peer.call(stamped(stamp, 5), &Request::State),
        "state stamped 5 from another cluster at epoch 0",
    );
    assert_eq!(our_state(&client), before);

    // The same other cluster once it really is at epoch 1 (grown to two nodes): its view
    // shares no member with ours, so it is not ours to adopt.
    let y_address = common::fresh_address();
    let _y = TestNode::start(&y_address, &[], &[]);
    let others = vec![x_address.clone(), y_address.clone()];
    let answer = client.view_change(&x_address, &others.join(","));
    common::assert_view_change_ok(&client, &answer, &others);
    common::assert_states(&client, &others, 1, &others);
    let mut peer = Peer::handshake(&a, &x.address, None);
    check_state(
        peer.call(stamped(stamp, 1), &Request::State),
        "state stamped 1 from another cluster at epoch 1",
    );
    assert_eq!(our_state(&client), before);

    assert_untouched(&client, &addresses, &addresses);
    common::assert_contents(&client, &addresses, &addresses, &data);
}

#[test]
fn forwarded_writes_are_validated_as_the_api_validates_them() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let a = node.address.clone();
    let client = Client::new();
    let data = common::sample_data("valid", 5);
    common::load(&client, std::slice::from_ref(&a), &data);
    let stamp = stamp_of(&client, &a);
    let mut peer = Peer::handshake(&a, &common::fresh_address(), None);
    let long_key = "k".repeat(51);
    let refused: [(&str, &'static str, Invalid); 6] = [
        ("k", "<html>", Invalid::NotJson),
        ("k", "1 2", Invalid::NotJson),
        ("k", "", Invalid::NotJson),
        ("k", "null", Invalid::ValueMissing),
        ("k", " null ", Invalid::ValueMissing),
        (&long_key, "1", Invalid::KeyTooLong),
    ];
    for (key, value, invalid) in refused {
        assert_eq!(
            peer.call(stamp, &put(key, value)),
            Response::Refused(Refusal::Invalid(invalid)),
            "PUT {key} = {value:?}"
        );
    }
    assert_eq!(peer.call(stamp, &get("k")), Response::Kv(KvOutcome::Absent));
    assert_eq!(
        peer.call(stamp, &get(&long_key)),
        Response::Kv(KvOutcome::Absent)
    );
    common::assert_absent(
        &client,
        std::slice::from_ref(&a),
        &["k".to_string(), long_key.clone()],
    );
    assert_eq!(client.key_count(&a), data.len() as u64);

    assert_eq!(
        peer.call(stamp, &put("k", r#" {"ok": [1, "<html>"]} "#)),
        Response::Kv(KvOutcome::Added)
    );
    let answer = client.get_key(&a, "k");
    assert_eq!(
        (answer.status, &answer.body["value"]),
        (200, &json!({"ok": [1, "<html>"]}))
    );
    assert_eq!(client.key_count(&a), data.len() as u64 + 1);
}

#[test]
fn a_forward_read_after_its_sender_gave_up_is_not_executed() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let a = node.address.clone();
    let client = Client::new();
    let stamp = stamp_of(&client, &a);
    let mut peer = Peer::handshake(&a, &common::fresh_address(), None);
    let late = |op: KvOp| Request::Kv {
        key: "late".into(),
        op,
        give_up: GiveUp(1),
    };
    for op in [KvOp::Put(Bytes::from_static(b"1")), KvOp::Delete, KvOp::Get] {
        assert_eq!(
            peer.call(stamp, &late(op.clone())),
            Response::Refused(Refusal::GaveUp),
            "{op:?}"
        );
    }
    common::assert_absent(&client, std::slice::from_ref(&a), &["late".to_string()]);
    assert_eq!(client.key_count(&a), 0);
    // The same request in time is served.
    assert_eq!(
        peer.call(stamp, &put("late", "2")),
        Response::Kv(KvOutcome::Added)
    );
    assert_eq!(
        peer.call(stamp, &late(KvOp::Delete)),
        Response::Refused(Refusal::GaveUp)
    );
    assert_eq!(client.get_key(&a, "late").body["value"], json!(2));
}

#[test]
fn staged_keys_outside_the_incoming_ranges_are_refused() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let a = node.address.clone();
    let view = vec![a.clone()];
    let client = Client::new();
    let data = common::sample_data("stage", 20);
    common::load(&client, &view, &data);
    let stamp = stamp_of(&client, &a);
    let fake = common::fresh_address();
    let ghost = common::fresh_address();
    let stranger = common::fresh_address();
    let change_id = 0x57a6e;
    let new_view = vec![a.clone(), ghost.clone()];
    let mut peer = Peer::handshake(&a, &fake, None);
    let change = fake_change(
        change_id,
        1,
        &new_view,
        &fake,
        &[a.clone(), ghost.clone(), fake.clone()],
    );
    assert_eq!(
        peer.call(stamp, &write(Command::Begin(change.clone()))),
        Response::Led(Ok(Applied::Done))
    );
    assert_eq!(peer.call(stamp, &prepare_of(&change)), Response::Done);

    // New keys, some this node will own under the new view and some it will not.
    let ring = View::new(1, new_view, DEFAULT_VNODES).unwrap();
    let (mine, strays): (Vec<String>, Vec<String>) = (0..40)
        .map(|i| format!("staged{i}"))
        .partition(|key| **ring.ring.owner(key.as_bytes()) == *a);
    assert!(
        !mine.is_empty() && !strays.is_empty(),
        "{mine:?} {strays:?}"
    );
    let entry = |key: &String| Entry {
        key: key.clone(),
        value: Some(Bytes::from_static(b"\"planted\"")),
    };
    let stage = |entries: Vec<Entry>| Request::Stage {
        change_id,
        round: 0,
        entries: entries.iter().collect(),
    };

    for stray in &strays {
        assert_eq!(
            peer.call(stamp, &stage(vec![entry(stray)])),
            Response::Refused(Refusal::NotIncoming(stray.clone())),
            "staging {stray}"
        );
    }
    // A batch with one stray key in it is refused whole.
    assert_eq!(
        peer.call(stamp, &stage(vec![entry(&mine[0]), entry(&strays[0])])),
        Response::Refused(Refusal::NotIncoming(strays[0].clone()))
    );
    // A stray tombstone for a key this node holds now.
    let held = data
        .keys()
        .find(|key| **ring.ring.owner(key.as_bytes()) != *a)
        .expect("a loaded key that moves under the new view");
    assert_eq!(
        peer.call(
            stamp,
            &stage(vec![Entry {
                key: held.clone(),
                value: None,
            }])
        ),
        Response::Refused(Refusal::NotIncoming(held.clone()))
    );
    // From a sender that takes no part in the change.
    let mut outsider = Peer::handshake(&a, &stranger, None);
    assert_eq!(
        outsider.call(stamp, &stage(vec![entry(&mine[0])])),
        Response::Refused(Refusal::NotMember(stranger.clone()))
    );
    // For a change that is not prepared.
    assert_eq!(
        peer.call(
            stamp,
            &Request::Stage {
                change_id: change_id + 1,
                round: 0,
                entries: [entry(&mine[0])].iter().collect(),
            }
        ),
        Response::Refused(Refusal::UnknownChange(change_id + 1))
    );

    assert_eq!(
        peer.call(stamp, &write(Command::Abort { change_id })),
        Response::Led(Ok(Applied::Decided(Outcome::Aborted)))
    );
    wait_until_settled(&client, &a);
    assert_untouched(&client, &view, &view);
    assert_eq!(client.key_count(&a), data.len() as u64);
    common::assert_absent(&client, &view, mine.iter().chain(&strays));
    common::assert_contents(&client, &view, &view, &data);
}

// ---------------------------------------------------------------------------------------
// A fake peer named in a view change.

/// What one connection to a [`FakePeer`] carried.
#[derive(Default)]
struct Recorded {
    bytes: Vec<u8>,
    /// The caller closed the connection (or went silent for the read timeout).
    ended: bool,
}

type Answering = dyn Fn(&str, &Hello) -> HelloAnswer + Send + Sync;

/// A listener that answers every hello as `answer` says and records every byte it receives.
struct FakePeer {
    address: String,
    connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
}

impl FakePeer {
    /// Listens at a fresh address; `answer` gets that address and the hello.
    fn start(answer: impl Fn(&str, &Hello) -> HelloAnswer + Send + Sync + 'static) -> FakePeer {
        let address = common::fresh_address();
        let listener = TcpListener::bind(&address).unwrap();
        let connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>> = Arc::default();
        let answer: Arc<Answering> = Arc::new(answer);
        let (own, all) = (address.clone(), connections.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let recorded = Arc::new(Mutex::new(Recorded::default()));
                all.lock().unwrap().push(recorded.clone());
                let (own, answer) = (own.clone(), answer.clone());
                std::thread::spawn(move || FakePeer::serve(stream, &own, &*answer, &recorded));
            }
        });
        FakePeer {
            address,
            connections,
        }
    }

    fn serve(mut stream: TcpStream, own: &str, answer: &Answering, recorded: &Mutex<Recorded>) {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut answered = false;
        let mut chunk = [0u8; 64 * 1024];
        loop {
            let n = match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut recorded = recorded.lock().unwrap();
            recorded.bytes.extend_from_slice(&chunk[..n]);
            if answered || recorded.bytes.len() < MAGIC.len() {
                continue;
            }
            let mut rest = BytesMut::from(&recorded.bytes[MAGIC.len()..]);
            let Ok(Some(frame)) = next_frame_within(&mut rest, MAX_HELLO) else {
                continue;
            };
            answered = true;
            let Ok(hello) = serde_json::from_slice::<Hello>(&frame) else {
                break;
            };
            let mut reply = BytesMut::new();
            encode_json(&mut reply, &answer(own, &hello));
            if stream.write_all(&reply).is_err() {
                break;
            }
        }
        recorded.lock().unwrap().ended = true;
    }

    /// Waits until every connection to the fake has ended (at least one was made); what
    /// each carried.
    fn recorded(&self) -> Vec<Vec<u8>> {
        common::poll_until(
            Duration::from_secs(20),
            "the fake's connections to end",
            || {
                let connections = self.connections.lock().unwrap();
                let ended = connections.iter().all(|c| c.lock().unwrap().ended);
                (!connections.is_empty() && ended).then(|| {
                    connections
                        .iter()
                        .map(|c| c.lock().unwrap().bytes.clone())
                        .collect()
                })
            },
        )
    }
}

/// Asserts that every connection to `fake` carried the magic and one hello from `caller`,
/// and nothing else: no proof, no request, and never `token`.
fn assert_only_hellos(fake: &FakePeer, caller: &str, token: Option<&str>) {
    for (i, bytes) in fake.recorded().into_iter().enumerate() {
        if let Some(token) = token {
            assert!(
                !contains(&bytes, token.as_bytes()),
                "connection {i} to the fake carried the token"
            );
        }
        assert!(
            bytes.starts_with(MAGIC),
            "connection {i}: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        let mut rest = BytesMut::from(&bytes[MAGIC.len()..]);
        let frame = next_frame_within(&mut rest, MAX_HELLO)
            .unwrap()
            .expect("a whole hello");
        let hello: Hello = serde_json::from_slice(&frame).unwrap();
        assert_eq!(
            (hello.from.as_str(), hello.vnodes, hello.nonce.len()),
            (caller, DEFAULT_VNODES, 32),
            "connection {i}: {hello:?}"
        );
        assert!(
            rest.is_empty(),
            "connection {i}: {} bytes after the hello: {:?}",
            rest.len(),
            String::from_utf8_lossy(&rest)
        );
    }
}

/// A hello answer of status 200.
fn accepted(address: &str, proof: Option<String>) -> HelloAnswer {
    HelloAnswer {
        status: 200,
        error: None,
        address: address.to_string(),
        nonce: nonce(),
        proof,
    }
}

/// Sends a view change adding `fake` to the nodes of `cluster` through its first node;
/// asserts that it fails naming the fake, that the fake got only hellos, and that the
/// cluster kept its view and its keys.
fn assert_view_change_to_fake_refused(
    client: &Client,
    cluster: &[String],
    data: &BTreeMap<String, Value>,
    fake: &FakePeer,
    token: Option<&str>,
) {
    let mut view = cluster.to_vec();
    view.push(fake.address.clone());
    let answer = client.view_change(&cluster[0], &view.join(","));
    assert_eq!(
        (answer.status, &answer.body),
        (
            503,
            &json!({
                "error": "Unable to satisfy request",
                "message": "Error in PUT",
                "unreachable": [fake.address],
            })
        ),
        "view change to {view:?}"
    );
    assert_only_hellos(fake, &cluster[0], token);
    assert_untouched(client, cluster, cluster);
    common::assert_contents(client, cluster, cluster, data);
}

#[test]
fn a_fake_peer_named_in_a_view_change_gets_neither_the_token_nor_data() {
    let token = "fake-Peer-Token-5Zr";
    let cluster = Cluster::start(2, &["--cluster-token", token]);
    let client = Client::new();
    let addresses = cluster.addresses();
    let data = common::sample_data("secret", 30);
    common::load(&client, &addresses, &data);

    // A made-up proof.
    let fake = FakePeer::start(|own, _| accepted(own, Some("ab".repeat(32))));
    assert_view_change_to_fake_refused(&client, &addresses, &data, &fake, Some(token));
    // No proof at all.
    let fake = FakePeer::start(|own, _| accepted(own, None));
    assert_view_change_to_fake_refused(&client, &addresses, &data, &fake, Some(token));
    // A proof that does verify (this fake holds the token) but another identity than the
    // one dialed: only the identity check stands between it and the cluster.
    let secret = ClusterToken::new(token).unwrap();
    let fake = FakePeer::start(move |own, hello| {
        let proof = secret.prove("server", &hello.nonce, own, &hello.from);
        accepted("127.0.0.1:13800", Some(proof))
    });
    assert_view_change_to_fake_refused(&client, &addresses, &data, &fake, Some(token));
    // Another identity and a proof of that identity under another token.
    let other = ClusterToken::new("other-token").unwrap();
    let fake = FakePeer::start(move |_, hello| {
        let claimed = "127.0.0.1:13800";
        let proof = other.prove("server", &hello.nonce, claimed, &hello.from);
        accepted(claimed, Some(proof))
    });
    assert_view_change_to_fake_refused(&client, &addresses, &data, &fake, Some(token));
}

#[test]
fn without_a_token_a_fake_that_answers_as_another_node_is_refused() {
    let cluster = Cluster::start(1, &[]);
    let client = Client::new();
    let addresses = cluster.addresses();
    let data = common::sample_data("plain", 20);
    common::load(&client, &addresses, &data);
    // It claims to be the very node that dials it.
    let claimed = addresses[0].clone();
    let fake = FakePeer::start(move |_, _| accepted(&claimed, None));
    assert_view_change_to_fake_refused(&client, &addresses, &data, &fake, None);
    let fake = FakePeer::start(|_, _| accepted("127.0.0.1:13800", None));
    assert_view_change_to_fake_refused(&client, &addresses, &data, &fake, None);
}

// ---------------------------------------------------------------------------------------
// Without a cluster token a fake peer can write to the log in its own name (the README says
// to set one). What it still cannot do: make a node drop keys it has not shipped, or store
// a value no client could.

/// A fake coordinator that begins a change, skips the transfer and writes the commit to
/// the log: the node switches view, but keeps every key it had not shipped.
#[test]
fn a_fake_coordinator_cannot_drop_keys_by_skipping_the_transfer() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let a = node.address.clone();
    let view = vec![a.clone()];
    let client = Client::new();
    let data = common::sample_data("skip", 30);
    common::load(&client, &view, &data);
    let stamp = stamp_of(&client, &a);
    let fake = common::fresh_address();
    let ghost = common::fresh_address();
    let change_id = 0xdead;
    let mut peer = Peer::handshake(&a, &fake, None);
    let change = fake_change(
        change_id,
        1,
        std::slice::from_ref(&ghost),
        &fake,
        &[a.clone(), ghost.clone(), fake.clone()],
    );
    assert_eq!(
        peer.call(stamp, &write(Command::Begin(change.clone()))),
        Response::Led(Ok(Applied::Done))
    );
    assert_eq!(peer.call(stamp, &prepare_of(&change)), Response::Done);
    let _ = peer.call(stamp, &Request::CatchUp { change_id });
    assert_eq!(
        peer.call(stamp, &write(Command::Commit { change_id })),
        Response::Led(Ok(Applied::Decided(Outcome::Committed)))
    );
    common::poll_until(Duration::from_secs(5), "the commit applied", || {
        (client.state(&a)["epoch"] == json!(1)).then_some(())
    });
    assert_eq!(
        client.key_count(&a),
        data.len() as u64,
        "keys it never shipped are kept"
    );
}

/// A fake coordinator's change that hands nothing over (the same view at the next epoch):
/// what it stages for keys the node already owns is validated, and refused.
#[test]
fn a_fake_change_that_moves_nothing_stores_nothing_invalid() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let a = node.address.clone();
    let view = vec![a.clone()];
    let client = Client::new();
    let data = common::sample_data("same", 10);
    common::load(&client, &view, &data);
    let stamp = stamp_of(&client, &a);
    let fake = common::fresh_address();
    let change_id = 0xbeef;
    let mut peer = Peer::handshake(&a, &fake, None);
    let change = fake_change(change_id, 1, &view, &fake, &[a.clone(), fake.clone()]);
    let _ = peer.call(stamp, &write(Command::Begin(change.clone())));
    let _ = peer.call(stamp, &prepare_of(&change));
    let first = data.keys().next().unwrap().clone();
    for entries in [
        vec![Entry {
            key: first.clone(),
            value: Some(Bytes::from_static(b"<html>")),
        }],
        vec![Entry {
            key: "l".repeat(60),
            value: Some(Bytes::from_static(b"null")),
        }],
    ] {
        let staged = peer.call(
            stamp,
            &Request::Stage {
                change_id,
                round: 0,
                entries: entries.iter().collect(),
            },
        );
        assert!(
            matches!(staged, Response::Refused(Refusal::Invalid(_))),
            "a stage of a value no client could store: {staged:?}"
        );
    }
    let _ = peer.call(stamp, &write(Command::Abort { change_id }));
    wait_until_settled(&client, &a);
    assert_eq!(client.key_count(&a), data.len() as u64);
    common::assert_contents(&client, &view, &view, &data);
}
