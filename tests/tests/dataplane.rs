//! The kernel dataplane against the real kernel: real programs, real cgroups, real sockets in
//! network namespaces these tests create. Run as root, one test at a time (`cargo xtask test`).
//!
//! Every "denied" has a positive control: the same operation from a process outside the agents'
//! root succeeds, so EPERM means enforcement and not a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{fs, path::Path, thread};

use aya::maps::{Array, MapData, MapInfo, MapType, PerCpuHashMap};
use ztseg::{
    clock::boot_now_ns,
    dataplane::{Dataplane, DataplaneError, Entry, Verdict},
};
use ztseg_common::{
    agent::AgentState,
    event::{AgentCounts, AgentStats, UNREGISTERED_SLOT},
    maps::MAX_AGENTS,
    rule::{PROTO_TCP, PROTO_UDP, Rule4, RuleValue, TABLE_NO_EVERY_PORT, VERDICT_ALLOW, VERDICT_DENY},
};
use ztseg_integration::{At, Netns, Site, loop_counts, probe, probe_loop, serve};

const HOUR_NS: u64 = 3_600_000_000_000;

fn rule(net: &str, proto: u8, port: u16, verdict: Verdict, rule_id: u32) -> Entry {
    Entry { net: net.parse().unwrap(), proto, port, inbound: false, verdict, rule_id }
}

fn allow(net: &str, proto: u8, port: u16) -> Entry {
    rule(net, proto, port, Verdict::Allow, 0)
}

/// A namespace with two IPv4 and two IPv6 "hosts" on its loopback, each listening on 8001/8002.
fn two_hosts() -> (Netns, ztseg_integration::Proc) {
    let ns = Netns::new(&["10.77.0.1/32", "10.77.0.2/32", "fd77::1/128", "fd77::2/128"]);
    let server = serve(
        &ns,
        &[
            "10.77.0.1:8001",
            "10.77.0.1:8002",
            "10.77.0.2:8001",
            "10.77.0.2:8002",
            "[fd77::1]:8001",
            "[fd77::1]:8002",
            "[fd77::2]:8001",
            "[fd77::2]:8002",
            "127.0.0.1:8001",
        ],
    );
    (ns, server)
}

fn start(site: &Site) -> Dataplane {
    Dataplane::start(&site.pin_dir, &site.root).unwrap().0
}

/// Runs `ops` inside the agent cgroup and from outside the root, and returns both outcomes.
fn inside_and_outside(ns: &Netns, cgroup: &Path, ops: &[&str]) -> (Vec<String>, Vec<String>) {
    let inside = probe(At { netns: ns, cgroup: Some(cgroup) }, ops);
    let outside = probe(At { netns: ns, cgroup: None }, ops);
    (inside, outside)
}

#[test]
fn a_connected_udp_send_with_a_traffic_class_is_judged_at_its_peer_over_v4_v6_and_v4_mapped() {
    // The kernel runs the sendmsg hook with no address for such a send (see the probe's
    // `udp-connect-tos`): it goes to the connected peer, judged at the connect.
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    let deadline = boot_now_ns() + HOUR_NS;
    dp.grant(id, &[allow("10.77.0.1/32", PROTO_UDP, 8001), allow("fd77::1/128", PROTO_UDP, 8001)], deadline)
        .unwrap();
    let ops = [
        "udp-connect-tos:10.77.0.1:8001",
        "udp-connect-tos:[fd77::1]:8001",
        "udp-connect-tos:[::ffff:10.77.0.1]:8001",
        "udp-connect-tos:10.77.0.1:8002",
        "udp-connect-tos:[fd77::1]:8002",
    ];
    let (inside, outside) = inside_and_outside(&ns, &agent, &ops);
    assert_eq!(outside, ["ok"; 5]);
    assert_eq!(inside, ["ok", "ok", "ok", "EPERM", "EPERM"]);
}

#[test]
fn only_the_allowed_destination_is_reachable_over_v4_v6_and_v4_mapped() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    let deadline = boot_now_ns() + HOUR_NS;
    dp.grant(id, &[allow("10.77.0.1/32", PROTO_TCP, 8001), allow("fd77::1/128", PROTO_TCP, 8001)], deadline)
        .unwrap();

    let allowed = ["tcp:10.77.0.1:8001", "tcp:[fd77::1]:8001", "tcp:[::ffff:10.77.0.1]:8001"];
    let (inside, outside) = inside_and_outside(&ns, &agent, &allowed);
    assert_eq!(inside, ["ok"; 3]);
    assert_eq!(outside, ["ok"; 3]);

    let denied = [
        // another address, every way to reach it
        "tcp:10.77.0.2:8001",
        "udp-sendto:10.77.0.2:8001",
        "udp-connect:10.77.0.2:8001",
        "tcp:[fd77::2]:8001",
        "udp-sendto:[fd77::2]:8001",
        "udp-connect:[fd77::2]:8001",
        "tcp:[::ffff:10.77.0.2]:8001",
        "udp-sendto:[::ffff:10.77.0.2]:8001",
        "udp-connect:[::ffff:10.77.0.2]:8001",
        // the allowed address on another port, or over UDP
        "tcp:10.77.0.1:8002",
        "tcp:[fd77::1]:8002",
        "tcp:[::ffff:10.77.0.1]:8002",
        "udp-sendto:10.77.0.1:8001",
        // 0.0.0.0 and :: reach this host's loopback
        "tcp:0.0.0.0:8001",
        "tcp:[::ffff:0.0.0.0]:8001",
        "tcp:127.0.0.1:8001",
    ];
    let (inside, outside) = inside_and_outside(&ns, &agent, &denied);
    for (op, (i, o)) in denied.iter().zip(inside.iter().zip(&outside)) {
        assert_eq!(i, "EPERM", "{op} from the agent");
        assert_eq!(o, "ok", "{op} from outside the root (positive control)");
    }
}

#[test]
fn a_deny_beats_an_overlapping_allow() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    let rules = [
        // every port of the /24, but not 10.77.0.2:8001
        allow("10.77.0.0/24", PROTO_TCP, 0),
        rule("10.77.0.2/32", PROTO_TCP, 8001, Verdict::Deny, 1),
        // a specific allow under a broader every-port deny
        allow("fd77::1/128", PROTO_TCP, 8001),
        rule("fd77::/64", PROTO_TCP, 0, Verdict::Deny, 2),
        // a specific allow under a broader deny of the same port
        allow("fd77::2/128", PROTO_TCP, 8002),
        rule("fd77::/112", PROTO_TCP, 8002, Verdict::Deny, 3),
    ];
    dp.grant(id, &rules, boot_now_ns() + HOUR_NS).unwrap();
    let ops = [
        "tcp:10.77.0.1:8001",
        "tcp:10.77.0.2:8002",
        "tcp:10.77.0.2:8001",
        "tcp:[fd77::1]:8001",
        "tcp:[fd77::2]:8002",
    ];
    let (inside, outside) = inside_and_outside(&ns, &agent, &ops);
    assert_eq!(inside, ["ok", "ok", "EPERM", "EPERM", "EPERM"]);
    assert_eq!(outside, ["ok"; 5]);
}

#[test]
fn a_table_without_every_port_entries_skips_that_bucket_and_an_unmarked_table_is_asked_both() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002"];

    // Port rules only: the table is marked and judged by its port bucket.
    let granted = dp.grant(id, &[allow("10.77.0.1/32", PROTO_TCP, 8001)], boot_now_ns() + HOUR_NS).unwrap();
    assert_ne!(granted.table & TABLE_NO_EVERY_PORT, 0, "table {:#x}", granted.table);
    let (inside, outside) = inside_and_outside(&ns, &agent, &ops);
    assert_eq!((inside, outside), (vec!["ok".to_owned(), "EPERM".to_owned()], vec!["ok".to_owned(); 2]));

    // An every-port rule: the table is not marked, and that bucket decides.
    let rules =
        [allow("10.77.0.1/32", PROTO_TCP, 0), rule("10.77.0.1/32", PROTO_TCP, 8001, Verdict::Deny, 1)];
    let granted = dp.grant(id, &rules, boot_now_ns() + HOUR_NS).unwrap();
    assert_eq!(granted.table & TABLE_NO_EVERY_PORT, 0, "table {:#x}", granted.table);
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&agent) }, &ops), ["EPERM", "ok"]);

    // A table written before the mark existed (so unmarked) with an every-port deny over a port
    // allow: the deny still holds. Written straight into the pinned maps, as an older daemon
    // left it.
    let legacy: u32 = 0x00ab_cdef;
    let rules_v4 = aya::maps::MapData::from_pin(site.pin_dir.join("rules_v4")).unwrap();
    let mut rules_v4: aya::maps::LpmTrie<_, Rule4, RuleValue> =
        aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(rules_v4)).unwrap();
    let key = |port: u16| {
        aya::maps::lpm_trie::Key::new(
            Rule4::EXACT,
            Rule4::new(legacy, PROTO_TCP, port.to_be_bytes(), [10, 77, 0, 1]),
        )
    };
    rules_v4.insert(&key(8001), RuleValue::new(0, VERDICT_ALLOW), 0).unwrap();
    rules_v4.insert(&key(0), RuleValue::new(1, VERDICT_DENY), 0).unwrap();
    let agents = aya::maps::MapData::from_pin(site.pin_dir.join("agents")).unwrap();
    let mut agents: aya::maps::HashMap<_, u64, AgentState> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(agents)).unwrap();
    let state = agents.get(&id, 0).unwrap();
    agents.insert(id, AgentState { table: legacy, ..state }, 0).unwrap();
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&agent) }, &ops), ["EPERM", "EPERM"]);
    // Positive control: without the every-port deny, the port allow of that table lets 8001 in.
    rules_v4.remove(&key(0)).unwrap();
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&agent) }, &ops), ["ok", "EPERM"]);
    rules_v4.remove(&key(8001)).unwrap();
}

#[test]
fn a_pinned_table_mislabelled_as_having_no_every_port_entry_is_withdrawn_at_start() {
    // A daemon that does not know the mark (an older one) may write every-port entries into a
    // table whose id carries it; these programs would skip its every-port denies.
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let (agent, id) = site.cgroup("agent");
    let mislabelled: u32 = TABLE_NO_EVERY_PORT | 0x00ab_cdef;
    {
        let mut dp = start(&site);
        dp.register(id).unwrap();
        dp.grant(id, &[allow("10.77.0.2/32", PROTO_TCP, 8001)], boot_now_ns() + HOUR_NS).unwrap();
        let rules_v4 = aya::maps::MapData::from_pin(site.pin_dir.join("rules_v4")).unwrap();
        let mut rules_v4: aya::maps::LpmTrie<_, Rule4, RuleValue> =
            aya::maps::LpmTrie::try_from(aya::maps::Map::LpmTrie(rules_v4)).unwrap();
        let key = |port: u16| {
            aya::maps::lpm_trie::Key::new(
                Rule4::EXACT,
                Rule4::new(mislabelled, PROTO_TCP, port.to_be_bytes(), [10, 77, 0, 1]),
            )
        };
        rules_v4.insert(&key(8001), RuleValue::new(0, VERDICT_ALLOW), 0).unwrap();
        rules_v4.insert(&key(0), RuleValue::new(1, VERDICT_DENY), 0).unwrap();
        let agents = aya::maps::MapData::from_pin(site.pin_dir.join("agents")).unwrap();
        let mut agents: aya::maps::HashMap<_, u64, AgentState> =
            aya::maps::HashMap::try_from(aya::maps::Map::HashMap(agents)).unwrap();
        let state = agents.get(&id, 0).unwrap();
        agents.insert(id, AgentState { table: mislabelled, ..state }, 0).unwrap();
        // The hole this guards against: these programs skip the every-port deny.
        assert_eq!(probe(At { netns: &ns, cgroup: Some(&agent) }, &["tcp:10.77.0.1:8001"]), ["ok"]);
    }
    let dp = start(&site);
    let state = dp.agent(id).unwrap().unwrap();
    assert_eq!((state.table, state.deadline_ns), (0, 0), "{state:?}");
    assert_eq!(pinned_entries(&site, "rules_v4"), 0);
    let (inside, outside) = inside_and_outside(&ns, &agent, &["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001"]);
    assert_eq!((inside, outside), (vec!["EPERM".to_owned(); 2], vec!["ok".to_owned(); 2]));
}

#[test]
fn replaced_tables_are_deleted_in_steps_oldest_first_and_the_one_in_force_stays() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    let rules = [
        allow("10.77.0.1/32", PROTO_TCP, 8001),
        allow("10.77.0.2/32", PROTO_TCP, 8001),
        allow("10.77.0.3/32", PROTO_TCP, 8001),
    ];
    for _ in 0..5 {
        dp.grant(id, &rules, boot_now_ns() + HOUR_NS).unwrap();
    }
    // Four replaced tables of three entries each, and the one in force.
    assert_eq!(pinned_entries(&site, "rules_v4"), 15);
    let barrier = dp.reclaim_barrier().unwrap();
    barrier.wait().unwrap();
    assert!(dp.finish_reclaim_some(&barrier, 6), "two tables fit a step of 6 entries");
    assert_eq!(pinned_entries(&site, "rules_v4"), 9);
    assert!(dp.finish_reclaim_some(&barrier, 1), "a step deletes at least one table");
    assert_eq!(pinned_entries(&site, "rules_v4"), 6);
    assert!(!dp.finish_reclaim_some(&barrier, 100), "nothing left");
    assert_eq!(pinned_entries(&site, "rules_v4"), 3);
    // The table in force was never touched.
    assert_eq!(
        probe(At { netns: &ns, cgroup: Some(&agent) }, &["tcp:10.77.0.1:8001", "tcp:10.77.0.1:8002"]),
        ["ok", "EPERM"]
    );
}

#[test]
fn an_unregistered_cgroup_under_the_root_gets_nothing() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (_agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    dp.grant(id, &[allow("10.77.0.1/32", PROTO_TCP, 8001)], boot_now_ns() + HOUR_NS).unwrap();
    let (stranger, _) = site.cgroup("stranger");
    // A TCP socket is created (the hook lets every TCP or UDP socket through unjudged: it
    // reaches nothing by itself) and refused at its connect; a raw socket at its creation.
    let ops = ["tcp:10.77.0.1:8001", "udp-sendto:10.77.0.1:8001", "raw4", "tcp4-socket"];
    let (inside, outside) = inside_and_outside(&ns, &stranger, &ops);
    assert_eq!(inside, ["EPERM", "EPERM", "EPERM", "ok"]);
    assert_eq!(outside, ["ok"; 4]);
}

#[test]
fn one_agents_rules_grant_nothing_to_another() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (a, a_id) = site.cgroup("agent-a");
    let (b, b_id) = site.cgroup("agent-b");
    dp.register(a_id).unwrap();
    dp.register(b_id).unwrap();
    let deadline = boot_now_ns() + HOUR_NS;
    dp.grant(a_id, &[allow("10.77.0.1/32", PROTO_TCP, 8001)], deadline).unwrap();
    dp.grant(b_id, &[allow("10.77.0.2/32", PROTO_TCP, 8001)], deadline).unwrap();
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001"];
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&a) }, &ops), ["ok", "EPERM"]);
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&b) }, &ops), ["EPERM", "ok"]);
    assert_eq!(probe(At { netns: &ns, cgroup: None }, &ops), ["ok", "ok"]);
}

#[test]
fn rights_lapse_at_the_deadline_with_no_userspace_action() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let (agent, id) = site.cgroup("agent");
    let deadline = {
        let mut dp = start(&site);
        dp.register(id).unwrap();
        let deadline = boot_now_ns() + 1_500_000_000;
        dp.grant(id, &[allow("10.77.0.1/32", PROTO_TCP, 8001)], deadline).unwrap();
        deadline
        // The dataplane is dropped here: no daemon runs from now on.
    };
    let out = std::process::Command::new(ztseg_integration::probe_bin())
        .arg("--netns")
        .arg(ns.path())
        .arg("--cgroup")
        .arg(&agent)
        .args(["until-denied", "tcp:10.77.0.1:8001"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("first ok"), "{text}");
    let fields: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(fields[0], "last-ok-started", "{text}");
    let (last_ok, denied) = (fields[1].parse::<u64>().unwrap(), fields[3].parse::<u64>().unwrap());
    assert!(last_ok < deadline, "allowed after the deadline: {last_ok} >= {deadline}");
    assert!(denied >= deadline, "denied before the deadline: {denied} < {deadline}");
    assert_eq!(probe(At { netns: &ns, cgroup: None }, &["tcp:10.77.0.1:8001"]), ["ok"]);
}

#[test]
fn the_kill_flag_refuses_everything_until_revived() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    dp.grant(
        id,
        &[allow("10.77.0.1/32", PROTO_TCP, 8001), allow("10.77.0.1/32", PROTO_UDP, 8001)],
        boot_now_ns() + HOUR_NS,
    )
    .unwrap();
    let ops = ["tcp:10.77.0.1:8001", "udp-sendto:10.77.0.1:8001", "udp-connect:10.77.0.1:8001"];
    let at = At { netns: &ns, cgroup: Some(&agent) };
    assert_eq!(probe(at, &ops), ["ok"; 3]);
    dp.set_killed(id, true).unwrap();
    assert_eq!(probe(at, &ops), ["EPERM"; 3]);
    assert_eq!(probe(At { netns: &ns, cgroup: None }, &ops), ["ok"; 3]);
    dp.set_killed(id, false).unwrap();
    assert_eq!(probe(at, &ops), ["ok"; 3]);
}

#[test]
fn a_reclaimed_table_id_is_never_handed_out_again() {
    // Decision records name the table that decided them; the daemon attributes a record to that
    // table's token. A reused id would credit an old decision still in the ring to a new token.
    let site = Site::new();
    let mut dp = start(&site);
    let (_agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    let rules = [allow("10.77.0.1/32", PROTO_TCP, 8001)];
    let mut seen = Vec::new();
    for _ in 0..4 {
        let granted = dp.grant(id, &rules, boot_now_ns() + HOUR_NS).unwrap();
        // The replaced table is deleted now, so its id would be free for reuse.
        dp.reclaim().unwrap();
        seen.push(granted.table);
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "table ids reused: {seen:?}");
}

#[test]
fn replacing_a_rule_set_under_a_connect_loop_never_gaps_or_leaks() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    let deadline = boot_now_ns() + HOUR_NS;
    // Both sets allow :8001 on .1; only A allows .2:8001; neither allows .1:8002.
    let set_a = [allow("10.77.0.1/32", PROTO_TCP, 8001), allow("10.77.0.2/32", PROTO_TCP, 8001)];
    let set_b =
        [allow("10.77.0.0/30", PROTO_TCP, 8001), rule("10.77.0.2/32", PROTO_TCP, 0, Verdict::Deny, 9)];
    dp.grant(id, &set_a, deadline).unwrap();
    // Closed with a reset: tens of thousands of connects to one destination in TIME_WAIT would
    // use up the ephemeral ports (EADDRNOTAVAIL, counted as `other`) on a fast machine.
    let looping = probe_loop(
        At { netns: &ns, cgroup: Some(&agent) },
        &["tcp-rst:10.77.0.1:8001", "tcp-rst:10.77.0.1:8002", "tcp-rst:10.77.0.2:8001"],
    );
    let mut switches = 0;
    for round in 0..300 {
        let set: &[Entry] = if round % 2 == 0 { &set_b } else { &set_a };
        // As the daemon does: the grace period for tables replaced so far is taken before the
        // next switch and waited out after it, so old tables are deleted (and their ids reused)
        // while connects run, and never the one this switch just retired.
        let barrier = dp.reclaim_barrier();
        dp.grant(id, set, deadline).unwrap();
        if let Some(barrier) = barrier {
            barrier.wait().unwrap();
            dp.finish_reclaim(&barrier);
        }
        switches += 1;
        thread::yield_now();
    }
    let counts = loop_counts(&looping.finish());
    let both = counts["tcp-rst:10.77.0.1:8001"];
    let neither = counts["tcp-rst:10.77.0.1:8002"];
    let only_a = counts["tcp-rst:10.77.0.2:8001"];
    assert_eq!(both.1 + both.2, 0, "a connect both sets allow was refused: {both:?}");
    assert_eq!(neither.0, 0, "a connect neither set allows got through: {neither:?}");
    assert!(both.0 > 0 && only_a.0 + only_a.1 > 0);
    eprintln!("{switches} switches under {} connect rounds: {counts:?}", both.0);

    // A barrier outlived by an inline reclaim and a newer switch deletes nothing it should not.
    let stale = dp.reclaim_barrier().expect("the last switch retired a table");
    dp.grant(id, &set_a, deadline).unwrap();
    dp.reclaim().unwrap();
    dp.grant(id, &set_b, deadline).unwrap();
    stale.wait().unwrap();
    dp.finish_reclaim(&stale);
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&agent) }, &["tcp:10.77.0.1:8001"]), ["ok"]);
    // Once reclaimed, the trie holds the table in force and nothing else.
    dp.reclaim().unwrap();
    assert_eq!(pinned_entries(&site, "rules_v4"), dp.rule_count(id).unwrap());
    assert_eq!(dp.rule_count(id).unwrap(), 2);
}

/// Entries of a pinned map, as stock bpftool dumps them.
fn pinned_entries(site: &Site, map: &str) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(site.pin_dir.join(map))
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    dump.as_array().map_or(0, Vec::len)
}

#[test]
fn a_second_start_adopts_the_pins_and_enforcement_never_lapses() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let (agent, id) = site.cgroup("agent");
    let deadline = boot_now_ns() + HOUR_NS;
    let mut first = start(&site);
    first.register(id).unwrap();
    first.grant(id, &[allow("10.77.0.1/32", PROTO_TCP, 8001)], deadline).unwrap();
    let before = first.agent(id).unwrap().unwrap();

    // While one holds the pins, another start is refused and changes nothing.
    assert!(matches!(Dataplane::start(&site.pin_dir, &site.root), Err(DataplaneError::Busy { .. })));

    let looping = probe_loop(
        At { netns: &ns, cgroup: Some(&agent) },
        &["tcp-rst:10.77.0.1:8001", "tcp-rst:10.77.0.2:8001"],
    );
    drop(first);
    let (mut second, report) = Dataplane::start(&site.pin_dir, &site.root).unwrap();
    assert_eq!(report.links_updated, ztseg::dataplane::program_names().count());
    assert_eq!(report.links_created, 0);
    assert_eq!(report.agents_adopted, 1);
    assert_eq!(second.agent(id).unwrap(), Some(before));
    assert_eq!(second.rule_count(id).unwrap(), 1);
    // The adopted state is writable: a new grant through the second start takes effect.
    second
        .grant(
            id,
            &[allow("10.77.0.1/32", PROTO_TCP, 8001), allow("10.77.0.1/32", PROTO_TCP, 8002)],
            deadline,
        )
        .unwrap();
    let counts = loop_counts(&looping.finish());
    assert_eq!(counts["tcp-rst:10.77.0.1:8001"].1 + counts["tcp-rst:10.77.0.1:8001"].2, 0, "{counts:?}");
    assert_eq!(counts["tcp-rst:10.77.0.2:8001"].0, 0, "{counts:?}");
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&agent) }, &["tcp:10.77.0.1:8002"]), ["ok"]);
}

/// `bpftool map lookup` of one `stats` slot: the named fields of each CPU's copy, summed.
fn bpftool_stats(site: &Site, slot: u32) -> (usize, AgentCounts) {
    let key: Vec<String> = slot.to_le_bytes().iter().map(|b| b.to_string()).collect();
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(site.pin_dir.join("stats"))
        .arg("key")
        .args(&key)
        .output()
        .expect("run bpftool");
    assert!(out.status.success(), "bpftool: {}", String::from_utf8_lossy(&out.stderr));
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cpus = dump["formatted"]["values"].as_array().unwrap_or_else(|| panic!("no named fields: {dump}"));
    let field = |v: &serde_json::Value, name: &str| v["value"][name].as_u64().unwrap();
    let each: Vec<AgentStats> = cpus
        .iter()
        .map(|v| AgentStats {
            passed_written: field(v, "passed_written"),
            denied_written: field(v, "denied_written"),
            passed_summarised: field(v, "passed_summarised"),
            denied_summarised: field(v, "denied_summarised"),
            denied_dropped: field(v, "denied_dropped"),
            unrecorded: field(v, "unrecorded"),
            passed_quiet: field(v, "passed_quiet"),
            denied_quiet: field(v, "denied_quiet"),
            ..AgentStats::default()
        })
        .collect();
    (each.len(), AgentStats::total(&each))
}

/// An upgrade over the pins of a version whose `stats` was a plain array: the counters map is
/// replaced by a per-CPU one (counts restart), enforcement maps are adopted, and the new map
/// counts decisions and reads back through bpftool.
#[test]
fn a_stats_array_pinned_by_an_older_version_is_replaced_and_counts_again() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let (agent, id) = site.cgroup("agent");
    fs::create_dir_all(&site.pin_dir).unwrap();
    let pin = site.pin_dir.join("stats");
    {
        let mut old = Array::<MapData, AgentStats>::create(MAX_AGENTS + 1, 0).unwrap();
        let stale = AgentStats { denied_written: 1000, ..AgentStats::default() };
        old.set(UNREGISTERED_SLOT, stale, 0).unwrap();
        old.pin(&pin).unwrap();
    }
    assert_eq!(MapInfo::from_pin(&pin).unwrap().map_type().unwrap(), MapType::Array);

    let (mut dp, report) = Dataplane::start(&site.pin_dir, &site.root).unwrap();
    assert_eq!(report.counters_replaced, ["stats"]);
    assert_eq!(MapInfo::from_pin(&pin).unwrap().map_type().unwrap(), MapType::PerCpuArray);
    assert_eq!(dp.stats(UNREGISTERED_SLOT).unwrap(), AgentCounts::default(), "the old counts are gone");

    let slot = dp.register(id).unwrap().slot;
    dp.grant(id, &[allow("10.77.0.1/32", PROTO_TCP, 8001)], boot_now_ns() + HOUR_NS).unwrap();
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001", "udp-sendto:10.77.0.2:8001"];
    let (inside, outside) = inside_and_outside(&ns, &agent, &ops);
    assert_eq!(inside, ["ok", "EPERM", "EPERM"]);
    assert_eq!(outside, ["ok"; 3]);
    let counted = dp.stats(slot).unwrap();
    // Three reported decisions (two denied), no record lost; allowed socket creations are
    // neither counted nor recorded.
    assert_eq!((counted.emitted, counted.denied, counted.dropped), (3, 2, 0), "{counted:?}");
    assert_eq!(counted.decisions, 3, "{counted:?}");
    let (cpus, dumped) = bpftool_stats(&site, slot);
    assert_eq!(cpus, aya::util::nr_cpus().unwrap(), "one copy per possible CPU");
    assert_eq!(dumped, counted, "bpftool's per-CPU copies sum to what the daemon reports");

    // The next start adopts the per-CPU map, counts and all.
    drop(dp);
    let (dp, report) = Dataplane::start(&site.pin_dir, &site.root).unwrap();
    assert!(report.counters_replaced.is_empty(), "{report:?}");
    assert_eq!(report.agents_adopted, 1);
    assert_eq!(dp.stats(slot).unwrap(), counted);
}

/// An enforcement map pinned in another type is refused, and nothing is unpinned: not even a
/// counters map that alone would have been replaced.
#[test]
fn an_enforcement_map_pinned_in_another_type_is_refused_and_nothing_is_unpinned() {
    let site = Site::new();
    fs::create_dir_all(&site.pin_dir).unwrap();
    PerCpuHashMap::<MapData, u64, AgentState>::create(MAX_AGENTS, 0)
        .unwrap()
        .pin(site.pin_dir.join("agents"))
        .unwrap();
    Array::<MapData, AgentStats>::create(MAX_AGENTS + 1, 0).unwrap().pin(site.pin_dir.join("stats")).unwrap();
    match Dataplane::start(&site.pin_dir, &site.root) {
        Err(DataplaneError::IncompatiblePin { path, found, expected }) => {
            assert_eq!(path, site.pin_dir.join("agents"));
            assert!(found.starts_with("PerCpuHash,"), "{found}");
            assert!(expected.starts_with("Hash,"), "{expected}");
        }
        Err(e) => panic!("expected IncompatiblePin, got {e}"),
        Ok(_) => panic!("a per-CPU hash pinned as `agents` was adopted"),
    }
    let stats = MapInfo::from_pin(site.pin_dir.join("stats")).unwrap();
    assert_eq!(stats.map_type().unwrap(), MapType::Array, "left in place");
}

#[test]
fn raw_and_unjudged_sockets_are_refused() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    // Ping sockets are open to every group inside this namespace, as on many systemd hosts.
    ns.sysctl("net.ipv4.ping_group_range", "0 2147483647");
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    dp.grant(id, &[allow("10.77.0.1/32", PROTO_TCP, 8001)], boot_now_ns() + HOUR_NS).unwrap();
    let ops = ["raw4", "udplite4", "mptcp4", "ping4", "ping6", "tcp4-socket"];
    let (inside, outside) = inside_and_outside(&ns, &agent, &ops);
    assert_eq!(inside, ["EPERM", "EPERM", "EPERM", "EPERM", "EPERM", "ok"]);
    assert_eq!(outside, ["ok"; 6]);
}

#[test]
fn a_test_host_across_a_veth_link_is_reachable_only_as_granted() {
    let site = Site::new();
    let client = Netns::new(&[]);
    let host = Netns::new(&[]);
    client.veth_to(&host, "10.78.0.1/24", "10.78.0.2/24");
    let _server = serve(&host, &["10.78.0.2:8001", "10.78.0.2:8002"]);
    let mut dp = start(&site);
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    dp.grant(id, &[allow("10.78.0.2/32", PROTO_TCP, 8001)], boot_now_ns() + HOUR_NS).unwrap();
    let ops = ["tcp:10.78.0.2:8001", "tcp:10.78.0.2:8002", "udp-sendto:10.78.0.2:8001"];
    let (inside, outside) = inside_and_outside(&client, &agent, &ops);
    assert_eq!(inside, ["ok", "EPERM", "EPERM"]);
    assert_eq!(outside, ["ok"; 3]);
}

#[test]
fn uninstall_detaches_everything_and_removes_the_pins() {
    let site = Site::new();
    let (ns, _server) = two_hosts();
    let (agent, id) = site.cgroup("agent");
    {
        let mut dp = start(&site);
        dp.register(id).unwrap();
    }
    let at = At { netns: &ns, cgroup: Some(&agent) };
    assert_eq!(probe(at, &["tcp:10.77.0.1:8001"]), ["EPERM"]);
    let report = ztseg::dataplane::uninstall(&site.pin_dir, &site.root).unwrap();
    assert_eq!(report.links_detached, ztseg::dataplane::program_names().count());
    assert_eq!(
        report.links_detached, 12,
        "connect4/6, sendmsg4/6, sock_create, packets_in/out, setsockopt, recvmsg4/6, getpeername4/6"
    );
    assert_eq!(report.maps_unpinned, ztseg::dataplane::pins::PINNED_MAPS.len());
    assert_eq!(
        report.maps_unpinned, 11,
        "agents, rules4/6, events, drops, stats, replies, summaries, summary_epoch, learned, dns_peers"
    );
    assert!(!site.pin_dir.exists());
    // The cgroup was empty, so it is gone too; a process in a fresh cgroup there is unconfined.
    assert!(!agent.exists());
    let (again, _) = site.cgroup("agent");
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&again) }, &["tcp:10.77.0.1:8001"]), ["ok"]);
}
