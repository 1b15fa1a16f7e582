//! A token's grant, compiled against the catalogue into rule-trie entries.
//!
//! The baseline and every granted scope and tool contribute their allows (and inbound grants) as
//! allows and their denies as denies; every forbidden tool contributes all its rules, allows and
//! inbound grants included, as denies, which win over any allow. Anything the catalogue does not define refuses the whole grant: a
//! partial grant would hand an agent rights nobody reviewed as a set.
//!
//! A group in audit mode (`mode = "audit"`) contributes its outbound denies (a forbidden tool's
//! allows included) as audit denies ([`Verdict::AuditDeny`]): what they cover of what an allow
//! grants is let through as `would_deny`. Its allows and inbound grants are allows as in
//! enforce mode, and a forbidden tool's inbound grants stay denies: inbound traffic is never
//! dry-run.
//!
//! Allows hidden under denies are pruned later, when the table is encoded
//! ([`crate::dataplane::table::encode`]).

use std::{collections::BTreeSet, fmt};

use ipnet::IpNet;
use ztseg_common::rule::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use super::{Catalogue, Group, Mode, NamePattern, Ports, Protos, Rule};
use crate::dataplane::{Entry, Verdict};

/// Most entries one grant may expand to.
pub const MAX_ENTRIES: usize = 1_000_000;

/// What a token grants, by catalogue name. Names may repeat; each is compiled once.
#[derive(Clone, Copy, Debug, Default)]
pub struct Grant<'a> {
    pub scopes: &'a [String],
    pub tools: &'a [String],
    pub forbidden_tools: &'a [String],
}

/// A compiled grant.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Compiled {
    pub entries: Vec<Entry>,
    /// The rules to DNS names, for the DNS proxy (they make no trie entry: the proxy writes
    /// the addresses of its answers for them).
    pub names: Vec<NameGrant>,
    /// One per catalogue rule, indexed by [`Entry::rule_id`]: `baseline#0`, `tool:http#1`,
    /// `scope:read:x#deny0`, `forbidden:tool:bash#0`, ...
    pub origins: Vec<String>,
    /// Catalogue rules compiled (`origins.len()`).
    pub rules: usize,
}

/// A rule to a DNS name in a compiled grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NameGrant {
    pub pattern: NamePattern,
    /// `Deny` for a deny rule and for every rule of a forbidden tool.
    pub verdict: Verdict,
    /// Index into [`Compiled::origins`].
    pub rule_id: u32,
    pub ports: Ports,
    pub protos: Protos,
}

/// The part of a grant a name came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantKind {
    Scope,
    Tool,
    ForbiddenTool,
}

impl fmt::Display for GrantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Scope => "scope",
            Self::Tool => "tool",
            Self::ForbiddenTool => "forbidden tool",
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CompileError {
    #[error("{kind} {name:?} is not defined in the capability catalogue, so the whole grant is refused")]
    Unknown { kind: GrantKind, name: String },
    #[error("{kind} {name:?} is a wildcard, so the whole grant is refused; grant exact names")]
    Wildcard { kind: GrantKind, name: String },
    #[error("the grant expands to {count} rule entries, more than the limit of {limit}, so it is refused")]
    TooManyEntries { count: usize, limit: usize },
}

/// How a group's allows count in a grant.
#[derive(Clone, Copy)]
enum Role {
    Granted,
    Forbidden,
}

impl Catalogue {
    /// Compiles `grant`: every entry, in catalogue-rule order, or a refusal of the whole grant.
    pub fn compile(&self, grant: &Grant<'_>) -> Result<Compiled, CompileError> {
        let mut parts: Vec<(String, &Group, Role)> = Vec::new();
        if let Some(baseline) = &self.baseline {
            parts.push(("baseline".to_owned(), baseline, Role::Granted));
        }
        for (kind, names) in [
            (GrantKind::Scope, grant.scopes),
            (GrantKind::Tool, grant.tools),
            (GrantKind::ForbiddenTool, grant.forbidden_tools),
        ] {
            let (groups, prefix, role) = match kind {
                GrantKind::Scope => (&self.scopes, "scope", Role::Granted),
                GrantKind::Tool => (&self.tools, "tool", Role::Granted),
                GrantKind::ForbiddenTool => (&self.tools, "forbidden:tool", Role::Forbidden),
            };
            let mut seen = BTreeSet::new();
            for name in names {
                if !seen.insert(name) {
                    continue;
                }
                if name.contains('*') {
                    return Err(CompileError::Wildcard { kind, name: name.clone() });
                }
                let group =
                    groups.get(name).ok_or_else(|| CompileError::Unknown { kind, name: name.clone() })?;
                parts.push((format!("{prefix}:{name}"), group, role));
            }
        }

        let count: usize = parts
            .iter()
            .flat_map(|(_, g, _)| g.allow.iter().chain(&g.deny).chain(&g.inbound))
            .map(Rule::entry_count)
            .sum();
        if count > MAX_ENTRIES {
            return Err(CompileError::TooManyEntries { count, limit: MAX_ENTRIES });
        }
        let mut compiled = Compiled { entries: Vec::with_capacity(count), ..Compiled::default() };
        for (prefix, group, role) in parts {
            let deny = match group.mode {
                Mode::Enforce => Verdict::Deny,
                Mode::Audit => Verdict::AuditDeny,
            };
            let (allow_verdict, inbound_verdict) = match role {
                Role::Granted => (Verdict::Allow, Verdict::Allow),
                // Inbound traffic is never dry-run: an audit entry's inbound denies deny.
                Role::Forbidden => (deny, Verdict::Deny),
            };
            // A rule's `#N` is its place in its list, names included.
            for (i, rule) in address_positions(group, false).zip(&group.allow) {
                compiled.push(format!("{prefix}#{i}"), rule, false, allow_verdict);
            }
            for (i, rule) in address_positions(group, true).zip(&group.deny) {
                compiled.push(format!("{prefix}#deny{i}"), rule, false, deny);
            }
            for (i, rule) in group.inbound.iter().enumerate() {
                compiled.push(format!("{prefix}#in{i}"), rule, true, inbound_verdict);
            }
            for name in &group.names {
                let (origin, verdict) = if name.deny {
                    (format!("{prefix}#deny{}", name.index), Verdict::Deny)
                } else {
                    (format!("{prefix}#{}", name.index), allow_verdict)
                };
                let rule_id = u32::try_from(compiled.origins.len()).unwrap_or(u32::MAX);
                compiled.origins.push(origin);
                compiled.names.push(NameGrant {
                    pattern: name.pattern.clone(),
                    verdict,
                    rule_id,
                    ports: name.ports.normalized(),
                    protos: name.protos,
                });
            }
        }
        compiled.rules = compiled.origins.len();
        Ok(compiled)
    }
}

/// The places in its list (`allow`, or `deny`) of a group's address rules, in order: every
/// place no name rule of that list takes.
fn address_positions(group: &Group, deny: bool) -> impl Iterator<Item = usize> + '_ {
    let taken: BTreeSet<usize> = group.names.iter().filter(|n| n.deny == deny).map(|n| n.index).collect();
    (0..).filter(move |i| !taken.contains(i))
}

impl Compiled {
    /// Whether the grant lets the agent resolve some name.
    pub fn allows_names(&self) -> bool {
        self.names.iter().any(|n| n.verdict == Verdict::Allow)
    }

    fn push(&mut self, origin: String, rule: &Rule, inbound: bool, verdict: Verdict) {
        // At most MAX_ENTRIES rules (each has an entry), so the id always fits.
        let rule_id = u32::try_from(self.origins.len()).unwrap_or(u32::MAX);
        self.origins.push(origin);
        let net = rule.net;
        let mut entry =
            |proto, port| self.entries.push(Entry { net, proto, port, inbound, verdict, rule_id });
        // Normalized again: a hand-made `Ranges` covering 1-65535 is every port too.
        let ports = rule.ports.normalized();
        for &proto in rule.protos.numbers(net) {
            match &ports {
                Ports::All => entry(proto, 0),
                Ports::Ranges(ranges) => {
                    for r in ranges {
                        for port in r.lo..=r.hi {
                            entry(proto, port);
                        }
                    }
                }
            }
        }
    }
}

impl Rule {
    /// Entries this rule expands to.
    pub fn entry_count(&self) -> usize {
        self.protos.numbers(self.net).len() * self.ports.normalized().entry_count()
    }
}

impl Protos {
    /// IP protocol numbers for destinations in `net`.
    pub fn numbers(self, net: IpNet) -> &'static [u8] {
        match self {
            Self::Tcp => &[PROTO_TCP],
            Self::Udp => &[PROTO_UDP],
            Self::TcpUdp => &[PROTO_TCP, PROTO_UDP],
            Self::Icmp if judged_as_ipv4(net) => &[PROTO_ICMP],
            Self::Icmp => &[PROTO_ICMPV6],
        }
    }
}

/// IPv4 networks, and IPv4-mapped IPv6 networks (the dataplane turns those into IPv4 rules).
fn judged_as_ipv4(net: IpNet) -> bool {
    match net {
        IpNet::V4(_) => true,
        IpNet::V6(n) => n.prefix_len() >= 96 && n.addr().to_ipv4_mapped().is_some(),
    }
}
