//! A minimal client: subscribe, ingest a decision, publish a message, print what comes back.
//! Run the server (`cargo run --release`), then `cargo run --example client`.

use tungstenite::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "ws://127.0.0.1:8080/ws?key=demo-secret".into());
    let (mut ws, _) = tungstenite::connect(url.as_str())?;
    let requests = [
        r#"{"type":"SUB","channels":["org:demo:decisions"],"id":"s1"}"#,
        r#"{"type":"INGEST","channel":"org:demo:decisions","schema":"decision.v1","idempotencyKey":"example-1","data":{"orgId":"demo","direction":"precheck","decision":"allow","tool":"web.fetch","payloadHash":"sha256:abc"}}"#,
        r#"{"type":"PUBLISH","channel":"org:demo:decisions","data":{"hello":"world"},"id":"p1"}"#,
        r#"{"type":"PING","timestamp":"2024-01-01T00:00:00Z"}"#,
    ];
    for request in requests {
        ws.send(Message::text(request))?;
    }
    // READY, SUBSCRIBED, DECISION, ACK, MESSAGE, ACK, PONG
    for _ in 0..7 {
        println!("{}", ws.read()?.into_text()?);
    }
    ws.close(None)?;
    Ok(())
}
