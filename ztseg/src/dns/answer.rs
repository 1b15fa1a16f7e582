//! The proxy's message work, pure: reading an agent's query, asking upstream the same question,
//! walking the upstream answer (CNAME chain, addresses), and writing the agent's answer.

use std::net::IpAddr;

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{DNSClass, Name, RData, Record, RecordType},
};

/// Payload size the proxy advertises upstream and to clients that speak EDNS.
pub const EDNS_PAYLOAD: u16 = 1232;
/// CNAME links followed at most.
const MAX_CHAIN: usize = 8;

/// A query the proxy can act on: one question of class IN.
#[derive(Clone, Debug)]
pub struct Question {
    pub id: u16,
    /// Lower case, without the trailing dot, as rules match it.
    pub name: String,
    pub qtype: RecordType,
    /// The question as the agent wrote it (case kept), echoed in the answer.
    pub query: Query,
    pub recursion_desired: bool,
    /// The agent's EDNS payload size, if it spoke EDNS.
    pub edns_payload: Option<u16>,
}

/// Why a message is not a query the proxy acts on, and what to answer (if anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unusable {
    /// Answered with this code (to this id), or dropped (`None`: not even an id to answer).
    pub answer: Option<(u16, ResponseCode)>,
    pub detail: String,
}

/// A name as rules match it: ASCII (non-LDH bytes escaped), lower case, no trailing dot.
pub fn name_text(name: &Name) -> String {
    let mut text = name.to_ascii();
    if text.ends_with('.') {
        text.pop();
    }
    text.make_ascii_lowercase();
    text
}

/// Reads an agent's query.
pub fn question(bytes: &[u8]) -> Result<Question, Unusable> {
    let message = Message::from_vec(bytes).map_err(|e| Unusable {
        answer: (bytes.len() >= 12)
            .then(|| (u16::from_be_bytes([bytes[0], bytes[1]]), ResponseCode::FormErr)),
        detail: format!("not a DNS message: {e}"),
    })?;
    let id = message.metadata.id;
    let refuse = |code, detail: &str| Err(Unusable { answer: Some((id, code)), detail: detail.to_owned() });
    if message.metadata.message_type != MessageType::Query {
        return Err(Unusable { answer: None, detail: "a response, not a query".to_owned() });
    }
    if message.metadata.op_code != OpCode::Query {
        return refuse(ResponseCode::NotImp, "not a standard query (opcode)");
    }
    if message.queries.len() != 1 {
        return refuse(ResponseCode::FormErr, "not exactly one question");
    }
    if !message.answers.is_empty() || !message.authorities.is_empty() {
        return refuse(ResponseCode::FormErr, "a query with records in it");
    }
    let query = message.queries[0].clone();
    if query.query_class() != DNSClass::IN {
        return refuse(ResponseCode::Refused, "a class other than IN");
    }
    // Names as hosts have them: a label with a dot, a backslash or any other byte would be
    // written escaped (`bad\.mirror`) and then judged, split at its dots, as another name.
    let host_byte = |b: &u8| crate::policy::label_byte(b.to_ascii_lowercase());
    if !query.name().iter().all(|label| label.iter().all(host_byte)) {
        return refuse(
            ResponseCode::Refused,
            "a name with a byte other than a letter, digit, '-' or '_' in a label",
        );
    }
    Ok(Question {
        id,
        name: name_text(query.name()),
        qtype: query.query_type(),
        query,
        recursion_desired: message.metadata.recursion_desired,
        edns_payload: message.edns.as_ref().map(|e| e.max_payload().max(512)),
    })
}

/// Whether the proxy forwards queries of this type: what ordinary programs resolve names with.
pub fn forwarded_type(qtype: RecordType) -> bool {
    matches!(qtype, RecordType::A | RecordType::AAAA)
}

/// The query the proxy sends upstream for `question`, with a fresh `id`, its name in lower
/// case: the agent's spelling could carry a bit per letter past the wildcard budget, which
/// counts names without case. (The agent's answer echoes its own spelling.)
pub fn upstream_query(question: &Question, id: u16) -> Vec<u8> {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(question.query.name().to_lowercase(), question.qtype));
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    message.set_edns(edns);
    // Encoding a message of one question we built cannot fail; an empty vec is sent nowhere.
    message.to_vec().unwrap_or_default()
}

/// Whether `bytes` answer the upstream query `id` for `question`: a response, the id, the
/// same question (names compare without case).
pub fn upstream_answer(bytes: &[u8], id: u16, question: &Question) -> Option<Message> {
    let message = Message::from_vec(bytes).ok()?;
    let same = message.metadata.message_type == MessageType::Response
        && message.metadata.id == id
        && message.queries.len() == 1
        && name_text(message.queries[0].name()) == question.name
        && message.queries[0].query_type() == question.qtype;
    same.then_some(message)
}

/// What an upstream answer holds for the question: the CNAME chain from the name, and the
/// addresses of its end.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Walked {
    /// (owner, target, ttl) of each link, in order.
    pub cnames: Vec<(Name, Name, u32)>,
    /// (owner, address, ttl) of the chain's end, of the queried type.
    pub addrs: Vec<(Name, IpAddr, u32)>,
}

impl Walked {
    /// The chain's targets, as rules match them.
    pub fn targets(&self) -> impl Iterator<Item = String> + '_ {
        self.cnames.iter().map(|(_, target, _)| name_text(target))
    }
}

/// Follows the answer section from the question's name: CNAMEs (at most [`MAX_CHAIN`]) and the
/// A or AAAA records of the name the chain ends at. Records of other names or types are left.
pub fn walk(answer: &Message, question: &Question) -> Walked {
    let mut walked = Walked::default();
    let mut current = question.name.clone();
    for _ in 0..=MAX_CHAIN {
        let link = answer.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if name_text(&r.name) == current => {
                Some((r.name.clone(), target.0.clone(), r.ttl))
            }
            _ => None,
        });
        match link {
            Some((owner, target, ttl)) if walked.cnames.len() < MAX_CHAIN => {
                current = name_text(&target);
                walked.cnames.push((owner, target, ttl));
            }
            Some(_) => return Walked::default(),
            None => break,
        }
    }
    for r in &answer.answers {
        if name_text(&r.name) != current {
            continue;
        }
        let addr = match (&r.data, question.qtype) {
            (RData::A(a), RecordType::A) => IpAddr::V4(a.0),
            (RData::AAAA(a), RecordType::AAAA) => IpAddr::V6(a.0),
            _ => continue,
        };
        walked.addrs.push((r.name.clone(), addr, r.ttl));
    }
    walked
}

/// The answer to the agent: `code`, the question as asked, and `walked`'s chain and addresses
/// (each address with its TTL from `ttls`, each link with the smallest of them); truncated
/// (TC, no records) if it would not fit the agent's UDP payload.
pub fn response(
    question: &Question,
    code: ResponseCode,
    walked: Option<(&Walked, &[u32])>,
    udp: bool,
) -> Vec<u8> {
    let mut message = Message::new(question.id, MessageType::Response, OpCode::Query);
    message.metadata.recursion_desired = question.recursion_desired;
    message.metadata.recursion_available = true;
    message.metadata.response_code = code;
    message.add_query(question.query.clone());
    if let Some(payload) = question.edns_payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload.min(EDNS_PAYLOAD));
        message.set_edns(edns);
    }
    if let Some((walked, ttls)) = walked {
        // A link lasts no longer than the addresses it leads to.
        let shortest = ttls.iter().copied().min().unwrap_or(u32::MAX);
        for (owner, target, ttl) in &walked.cnames {
            let ttl = (*ttl).min(shortest);
            message.add_answer(Record::from_rdata(
                owner.clone(),
                ttl,
                RData::CNAME(hickory_proto::rr::rdata::CNAME(target.clone())),
            ));
        }
        for ((owner, addr, _), ttl) in walked.addrs.iter().zip(ttls) {
            let data = match addr {
                IpAddr::V4(v4) => RData::A(hickory_proto::rr::rdata::A(*v4)),
                IpAddr::V6(v6) => RData::AAAA(hickory_proto::rr::rdata::AAAA(*v6)),
            };
            message.add_answer(Record::from_rdata(owner.clone(), *ttl, data));
        }
    }
    let bytes = message.to_vec().unwrap_or_default();
    let limit = usize::from(question.edns_payload.unwrap_or(512));
    if udp && bytes.len() > limit {
        let mut truncated = message.truncate();
        truncated.metadata.id = question.id;
        return truncated.to_vec().unwrap_or_default();
    }
    bytes
}

/// An answer with only a code, to a message that could not be read as a question (`id`).
pub fn error(id: u16, code: ResponseCode) -> Vec<u8> {
    Message::error_msg(id, OpCode::Query, code).to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};

    use super::*;

    fn ask(name: &str, qtype: RecordType) -> Vec<u8> {
        let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        m.to_vec().unwrap()
    }

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    #[test]
    fn a_query_is_read_with_its_name_as_rules_match_it() {
        let q = question(&ask("API.Example.COM.", RecordType::AAAA)).unwrap();
        assert_eq!(
            (q.id, q.name.as_str(), q.qtype, q.recursion_desired),
            (4242, "api.example.com", RecordType::AAAA, true)
        );
        // The echo keeps the agent's case (0x20 randomisation checks it).
        assert_eq!(q.query.name().to_ascii(), "API.Example.COM.");
        assert!(forwarded_type(RecordType::A) && forwarded_type(RecordType::AAAA));
        for refused in [
            RecordType::TXT,
            RecordType::NULL,
            RecordType::ANY,
            RecordType::MX,
            RecordType::PTR,
            RecordType::HTTPS,
            RecordType::SRV,
        ] {
            assert!(!forwarded_type(refused), "{refused}");
        }
    }

    #[test]
    fn upstream_is_asked_in_lower_case_and_the_agent_answered_in_its_own() {
        let q = question(&ask("LeakData.Attacker.TEST.", RecordType::A)).unwrap();
        let sent = Message::from_vec(&upstream_query(&q, 7)).unwrap();
        assert_eq!(sent.queries[0].name().to_ascii(), "leakdata.attacker.test.");
        let reply = Message::from_vec(&response(&q, ResponseCode::NoError, None, true)).unwrap();
        assert_eq!(reply.queries[0].name().to_ascii(), "LeakData.Attacker.TEST.");
    }

    #[test]
    fn a_label_with_a_byte_hosts_do_not_use_is_refused() {
        let raw = |labels: &[&[u8]]| {
            let mut m = Message::new(4242, MessageType::Query, OpCode::Query);
            m.add_query(Query::query(Name::from_labels(labels.iter().copied()).unwrap(), RecordType::A));
            m.to_vec().unwrap()
        };
        for odd in [
            &[b"bad.mirror" as &[u8], b"test"][..],
            &[b"a\\b", b"test"],
            &[b"sp ace", b"test"],
            &[b"*", b"test"],
            &[b"nul\0", b"test"],
            &[b"\xc3\xa9t\xc3\xa9", b"test"],
        ] {
            let err = question(&raw(odd)).unwrap_err();
            assert_eq!(err.answer, Some((4242, ResponseCode::Refused)), "{odd:?}");
        }
        // Letters, digits, '-' and '_' (service labels) in any case are names.
        let q = question(&raw(&[b"_srv-1", b"Api", b"test"])).unwrap();
        assert_eq!(q.name, "_srv-1.api.test");
    }

    #[test]
    fn what_is_not_one_plain_question_is_refused_with_a_code_or_dropped() {
        let err = question(b"\x12\x34garbage-but-long").unwrap_err();
        assert_eq!(err.answer, Some((0x1234, ResponseCode::FormErr)));
        assert_eq!(question(b"\x12").unwrap_err().answer, None);
        let mut two = Message::new(7, MessageType::Query, OpCode::Query);
        two.add_query(Query::query(name("a.example."), RecordType::A));
        two.add_query(Query::query(name("b.example."), RecordType::A));
        assert_eq!(question(&two.to_vec().unwrap()).unwrap_err().answer, Some((7, ResponseCode::FormErr)));
        let mut update = Message::new(8, MessageType::Query, OpCode::Update);
        update.add_query(Query::query(name("a.example."), RecordType::A));
        assert_eq!(question(&update.to_vec().unwrap()).unwrap_err().answer, Some((8, ResponseCode::NotImp)));
        let mut chaos = Message::new(9, MessageType::Query, OpCode::Query);
        let mut q = Query::query(name("version.bind."), RecordType::TXT);
        q.set_query_class(DNSClass::CH);
        chaos.add_query(q);
        assert_eq!(question(&chaos.to_vec().unwrap()).unwrap_err().answer, Some((9, ResponseCode::Refused)));
        let response = Message::new(10, MessageType::Response, OpCode::Query);
        assert_eq!(question(&response.to_vec().unwrap()).unwrap_err().answer, None);
    }

    fn upstream(q: &Question, records: Vec<Record>) -> Message {
        let mut m = Message::new(99, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name("api.example.com."), q.qtype));
        m.add_answers(records);
        m
    }

    #[test]
    fn an_upstream_answer_must_answer_our_question() {
        let q = question(&ask("api.example.com", RecordType::A)).unwrap();
        let sent = upstream_query(&q, 99);
        assert_eq!(Message::from_vec(&sent).unwrap().metadata.id, 99);
        let good = upstream(&q, vec![]).to_vec().unwrap();
        assert!(upstream_answer(&good, 99, &q).is_some());
        assert!(upstream_answer(&good, 98, &q).is_none(), "another id");
        let mut other = upstream(&q, vec![]);
        other.queries[0] = Query::query(name("evil.example."), RecordType::A);
        assert!(upstream_answer(&other.to_vec().unwrap(), 99, &q).is_none(), "another question");
    }

    #[test]
    fn the_walk_follows_cnames_and_takes_the_addresses_of_the_end() {
        let q = question(&ask("api.example.com", RecordType::A)).unwrap();
        let answer = upstream(
            &q,
            vec![
                Record::from_rdata(
                    name("api.example.com."),
                    300,
                    RData::CNAME(CNAME(name("edge.cdn.example.net."))),
                ),
                Record::from_rdata(
                    name("edge.cdn.example.net."),
                    60,
                    RData::A(A("192.0.2.7".parse().unwrap())),
                ),
                Record::from_rdata(
                    name("edge.cdn.example.net."),
                    60,
                    RData::AAAA(AAAA("2001:db8::7".parse().unwrap())),
                ),
                // Not on the chain: left out.
                Record::from_rdata(name("other.example."), 60, RData::A(A("192.0.2.99".parse().unwrap()))),
                Record::from_rdata(name("edge.cdn.example.net."), 60, RData::TXT(TXT::new(vec!["x".into()]))),
            ],
        );
        let walked = walk(&answer, &q);
        assert_eq!(walked.targets().collect::<Vec<_>>(), ["edge.cdn.example.net"]);
        assert_eq!(walked.addrs.len(), 1);
        assert_eq!(walked.addrs[0].1, "192.0.2.7".parse::<IpAddr>().unwrap());
        let bytes = response(&q, ResponseCode::NoError, Some((&walked, &[30])), true);
        let out = Message::from_vec(&bytes).unwrap();
        assert_eq!(out.metadata.id, 4242);
        assert_eq!(out.answers.len(), 2);
        assert!(out.answers.iter().all(|r| r.ttl == 30), "no record outlives its grant: {:?}", out.answers);
    }

    #[test]
    fn a_chain_longer_than_allowed_gives_nothing() {
        let q = question(&ask("n0.example", RecordType::A)).unwrap();
        let links: Vec<Record> = (0..10)
            .map(|i| {
                Record::from_rdata(
                    name(&format!("n{i}.example.")),
                    60,
                    RData::CNAME(CNAME(name(&format!("n{}.example.", i + 1)))),
                )
            })
            .collect();
        assert_eq!(walk(&upstream(&q, links), &q), Walked::default());
    }

    #[test]
    fn an_answer_too_large_for_udp_is_truncated() {
        let q = question(&ask("api.example.com", RecordType::A)).unwrap();
        let addrs: Vec<(Name, IpAddr, u32)> =
            (0..60).map(|i| (name("api.example.com."), IpAddr::from([192, 0, 2, i]), 60)).collect();
        let walked = Walked { cnames: vec![], addrs };
        let ttls = vec![60; 60];
        let udp =
            Message::from_vec(&response(&q, ResponseCode::NoError, Some((&walked, &ttls)), true)).unwrap();
        assert!(udp.metadata.truncation && udp.answers.is_empty());
        let tcp =
            Message::from_vec(&response(&q, ResponseCode::NoError, Some((&walked, &ttls)), false)).unwrap();
        assert_eq!(tcp.answers.len(), 60);
    }
}
