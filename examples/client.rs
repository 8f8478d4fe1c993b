//! A minimal client: subscribe, ingest a decision, publish a message, ping, and print every
//! frame that comes back. Run the server (`cargo run --release`), then
//! `cargo run --example client [URL]`.
//!
//! Each request is sent after the answer to the one before, so the output reads in order;
//! the idempotency key is new on every run (the same key again would be answered as a
//! duplicate, with no new DECISION). No read waits more than 5 seconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tungstenite::stream::MaybeTlsStream;
use tungstenite::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws?key=demo-secret".into());
    let (mut ws, _) = tungstenite::connect(url.as_str())?;
    if let MaybeTlsStream::Plain(stream) = ws.get_ref() {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    }
    let key = format!(
        "example-{}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
    );
    let ingest = format!(
        r#"{{"type":"INGEST","channel":"org:demo:decisions","schema":"decision.v1","idempotencyKey":"{key}","data":{{"orgId":"demo","direction":"precheck","decision":"allow","tool":"web.fetch","payloadHash":"sha256:abc"}}}}"#
    );
    // Each request, and what must come back before the next is sent (in any order).
    let steps: [(String, &[&str]); 5] = [
        (String::new(), &[r#""type":"READY""#]),
        (
            r#"{"type":"SUB","channels":["org:demo:decisions"],"id":"s1"}"#.into(),
            &[r#""type":"SUBSCRIBED""#],
        ),
        // Its ACK, and the DECISION fanned out to this subscriber.
        (ingest, &[r#""type":"ACK""#, r#""type":"DECISION""#]),
        (
            r#"{"type":"PUBLISH","channel":"org:demo:decisions","data":{"hello":"world"},"id":"p1"}"#
                .into(),
            &[r#""type":"ACK""#, r#""type":"MESSAGE""#],
        ),
        (
            r#"{"type":"PING","timestamp":"2024-01-01T00:00:00Z"}"#.into(),
            &[r#""type":"PONG""#],
        ),
    ];
    for (request, expected) in steps {
        if !request.is_empty() {
            println!("> {request}");
            ws.send(Message::text(request))?;
        }
        let mut waiting = expected.to_vec();
        while !waiting.is_empty() {
            let text = ws.read()?.into_text()?;
            println!("< {text}");
            if text.contains(r#""type":"ERROR""#) {
                break;
            }
            waiting.retain(|marker| !text.contains(marker));
        }
    }
    ws.close(None)?;
    Ok(())
}
