use ztseg_common::rule::{PROTO_TCP, PROTO_UDP};

use super::*;
use crate::dns::fake_map::FakeMap;
use crate::{
    dataplane::Verdict,
    policy::{NameGrant, NamePattern, PortRange, Protos},
};

const S: u64 = 1_000_000_000;
const CG: u64 = 77;

fn limits() -> Limits {
    Limits {
        ttl_min_ns: 5 * S,
        ttl_max_ns: 300 * S,
        max_names: 4,
        max_addresses: 8,
        wildcard_names: 2,
        wildcard_window_ns: 60 * S,
    }
}

fn grant(pattern: &str, verdict: Verdict, rule_id: u32, ports: Ports, protos: Protos) -> NameGrant {
    NameGrant { pattern: NamePattern::parse(pattern).unwrap(), verdict, rule_id, ports, protos }
}

fn port(p: u16) -> Ports {
    Ports::Ranges(vec![PortRange { lo: p, hi: p }])
}

fn origins() -> Vec<String> {
    (0..4).map(|i| format!("tool:t#{i}")).collect()
}

/// api.example.com tcp 443; *.example.com any port tcp+udp; evil.example.com denied.
fn rules() -> Arc<NameRules> {
    NameRules::new(
        vec![
            grant("api.example.com", Verdict::Allow, 0, port(443), Protos::Tcp),
            grant("*.example.com", Verdict::Allow, 1, Ports::All, Protos::TcpUdp),
            grant("evil.example.com", Verdict::Deny, 2, Ports::All, Protos::TcpUdp),
        ],
        &origins(),
    )
}

fn table() -> Arc<TableInfo> {
    Arc::new(TableInfo { origins: Arc::new(origins()), op: None, jti: "j1".into() })
}

fn store() -> (Store, FakeMap) {
    let map = FakeMap::default();
    let mut store = Store::new(Box::new(map.clone()), limits()).unwrap();
    store.register(CG, 3, "alpha", 61184);
    store.regrant(CG, rules(), 1000 * S, table());
    (store, map)
}

fn addr(a: &str) -> IpAddr {
    a.parse().unwrap()
}

#[test]
fn an_answer_is_written_per_address_port_and_protocol_with_its_clamped_ttl() {
    let (mut store, map) = store();
    let now = 10 * S;
    let admitted = store.admit(3, "api.example.com", now).unwrap();
    // The exact rule and the wildcard both allow it; no budget (an exact rule allows it).
    assert_eq!(admitted.grants, [0, 1]);
    let installed = store
        .install(&admitted, "api.example.com", &[(addr("192.0.2.1"), 1), (addr("2001:db8::1"), 3600)], now)
        .unwrap();
    // TTL 1 is granted for the 5 s minimum (the agent is told 1); 3600 for the 300 s maximum.
    assert_eq!(installed.ttls, [1, 300]);
    assert_eq!(installed.rule_id, 0);
    let tcp443 = map.get(CG, "192.0.2.1", PROTO_TCP, 443).unwrap();
    assert_eq!((tcp443.expires_ns, tcp443.rule_id), (now + 5 * S, 0));
    assert_eq!(map.get(CG, "192.0.2.1", PROTO_TCP, 0).unwrap().rule_id, 1);
    assert_eq!(map.get(CG, "192.0.2.1", PROTO_UDP, 0).unwrap().rule_id, 1);
    assert_eq!(map.get(CG, "2001:db8::1", PROTO_TCP, 443).unwrap().expires_ns, now + 300 * S);
    assert_eq!(map.len(), 6);
    // IPv4-mapped answers are IPv4 entries (the kernel judges them as IPv4).
    store.install(&admitted, "api.example.com", &[(addr("::ffff:192.0.2.1"), 60)], now).unwrap();
    assert_eq!(map.get(CG, "192.0.2.1", PROTO_TCP, 443).unwrap().expires_ns, now + 60 * S);
    assert_eq!(map.len(), 6);
    // Never past the token's deadline.
    let late = store.install(&admitted, "api.example.com", &[(addr("192.0.2.1"), 300)], 998 * S).unwrap();
    assert_eq!(late.ttls, [2]);
    assert_eq!(map.get(CG, "192.0.2.1", PROTO_TCP, 443).unwrap().expires_ns, 1000 * S);
}

#[test]
fn names_without_an_allow_are_refused_before_anything_is_asked() {
    let (mut store, _) = store();
    let now = 10 * S;
    let refused = |s: &mut Store, name: &str| s.admit(3, name, now).unwrap_err();
    assert_eq!(refused(&mut store, "attacker.test").reason, reason::NO_RULE);
    assert_eq!(refused(&mut store, "a.b.example.com").reason, reason::NO_RULE, "one label only");
    let denied = refused(&mut store, "evil.example.com");
    assert_eq!((denied.reason, denied.rule_id), (reason::FORBIDDEN, Some(2)));
    assert_eq!(refused(&mut store, "x.evil.example.com").reason, reason::FORBIDDEN, "and below it");
    assert_eq!(store.admit(9, "api.example.com", now).unwrap_err().reason, reason::UNREGISTERED);
    assert_eq!(store.admit(3, "api.example.com", 1000 * S).unwrap_err().reason, reason::EXPIRED);
    store.withdraw(CG);
    assert_eq!(refused(&mut store, "api.example.com").reason, reason::NO_TOKEN);
}

#[test]
fn a_wildcard_carries_only_its_budget_of_distinct_names_per_window() {
    let (mut store, _) = store();
    let now = 10 * S;
    assert!(store.admit(3, "a.example.com", now).is_ok());
    assert!(store.admit(3, "b.example.com", now).is_ok());
    assert!(store.admit(3, "a.example.com", now).is_ok(), "a name already counted is free");
    let over = store.admit(3, "c.example.com", now).unwrap_err();
    assert_eq!((over.reason, over.rule_id), (dns_reason::BUDGET, Some(1)));
    // An exact rule's name is not the wildcard's to budget.
    assert!(store.admit(3, "api.example.com", now).is_ok());
    // The next window starts afresh.
    assert!(store.admit(3, "c.example.com", now + 60 * S).is_ok());
}

#[test]
fn an_agent_holds_at_most_its_names_and_addresses_and_expired_ones_make_room() {
    let (mut store, map) = store();
    let now = 10 * S;
    let admitted = store.admit(3, "api.example.com", now).unwrap();
    // 3 entries per address (tcp 443, tcp and udp every port): 2 addresses fit in 8, 3 do not.
    let three = [(addr("192.0.2.1"), 60), (addr("192.0.2.2"), 60), (addr("192.0.2.3"), 60)];
    let full = store.install(&admitted, "api.example.com", &three, now).unwrap_err();
    assert_eq!(full.reason, dns_reason::FULL);
    assert_eq!(map.len(), 0, "nothing of a refused answer is written");
    store.install(&admitted, "api.example.com", &three[..2], now).unwrap();
    assert_eq!(map.len(), 6);
    // Once those expired, there is room again.
    let later = now + 61 * S;
    store.install(&admitted, "api.example.com", &three[2..], later).unwrap();
    assert_eq!(map.len(), 3);
    // Names: 4 at most.
    let mut names = 0;
    for name in ["w.example.com", "x.example.com"] {
        let a = store.admit(3, name, later).unwrap();
        store.install(&a, name, &[(addr("192.0.2.4"), 60)], later).unwrap();
        names += 1;
    }
    assert_eq!(names, 2);
    store.sweep(later);
    assert_eq!(store.totals().0, 3);
}

#[test]
fn a_failed_write_undoes_the_install_and_is_refused() {
    let (mut store, map) = store();
    let now = 10 * S;
    let admitted = store.admit(3, "api.example.com", now).unwrap();
    map.0.lock().unwrap().fail_after = Some(2);
    let refused = store.install(&admitted, "api.example.com", &[(addr("192.0.2.1"), 60)], now).unwrap_err();
    assert_eq!(refused.reason, dns_reason::INSTALL);
    assert_eq!(map.len(), 0);
    map.0.lock().unwrap().fail_after = None;
    store.install(&admitted, "api.example.com", &[(addr("192.0.2.1"), 60)], now).unwrap();
    assert_eq!(map.len(), 3);
}

#[test]
fn a_new_grant_moves_or_drops_what_the_names_granted_before_the_switch() {
    let (mut store, map) = store();
    let now = 10 * S;
    for name in ["api.example.com", "www.example.com"] {
        let a = store.admit(3, name, now).unwrap();
        store.install(&a, name, &[(addr("192.0.2.1"), 60)], now).unwrap();
    }
    assert_eq!(map.len(), 3);
    // api.example.com now on 8443 only, the wildcard gone, www denied.
    let narrower = NameRules::new(
        vec![
            grant("api.example.com", Verdict::Allow, 0, port(8443), Protos::Tcp),
            grant("www.example.com", Verdict::Deny, 1, Ports::All, Protos::TcpUdp),
        ],
        &origins(),
    );
    store.regrant(CG, narrower.clone(), 1000 * S, table());
    assert_eq!(map.len(), 1);
    assert!(map.get(CG, "192.0.2.1", PROTO_TCP, 8443).is_some());
    assert_eq!(store.totals(), (1, 1));
    // An answer in flight under the old rules is judged under the new ones.
    let stale = store.admit(3, "api.example.com", now).unwrap();
    store.regrant(CG, NameRules::new(vec![], &[]), 1000 * S, table());
    assert_eq!(map.len(), 0);
    let refused = store.install(&stale, "api.example.com", &[(addr("192.0.2.1"), 60)], now).unwrap_err();
    assert_eq!(refused.reason, reason::NO_RULE);
    let _ = narrower;
}

#[test]
fn a_restart_keeps_entries_whose_rule_is_unchanged_and_drops_the_rest() {
    let (mut store, map) = store();
    let now = 10 * S;
    let a = store.admit(3, "api.example.com", now).unwrap();
    store.install(&a, "api.example.com", &[(addr("192.0.2.1"), 60)], now).unwrap();
    // An entry of an agent that is gone.
    map.clone()
        .write(
            &key(99, addr("192.0.2.7"), PROTO_TCP, 0),
            &LearnedValue { expires_ns: now + S, rule_id: 0, check: 1 },
        )
        .unwrap();
    drop(store);
    // The daemon starts again: the agent comes back with the wildcard rule changed.
    let mut again = Store::new(Box::new(map.clone()), limits()).unwrap();
    again.register(CG, 3, "alpha", 61184);
    again.forget_strangers();
    assert_eq!(map.len(), 3, "the stranger's entry is gone");
    let changed = NameRules::new(
        vec![
            grant("api.example.com", Verdict::Allow, 0, port(443), Protos::Tcp),
            grant("*.example.com", Verdict::Allow, 1, port(80), Protos::Tcp),
        ],
        &origins(),
    );
    again.regrant(CG, changed, 1000 * S, table());
    assert_eq!(map.len(), 1);
    assert_eq!(map.get(CG, "192.0.2.1", PROTO_TCP, 443).unwrap().expires_ns, now + 60 * S);
}

#[test]
fn answers_never_grant_this_host_link_local_or_multicast() {
    for a in [
        "127.0.0.1",
        "127.53.0.1",
        "0.0.0.0",
        "169.254.169.254",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "ff02::1",
        "::ffff:127.0.0.1",
    ] {
        assert!(forbidden_answer(addr(a)), "{a}");
    }
    for a in ["192.0.2.1", "10.0.0.1", "2001:db8::1", "fd00::1"] {
        assert!(!forbidden_answer(addr(a)), "{a}");
    }
}
