//! A client's JSON text message (and HTTP API body) through the parser the server uses (the
//! raw member scan, then simd-json's tape and the decision checks), and the decision
//! enrichment of what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardcast::dialect::shardcast::Parser;
use shardcast::dialect::Request;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parser = Parser::default();
    if let Ok(Request::Ingest(ingest)) = parser.parse(text.as_bytes()) {
        let enriched =
            shardcast::decision::enrich(ingest.data, "dec_0", "1970-01-01T00:00:00.000Z");
        // What subscribers get must still be one JSON object with no repeated key.
        let mut copy = enriched.clone();
        let tape = simd_json::to_tape(&mut copy).expect("valid JSON");
        assert!(
            tape.as_value().is_object() && shardcast::json::duplicate_key(&tape.0).is_none(),
            "{}",
            String::from_utf8_lossy(&enriched)
        );
    }
    // The same text as an HTTP API body (the message without its type), and as a batch:
    // whatever `validate` lets through, the raw scans must find whole items.
    let _ = parser.parse_body("PUBLISH", data);
    let _ = parser.parse_body("INGEST", data);
    if parser.validate(data).is_ok() {
        for item in shardcast::json::array_items(data).into_iter().flatten() {
            let _ = parser.parse_body("PUBLISH", &data[item]);
        }
    }
    // The scans run before simd-json has validated anything: they must take any bytes.
    let _ = shardcast::json::scan_object(data);
    let _ = shardcast::json::array_items(data);
    let _ = shardcast::json::too_deep(data);
});
