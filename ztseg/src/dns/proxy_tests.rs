//! The proxy's handling of one query, against a resolver on this host's loopback and the
//! learned map in memory: what is asked upstream, what the agent gets, what is recorded.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query, ResponseCode},
    rr::{Name, RData, Record, RecordType, rdata::A},
};
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, oneshot};

use super::{
    NameRules, Store,
    fake_map::FakeMap,
    proxy::{Proxy, Records},
    store::Limits,
};
use crate::{
    dataplane::Verdict,
    events::TableInfo,
    policy::{NameGrant, NamePattern, Ports, Protos},
    risk::Observation,
};

const CG: u64 = 41;

/// Records in memory; an allowed one counts as written at once.
#[derive(Default)]
struct Kept(Mutex<Vec<Map<String, Value>>>);

impl Records for Kept {
    fn send(
        &self,
        fields: Map<String, Value>,
        _agent: Option<Arc<str>>,
        _observation: Option<Observation>,
        allowed: bool,
        _permit: OwnedSemaphorePermit,
    ) -> Option<oneshot::Receiver<()>> {
        self.0.lock().unwrap().push(fields);
        allowed.then(|| {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(());
            rx
        })
    }
}

/// A resolver on 127.0.0.1 answering every A query with 192.0.2.1 (and 127.0.0.1 for
/// `local.example.com`); the names it was asked.
async fn resolver() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let request = Message::from_vec(&buf[..n]).unwrap();
            let query = request.queries[0].clone();
            let name = query.name().to_ascii();
            log.lock().unwrap().push(name.clone());
            let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
            reply.add_query(query.clone());
            let ip = if name.starts_with("local.") { [127, 0, 0, 1] } else { [192, 0, 2, 1] };
            reply.add_answer(Record::from_rdata(query.name().clone(), 60, RData::A(A(ip.into()))));
            socket.send_to(&reply.to_vec().unwrap(), peer).await.unwrap();
        }
    });
    (addr, asked)
}

fn setup(upstream: SocketAddr) -> (Arc<Proxy>, FakeMap, Arc<Kept>) {
    let map = FakeMap::default();
    let config = crate::config::Dns { upstream: vec![upstream], ..crate::config::Dns::default() };
    let mut store = Store::new(Box::new(map.clone()), Limits::of(&config)).unwrap();
    store.register(CG, 0, "alpha", 61184);
    let origins: Vec<String> = vec!["tool:api#0".into()];
    let grant = NameGrant {
        pattern: NamePattern::parse("*.example.com").unwrap(),
        verdict: Verdict::Allow,
        rule_id: 0,
        ports: Ports::All,
        protos: Protos::Tcp,
    };
    let table = Arc::new(TableInfo { origins: Arc::new(origins.clone()), op: None, jti: "j".into() });
    store.regrant(
        CG,
        NameRules::new(vec![grant], &origins),
        crate::clock::boot_now_ns() + 3_600_000_000_000,
        table,
    );
    let kept = Arc::new(Kept::default());
    let proxy = Proxy::new(Arc::new(Mutex::new(store)), &config, vec![upstream], kept.clone());
    (proxy, map, kept)
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(7, MessageType::Query, OpCode::Query);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn last(kept: &Kept) -> Map<String, Value> {
    kept.0.lock().unwrap().last().cloned().unwrap()
}

#[tokio::test]
async fn an_allowed_name_is_answered_once_its_address_is_written_and_others_are_never_asked() {
    let (upstream, asked) = resolver().await;
    let (proxy, map, kept) = setup(upstream);
    let reply =
        Message::from_vec(&proxy.answer(0, &query("api.example.com.", RecordType::A), "udp").await.unwrap())
            .unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert_eq!(reply.answers.len(), 1);
    assert_eq!(map.len(), 1, "tcp, every port, 192.0.2.1");
    assert!(map.get(CG, "192.0.2.1", ztseg_common::rule::PROTO_TCP, 0).is_some());
    let record = last(&kept);
    assert_eq!((record["verdict"].as_str(), record["rule"].as_str()), (Some("allow"), Some("tool:api#0")));

    for (name, qtype, reason) in [
        ("other.test.", RecordType::A, "no_rule"),
        ("api.example.com.", RecordType::TXT, "qtype"),
        ("api.example.com.", RecordType::ANY, "qtype"),
    ] {
        let reply = Message::from_vec(&proxy.answer(0, &query(name, qtype), "udp").await.unwrap()).unwrap();
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused, "{name} {qtype}");
        assert_eq!(last(&kept)["reason"].as_str(), Some(reason));
    }
    assert_eq!(asked.lock().unwrap().as_slice(), ["api.example.com."], "only the allowed name went upstream");
    // No agent at this proxy address: refused, unasked.
    let reply =
        Message::from_vec(&proxy.answer(5, &query("api.example.com.", RecordType::A), "udp").await.unwrap())
            .unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
    assert_eq!(asked.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn an_answer_that_cannot_be_enforced_is_servfail_and_this_host_is_never_granted() {
    let (upstream, _) = resolver().await;
    let (proxy, map, kept) = setup(upstream);
    map.0.lock().unwrap().fail_after = Some(0);
    let reply =
        Message::from_vec(&proxy.answer(0, &query("api.example.com.", RecordType::A), "tcp").await.unwrap())
            .unwrap();
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(reply.answers.is_empty());
    assert_eq!(last(&kept)["reason"].as_str(), Some("install"));
    map.0.lock().unwrap().fail_after = None;
    // An answer pointing at loopback: the name resolves to nothing, nothing is granted.
    let reply = Message::from_vec(
        &proxy.answer(0, &query("local.example.com.", RecordType::A), "udp").await.unwrap(),
    )
    .unwrap();
    assert_eq!((reply.metadata.response_code, reply.answers.len()), (ResponseCode::NoError, 0));
    assert_eq!(map.len(), 0);
    assert_eq!(last(&kept)["dropped"], serde_json::json!(["127.0.0.1"]));
    // Garbage gets FORMERR (it has an id) and a record.
    let reply = proxy.answer(0, b"\x00\x07not a dns message at all", "udp").await.unwrap();
    assert_eq!(Message::from_vec(&reply).unwrap().metadata.response_code, ResponseCode::FormErr);
    assert_eq!(last(&kept)["reason"].as_str(), Some("malformed"));
}
