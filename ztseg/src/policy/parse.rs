//! One policy file: TOML into spanned raw structs, then validated into a [`PolicyFile`].
//!
//! Serde refuses unknown keys and wrong types (with toml's own line and column); everything
//! else is checked here, collecting every problem of the file with the line it is on.
//!
//! Line numbers come from the spans of keys and values. A table's own span is not used: toml
//! has none for tables defined implicitly (`[[baseline.allow]]` without `[baseline]`), so a
//! group's line is the line of its name, and the top level is read by hand to get those names.

use std::{
    collections::BTreeMap,
    fmt,
    net::IpAddr,
    ops::Range,
    path::{Component, Path, PathBuf},
};

use ipnet::IpNet;
use serde::{Deserialize, de};
use toml::Spanned;

use super::{
    Binding, Errors, Group, Mode, NamePattern, NameRule, PolicyError, PolicyFile, PortRange, Ports, Protos,
    Rule, TokenSource, name,
};
use crate::{agent_id::AgentId, config::line_col};

/// Keys allowed at the top of a policy file.
const TOP_LEVEL: [&str; 4] = ["baseline", "tools", "scopes", "agent"];

#[derive(Default)]
struct RawFile {
    baseline: Option<(Range<usize>, RawGroup)>,
    tools: BTreeMap<Spanned<String>, RawGroup>,
    scopes: BTreeMap<Spanned<String>, RawGroup>,
    agent: Option<(Range<usize>, RawAgent)>,
    /// Top-level keys that are not in [`TOP_LEVEL`].
    unknown: Vec<Spanned<String>>,
}

impl<'de> Deserialize<'de> for RawFile {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;

        impl<'de> de::Visitor<'de> for Visitor {
            type Value = RawFile;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a policy file")
            }

            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<RawFile, A::Error> {
                let mut file = RawFile::default();
                // TOML itself refuses a key given twice, so each arm runs at most once.
                while let Some(key) = map.next_key::<Spanned<String>>()? {
                    match key.get_ref().as_str() {
                        "baseline" => file.baseline = Some((key.span(), map.next_value()?)),
                        "tools" => file.tools = map.next_value()?,
                        "scopes" => file.scopes = map.next_value()?,
                        "agent" => file.agent = Some((key.span(), map.next_value()?)),
                        _ => {
                            map.next_value::<de::IgnoredAny>()?;
                            file.unknown.push(key);
                        }
                    }
                }
                Ok(file)
            }
        }

        deserializer.deserialize_map(Visitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    allow: Vec<Spanned<RawRule>>,
    #[serde(default)]
    deny: Vec<Spanned<RawRule>>,
    #[serde(default)]
    inbound: Vec<Spanned<RawInbound>>,
    /// `"enforce"` (the default) or `"audit"`; checked by hand for a clear message.
    mode: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    to: Spanned<String>,
    /// Numbers and `"lo-hi"` strings; checked by hand for clear messages.
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    proto: Option<Spanned<String>>,
}

/// An inbound grant: who may connect or send (`from`) to which of the agent's ports.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInbound {
    from: Spanned<String>,
    ports: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    proto: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgent {
    id: Option<Spanned<String>>,
    token_file: Option<Spanned<String>>,
    token: Option<Spanned<String>>,
    cgroup: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
}

/// Parses and validates one file, collecting every error.
pub(super) fn parse(path: &Path, text: &str) -> Result<PolicyFile, Errors> {
    let (file, errors) = parse_partial(path, text).map_err(|first| Errors { first, rest: Vec::new() })?;
    match Errors::from_vec(errors) {
        None => Ok(file),
        Some(errors) => Err(errors),
    }
}

/// Parses and validates one file. Unless the TOML itself is refused (`Err`), returns what was
/// valid (rules, groups and bindings with errors left out) with every error found, so that
/// cross-file checks can still run over the file and everything is reported at once.
pub(super) fn parse_partial(path: &Path, text: &str) -> Result<(PolicyFile, Vec<PolicyError>), PolicyError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
        // toml puts "expected ..." on a line of its own; errors are one line.
        let message =
            e.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(", ");
        PolicyError::Syntax { path: path.to_owned(), line, column, message }
    })?;
    let mut cx = Checker { path, text, errors: Vec::new() };
    for key in &raw.unknown {
        let (line, column) = line_col(text, key.span().start);
        let expected = TOP_LEVEL.map(|k| format!("`{k}`")).join(", ");
        cx.errors.push(PolicyError::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: format!("unknown field `{}`, expected one of {expected}", key.get_ref()),
        });
    }
    let file = PolicyFile {
        path: path.to_owned(),
        baseline: raw.baseline.map(|(span, group)| cx.group(cx.line(&span), group)),
        tools: cx.groups("tool", raw.tools),
        scopes: cx.groups("scope", raw.scopes),
        binding: raw.agent.and_then(|(span, agent)| cx.binding(cx.line(&span), agent)),
    };
    Ok((file, cx.errors))
}

/// Validation state of one file.
struct Checker<'a> {
    path: &'a Path,
    text: &'a str,
    errors: Vec<PolicyError>,
}

impl Checker<'_> {
    fn line(&self, span: &Range<usize>) -> usize {
        line_col(self.text, span.start).0
    }

    /// Records an error at `line`; returns `None` so a check can end with it.
    fn invalid<T>(&mut self, line: usize, message: String) -> Option<T> {
        self.errors.push(PolicyError::Invalid { path: self.path.to_owned(), line, message });
        None
    }

    fn groups(&mut self, kind: &str, raw: BTreeMap<Spanned<String>, RawGroup>) -> BTreeMap<String, Group> {
        let mut groups = BTreeMap::new();
        for (name, group) in raw {
            let line = self.line(&name.span());
            let name = name.into_inner();
            if name.is_empty() {
                self.invalid::<()>(line, format!("a {kind} name is empty; name every {kind}"));
            } else if name.contains('*') {
                self.invalid::<()>(
                    line,
                    format!("{kind} name {name:?} contains '*'; wildcards are not allowed, name each {kind}"),
                );
            }
            let group = self.group(line, group);
            groups.insert(name, group);
        }
        groups
    }

    fn group(&mut self, line: usize, raw: RawGroup) -> Group {
        let mut names = Vec::new();
        let mut rules = |list: Vec<Spanned<RawRule>>, allow: bool, names: &mut Vec<NameRule>| {
            let mut rules = Vec::new();
            for (index, raw) in list.into_iter().enumerate() {
                match self.rule(raw, allow, index) {
                    Some(To::Net(rule)) => rules.push(rule),
                    Some(To::Name(rule)) => names.push(rule),
                    None => {}
                }
            }
            rules
        };
        let allow = rules(raw.allow, true, &mut names);
        let deny = rules(raw.deny, false, &mut names);
        Group {
            allow,
            deny,
            inbound: raw.inbound.into_iter().filter_map(|r| self.inbound(r)).collect(),
            // An invalid mode is reported; the group is kept (for the cross-file checks) as
            // enforced, and the file is refused anyway.
            mode: raw.mode.as_ref().and_then(|m| self.mode(m)).unwrap_or_default(),
            line,
            names,
        }
    }

    /// `mode = "enforce"` or `"audit"`, exactly (lower case).
    fn mode(&mut self, mode: &Spanned<String>) -> Option<Mode> {
        match mode.get_ref().as_str() {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            other => self.invalid(
                self.line(&mode.span()),
                format!(
                    "mode {other:?} is not a mode; use \"enforce\" (the default) or \"audit\" (dry run: what would be denied is recorded as would_deny and let through)"
                ),
            ),
        }
    }

    /// A rule of `allow` (`allow` true) or `deny`, the `index`th of its list: to an address or
    /// network, or to a DNS name.
    fn rule(&mut self, raw: Spanned<RawRule>, allow: bool, index: usize) -> Option<To> {
        let line = self.line(&raw.span());
        let raw = raw.into_inner();
        let text = raw.to.get_ref().as_str();
        if parse_net(text).is_none() && name::looks_like_name(text) {
            return self.name_rule(&raw, !allow, index, line).map(To::Name);
        }
        let net = self.net("to", &raw.to, allow);
        let protos = raw.proto.as_ref().map_or(Some(Protos::TcpUdp), |p| self.protos(p));
        let ports = raw.ports.map_or(Some(Ports::All), |p| self.ports(p, protos));
        Some(To::Net(Rule { net: net?, ports: ports?, protos: protos?, line }))
    }

    /// A rule whose `to` is a DNS name: checked as a name, for TCP and UDP only, with few
    /// enough ports (each address of an answer is kept once per port and protocol).
    fn name_rule(&mut self, raw: &RawRule, deny: bool, index: usize, line: usize) -> Option<NameRule> {
        let to_line = self.line(&raw.to.span());
        let text = raw.to.get_ref().as_str();
        let pattern = match NamePattern::parse(text) {
            Ok(pattern) => Some(pattern),
            Err(why) => self.invalid(to_line, format!("`to = {text:?}` {why}")),
        };
        let protos = match &raw.proto {
            None => Some(Protos::TcpUdp),
            Some(p) if p.get_ref() == "icmp" => self.invalid(
                self.line(&p.span()),
                format!("a rule to the name {text:?} with proto = \"icmp\" can never match (ping sockets are refused to agents); use \"tcp\" or \"udp\", or leave it out for both"),
            ),
            Some(p) => self.protos(p),
        };
        let ports = raw.ports.clone().map_or(Some(Ports::All), |p| self.ports(p, protos));
        if let (Some(ports), Some(protos)) = (&ports, protos) {
            let per_address = ports.entry_count() * protos.numbers(IpNet::from(IpAddr::from([0u8; 4]))).len();
            if per_address > MAX_NAME_PORTS {
                return self.invalid(
                    line,
                    format!(
                        "the rule to the name {text:?} names {per_address} ports and protocols; a name rule may name at most {MAX_NAME_PORTS} (each address of an answer is granted once per port), or every port (leave `ports` out)"
                    ),
                );
            }
        }
        Some(NameRule { pattern: pattern?, ports: ports?, protos: protos?, deny, index, line })
    }

    /// An inbound grant is an allow (bounded senders) of TCP or UDP: an agent has no socket that
    /// ICMP could be delivered to.
    fn inbound(&mut self, raw: Spanned<RawInbound>) -> Option<Rule> {
        let line = self.line(&raw.span());
        let raw = raw.into_inner();
        let net = self.net("from", &raw.from, true);
        let protos = match &raw.proto {
            None => Some(Protos::TcpUdp),
            Some(p) if p.get_ref() == "icmp" => self.invalid(
                self.line(&p.span()),
                "an inbound rule with proto = \"icmp\" can never match (agents have no ICMP sockets); use \"tcp\" or \"udp\", or leave it out for both".to_owned(),
            ),
            Some(p) => self.protos(p),
        };
        let ports = raw.ports.map_or(Some(Ports::All), |p| self.ports(p, protos));
        Some(Rule { net: net?, ports: ports?, protos: protos?, line })
    }

    /// `key` is the field the address came from (`to`, or `from` in an inbound rule).
    fn net(&mut self, key: &str, to: &Spanned<String>, allow: bool) -> Option<IpNet> {
        let line = self.line(&to.span());
        let text = to.get_ref().as_str();
        let Some(net) = parse_net(text) else {
            if looks_like_dns_name(text) {
                return self.invalid(
                    line,
                    format!("`{key} = {text:?}` is a DNS name; an inbound rule names its senders by IP address or CIDR"),
                );
            }
            return self.invalid(line, format!("`{key} = {text:?}` is not an IPv4/IPv6 address or CIDR"));
        };
        if net != net.trunc() {
            return self.invalid(
                line,
                format!(
                    "`{key} = {text:?}` has host bits set; did you mean {}, or {}/{} for the one address?",
                    net.trunc(),
                    net.addr(),
                    net.max_prefix_len()
                ),
            );
        }
        if allow && is_unbounded(net) {
            return self.invalid(
                line,
                if key == "from" {
                    format!(
                        "an inbound rule from {net} is unbounded (every address) and is refused; list the networks that may connect"
                    )
                } else {
                    format!(
                        "an allow to {net} is unbounded (every address) and is refused; list the networks it needs (only a deny may be unbounded)"
                    )
                },
            );
        }
        Some(net)
    }

    fn protos(&mut self, proto: &Spanned<String>) -> Option<Protos> {
        match proto.get_ref().as_str() {
            "tcp" => Some(Protos::Tcp),
            "udp" => Some(Protos::Udp),
            "icmp" => Some(Protos::Icmp),
            other => self.invalid(
                self.line(&proto.span()),
                format!(
                    "proto {other:?} is not supported; use \"tcp\", \"udp\" or \"icmp\" (ICMPv6 for IPv6 networks), or leave it out for tcp and udp"
                ),
            ),
        }
    }

    /// `protos` is `None` if `proto` was invalid (already reported).
    fn ports(&mut self, ports: Spanned<Vec<Spanned<toml::Value>>>, protos: Option<Protos>) -> Option<Ports> {
        let line = self.line(&ports.span());
        let ports = ports.into_inner();
        if ports.is_empty() {
            return self
                .invalid(line, "`ports = []` can never match; leave `ports` out for every port".to_owned());
        }
        if protos == Some(Protos::Icmp) {
            return self.invalid(
                line,
                "ICMP has no ports, so a rule with proto = \"icmp\" and `ports` can never match; remove `ports`"
                    .to_owned(),
            );
        }
        let mut ranges = Vec::with_capacity(ports.len());
        let mut ok = true;
        for port in ports {
            let line = self.line(&port.span());
            let range = match port.get_ref() {
                toml::Value::Integer(n) => self.port_number(*n, line),
                toml::Value::String(s) => self.port_range(s, line),
                other => self.invalid(
                    line,
                    format!("ports are numbers or \"lo-hi\" strings, not a {}", other.type_str()),
                ),
            };
            match range {
                Some(r) => ranges.push(r),
                None => ok = false,
            }
        }
        ok.then(|| Ports::new(ranges))
    }

    fn port_number(&mut self, n: i64, line: usize) -> Option<PortRange> {
        if n == 0 {
            return self
                .invalid(line, "port 0 is not a destination port; ports run from 1 to 65535".to_owned());
        }
        match u16::try_from(n) {
            Ok(port) => Some(PortRange { lo: port, hi: port }),
            Err(_) => self.invalid(line, format!("port {n} is out of range; ports run from 1 to 65535")),
        }
    }

    fn port_range(&mut self, text: &str, line: usize) -> Option<PortRange> {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        let Some((lo, hi)) = text.split_once('-').filter(|(lo, hi)| digits(lo) && digits(hi)) else {
            if digits(text) {
                return self.invalid(
                    line,
                    format!("port {text:?} is a string; write a single port as a number: {text}"),
                );
            }
            return self.invalid(
                line,
                format!("port range {text:?} is malformed; write \"lo-hi\" with two port numbers, e.g. \"8000-8999\""),
            );
        };
        let (Ok(lo), Ok(hi)) = (lo.parse::<u16>(), hi.parse::<u16>()) else {
            return self
                .invalid(line, format!("port range {text:?} is out of range; ports run from 1 to 65535"));
        };
        if lo == 0 {
            return self.invalid(
                line,
                format!("port range {text:?} starts at port 0, which is not a destination port; ports run from 1 to 65535"),
            );
        }
        if lo > hi {
            return self
                .invalid(line, format!("port range {text:?} is inverted; did you mean \"{hi}-{lo}\"?"));
        }
        Some(PortRange { lo, hi })
    }

    fn binding(&mut self, line: usize, raw: RawAgent) -> Option<Binding> {
        let id = match &raw.id {
            None => {
                self.invalid(line, "[agent] has no id; add `id = \"...\"` with the agent's id".to_owned())
            }
            Some(id) => match id.get_ref().parse::<AgentId>() {
                Ok(id) => Some(id),
                Err(source) => {
                    let line = self.line(&id.span());
                    self.errors.push(PolicyError::AgentId { path: self.path.to_owned(), line, source });
                    None
                }
            },
        };
        let token = match (&raw.token_file, &raw.token) {
            (Some(file), Some(token)) => self.invalid(
                self.line(&file.span()).max(self.line(&token.span())),
                "[agent] has both token_file and token; give exactly one".to_owned(),
            ),
            (None, None) => self.invalid(
                line,
                "[agent] has no token; add `token_file = \"...\"` or `token = \"...\"`".to_owned(),
            ),
            (Some(file), None) => self.token_file(file),
            (None, Some(token)) if token.get_ref().trim().is_empty() => {
                self.invalid(self.line(&token.span()), "`token` is empty".to_owned())
            }
            (None, Some(token)) => Some(TokenSource::Inline(token.get_ref().as_str().into())),
        };
        let cgroup = match &raw.cgroup {
            None => Some(None),
            Some(cgroup) => {
                let path = PathBuf::from(cgroup.get_ref());
                if path.as_os_str().is_empty()
                    || !path.components().all(|c| matches!(c, Component::Normal(_)))
                {
                    let example = id.as_ref().map_or_else(|| "<id>".to_owned(), ToString::to_string);
                    self.invalid(
                        self.line(&cgroup.span()),
                        format!(
                            "cgroup {:?} must be a path relative to the cgroup2 mount without '..', e.g. \"ztseg.slice/{example}\"",
                            cgroup.get_ref()
                        ),
                    )
                } else if id
                    .as_ref()
                    .is_some_and(|id| path.file_name() != Some(std::ffi::OsStr::new(id.as_str())))
                {
                    // A binding names its own agent's cgroup only: another agent's would hand this
                    // binding's grant to that agent's processes and log them under this name.
                    let id = id.as_ref().map_or_else(String::new, ToString::to_string);
                    self.invalid(
                        self.line(&cgroup.span()),
                        format!(
                            "cgroup {:?} must end in the agent's own id {id:?} (e.g. \"ztseg.slice/{id}\"); a binding cannot name another agent's cgroup",
                            cgroup.get_ref()
                        ),
                    )
                } else {
                    Some(Some(path))
                }
            }
        };
        let mode = match &raw.mode {
            None => Some(Mode::Enforce),
            Some(mode) => self.mode(mode),
        };
        Some(Binding {
            id: id?,
            token: token?,
            cgroup: cgroup?,
            mode: mode?,
            path: self.path.to_owned(),
            line,
        })
    }

    fn token_file(&mut self, file: &Spanned<String>) -> Option<TokenSource> {
        let line = self.line(&file.span());
        let name = file.get_ref();
        if name.is_empty() {
            return self.invalid(line, "`token_file` is empty".to_owned());
        }
        let dir = self.path.parent().unwrap_or(Path::new(""));
        match std::path::absolute(dir.join(name)) {
            Ok(path) => Some(TokenSource::File(path)),
            Err(source) => {
                self.errors.push(PolicyError::TokenPath {
                    path: self.path.to_owned(),
                    line,
                    token_file: name.clone(),
                    source,
                });
                None
            }
        }
    }
}

/// What `to` names: a network, or a DNS name.
enum To {
    Net(Rule),
    Name(NameRule),
}

/// Ports times protocols a name rule may name: each address of an answer is one entry of the
/// kernel's `learned` map per port and protocol ("every port" is one).
pub const MAX_NAME_PORTS: usize = 64;

/// An address (one host) or a CIDR network, if `text` is one.
fn parse_net(text: &str) -> Option<IpNet> {
    if text.contains('/') { text.parse::<IpNet>().ok() } else { text.parse::<IpAddr>().ok().map(IpNet::from) }
}

/// Something that is not an address but reads like a host name (`example.com`, `db-1`).
fn looks_like_dns_name(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && text.bytes().any(|b| b.is_ascii_alphabetic())
}

/// Every address of a family: `0.0.0.0/0`, `::/0`, or `::ffff:0:0/96` (every IPv4 address,
/// IPv4-mapped; the dataplane judges those with the IPv4 rules).
fn is_unbounded(net: IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.prefix_len() == 0,
        IpNet::V6(n) => n.prefix_len() == 0 || (n.prefix_len() == 96 && n.addr().to_ipv4_mapped().is_some()),
    }
}
