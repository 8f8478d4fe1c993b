//! Small JSON helpers around simd-json: raw value spans and string escaping.
//!
//! simd-json validates and decodes, but it rewrites its input and keeps no offsets. The protocol
//! promises that `data` reaches subscribers byte for byte as the publisher sent it, so the raw
//! text of top-level values is located here, on input that simd-json has already validated.

use std::ops::Range;

use simd_json::Node;
use smallvec::SmallVec;

/// A member's key and value, as raw byte ranges of the input (the key without its quotes).
pub type Member = (Range<usize>, Range<usize>);

/// What one pass over a JSON object found.
#[derive(Debug, Default)]
pub struct Scanned {
    /// The top-level members, in document order.
    pub members: Vec<Member>,
    /// Something is nested deeper than [`MAX_DEPTH`] (skipped over, not looked into).
    pub too_deep: bool,
}

/// Deepest nesting of objects and arrays accepted in a request (as serde_json's default):
/// deeper input is refused before a parser builds a tree of it.
pub const MAX_DEPTH: usize = 128;

/// Raw byte ranges of the values of a JSON object's top-level members, in document order.
/// `input` must be valid JSON (checked beforehand by simd-json); returns `None` if it is not
/// an object.
pub fn object_members(input: &[u8]) -> Option<Vec<Member>> {
    scan_object(input).map(|s| s.members)
}

/// One pass over a JSON object: where its top-level members are, and whether anything in it
/// is nested deeper than [`MAX_DEPTH`]. Safe on any bytes (nothing indexes past the input),
/// but only meaningful on valid JSON; `None` if it is not an object. Iterative, and it looks
/// at the bytes inside strings only to find where they end.
pub fn scan_object(input: &[u8]) -> Option<Scanned> {
    let mut out = Scanned::default();
    let mut pos = skip_ws(input, 0);
    if input.get(pos) != Some(&b'{') {
        return None;
    }
    pos = skip_ws(input, pos + 1);
    if input.get(pos) == Some(&b'}') {
        return Some(out);
    }
    loop {
        let key_end = skip_string(input, pos)?;
        let key = pos + 1..key_end - 1;
        pos = skip_ws(input, key_end);
        if input.get(pos) != Some(&b':') {
            return None;
        }
        pos = skip_ws(input, pos + 1);
        let end = match input.get(pos)? {
            b'{' | b'[' => {
                // The object itself is one level.
                let (end, depth) = skip_container(input, pos)?;
                out.too_deep |= depth + 1 > MAX_DEPTH;
                end
            }
            _ => skip_scalar(input, pos)?,
        };
        out.members.push((key, pos..end));
        pos = skip_ws(input, end);
        match input.get(pos)? {
            b',' => pos = skip_ws(input, pos + 1),
            b'}' => return Some(out),
            _ => return None,
        }
    }
}

/// True when the JSON value `input` holds (valid or not) nests objects and arrays deeper
/// than [`MAX_DEPTH`]; counted on brackets alone, without recursion.
pub fn too_deep(input: &[u8]) -> bool {
    let pos = skip_ws(input, 0);
    matches!(input.get(pos), Some(b'{' | b'['))
        && skip_container(input, pos).is_some_and(|(_, depth)| depth > MAX_DEPTH)
}

/// Raw byte ranges of the items of the JSON array `input`; `None` if it is not an array.
/// Meaningful only on valid JSON, like [`scan_object`].
pub fn array_items(input: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut items = Vec::new();
    let mut pos = skip_ws(input, 0);
    if input.get(pos) != Some(&b'[') {
        return None;
    }
    pos = skip_ws(input, pos + 1);
    if input.get(pos) == Some(&b']') {
        return Some(items);
    }
    loop {
        let end = match input.get(pos)? {
            b'{' | b'[' => skip_container(input, pos)?.0,
            _ => skip_scalar(input, pos)?,
        };
        items.push(pos..end);
        pos = skip_ws(input, end);
        match input.get(pos)? {
            b',' => pos = skip_ws(input, pos + 1),
            b']' => return Some(items),
            _ => return None,
        }
    }
}

/// Objects with up to this many keys are checked pairwise.
const PAIRWISE: usize = 16;

/// The first name that appears twice in one object, anywhere in a parsed document (keys on
/// the tape are decoded, so `"a"` and `"\u0061"` are one name). Objects of more than 16
/// keys go through a hash set, not pairwise comparison: a 64 KB object of short
/// keys must not cost milliseconds.
pub fn duplicate_key<'i>(tape: &[Node<'i>]) -> Option<&'i str> {
    let mut keys: SmallVec<[&'i str; PAIRWISE]> = SmallVec::new();
    for (at, node) in tape.iter().enumerate() {
        let Node::Object { len, .. } = *node else {
            continue;
        };
        if len < 2 {
            continue;
        }
        keys.clear();
        let mut next = at + 1;
        for _ in 0..len {
            let Some(Node::String(key)) = tape.get(next) else {
                return None;
            };
            if len <= PAIRWISE && keys.contains(key) {
                return Some(key);
            }
            keys.push(key);
            next += 1 + tape.get(next + 1).map_or(1, nodes_in);
        }
        if len > PAIRWISE {
            let mut seen = std::collections::HashSet::with_capacity(len);
            if let Some(key) = keys.iter().find(|k| !seen.insert(**k)) {
                return Some(key);
            }
        }
    }
    None
}

/// Nodes a value takes on the tape, its own included.
fn nodes_in(node: &Node<'_>) -> usize {
    match node {
        Node::Object { count, .. } | Node::Array { count, .. } => count + 1,
        _ => 1,
    }
}

/// True when the raw key (without quotes) names `name`, escapes decoded.
pub fn key_is(raw: &[u8], name: &str) -> bool {
    raw == name.as_bytes() || (raw.contains(&b'\\') && *unescape(raw) == *name.as_bytes())
}

/// The text of a raw JSON string value (quotes included, escapes decoded); `None` when the
/// value is not a string. Meaningful only on validated JSON.
pub fn string(raw: &[u8]) -> Option<String> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    String::from_utf8(unescape(inner)).ok()
}

/// Decode the escapes of a valid JSON string's contents.
fn unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    let hex = |at: usize| {
        raw.get(at..at + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u32::from_str_radix(h, 16).ok())
    };
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let escaped = raw.get(i + 1).copied().unwrap_or(b'\\');
        i += 2;
        let c = match escaped {
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let high = hex(i).unwrap_or(0xfffd);
                i += 4;
                let code = if (0xd800..0xdc00).contains(&high) && raw.get(i) == Some(&b'\\') {
                    let low = hex(i + 2).unwrap_or(0);
                    i += 6;
                    0x10000 + ((high - 0xd800) << 10) + (low.wrapping_sub(0xdc00) & 0x3ff)
                } else {
                    high
                };
                char::from_u32(code).unwrap_or('\u{fffd}')
            }
            other => char::from(other),
        };
        let mut utf8 = [0; 4];
        out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
    }
    out
}

/// The raw value of the member named `name` (requests with duplicate keys are refused, so
/// there is at most one).
pub fn member<'a>(input: &'a [u8], members: &[Member], name: &str) -> Option<&'a [u8]> {
    members
        .iter()
        .find(|(key, _)| key_is(&input[key.clone()], name))
        .map(|(_, value)| &input[value.clone()])
}

fn skip_ws(input: &[u8], mut pos: usize) -> usize {
    while matches!(input.get(pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        pos += 1;
    }
    pos
}

/// End (exclusive) of the string starting at `pos` (which must be a quote).
fn skip_string(input: &[u8], pos: usize) -> Option<usize> {
    if input.get(pos) != Some(&b'"') {
        return None;
    }
    let mut i = pos + 1;
    loop {
        i += memchr::memchr2(b'"', b'\\', input.get(i..)?)?;
        if input[i] == b'"' {
            return Some(i + 1);
        }
        i += 2;
    }
}

/// End (exclusive) of the object or array starting at `pos`, counting brackets only, and
/// the deepest nesting inside it (1 for `[]`).
fn skip_container(input: &[u8], pos: usize) -> Option<(usize, usize)> {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut i = pos;
    while i < input.len() {
        match input[i] {
            b'"' => {
                i = skip_string(input, i)?;
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some((i + 1, deepest));
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// End (exclusive) of the string, number or literal starting at `pos`.
fn skip_scalar(input: &[u8], pos: usize) -> Option<usize> {
    if input.get(pos) == Some(&b'"') {
        return skip_string(input, pos);
    }
    let mut i = pos;
    while i < input.len() && !matches!(input[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
    {
        i += 1;
    }
    (i > pos).then_some(i)
}

/// Append `s` as a JSON string literal (quotes included).
pub fn push_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The first `max` bytes of `s` at most, cut on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` quoted for a human-readable message, cut to [`MAX_ECHO`] bytes and marked `…` when
/// longer: client input is echoed in errors, but never all of it.
pub fn echo(s: &str) -> String {
    let shown = truncate(s, MAX_ECHO);
    let cut = if shown.len() < s.len() { "…" } else { "" };
    format!("{shown:?}{cut}")
}

/// Longest piece of client input echoed in an error message.
pub const MAX_ECHO: usize = 64;

/// Append an unsigned integer.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_array_items_and_deep_nesting() {
        let doc = br#" [ {"a":"],"} , 1.5e2,"x" ,[[]] ,null ] "#;
        let items: Vec<&[u8]> = array_items(doc)
            .unwrap()
            .into_iter()
            .map(|r| &doc[r])
            .collect();
        let expected: [&[u8]; 5] = [br#"{"a":"],"}"#, b"1.5e2", br#""x""#, b"[[]]", b"null"];
        assert_eq!(items, expected);
        assert_eq!(array_items(b"[]"), Some(Vec::new()));
        assert_eq!(array_items(b"{}"), None);
        assert_eq!(array_items(b"[1 2]"), None);
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert!(too_deep(deep.as_bytes()));
        let fine = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(!too_deep(fine.as_bytes()) && !too_deep(b"1"));
    }

    #[test]
    fn finds_raw_member_values() {
        let doc = br#" { "type" : "PUBLISH", "data":{"a":[1,{"b":"}\"]"}],"c" : 2.5e3 } ,"id":7,"x":"\"q\"" } "#;
        let members = object_members(doc).unwrap();
        assert_eq!(member(doc, &members, "type"), Some(&br#""PUBLISH""#[..]));
        assert_eq!(
            member(doc, &members, "data"),
            Some(&br#"{"a":[1,{"b":"}\"]"}],"c" : 2.5e3 }"#[..])
        );
        assert_eq!(member(doc, &members, "id"), Some(&b"7"[..]));
        assert_eq!(member(doc, &members, "x"), Some(&br#""\"q\"""#[..]));
        assert_eq!(member(doc, &members, "missing"), None);
        assert_eq!(object_members(b"{}").unwrap().len(), 0);
        assert!(object_members(b"[1]").is_none());
    }

    #[test]
    fn finds_a_duplicate_key_at_any_depth() {
        let dup = |doc: &[u8]| {
            let mut copy = doc.to_vec();
            let tape = simd_json::to_tape(&mut copy).expect("valid JSON");
            duplicate_key(&tape.0).map(str::to_string)
        };
        assert_eq!(
            dup(br#"{"a":1,"b":{"c":[{"d":1,"e":2}],"f":{}},"g":"a"}"#),
            None
        );
        assert_eq!(dup(br#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            dup(br#"{"x":[1,{"b":1,"c":2,"b":3}]}"#).as_deref(),
            Some("b")
        );
        // The same name in different objects is no duplicate; escapes are decoded.
        assert_eq!(dup(br#"{"a":{"a":{"a":1}}}"#), None);
        assert_eq!(
            dup(br#"{"a":{"b":[{"a":1}],"c":{"b":1},"b":2}}"#).as_deref(),
            Some("b")
        );
        assert_eq!(dup(br#"{"id":1,"\u0069d":2}"#).as_deref(), Some("id"));
        assert!(dup(br#"{"\ud83d\ude00":1,"\ud83d\ude00":2}"#).is_some());
        let many: String = (0..100).map(|i| format!(r#""k{i}":{i},"#)).collect();
        assert_eq!(
            dup(format!("{{{many}\"k7\":0}}").as_bytes()).as_deref(),
            Some("k7")
        );
        // Large objects are sorted, not compared pairwise; nested ones are checked too.
        let keys: Vec<String> = (0..8_000).map(|i| format!(r#""{i:x}":[0,{{}}]"#)).collect();
        let large = format!("{{\"d\":{{{}}}}}", keys.join(","));
        assert_eq!(dup(large.as_bytes()), None);
        let repeated = format!("{{\"d\":{{{},\"1f3\":1}}}}", keys.join(","));
        assert_eq!(dup(repeated.as_bytes()).as_deref(), Some("1f3"));
    }

    #[test]
    fn nesting_deeper_than_allowed_is_found_without_recursion() {
        let nested = |depth| format!("{{\"a\":{}1{}}}", "[".repeat(depth), "]".repeat(depth));
        let deepest = nested(MAX_DEPTH - 1);
        assert_eq!(scan_object(deepest.as_bytes()).unwrap().members.len(), 1);
        assert!(!scan_object(deepest.as_bytes()).unwrap().too_deep);
        let inner = nested(MAX_DEPTH);
        let deeper = format!(r#"{{"id":1,"a":{},"b":2}}"#, &inner[5..inner.len() - 1]);
        let scanned = scan_object(deeper.as_bytes()).unwrap();
        assert!(scanned.too_deep);
        assert_eq!(
            scanned.members.len(),
            3,
            "the members around it are still found"
        );
        assert!(scan_object(nested(500_000).as_bytes()).unwrap().too_deep);
        assert!(scan_object(b"[1]").is_none());
        for junk in [
            &b"{"[..],
            b"{\"a",
            b"{\"a\":",
            b"{\"a\":1,",
            b"}",
            b"{\"\\",
            b"{\"a\":1 2}",
        ] {
            assert!(scan_object(junk).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn keys_are_compared_decoded() {
        assert!(key_is(br"\u0069d", "id"));
        assert!(key_is(b"id", "id"));
        assert!(!key_is(br"i\nd", "id"));
        assert_eq!(
            unescape(br#"a\"b\\c\/\n\u00e9\ud83d\ude00"#),
            "a\"b\\c/\né😀".as_bytes()
        );
    }

    #[test]
    fn echoes_are_cut_on_a_character_boundary() {
        assert_eq!(echo("short"), r#""short""#);
        let long = "é".repeat(100);
        let shown = echo(&long);
        assert_eq!(shown, format!("{:?}…", "é".repeat(32)));
    }

    #[test]
    fn escapes_strings() {
        let mut out = Vec::new();
        push_str(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, r#""a\"b\\c\nd\u0001é""#.as_bytes());
        let mut n = Vec::new();
        push_u64(&mut n, 0);
        push_u64(&mut n, 18446744073709551615);
        assert_eq!(n, b"018446744073709551615".to_vec());
    }
}
