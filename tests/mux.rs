//! The forwarding protocol on the wire: a raw TCP client speaks it to a real node, as a
//! peer would, and checks the answers frame by frame; bad hellos and bad frames close the
//! connection and leave the node serving.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{Client, TestNode};
use ringkv::kv::{KvOp, KvOutcome};
use ringkv::mux::{
    decode_answer, encode_json, encode_request, next_frame, Answer, Hello, HelloAnswer, MAGIC,
};
use serde_json::json;

/// A raw mux connection.
struct Peer {
    stream: TcpStream,
    buffer: BytesMut,
}

impl Peer {
    /// Connects to `node` and sends the magic and a hello.
    fn open(node: &str, vnodes: u32, token: Option<&str>) -> Peer {
        let mut stream = TcpStream::connect(node).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut hello = BytesMut::from(&MAGIC[..]);
        encode_json(
            &mut hello,
            &Hello {
                from: "127.0.0.1:1".into(),
                vnodes,
                token: token.map(String::from),
            },
        );
        stream.write_all(&hello).unwrap();
        Peer {
            stream,
            buffer: BytesMut::new(),
        }
    }

    /// The next frame, or `None` once the node closed the connection.
    fn frame(&mut self) -> Option<Bytes> {
        loop {
            if let Some(frame) = next_frame(&mut self.buffer).unwrap() {
                return Some(frame);
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("no frame and no close: {e}"),
            }
        }
    }

    fn hello_answer(&mut self) -> HelloAnswer {
        serde_json::from_slice(&self.frame().expect("a hello answer")).unwrap()
    }

    fn assert_closed(&mut self) {
        assert!(self.frame().is_none(), "the connection stayed open");
    }
}

fn describe(answer: &Answer) -> String {
    match answer {
        Answer::Served(KvOutcome::Found(value)) => {
            format!("found {}", String::from_utf8_lossy(value))
        }
        other => format!("{other:?}"),
    }
}

#[test]
fn requests_in_one_write_are_answered_by_id() {
    let node = TestNode::start(&common::fresh_address(), &[], &[]);
    let mut peer = Peer::open(&node.address, 1024, None);
    let answer = peer.hello_answer();
    assert_eq!((answer.status, answer.error), (200, None));

    let requests: [(u64, &str, KvOp); 5] = [
        (10, "k1", KvOp::Put(Bytes::from_static(br#"{"a":[1,2]}"#))),
        (11, "k1", KvOp::Get),
        (12, "absent", KvOp::Get),
        (13, "k1", KvOp::Delete),
        (14, "k1", KvOp::Get),
    ];
    let mut batch = BytesMut::new();
    for (id, key, op) in &requests {
        encode_request(&mut batch, *id, 0, key, op);
    }
    peer.stream.write_all(&batch).unwrap();
    let mut answers = BTreeMap::new();
    while answers.len() < requests.len() {
        let (id, answer) = decode_answer(peer.frame().expect("an answer")).unwrap();
        answers.insert(id, describe(&answer));
    }
    let expected: BTreeMap<u64, String> = [
        (10, "Served(Added)"),
        (11, r#"found {"a":[1,2]}"#),
        (12, "Served(Absent)"),
        (13, "Served(Deleted)"),
        (14, "Served(Absent)"),
    ]
    .into_iter()
    .map(|(id, text)| (id, text.to_string()))
    .collect();
    assert_eq!(answers, expected);
    assert_eq!(Client::new().key_count(&node.address), 0);
}

#[test]
fn bad_hellos_and_bad_frames_close_the_connection_and_nothing_else() {
    let token = "mux-token";
    let node = TestNode::start(&common::fresh_address(), &[], &["--cluster-token", token]);
    let a = &node.address;

    let mut other_vnodes = Peer::open(a, 512, Some(token));
    let answer = other_vnodes.hello_answer();
    assert_eq!(answer.status, 409);
    assert!(answer.error.unwrap().contains("vnode count mismatch"));
    other_vnodes.assert_closed();

    for offered in [None, Some("wrong")] {
        let mut peer = Peer::open(a, 1024, offered);
        let answer = peer.hello_answer();
        assert_eq!(
            (answer.status, answer.error.as_deref()),
            (401, Some("Unauthorized"))
        );
        peer.assert_closed();
    }

    // An unknown operation, a key that is not UTF-8, and a frame too large to accept.
    let unknown_op = [
        19u32.to_le_bytes().as_slice(),
        &[0u8; 8],
        &[9u8],
        &[0u8; 10],
    ]
    .concat();
    let mut bad_key = BytesMut::new();
    encode_request(&mut bad_key, 1, 0, "k", &KvOp::Get);
    let at = bad_key.len() - 1;
    bad_key[at] = 0xff;
    let too_large = u32::MAX.to_le_bytes().to_vec();
    for (what, bytes) in [
        ("unknown operation", unknown_op),
        ("key not UTF-8", bad_key.to_vec()),
        ("too large", too_large),
    ] {
        let mut peer = Peer::open(a, 1024, Some(token));
        assert_eq!(peer.hello_answer().status, 200, "{what}");
        peer.stream.write_all(&bytes).unwrap();
        peer.assert_closed();
    }

    // A hello over 4 KiB is refused before it has all arrived (it comes before the token).
    let mut stream = TcpStream::connect(a).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(MAGIC).unwrap();
    stream.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
    let mut peer = Peer {
        stream,
        buffer: BytesMut::new(),
    };
    peer.assert_closed();

    // A peer that announces a large frame and goes away costs nothing lasting.
    let mut peer = Peer::open(a, 1024, Some(token));
    assert_eq!(peer.hello_answer().status, 200);
    peer.stream
        .write_all(&(200u32 << 20).to_le_bytes())
        .unwrap();
    drop(peer);

    // The magic cut short, then silence, is not mistaken for HTTP and is not answered.
    let mut partial = TcpStream::connect(a).unwrap();
    partial.write_all(&MAGIC[..3]).unwrap();

    let client = Client::new();
    let answer = client.put_key(a, "still", &json!("serving"));
    assert_eq!(answer.status, 201, "{answer:?}");
    let answer = client.get_key(a, "still");
    assert_eq!(answer.body["value"], json!("serving"));
}
