//! DNS under ztseg's control, against the real kernel: port 53 of an agent goes to the DNS
//! proxy (at the agent's own proxy address) whatever resolver it names, over UDP (connected or
//! not) and TCP, and the agent sees the resolver it asked; addresses the proxy answered are
//! reachable through the `learned` map until they expire; the proxy (the daemon) refuses names
//! no rule allows before any upstream query, and leaks nothing upstream.
//!
//! Every refusal has its positive control: the same query or connect from outside the agents'
//! root, or for an allowed name, goes through.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{fs, path::Path};

use ztseg::{
    clock::boot_now_ns,
    dataplane::{Dataplane, Entry, LoadOptions, Verdict},
};
use ztseg_common::{
    dns::{DnsConfig, FLAG_NAMES, Learned, LearnedValue},
    event::FAMILY_V4,
    rule::PROTO_TCP,
};
use ztseg_integration::{At, Netns, Proc, Site, TempDir, probe, probe_bin, serve};

const HOUR_NS: u64 = 3_600_000_000_000;

/// The proxy network and port the kernel-level tests load the programs with.
const PROXY: DnsConfig = DnsConfig::new([127, 53, 0, 0], 10053);

/// Starts the probe's authoritative DNS server on `addr` inside `ns`, answering from `zone`
/// and logging each query to `log`.
fn dns_server(ns: &Netns, addr: &str, zone: &Path, log: &Path) -> Proc {
    let mut command = std::process::Command::new(probe_bin());
    command.arg("--netns").arg(ns.path()).arg("dns-server").arg(addr).arg(zone).arg(log);
    let mut proc = Proc::spawn(command);
    assert_eq!(proc.line(), "ready");
    proc
}

fn queries(log: &Path) -> Vec<String> {
    fs::read_to_string(log).unwrap_or_default().lines().map(str::to_owned).collect()
}

/// A field (`rcode`, `answers`, `from`, `peer`, `ttl`) of a dns-* op's outcome.
fn field<'a>(outcome: &'a str, key: &str) -> &'a str {
    outcome
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key} in {outcome:?}"))
}

#[test]
fn kernel_sends_port_53_to_the_agents_proxy_address_and_shows_the_resolver_asked() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-dns-kernel");
    let ns = Netns::new(&["10.77.0.1/32", "10.77.0.53/32", "fd77::53/128"]);
    let (zone, log) = (dir.path.join("zone"), dir.path.join("queries"));
    fs::write(&zone, "x.test A 10.77.0.1 60\n").unwrap();
    // Stands in for the daemon's proxy: the first agent's slot (0) has address 127.53.0.1.
    let _proxy = dns_server(&ns, "127.53.0.1:10053", &zone, &log);
    let (mut dp, _) = Dataplane::start_with(&site.pin_dir, &site.root, &LoadOptions { dns: PROXY }).unwrap();
    let (agent, id) = site.cgroup("agent");
    assert_eq!(dp.register(id).unwrap().slot, 0);
    dp.grant(id, &[], boot_now_ns() + HOUR_NS).unwrap();
    let inside = |ops: &[&str]| probe(At { netns: &ns, cgroup: Some(&agent) }, ops);
    let outside = |ops: &[&str]| probe(At { netns: &ns, cgroup: None }, ops);

    // Any resolver the agent names, by any way of asking, reaches the proxy; the answer comes
    // from the resolver asked.
    let asked = inside(&[
        "dns-udp:10.77.0.53:53/x.test/A",
        "dns-conn:10.77.0.53:53/x.test/A",
        "dns-tcp:10.77.0.53:53/x.test/A",
        "dns-udp:192.0.2.1:53/x.test/A",
        "dns-conn:[fd77::53]:53/x.test/A",
        "dns-tcp:[fd77::53]:53/x.test/A",
        "dns-conn:[::ffff:10.77.0.53]:53/x.test/A",
    ]);
    for (outcome, resolver, connected) in [
        (&asked[0], "10.77.0.53:53", false),
        (&asked[1], "10.77.0.53:53", true),
        (&asked[2], "10.77.0.53:53", true),
        (&asked[3], "192.0.2.1:53", false),
        (&asked[4], "[fd77::53]:53", true),
        (&asked[5], "[fd77::53]:53", true),
        (&asked[6], "[::ffff:10.77.0.53]:53", true),
    ] {
        assert_eq!(
            (field(outcome, "rcode"), field(outcome, "answers")),
            ("NoError", "10.77.0.1"),
            "{outcome}"
        );
        assert_eq!(field(outcome, "from"), resolver, "{outcome}");
        assert_eq!(field(outcome, "peer"), if connected { resolver } else { "-" }, "{outcome}");
    }
    assert_eq!(queries(&log).len(), 7, "{:?}", queries(&log));
    // An unconnected IPv6 send cannot be redirected (the kernel refuses the rewrite): refused.
    // Another agent's proxy address, on any port, and its own on another port: refused.
    assert_eq!(
        inside(&[
            "dns-udp:[fd77::53]:53/x.test/A",
            "udp-sendto:127.53.0.2:10053",
            "tcp:127.53.0.2:53",
            "udp-sendto:127.53.0.1:53",
        ]),
        ["EPERM"; 4]
    );
    assert_eq!(queries(&log).len(), 7);
    // Its own proxy address names only itself: a query there is a query like any other.
    let own = inside(&["dns-udp:127.53.0.1:10053/x.test/A"]);
    assert_eq!(field(&own[0], "from"), "127.53.0.1:10053", "{own:?}");
    assert_eq!(queries(&log).len(), 8);
    // Control: outside the agents' root nothing is redirected, and the proxy answers as itself.
    let control = outside(&["dns-udp:127.53.0.1:10053/x.test/A", "dns-udp:10.77.0.53:53/x.test/A"]);
    assert_eq!(field(&control[0], "from"), "127.53.0.1:10053");
    assert_eq!(control[1], "EAGAIN", "nothing serves 10.77.0.53:53 itself");
}

#[test]
fn kernel_allows_a_learned_address_until_it_expires_and_only_with_the_names_flag() {
    let site = Site::new();
    let ns = Netns::new(&["10.77.0.1/32", "10.77.0.2/32"]);
    let _server = serve(&ns, &["10.77.0.1:8001", "10.77.0.2:8001"]);
    let (mut dp, _) = Dataplane::start_with(&site.pin_dir, &site.root, &LoadOptions { dns: PROXY }).unwrap();
    let (agent, id) = site.cgroup("agent");
    dp.register(id).unwrap();
    // 10.77.0.2 is denied by a rule: a learned entry never lifts a deny.
    let deny = Entry {
        net: "10.77.0.2/32".parse().unwrap(),
        proto: PROTO_TCP,
        port: 8001,
        inbound: false,
        verdict: Verdict::Deny,
        rule_id: 0,
    };
    dp.grant(id, &[deny], boot_now_ns() + HOUR_NS).unwrap();
    let mut learned = dp.take_learned().unwrap();
    let key = |addr: [u8; 4]| Learned {
        cgroup_id: id,
        addr: [u32::from_ne_bytes(addr), 0, 0, 0],
        port: 8001u16.to_be_bytes(),
        family: FAMILY_V4,
        proto: PROTO_TCP,
        _pad: 0,
    };
    let until = |ns: u64| LearnedValue { expires_ns: ns, rule_id: 1, check: 0 };
    learned.insert(key([10, 77, 0, 1]), until(boot_now_ns() + HOUR_NS), 0).unwrap();
    learned.insert(key([10, 77, 0, 2]), until(boot_now_ns() + HOUR_NS), 0).unwrap();
    let ops = ["tcp:10.77.0.1:8001", "tcp:10.77.0.2:8001"];
    let inside = || probe(At { netns: &ns, cgroup: Some(&agent) }, &ops);
    // Without the flag the map is not consulted.
    assert_eq!(inside(), ["EPERM", "EPERM"]);
    dp.set_flag(id, FLAG_NAMES, true).unwrap();
    assert_eq!(inside(), ["ok", "EPERM"]);
    learned.insert(key([10, 77, 0, 1]), until(boot_now_ns()), 0).unwrap();
    assert_eq!(inside(), ["EPERM", "EPERM"], "an expired entry grants nothing");
    // Another agent's entry grants this one nothing.
    let (other, other_id) = site.cgroup("other");
    dp.register(other_id).unwrap();
    dp.grant(other_id, &[], boot_now_ns() + HOUR_NS).unwrap();
    dp.set_flag(other_id, FLAG_NAMES, true).unwrap();
    learned.insert(key([10, 77, 0, 1]), until(boot_now_ns() + HOUR_NS), 0).unwrap();
    assert_eq!(probe(At { netns: &ns, cgroup: Some(&other) }, &ops[..1]), ["EPERM"]);
    assert_eq!(inside(), ["ok", "EPERM"]);
    // Control: both destinations are up.
    assert_eq!(probe(At { netns: &ns, cgroup: None }, &ops), ["ok", "ok"]);
}
