//! A record body serialised once, in canonical form, with the places kept where the chain's
//! own fields (`hash`, `prev`, `seq`) go: the log hashes it, writes it and hands it to the
//! event stream by splicing those fields in, never by building and sorting a map again.

use std::{io::Write as _, net::IpAddr};

use serde_json::{Map, Value};

use super::record::{write_str, write_value};

/// The fields the log adds, in key order.
const CHAIN_KEYS: [&str; 3] = ["hash", "prev", "seq"];

/// Canonical bytes of a record body (compact JSON, keys sorted) without `hash`, `prev` and
/// `seq`, and the byte offset where each of those belongs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Body {
    bytes: Vec<u8>,
    slots: [usize; 3],
}

/// The chain fields to splice into a [`Body`], already encoded as JSON values.
#[derive(Clone, Copy, Default)]
pub struct Chain<'a> {
    pub hash: Option<&'a [u8]>,
    pub prev: Option<&'a [u8]>,
    pub seq: Option<&'a [u8]>,
}

impl Body {
    /// The body's canonical bytes with `chain`'s fields spliced in, passed to `out` in pieces.
    pub fn emit(&self, chain: Chain<'_>, mut out: impl FnMut(&[u8])) {
        let mut pos = 0;
        // The last byte handed out: a '{' means no comma before the next field.
        let mut after_brace = false;
        for (i, value) in [chain.hash, chain.prev, chain.seq].into_iter().enumerate() {
            let Some(value) = value else { continue };
            let slot = self.slots[i];
            // Slots are never 0 (the body starts with '{') and never go backwards.
            if slot > pos {
                self.resume(pos, slot, after_brace, &mut out);
                after_brace = self.bytes[slot - 1] == b'{';
                pos = slot;
            }
            if !after_brace {
                out(b",");
            }
            out(b"\"");
            out(CHAIN_KEYS[i].as_bytes());
            out(b"\":");
            out(value);
            after_brace = false;
        }
        self.resume(pos, self.bytes.len(), after_brace, &mut out);
    }

    /// Hands out `bytes[from..to]`, with the comma a key right after an inserted field needs.
    fn resume(&self, from: usize, to: usize, after_brace: bool, out: &mut impl FnMut(&[u8])) {
        if from < to {
            if from > 0 && self.bytes[from] == b'"' && !after_brace {
                out(b",");
            }
            out(&self.bytes[from..to]);
        }
    }

    /// The body with `chain`'s fields spliced in, as one buffer.
    pub fn to_vec(&self, chain: Chain<'_>) -> Vec<u8> {
        let mut line = Vec::with_capacity(self.bytes.len() + 160);
        self.emit(chain, |piece| line.extend_from_slice(piece));
        line
    }

    /// The body of a JSON object (its keys sorted here); the caller has checked it carries no
    /// chain field.
    pub fn from_map(map: &Map<String, Value>) -> Self {
        let mut entries: Vec<(&String, &Value)> = map.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut body = BodyWriter::new();
        for (key, value) in entries {
            body.key(key);
            write_value(&mut body.out, value);
        }
        body.finish()
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.len() <= 2
    }
}

/// Writes a [`Body`] field by field; fields must come in byte-wise key order.
pub struct BodyWriter {
    out: Vec<u8>,
    slots: [usize; 3],
    /// Chain fields whose slot is known.
    placed: usize,
    fields: usize,
    #[cfg(debug_assertions)]
    last_key: String,
}

impl Default for BodyWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BodyWriter {
    pub fn new() -> Self {
        let mut out = Vec::with_capacity(320);
        out.push(b'{');
        Self {
            out,
            slots: [0; 3],
            placed: 0,
            fields: 0,
            #[cfg(debug_assertions)]
            last_key: String::new(),
        }
    }

    /// Starts the field `key` (the next in key order): the comma, the key, the colon.
    fn key(&mut self, key: &str) {
        #[cfg(debug_assertions)]
        {
            debug_assert!(
                self.fields == 0 || self.last_key.as_bytes() < key.as_bytes(),
                "body keys out of order: {:?} after {:?}",
                key,
                self.last_key
            );
            debug_assert!(!CHAIN_KEYS.contains(&key), "{key} is the log's own field");
            self.last_key = key.to_owned();
        }
        while self.placed < CHAIN_KEYS.len() && CHAIN_KEYS[self.placed].as_bytes() < key.as_bytes() {
            self.slots[self.placed] = self.out.len();
            self.placed += 1;
        }
        if self.fields > 0 {
            self.out.push(b',');
        }
        self.fields += 1;
        write_str(&mut self.out, key);
        self.out.push(b':');
    }

    pub fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        write_str(&mut self.out, value);
        self
    }

    pub fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        match value {
            Some(value) => self.str(key, value),
            None => self.null(key),
        }
    }

    pub fn u64(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    pub fn null(&mut self, key: &str) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(b"null");
        self
    }

    /// An address as a string (its `Display` form), or null.
    pub fn ip(&mut self, key: &str, value: Option<IpAddr>) -> &mut Self {
        self.key(key);
        match value {
            // Addresses print no character that needs escaping.
            Some(ip) => {
                let _ = write!(self.out, "\"{ip}\"");
            }
            None => self.out.extend_from_slice(b"null"),
        }
        self
    }

    /// A value written by `write` as canonical JSON (a timestamp, a nested object).
    pub fn raw(&mut self, key: &str, write: impl FnOnce(&mut Vec<u8>)) -> &mut Self {
        self.key(key);
        write(&mut self.out);
        self
    }

    pub fn finish(mut self) -> Body {
        while self.placed < CHAIN_KEYS.len() {
            self.slots[self.placed] = self.out.len();
            self.placed += 1;
        }
        self.out.push(b'}');
        Body { bytes: self.out, slots: self.slots }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::audit::record::canonical_object;

    fn spliced(map: &Map<String, Value>, chain: &[(&str, Value)]) -> (Vec<u8>, Vec<u8>) {
        let body = Body::from_map(map);
        let encoded: Vec<(String, Vec<u8>)> =
            chain.iter().map(|(k, v)| ((*k).to_owned(), serde_json::to_vec(v).unwrap())).collect();
        let get = |name: &str| encoded.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice());
        let ours = body.to_vec(Chain { hash: get("hash"), prev: get("prev"), seq: get("seq") });
        let mut full = map.clone();
        for (k, v) in chain {
            full.insert((*k).to_owned(), v.clone());
        }
        (ours, canonical_object(&full))
    }

    #[test]
    fn spliced_chain_fields_give_the_canonical_bytes_of_the_whole_record() {
        let bodies = [
            json!({}),
            json!({"a": 1}),
            json!({"z": 1}),
            json!({"a": 1, "z": "x"}),
            json!({"event": "kill", "ts": "t", "agent": "a\"b\n"}),
            json!({"hat": 1, "pre": [1, {"b": 2, "a": null}], "sea": true, "seq0": 5}),
            json!({"action": "connect", "agent": "alpha", "cgroup_id": 7, "comm": "curl", "dport": 443,
                   "dst": "10.0.0.1", "jti": "j", "op": null, "pid": 9, "proto": "tcp", "reason": "rule",
                   "rule": "scope:x#0", "ts": "2026-01-01T00:00:00.000000Z", "uid": 1, "verdict": "allow"}),
        ];
        let chains: [&[(&str, Value)]; 5] = [
            &[],
            &[("seq", json!(3))],
            &[("prev", json!("00ff")), ("seq", json!(0))],
            &[("hash", json!("ab")), ("prev", json!("cd")), ("seq", json!(12))],
            &[("hash", json!("ab"))],
        ];
        for body in &bodies {
            for chain in chains {
                let (ours, canonical) = spliced(body.as_object().unwrap(), chain);
                assert_eq!(
                    String::from_utf8(ours).unwrap(),
                    String::from_utf8(canonical).unwrap(),
                    "{body} with {chain:?}"
                );
            }
        }
    }

    #[test]
    fn the_writer_writes_what_the_map_path_writes() {
        let mut w = BodyWriter::new();
        w.str("action", "connect").null("agent").u64("dport", 53).ip("dst", Some("::1".parse().unwrap()));
        w.raw("ts", |out| out.extend_from_slice(b"\"t\""));
        let map = json!({"action": "connect", "agent": null, "dport": 53, "dst": "::1", "ts": "t"});
        assert_eq!(w.finish(), Body::from_map(map.as_object().unwrap()));
    }
}
