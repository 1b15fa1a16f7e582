use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
};

use ztseg_common::rule::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use super::*;
use crate::dataplane::{Entry, Verdict};

const PATH: &str = "/etc/ztseg/policies/p.toml";

fn parse(text: &str) -> Result<PolicyFile, PolicyError> {
    parse_file(Path::new(PATH), text)
}

/// The error of `text`, which must be refused at `line` with a message containing `needle`.
#[track_caller]
fn assert_refused(text: &str, line: usize, needle: &str) {
    let err = match parse(text) {
        Ok(file) => panic!("accepted:\n{text}\n{file:?}"),
        Err(e) => e,
    };
    let shown = err.to_string();
    assert_eq!(err.line(), Some(line), "wrong line in {shown:?}");
    assert!(shown.starts_with(&format!("{PATH}:{line}:")), "{shown}");
    assert!(shown.contains(needle), "{shown:?} does not contain {needle:?}");
}

#[track_caller]
fn assert_accepted(text: &str) -> PolicyFile {
    match parse(text) {
        Ok(file) => file,
        Err(e) => panic!("refused: {e}\n{text}"),
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

fn entry(n: &str, proto: u8, port: u16, verdict: Verdict, rule_id: u32) -> Entry {
    Entry { net: net(n), proto, port, inbound: false, verdict, rule_id }
}

/// The only rule of `[tools.t]` in `text`.
fn only_rule(text: &str) -> Rule {
    let file = assert_accepted(text);
    let group = &file.tools["t"];
    assert_eq!(group.rule_count(), 1);
    group.allow.iter().chain(&group.deny).next().unwrap().clone()
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ztseg-policy-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

// ---- parsing: what is accepted -------------------------------------------------------------

#[test]
fn design_catalogue_example_parses() {
    let file = assert_accepted(
        r#"
[baseline]                      # granted to every agent that holds a valid token
allow = [{ to = "127.0.0.53/32", ports = [53], proto = "udp" }]

[tools.http]
allow = [{ to = "203.0.113.0/24", ports = [80, 443], proto = "tcp" }]

[scopes."read:data.sales_q1_2026"]
allow = [{ to = "10.0.5.12/32", ports = [5432], proto = "tcp" }]
"#,
    );
    let baseline = file.baseline.unwrap();
    assert_eq!(baseline.line, 2);
    assert_eq!(
        baseline.allow,
        [Rule {
            net: net("127.0.0.53/32"),
            ports: Ports::Ranges(vec![PortRange { lo: 53, hi: 53 }]),
            protos: Protos::Udp,
            line: 3,
        }]
    );
    let http = &file.tools["http"];
    assert_eq!((http.line, http.allow[0].line), (5, 6));
    assert_eq!(
        http.allow[0].ports,
        Ports::Ranges(vec![PortRange { lo: 80, hi: 80 }, PortRange { lo: 443, hi: 443 }])
    );
    let scope = &file.scopes["read:data.sales_q1_2026"];
    assert_eq!((scope.line, scope.allow[0].protos), (8, Protos::Tcp));
    assert!(file.binding.is_none());
}

#[test]
fn design_binding_example_parses() {
    let file = assert_accepted(
        r#"
[agent]
id = "analyst-7"
token_file = "analyst-7.jwt"    # relative to this file; or token = "eyJ..."
# cgroup = "ztseg.slice/analyst-7" is the default
"#,
    );
    let binding = file.binding.unwrap();
    assert_eq!(binding.id.as_str(), "analyst-7");
    assert_eq!(binding.token, TokenSource::File(PathBuf::from("/etc/ztseg/policies/analyst-7.jwt")));
    assert_eq!((binding.cgroup, binding.line), (None, 2));
    assert_eq!(binding.path, Path::new(PATH));
    assert!(file.baseline.is_none() && file.tools.is_empty() && file.scopes.is_empty());
}

#[test]
fn catalogue_and_binding_may_share_a_file() {
    let file = assert_accepted(
        r#"
[scopes."read:x"]
allow = [{ to = "10.0.5.12", ports = [5432], proto = "tcp" }]
deny = [{ to = "10.0.5.0/24" }]
[agent]
id = "a1"
token = "eyJhbGciOiJFZERTQSJ9.e30.sig"
cgroup = "agents.slice/a1"
"#,
    );
    let scope = &file.scopes["read:x"];
    assert_eq!(scope.allow[0].net, net("10.0.5.12/32"));
    assert_eq!(
        scope.deny,
        [Rule { net: net("10.0.5.0/24"), ports: Ports::All, protos: Protos::TcpUdp, line: 4 }]
    );
    let binding = file.binding.unwrap();
    assert_eq!(binding.token, TokenSource::Inline("eyJhbGciOiJFZERTQSJ9.e30.sig".into()));
    assert_eq!(binding.cgroup, Some(PathBuf::from("agents.slice/a1")));
}

#[test]
fn empty_file_and_empty_groups_are_fine() {
    let file = assert_accepted("# nothing yet\n");
    assert_eq!(file, PolicyFile { path: PATH.into(), ..PolicyFile::default() });
    let file = assert_accepted("[tools.pandas]\nallow = []\n[tools.numpy]\n");
    assert_eq!(
        file.tools["pandas"],
        Group { allow: vec![], deny: vec![], inbound: vec![], mode: Mode::Enforce, line: 1, names: vec![] }
    );
    assert_eq!(file.tools["numpy"].line, 3);
}

#[test]
fn array_of_tables_form_keeps_lines() {
    // `[[baseline.allow]]` defines [baseline] implicitly: its line is the first header's.
    let file = assert_accepted(
        r#"
[[baseline.allow]]
to = "10.0.53.53"
ports = [53]

[[baseline.allow]]
to = "fd00::53"
proto = "udp"

[tools]
ssh.allow = [{ to = "10.0.0.0/16", ports = [22] }]
"#,
    );
    let baseline = file.baseline.unwrap();
    assert_eq!(baseline.line, 2);
    assert_eq!(baseline.allow.iter().map(|r| r.line).collect::<Vec<_>>(), [2, 6]);
    assert_eq!(baseline.allow[1].net, net("fd00::53/128"));
    assert_eq!(file.tools["ssh"].line, 11);
}

#[test]
fn ports_are_sorted_merged_and_full_cover_is_every_port() {
    let rule = only_rule(
        r#"[tools.t]
allow = [{ to = "10.0.0.1", ports = [443, "8000-8999", 80, "8500-9100", 9101, 443] }]"#,
    );
    assert_eq!(
        rule.ports,
        Ports::Ranges(vec![
            PortRange { lo: 80, hi: 80 },
            PortRange { lo: 443, hi: 443 },
            PortRange { lo: 8000, hi: 9101 },
        ])
    );
    assert_eq!(rule.ports.entry_count(), 2 + 1102);
    for full in [r#"["1-65535"]"#, r#"[1, "2-65535"]"#, r#"["1-30000", "30001-65535", 80]"#] {
        let rule = only_rule(&format!("[tools.t]\nallow = [{{ to = \"10.0.0.1\", ports = {full} }}]"));
        assert_eq!(rule.ports, Ports::All, "{full}");
    }
    let rule = only_rule("[tools.t]\nallow = [{ to = \"10.0.0.1\", ports = [1, 65535, \"2-65533\"] }]");
    assert_eq!(
        rule.ports,
        Ports::Ranges(vec![PortRange { lo: 1, hi: 65533 }, PortRange { lo: 65535, hi: 65535 }])
    );
}

// ---- parsing: what is refused, each next to an accepted twin --------------------------------

#[test]
fn toml_syntax_errors_have_line_and_column() {
    let err = parse("[tools.t]\nallow = [{ to = \"10.0.0.1\" ]\n").unwrap_err();
    assert!(matches!(err, PolicyError::Syntax { line: 2, .. }), "{err}");
    assert!(err.to_string().starts_with(&format!("{PATH}:2:")), "{err}");
    assert!(!err.to_string().contains('\n'), "{err:?}");
    assert_accepted("[tools.t]\nallow = [{ to = \"10.0.0.1\" }]\n");
}

#[test]
fn wrong_types_are_refused_with_their_line() {
    assert_refused("[tools.t]\n\nallow = [{ to = 10 }]", 3, "invalid type");
    assert_refused("[tools.t]\nallow = 5", 2, "invalid type");
    assert_refused("tools = 5", 1, "invalid type");
    assert_accepted("[tools.t]\n\nallow = [{ to = \"10.0.0.0/8\" }]");
}

#[test]
fn unknown_keys_are_refused_everywhere() {
    assert_refused("\n[tools.t]\nallow = [{ to = \"10.0.0.1\", prto = \"tcp\" }]", 3, "unknown field `prto`");
    assert_refused("[tools.t]\nallw = []", 2, "unknown field `allw`");
    assert_refused("[agent]\nid = \"a\"\ntoken = \"x\"\ncgroups = \"a\"", 4, "unknown field `cgroups`");
    assert_refused("\n\n[tool.t]\nallow = []", 3, "unknown field `tool`, expected one of `baseline`");
    assert_refused("version = 2", 1, "unknown field `version`");
    // The same files with the keys spelled right.
    assert_accepted("\n[tools.t]\nallow = [{ to = \"10.0.0.1\", proto = \"tcp\" }]");
    assert_accepted("[tools.t]\nallow = []");
    assert_accepted("[agent]\nid = \"a\"\ntoken = \"x\"\ncgroup = \"a\"");
    assert_accepted("\n\n[tools.t]\nallow = []");
}

#[test]
fn missing_to_is_refused() {
    assert_refused("[tools.t]\nallow = [\n  { ports = [80] },\n]", 3, "missing field `to`");
    assert_accepted("[tools.t]\nallow = [\n  { to = \"10.0.0.1\", ports = [80] },\n]");
}

#[test]
fn bad_addresses_are_refused() {
    for bad in ["10.0.0.300", "10.0.0.0/33", "fd00::/129", "fe80::1%eth0", "10.0.0.1/", "", "10.0.0.0/8 "] {
        assert_refused(
            &format!("[tools.t]\nallow = [\n{{ to = {bad:?} }}]"),
            3,
            "is not an IPv4/IPv6 address or CIDR",
        );
    }
    for good in ["10.0.0.30", "10.0.0.0/32", "fd00::/128", "fe80::1", "10.0.0.1/32", "2001:db8::/32"] {
        assert_accepted(&format!("[tools.t]\nallow = [\n{{ to = {good:?} }}]"));
    }
}

#[test]
fn host_bits_are_refused_with_the_network_probably_meant() {
    assert_refused(
        "[scopes.s]\nallow = [{ to = \"10.0.5.12/24\", ports = [5432] }]",
        2,
        "has host bits set; did you mean 10.0.5.0/24, or 10.0.5.12/32 for the one address?",
    );
    assert_refused(
        "[scopes.s]\ndeny = [{ to = \"fd00::1/64\" }]",
        2,
        "did you mean fd00::/64, or fd00::1/128",
    );
    assert_eq!(only_rule("[tools.t]\nallow = [{ to = \"10.0.5.0/24\" }]").net, net("10.0.5.0/24"));
    assert_eq!(only_rule("[tools.t]\ndeny = [{ to = \"fd00::/64\" }]").net, net("fd00::/64"));
}

#[test]
fn dns_names_are_rules_of_their_own_with_ports_and_protocols() {
    let file = assert_accepted(
        "[tools.t]\nallow = [\n  { to = \"10.0.0.1\", ports = [22] },\n  { to = \"api.example.com\", ports = [443], proto = \"tcp\" },\n  { to = \"*.cdn.example.com\" },\n]\ndeny = [{ to = \"evil.example.com\" }]\n",
    );
    let group = &file.tools["t"];
    assert_eq!(group.allow.len(), 1);
    assert_eq!(group.names.len(), 3);
    let api = &group.names[0];
    assert_eq!(api.pattern, NamePattern::Exact("api.example.com".into()));
    assert_eq!((api.deny, api.index, api.line, api.protos), (false, 1, 4, Protos::Tcp));
    assert_eq!(api.ports, Ports::Ranges(vec![PortRange { lo: 443, hi: 443 }]));
    let cdn = &group.names[1];
    assert_eq!(cdn.pattern, NamePattern::Wildcard("cdn.example.com".into()));
    assert_eq!((cdn.index, cdn.ports.clone(), cdn.protos), (2, Ports::All, Protos::TcpUdp));
    assert_eq!((group.names[2].deny, group.names[2].index), (true, 0));
    assert_eq!(group.rule_count(), 4);
    assert_accepted("[tools.t]\nallow = [{ to = \"192.0.2.10\", ports = [443] }]");

    // Compiled: address rules keep their place in the list (`#N`), names get theirs, and make
    // no trie entry; a forbidden tool's names are denies.
    let catalogue = assemble(&[file]).unwrap().catalogue;
    let tools = names(&["t"]);
    let compiled = catalogue.compile(&Grant { tools: &tools, ..Grant::default() }).unwrap();
    assert_eq!(compiled.origins, ["tool:t#0", "tool:t#1", "tool:t#2", "tool:t#deny0"]);
    assert_eq!(compiled.entries.len(), 2, "10.0.0.1 port 22, tcp and udp");
    let verdicts: Vec<(String, Verdict, u32)> =
        compiled.names.iter().map(|n| (n.pattern.to_string(), n.verdict, n.rule_id)).collect();
    assert_eq!(
        verdicts,
        [
            ("api.example.com".to_owned(), Verdict::Allow, 1),
            ("*.cdn.example.com".to_owned(), Verdict::Allow, 2),
            ("evil.example.com".to_owned(), Verdict::Deny, 3),
        ]
    );
    assert!(compiled.allows_names());
    let forbidden = catalogue.compile(&Grant { forbidden_tools: &tools, ..Grant::default() }).unwrap();
    assert!(forbidden.names.iter().all(|n| n.verdict == Verdict::Deny));
    assert!(!forbidden.allows_names());
}

#[test]
fn bad_names_are_refused_with_their_line_and_how_to_write_them() {
    let cases = [
        ("*", "`*` alone would match every name"),
        ("*.com", "wildcard over the top-level domain"),
        ("a.*.example.com", "only \"*.parent.domain\" is a wildcard"),
        ("API.example.com", "write names in lower case"),
        ("api.example.com.", "ends with a dot"),
        ("localhost", "single label"),
        ("db-1", "single label"),
        ("b\u{fc}cher.example", "punycode"),
    ];
    for (name, needle) in cases {
        assert_refused(&format!("[tools.t]\nallow = [\n{{ to = {name:?}, ports = [443] }}]"), 3, needle);
    }
    assert_refused(
        "[tools.t]\nallow = [{ to = \"a.example\", proto = \"icmp\" }]",
        2,
        "with proto = \"icmp\" can never match",
    );
    assert_refused(
        "[tools.t]\nallow = [{ to = \"a.example\", ports = [\"1000-1100\"] }]",
        2,
        "names 202 ports and protocols; a name rule may name at most 64",
    );
    assert_accepted("[tools.t]\nallow = [{ to = \"a.example\", ports = [\"1000-1031\"] }]");
}

#[test]
fn impossible_ports_are_refused_each_with_its_own_line() {
    let cases = [
        ("0", "port 0 is not a destination port"),
        ("65536", "port 65536 is out of range"),
        ("-1", "port -1 is out of range"),
        ("\"0-10\"", "starts at port 0"),
        ("\"1-70000\"", "is out of range"),
        ("\"9000-8000\"", "port range \"9000-8000\" is inverted; did you mean \"8000-9000\"?"),
        ("\"80..90\"", "is malformed"),
        ("\"80-\"", "is malformed"),
        ("\"-80\"", "is malformed"),
        ("\"80-90-100\"", "is malformed"),
        ("\" 80-90\"", "is malformed"),
        ("\"443\"", "write a single port as a number: 443"),
        ("1.5", "not a float"),
        ("true", "not a boolean"),
    ];
    for (bad, needle) in cases {
        // The bad port sits on its own line (4) inside a multi-line list.
        let text =
            format!("[tools.t]\nallow = [{{ to = \"10.0.0.1\", ports = [\n  80,\n  {bad},\n  443] }}]");
        assert_refused(&text, 4, needle);
    }
    let good =
        only_rule("[tools.t]\nallow = [{ to = \"10.0.0.1\", ports = [\n  1,\n  \"8000-9000\",\n  65535] }]");
    assert_eq!(good.ports.entry_count(), 1 + 1001 + 1);
    assert_eq!(
        only_rule("[tools.t]\nallow = [{ to = \"10.0.0.1\", ports = [\"80-80\"] }]").ports,
        Ports::Ranges(vec![PortRange { lo: 80, hi: 80 }])
    );
}

#[test]
fn every_bad_port_of_a_file_is_reported() {
    let dir = TempDir::new();
    let path =
        dir.write("p.toml", "[tools.t]\nallow = [{ to = \"10.0.0.1\", ports = [\n0,\n\"9-8\",\n65536] }]\n");
    let errors = check_path(&path).unwrap_err();
    assert_eq!(errors.iter().map(PolicyError::line).collect::<Vec<_>>(), [Some(3), Some(4), Some(5)]);
}

#[test]
fn rules_that_can_never_match_are_refused() {
    assert_refused("[[tools.t.allow]]\nto = \"10.0.0.1\"\nports = []", 3, "`ports = []` can never match");
    assert_refused(
        "[[tools.t.allow]]\nto = \"10.0.0.1\"\nproto = \"icmp\"\nports = [7]",
        4,
        "ICMP has no ports",
    );
    assert_refused(
        "[[tools.t.allow]]\nto = \"10.0.0.1\"\nports = [80]\nproto = \"sctp\"",
        4,
        "proto \"sctp\"",
    );
    assert_refused("[tools.t]\nallow = [{ to = \"10.0.0.1\", proto = \"TCP\" }]", 2, "proto \"TCP\"");
    assert_eq!(only_rule("[tools.t]\nallow = [{ to = \"10.0.0.1\" }]").ports, Ports::All);
    assert_eq!(
        only_rule("[tools.t]\nallow = [{ to = \"10.0.0.1\", proto = \"icmp\" }]").protos,
        Protos::Icmp
    );
    assert_eq!(
        only_rule("[tools.t]\nallow = [{ to = \"10.0.0.1\", ports = [7], proto = \"udp\" }]").protos,
        Protos::Udp
    );
}

#[test]
fn unbounded_allows_are_refused_but_unbounded_denies_are_fine() {
    for every in ["0.0.0.0/0", "::/0", "::ffff:0:0/96"] {
        assert_refused(
            &format!("[scopes.s]\n\nallow = [{{ to = {every:?}, ports = [443] }}]"),
            3,
            "is unbounded (every address) and is refused",
        );
        assert_eq!(
            only_rule(&format!("[tools.t]\ndeny = [{{ to = {every:?}, ports = [443] }}]")).net,
            net(every)
        );
    }
    assert_refused(
        "[baseline]\nallow = [{ to = \"0.0.0.0/0\", ports = [53], proto = \"udp\" }]",
        2,
        "unbounded",
    );
    // Large but bounded networks are the catalogue author's call.
    assert_eq!(only_rule("[tools.t]\nallow = [{ to = \"0.0.0.0/1\" }]").net, net("0.0.0.0/1"));
    assert_eq!(
        only_rule("[tools.t]\nallow = [{ to = \"::ffff:10.0.0.0/104\" }]").net,
        net("::ffff:10.0.0.0/104")
    );
}

#[test]
fn wildcard_names_are_refused() {
    assert_refused(
        "[tools.t]\nallow = []\n[tools.\"web*\"]\nallow = []",
        3,
        "tool name \"web*\" contains '*'",
    );
    assert_refused(
        "\n[scopes.\"read:*\"]\nallow = []",
        2,
        "scope name \"read:*\" contains '*'; wildcards are not allowed",
    );
    assert_refused("[scopes.\"\"]\nallow = []", 1, "scope name is empty");
    let file = assert_accepted("[tools.web]\nallow = []\n[scopes.\"read:all.sales\"]\nallow = []");
    assert!(file.tools.contains_key("web") && file.scopes.contains_key("read:all.sales"));
}

#[test]
fn bindings_need_an_id_and_exactly_one_token() {
    assert_refused("\n[agent]\ntoken = \"x\"", 2, "[agent] has no id");
    assert_refused(
        "[agent]\nid = \"a\"\ntoken_file = \"a.jwt\"\ntoken = \"x\"",
        4,
        "has both token_file and token",
    );
    assert_refused(
        "[agent]\nid = \"a\"\ntoken = \"x\"\ntoken_file = \"a.jwt\"",
        4,
        "has both token_file and token",
    );
    assert_refused("\n\n[agent]\nid = \"a\"", 3, "[agent] has no token");
    assert_refused("[agent]\nid = \"a\"\ntoken = \" \"", 3, "`token` is empty");
    assert_refused("[agent]\nid = \"a\"\ntoken_file = \"\"", 3, "`token_file` is empty");
    assert_eq!(assert_accepted("\n[agent]\nid = \"a\"\ntoken = \"x\"").binding.unwrap().line, 2);
    assert!(assert_accepted("[agent]\nid = \"a\"\ntoken_file = \"a.jwt\"").binding.is_some());
}

#[test]
fn invalid_agent_ids_use_the_agent_id_error() {
    for bad in ["", "../etc", "a/b", "cgroup.procs", "-x", "a b"] {
        let text = format!("[agent]\ntoken = \"x\"\nid = {bad:?}");
        assert_refused(&text, 3, &format!("agent id {bad:?} is invalid"));
        assert!(matches!(parse(&text), Err(PolicyError::AgentId { .. })));
    }
    let file = assert_accepted("[agent]\ntoken = \"x\"\nid = \"agent_x-1\"");
    assert_eq!(file.binding.unwrap().id.as_str(), "agent_x-1");
}

#[test]
fn a_binding_cannot_name_another_agents_cgroup() {
    for other in ["ztseg.slice/b", "ztseg.slice/a/b", "ztseg.slice"] {
        assert_refused(
            &format!("[agent]\nid = \"a\"\ntoken = \"x\"\ncgroup = {other:?}"),
            4,
            "must end in the agent's own id \"a\"",
        );
    }
}

#[test]
fn cgroups_must_stay_under_the_cgroup2_mount() {
    for bad in ["/sys/fs/cgroup/x", "ztseg.slice/../system.slice", "..", "", "./x"] {
        assert_refused(
            &format!("[agent]\nid = \"a\"\ntoken = \"x\"\ncgroup = {bad:?}"),
            4,
            "must be a path relative to the cgroup2 mount without '..', e.g. \"ztseg.slice/a\"",
        );
    }
    for good in ["ztseg.slice/a", "a", "x.slice/y/a", "ztseg.slice/a/"] {
        let file = assert_accepted(&format!("[agent]\nid = \"a\"\ntoken = \"x\"\ncgroup = {good:?}"));
        assert_eq!(file.binding.unwrap().cgroup, Some(PathBuf::from(good)));
    }
}

#[test]
fn token_files_resolve_against_the_policy_file_directory() {
    let token = |policy: &str, file: &str| {
        let text = format!("[agent]\nid = \"a\"\ntoken_file = {file:?}");
        parse_file(Path::new(policy), &text).unwrap().binding.unwrap().token
    };
    assert_eq!(token("/etc/p/a.toml", "a.jwt"), TokenSource::File("/etc/p/a.jwt".into()));
    assert_eq!(token("/etc/p/a.toml", "tokens/a.jwt"), TokenSource::File("/etc/p/tokens/a.jwt".into()));
    assert_eq!(token("/etc/p/a.toml", "/run/tokens/a.jwt"), TokenSource::File("/run/tokens/a.jwt".into()));
    let cwd = std::env::current_dir().unwrap();
    assert_eq!(token("p/a.toml", "a.jwt"), TokenSource::File(cwd.join("p/a.jwt")));
    assert_eq!(token("a.toml", "a.jwt"), TokenSource::File(cwd.join("a.jwt")));
}

#[test]
fn inline_tokens_are_not_printed() {
    let source = TokenSource::Inline("eyJ.secret.sig".into());
    assert_eq!(format!("{source:?}"), "Inline(<14 bytes>)");
    let file = assert_accepted("[agent]\nid = \"a\"\ntoken = \"eyJ.secret.sig\"");
    assert!(!format!("{file:?}").contains("secret"));
}

// ---- across files ------------------------------------------------------------------------------

fn file_at(path: &str, text: &str) -> PolicyFile {
    parse_file(Path::new(path), text).unwrap()
}

#[track_caller]
fn assert_duplicate(files: &[PolicyFile], what: Definition, at: (&str, usize), first: (&str, usize)) {
    let err = assemble(files).unwrap_err();
    let shown = err.to_string();
    match err {
        PolicyError::Duplicate { path, line, what: got, first_path, first_line } => {
            assert_eq!((got, path.as_path(), line), (what, Path::new(at.0), at.1), "{shown}");
            assert_eq!((first_path.as_path(), first_line), (Path::new(first.0), first.1), "{shown}");
        }
        other => panic!("not a duplicate: {other}"),
    }
    assert!(
        shown.contains(&format!("{}:{}", at.0, at.1)) && shown.contains(&format!("{}:{}", first.0, first.1))
    );
}

#[test]
fn a_tool_or_scope_defined_in_two_files_is_refused() {
    let a = file_at("/p/a.toml", "[tools.http]\nallow = []\n[scopes.s]\nallow = []");
    let b = file_at("/p/b.toml", "\n[tools.http]\nallow = []");
    assert_duplicate(&[a.clone(), b], Definition::Tool("http".into()), ("/p/b.toml", 2), ("/p/a.toml", 1));
    let c = file_at("/p/c.toml", "\n\n[scopes.s]\nallow = []");
    assert_duplicate(&[a.clone(), c], Definition::Scope("s".into()), ("/p/c.toml", 3), ("/p/a.toml", 3));
    // A tool and a scope may share a name; distinct names merge.
    let d = file_at("/p/d.toml", "[tools.s]\nallow = []\n[scopes.http]\nallow = []\n[scopes.t]\nallow = []");
    let set = assemble(&[a, d]).unwrap();
    assert_eq!(set.catalogue.tools.keys().collect::<Vec<_>>(), ["http", "s"]);
    assert_eq!(set.catalogue.scopes.keys().collect::<Vec<_>>(), ["http", "s", "t"]);
}

#[test]
fn two_baselines_are_refused() {
    let a = file_at("/p/a.toml", "[baseline]\nallow = []");
    let b = file_at("/p/b.toml", "[tools.t]\nallow = []\n[baseline]\nallow = []");
    assert_duplicate(&[a.clone(), b], Definition::Baseline, ("/p/b.toml", 3), ("/p/a.toml", 1));
    let c = file_at("/p/c.toml", "[tools.t]\nallow = []");
    assert!(assemble(&[a, c]).unwrap().catalogue.baseline.is_some());
}

#[test]
fn an_agent_bound_twice_is_refused() {
    let a = file_at("/p/a.toml", "[agent]\nid = \"analyst-7\"\ntoken = \"x\"");
    let b = file_at("/p/b.toml", "\n[agent]\nid = \"analyst-7\"\ntoken_file = \"b.jwt\"");
    let id: AgentId = "analyst-7".parse().unwrap();
    assert_duplicate(&[a.clone(), b], Definition::Agent(id), ("/p/b.toml", 2), ("/p/a.toml", 1));
    let c = file_at("/p/c.toml", "[agent]\nid = \"analyst-8\"\ntoken = \"y\"");
    assert_eq!(assemble(&[a, c]).unwrap().bindings.len(), 2);
}

#[test]
fn an_agent_cgroup_inside_another_agents_is_refused() {
    let a = file_at("/p/a.toml", "[agent]\nid = \"a\"\ntoken = \"x\"\ncgroup = \"s/a\"");
    let b = file_at("/p/b.toml", "[agent]\nid = \"b\"\ntoken = \"y\"\ncgroup = \"s/a/b\"");
    assert_duplicate(&[a.clone(), b], Definition::Cgroup("s/a/b".into()), ("/p/b.toml", 1), ("/p/a.toml", 1));
    let c = file_at("/p/c.toml", "[agent]\nid = \"c\"\ntoken = \"y\"\ncgroup = \"s/c\"");
    assert_eq!(assemble(&[a, c]).unwrap().bindings.len(), 2);
}

#[test]
fn check_path_reports_every_error_of_every_file() {
    let dir = TempDir::new();
    dir.write("a.toml", "[tools.http]\nallow = [{ to = \"203.0.113.0/24\", ports = [80] }]\n");
    dir.write("b.toml", "[tools.http]\nallow = []\n[scopes.s]\nallow = [{ to = \"*.com\" }]\n");
    dir.write("c.toml", "[tools.x\n");
    dir.write("notes.txt", "not a policy");
    dir.write(".hidden.toml", "garbage [");
    let errors = check_path(&dir.0).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 3, "{shown:#?}");
    assert!(shown[0].contains("b.toml:1: tool \"http\" is defined twice") && shown[0].contains("a.toml:1"));
    assert!(shown[1].contains("b.toml:4: `to = \"*.com\"` is a wildcard over the top-level domain"));
    assert!(matches!(errors[2], PolicyError::Syntax { line: 1, .. }) && shown[2].contains("c.toml:1:"));

    // The same dir, fixed.
    dir.write("b.toml", "[tools.ssh]\nallow = []\n[scopes.s]\nallow = [{ to = \"192.0.2.1\" }]\n");
    dir.write("c.toml", "[tools.x]\n[agent]\nid = \"a\"\ntoken = \"x\"\n");
    let summary = check_path(&dir.0).unwrap();
    assert_eq!(
        summary,
        CheckSummary { files: 3, baseline: false, tools: 3, scopes: 1, bindings: 1, rules: 2, audit: vec![] }
    );
    assert_eq!(summary.to_string(), "3 files valid: no baseline, 3 tools, 1 scope, 2 rules, 1 agent binding");
    assert!(matches!(check_path(&dir.0.join("missing.toml")).unwrap_err()[..], [PolicyError::Read { .. }]));
    assert_eq!(load_dir(&dir.0).unwrap().bindings.len(), 1);
}

#[test]
fn the_example_policies_pass_check() {
    let summary = check_path(&repo_policies()).unwrap_or_else(|e| panic!("{e:#?}"));
    assert!(summary.files >= 1 && summary.baseline, "{summary}");
    for path in policy_files(&repo_policies()).unwrap() {
        check_path(&path).unwrap_or_else(|e| panic!("{e:#?}"));
    }
}

// ---- compiling ---------------------------------------------------------------------------------

fn catalogue(text: &str) -> Catalogue {
    assemble(&[assert_accepted(text)]).unwrap().catalogue
}

fn demo_catalogue() -> Catalogue {
    let file = load_file(&repo_policies().join("catalogue.toml")).unwrap();
    assemble(&[file]).unwrap().catalogue
}

#[test]
fn the_demo_grant_compiles_to_exactly_its_entries() {
    let scopes = names(&["read:data.sales_q1_2026", "write:report.draft.2026q1"]);
    let tools = names(&["pandas", "matplotlib"]);
    let forbidden = names(&["bash", "http"]);
    let compiled = demo_catalogue()
        .compile(&Grant { scopes: &scopes, tools: &tools, forbidden_tools: &forbidden })
        .unwrap();
    assert_eq!(
        compiled.origins,
        [
            "baseline#0",
            "scope:read:data.sales_q1_2026#0",
            "scope:write:report.draft.2026q1#0",
            "forbidden:tool:bash#0",
            "forbidden:tool:http#0",
        ]
    );
    assert_eq!(compiled.rules, 5);
    assert_eq!(
        compiled.entries,
        [
            entry("10.0.53.53/32", PROTO_UDP, 53, Verdict::Allow, 0),
            entry("10.0.5.12/32", PROTO_TCP, 5432, Verdict::Allow, 1),
            entry("10.0.6.20/32", PROTO_TCP, 443, Verdict::Allow, 2),
            entry("10.0.0.0/16", PROTO_TCP, 22, Verdict::Deny, 3),
            entry("203.0.113.0/24", PROTO_TCP, 80, Verdict::Deny, 4),
            entry("203.0.113.0/24", PROTO_TCP, 443, Verdict::Deny, 4),
        ]
    );
}

#[test]
fn a_token_with_nothing_gets_the_baseline_only() {
    let compiled = demo_catalogue().compile(&Grant::default()).unwrap();
    assert_eq!(compiled.origins, ["baseline#0"]);
    assert_eq!(compiled.entries, [entry("10.0.53.53/32", PROTO_UDP, 53, Verdict::Allow, 0)]);
    assert!(!demo_catalogue().is_empty());
    let empty = Catalogue::default();
    assert!(empty.is_empty());
    assert_eq!(empty.compile(&Grant::default()).unwrap(), Compiled::default());
}

#[test]
fn a_forbidden_tool_denies_all_its_rules() {
    let cat = catalogue(
        r#"
[tools.bash]
allow = [{ to = "10.0.0.0/16", ports = [22], proto = "tcp" }]
deny = [{ to = "10.0.9.0/24", ports = [22], proto = "tcp" }]
"#,
    );
    let bash = names(&["bash"]);
    let forbidden = cat.compile(&Grant { forbidden_tools: &bash, ..Grant::default() }).unwrap();
    assert_eq!(forbidden.origins, ["forbidden:tool:bash#0", "forbidden:tool:bash#deny0"]);
    assert_eq!(
        forbidden.entries,
        [
            entry("10.0.0.0/16", PROTO_TCP, 22, Verdict::Deny, 0),
            entry("10.0.9.0/24", PROTO_TCP, 22, Verdict::Deny, 1),
        ]
    );
    // Granted instead of forbidden: the allow is an allow, the deny stays a deny.
    let granted = cat.compile(&Grant { tools: &bash, ..Grant::default() }).unwrap();
    assert_eq!(granted.origins, ["tool:bash#0", "tool:bash#deny0"]);
    assert_eq!(
        granted.entries,
        [
            entry("10.0.0.0/16", PROTO_TCP, 22, Verdict::Allow, 0),
            entry("10.0.9.0/24", PROTO_TCP, 22, Verdict::Deny, 1),
        ]
    );
    // Granted and forbidden at once: both appear, and the deny wins when encoded.
    let both = cat.compile(&Grant { tools: &bash, forbidden_tools: &bash, ..Grant::default() }).unwrap();
    let encoded = crate::dataplane::table::encode(1, &both.entries);
    assert!(encoded.v4.iter().all(|(_, v)| v.verdict == ztseg_common::rule::VERDICT_DENY));
}

#[test]
fn anything_undefined_refuses_the_whole_grant() {
    let cat = demo_catalogue();
    let known = names(&["read:data.sales_q1_2026"]);
    let with_unknown = names(&["read:data.sales_q1_2026", "read:data.payroll"]);
    assert_eq!(
        cat.compile(&Grant { scopes: &with_unknown, ..Grant::default() }),
        Err(CompileError::Unknown { kind: GrantKind::Scope, name: "read:data.payroll".into() })
    );
    let tools = names(&["pandas", "curl"]);
    let err = cat.compile(&Grant { scopes: &known, tools: &tools, ..Grant::default() }).unwrap_err();
    assert_eq!(err, CompileError::Unknown { kind: GrantKind::Tool, name: "curl".into() });
    assert_eq!(
        err.to_string(),
        "tool \"curl\" is not defined in the capability catalogue, so the whole grant is refused"
    );
    let forbid = names(&["rm"]);
    assert_eq!(
        cat.compile(&Grant { forbidden_tools: &forbid, ..Grant::default() }),
        Err(CompileError::Unknown { kind: GrantKind::ForbiddenTool, name: "rm".into() })
    );
    // A scope is not a tool.
    assert!(cat.compile(&Grant { tools: &known, ..Grant::default() }).is_err());
    let pandas = names(&["pandas"]);
    assert_eq!(cat.compile(&Grant { scopes: &known, tools: &pandas, ..Grant::default() }).unwrap().rules, 2);
}

#[test]
fn wildcards_refuse_the_whole_grant() {
    let cat = demo_catalogue();
    for (scopes, tools, forbidden, kind, name) in [
        (names(&["read:*"]), vec![], vec![], GrantKind::Scope, "read:*"),
        (names(&["read:data.sales_q1_2026", "*"]), vec![], vec![], GrantKind::Scope, "*"),
        (vec![], names(&["*"]), vec![], GrantKind::Tool, "*"),
        (vec![], vec![], names(&["ba*"]), GrantKind::ForbiddenTool, "ba*"),
    ] {
        let grant = Grant { scopes: &scopes, tools: &tools, forbidden_tools: &forbidden };
        assert_eq!(cat.compile(&grant), Err(CompileError::Wildcard { kind, name: name.into() }));
    }
    let exact = names(&["read:data.sales_q1_2026"]);
    assert!(cat.compile(&Grant { scopes: &exact, ..Grant::default() }).is_ok());
}

#[test]
fn repeated_names_compile_once() {
    let cat = demo_catalogue();
    let once = names(&["read:data.sales_q1_2026"]);
    let twice = names(&["read:data.sales_q1_2026", "read:data.sales_q1_2026"]);
    let forbid_twice = names(&["http", "http"]);
    let a = cat
        .compile(&Grant { scopes: &once, forbidden_tools: &forbid_twice[..1], ..Grant::default() })
        .unwrap();
    let b =
        cat.compile(&Grant { scopes: &twice, forbidden_tools: &forbid_twice, ..Grant::default() }).unwrap();
    assert_eq!(a, b);
    assert_eq!(b.rules, 3);
}

#[test]
fn ports_and_protocols_expand_into_entries() {
    let cat = catalogue(
        r#"
[scopes.s]
allow = [
  { to = "10.0.0.1", ports = [443, "8000-8002"] },
  { to = "10.0.0.2", ports = ["1-65535"], proto = "tcp" },
  { to = "10.0.0.3" },
]
"#,
    );
    let s = names(&["s"]);
    let compiled = cat.compile(&Grant { scopes: &s, ..Grant::default() }).unwrap();
    let mut expected = Vec::new();
    for proto in [PROTO_TCP, PROTO_UDP] {
        for port in [443, 8000, 8001, 8002] {
            expected.push(entry("10.0.0.1/32", proto, port, Verdict::Allow, 0));
        }
    }
    expected.push(entry("10.0.0.2/32", PROTO_TCP, 0, Verdict::Allow, 1));
    expected.push(entry("10.0.0.3/32", PROTO_TCP, 0, Verdict::Allow, 2));
    expected.push(entry("10.0.0.3/32", PROTO_UDP, 0, Verdict::Allow, 2));
    assert_eq!(compiled.entries, expected);
    assert_eq!(compiled.origins, ["scope:s#0", "scope:s#1", "scope:s#2"]);
}

#[test]
fn hand_made_full_port_ranges_are_every_port() {
    let rule = |ports| Rule { net: net("10.0.0.1/32"), ports, protos: Protos::Udp, line: 1 };
    let full = Ports::Ranges(vec![PortRange { lo: 1, hi: 30000 }, PortRange { lo: 30001, hi: 65535 }]);
    let almost = Ports::Ranges(vec![PortRange { lo: 2, hi: 65535 }]);
    let mut cat = Catalogue::default();
    cat.tools.insert(
        "t".into(),
        Group {
            allow: vec![rule(full), rule(almost)],
            deny: vec![],
            inbound: vec![],
            mode: Mode::Enforce,
            line: 1,
            names: vec![],
        },
    );
    let t = names(&["t"]);
    let compiled = cat.compile(&Grant { tools: &t, ..Grant::default() }).unwrap();
    assert_eq!(compiled.entries[0], entry("10.0.0.1/32", PROTO_UDP, 0, Verdict::Allow, 0));
    assert_eq!(compiled.entries.len(), 1 + 65534);
    assert!(compiled.entries[1..].iter().all(|e| e.port >= 2 && e.rule_id == 1));
}

#[test]
fn icmp_follows_the_address_family() {
    let cat = catalogue(
        r#"
[tools.ping]
allow = [
  { to = "10.0.0.0/24", proto = "icmp" },
  { to = "fd00::/64", proto = "icmp" },
  { to = "::ffff:10.1.0.0/112", proto = "icmp" },
]
"#,
    );
    let ping = names(&["ping"]);
    let compiled = cat.compile(&Grant { tools: &ping, ..Grant::default() }).unwrap();
    assert_eq!(
        compiled.entries,
        [
            entry("10.0.0.0/24", PROTO_ICMP, 0, Verdict::Allow, 0),
            entry("fd00::/64", PROTO_ICMPV6, 0, Verdict::Allow, 1),
            entry("::ffff:10.1.0.0/112", PROTO_ICMP, 0, Verdict::Allow, 2),
        ]
    );
}

#[test]
fn grants_over_a_million_entries_are_refused() {
    // Each rule: tcp and udp on 65534 ports = 131068 entries.
    let big = |rules: usize| {
        let rule = "{ to = \"10.0.0.1\", ports = [\"2-65535\"] },\n".repeat(rules);
        catalogue(&format!("[scopes.big]\nallow = [\n{rule}]"))
    };
    let s = names(&["big"]);
    let grant = Grant { scopes: &s, ..Grant::default() };
    let err = big(8).compile(&grant).unwrap_err();
    assert_eq!(err, CompileError::TooManyEntries { count: 8 * 131_068, limit: MAX_ENTRIES });
    assert!(err.to_string().contains("1048544 rule entries, more than the limit of 1000000"));
    assert_eq!(big(7).compile(&grant).unwrap().entries.len(), 7 * 131_068);
}

// ---- inbound rules ---------------------------------------------------------------------------

#[test]
fn inbound_rules_parse_and_compile_to_inbound_entries() {
    let cat = catalogue(
        r#"
[scopes."serve"]
allow = [{ to = "10.0.0.1/32", ports = [53], proto = "udp" }]
inbound = [{ from = "10.1.0.0/16", ports = [8080], proto = "tcp" }, { from = "fd00::1", ports = [9000] }]
"#,
    );
    let serve = names(&["serve"]);
    let compiled = cat.compile(&Grant { scopes: &serve, ..Grant::default() }).unwrap();
    assert_eq!(compiled.origins, ["scope:serve#0", "scope:serve#in0", "scope:serve#in1"]);
    let inbound = |n: &str, proto, port, rule_id| Entry {
        inbound: true,
        ..entry(n, proto, port, Verdict::Allow, rule_id)
    };
    assert_eq!(
        compiled.entries,
        [
            entry("10.0.0.1/32", PROTO_UDP, 53, Verdict::Allow, 0),
            inbound("10.1.0.0/16", PROTO_TCP, 8080, 1),
            // No proto: TCP and UDP.
            inbound("fd00::1/128", PROTO_TCP, 9000, 2),
            inbound("fd00::1/128", PROTO_UDP, 9000, 2),
        ]
    );
    // Encoded, the inbound entries carry their direction in the key.
    let encoded = crate::dataplane::table::encode(1, &compiled.entries);
    let dirs: Vec<u8> = encoded.v4.iter().map(|(k, _)| k.data().dir).collect();
    assert_eq!(dirs.iter().filter(|&&d| d == ztseg_common::rule::DIR_IN).count(), 1, "{dirs:?}");
    assert_eq!(dirs.iter().filter(|&&d| d == ztseg_common::rule::DIR_OUT).count(), 1, "{dirs:?}");
    assert!(encoded.v6.iter().all(|(k, _)| k.data().dir == ztseg_common::rule::DIR_IN));
}

#[test]
fn a_forbidden_tools_inbound_rules_are_denials() {
    let cat =
        catalogue("[tools.nc]\ninbound = [{ from = \"10.0.0.0/8\", ports = [4444], proto = \"tcp\" }]\n");
    let nc = names(&["nc"]);
    let forbidden = cat.compile(&Grant { forbidden_tools: &nc, ..Grant::default() }).unwrap();
    assert_eq!(forbidden.origins, ["forbidden:tool:nc#in0"]);
    assert_eq!(
        forbidden.entries,
        [Entry { inbound: true, ..entry("10.0.0.0/8", PROTO_TCP, 4444, Verdict::Deny, 0) }]
    );
}

#[test]
fn inbound_rules_are_refused_when_they_could_never_match_or_open_everything() {
    let ok = "[scopes.s]\ninbound = [{ from = \"10.0.0.0/8\", ports = [80], proto = \"tcp\" }]";
    assert_accepted(ok);
    assert_refused(&ok.replace("\"tcp\"", "\"icmp\""), 2, "proto = \"icmp\" can never match");
    assert_refused(&ok.replace("10.0.0.0/8", "0.0.0.0/0"), 2, "unbounded");
    assert_refused(&ok.replace("10.0.0.0/8", "::/0"), 2, "unbounded");
    assert_refused(&ok.replace("10.0.0.0/8", "10.0.0.1/8"), 2, "`from = \"10.0.0.1/8\"` has host bits set");
    assert_refused(&ok.replace("10.0.0.0/8", "db.example"), 2, "`from = \"db.example\"` is a DNS name");
    assert_refused(&ok.replace("from", "to"), 2, "unknown field `to`");
    assert_refused(&ok.replace("[80]", "[0]"), 2, "port");
}

#[test]
fn mode_is_enforce_by_default_and_audit_when_asked_in_groups_and_bindings() {
    let file = assert_accepted(
        r#"
[baseline]
mode = "audit"
deny = [{ to = "10.0.0.0/8" }]

[tools.http]
mode = "enforce"
allow = [{ to = "203.0.113.0/24", ports = [80], proto = "tcp" }]

[scopes."read:x"]
allow = [{ to = "10.0.5.12/32", ports = [5432], proto = "tcp" }]

[agent]
id = "analyst-7"
token = "eyJ.x.y"
mode = "audit"
"#,
    );
    assert_eq!(file.baseline.as_ref().map(|g| g.mode), Some(Mode::Audit));
    assert_eq!(file.tools["http"].mode, Mode::Enforce);
    assert_eq!(file.scopes["read:x"].mode, Mode::Enforce);
    assert_eq!(file.binding.as_ref().map(|b| b.mode), Some(Mode::Audit));
    let plain = assert_accepted("[agent]\nid = \"a\"\ntoken = \"eyJ.x.y\"\n");
    assert_eq!(plain.binding.map(|b| b.mode), Some(Mode::Enforce));
    assert_eq!(Mode::Audit.code(), ztseg_common::agent::MODE_AUDIT);
    assert_eq!(Mode::Enforce.code(), ztseg_common::agent::MODE_ENFORCE);
}

#[test]
fn a_mode_other_than_enforce_or_audit_is_refused_at_its_line() {
    assert_refused(
        "[tools.t]\nallow = []\nmode = \"dry-run\"\n",
        3,
        "mode \"dry-run\" is not a mode; use \"enforce\"",
    );
    assert_refused(
        "[agent]\nid = \"a\"\ntoken = \"x\"\nmode = \"Audit\"\n",
        4,
        "use \"enforce\" (the default) or \"audit\"",
    );
    assert_refused("[baseline]\nmode = \"\"\n", 2, "is not a mode");
    // Not a string: toml's own error, with its line.
    let err = parse("[scopes.\"s\"]\nmode = true\n").unwrap_err();
    assert_eq!(err.line(), Some(2), "{err}");
    // A file refused for its mode is refused whole: `check` reports it.
    let dir = TempDir::new();
    fs::write(dir.0.join("a.toml"), "[tools.t]\nmode = \"off\"\n").unwrap();
    let errors = check_path(&dir.0).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert!(errors[0].to_string().contains("mode \"off\""), "{}", errors[0]);
}

#[test]
fn check_names_what_is_in_audit_mode() {
    let dir = TempDir::new();
    fs::write(
        dir.0.join("catalogue.toml"),
        "[baseline]\nmode = \"audit\"\n[tools.a]\nmode = \"audit\"\n[tools.b]\n[scopes.\"s\"]\nmode = \"audit\"\n",
    )
    .unwrap();
    fs::write(dir.0.join("x.toml"), "[agent]\nid = \"x\"\ntoken = \"t\"\nmode = \"audit\"\n").unwrap();
    fs::write(dir.0.join("y.toml"), "[agent]\nid = \"y\"\ntoken = \"t\"\n").unwrap();
    let summary = check_path(&dir.0).unwrap();
    assert_eq!(summary.audit, ["[baseline]", "tool \"a\"", "scope \"s\"", "agent \"x\""]);
    assert_eq!(
        summary.to_string(),
        "3 files valid: baseline, 2 tools, 1 scope, 0 rules, 2 agent bindings; in audit mode (would-be denials let through): [baseline], tool \"a\", scope \"s\", agent \"x\""
    );
}

#[test]
fn an_audit_entrys_denies_compile_to_audit_denies_and_its_allows_and_inbound_stay() {
    let cat = catalogue(
        r#"
[tools.shell]
mode = "audit"
allow = [{ to = "10.0.0.9/32", ports = [22], proto = "tcp" }]
deny = [{ to = "10.0.9.0/24", ports = [22], proto = "tcp" }]
inbound = [{ from = "10.0.7.0/24", ports = [2222], proto = "tcp" }]

[scopes."work"]
mode = "audit"
allow = [{ to = "10.0.0.0/16", ports = [22], proto = "tcp" }]
deny = [{ to = "10.0.3.0/24", ports = [22], proto = "tcp" }]
"#,
    );
    let inbound =
        |n: &str, port, verdict, id| Entry { inbound: true, ..entry(n, PROTO_TCP, port, verdict, id) };
    let shell = names(&["shell"]);
    // Forbidden: its outbound rules are audit denies; its inbound grant is an enforced deny
    // (inbound traffic is never dry-run).
    let forbidden = cat.compile(&Grant { forbidden_tools: &shell, ..Grant::default() }).unwrap();
    assert_eq!(
        forbidden.entries,
        [
            entry("10.0.0.9/32", PROTO_TCP, 22, Verdict::AuditDeny, 0),
            entry("10.0.9.0/24", PROTO_TCP, 22, Verdict::AuditDeny, 1),
            inbound("10.0.7.0/24", 2222, Verdict::Deny, 2),
        ]
    );
    // Granted: its allows and inbound grants are in force, its deny is an audit deny.
    let granted = cat.compile(&Grant { tools: &shell, ..Grant::default() }).unwrap();
    assert_eq!(
        granted.entries,
        [
            entry("10.0.0.9/32", PROTO_TCP, 22, Verdict::Allow, 0),
            entry("10.0.9.0/24", PROTO_TCP, 22, Verdict::AuditDeny, 1),
            inbound("10.0.7.0/24", 2222, Verdict::Allow, 2),
        ]
    );
    let work = names(&["work"]);
    let scope = cat.compile(&Grant { scopes: &work, ..Grant::default() }).unwrap();
    assert_eq!(
        scope.entries,
        [
            entry("10.0.0.0/16", PROTO_TCP, 22, Verdict::Allow, 0),
            entry("10.0.3.0/24", PROTO_TCP, 22, Verdict::AuditDeny, 1),
        ]
    );
    // The same catalogue in enforce mode: plain denies.
    let mut enforced = cat.clone();
    for group in enforced.tools.values_mut().chain(enforced.scopes.values_mut()) {
        group.mode = Mode::Enforce;
    }
    let forbidden = enforced.compile(&Grant { forbidden_tools: &shell, ..Grant::default() }).unwrap();
    assert!(forbidden.entries.iter().all(|e| e.verdict == Verdict::Deny), "{forbidden:?}");
}
