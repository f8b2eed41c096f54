//! What a stored value costs: a value written by a local PUT must cost about its own size,
//! not the connection's read buffer it arrived in.

mod common;

use common::{Client, TestNode};
use serde_json::json;

const KEYS: usize = 10_000;
const VALUE_BYTES: usize = 1024;

#[test]
fn values_stored_by_local_puts_do_not_pin_their_read_buffers() {
    let address = common::fresh_address();
    let node = TestNode::start(&address, &[], &[]);
    let before = node.rss_bytes();
    let value = json!("v".repeat(VALUE_BYTES - 2));
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (address, value) = (address.clone(), value.clone());
            std::thread::spawn(move || {
                let client = Client::new();
                for i in (w..KEYS).step_by(8) {
                    let answer = client.put_key(&address, &format!("k{i}"), &value);
                    assert_eq!(answer.status, 201, "{answer:?}");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    assert_eq!(Client::new().key_count(&address), KEYS as u64);
    let growth = node.rss_bytes().saturating_sub(before);
    let per_key = growth / KEYS as u64;
    println!("RSS growth {growth} bytes for {KEYS} x {VALUE_BYTES} B values: {per_key} B per key");
    // The value itself, its key, the index entry and the allocator's rounding: well under
    // 3 KiB. A value that kept its read buffer alive cost 8 KiB and more.
    assert!(
        per_key < 3 * 1024,
        "{per_key} bytes of RSS per 1 KiB value ({growth} bytes for {KEYS} keys)"
    );
}
