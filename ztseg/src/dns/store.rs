//! The names each agent has resolved through the proxy and the addresses they granted: the
//! daemon's side of the kernel's `learned` map, its only writer.
//!
//! An answer's addresses are written into the map (one entry per address, port and protocol of
//! each rule that allows the name) before the proxy releases the answer, each with an expiry
//! of the answer's TTL clamped to `[dns] ttl_min_seconds..ttl_max_seconds` and never past the
//! token's `exp`; the kernel itself stops honouring an entry at its expiry, and a sweep every
//! second deletes what expired. A new grant re-derives every entry from the names held and the
//! new rules before the kernel switches to it: a name the new grant no longer allows loses its
//! addresses, a rule with other ports gets its entries moved.
//!
//! Bounded: at most `max_names` names and `max_addresses` entries per agent; past either, a
//! query is refused (`full`) rather than anything evicted.

use std::{
    collections::{HashMap, HashSet},
    io,
    net::IpAddr,
    sync::Arc,
};

use ztseg_common::{
    decision::reason,
    dns::{Learned, LearnedValue, reason as dns_reason},
    event::{FAMILY_V4, FAMILY_V6},
};

use super::rules::{Judged, NameRules};
use crate::{events::TableInfo, policy::Ports};

/// The kernel's `learned` map, as the store writes it (a fake in unit tests).
pub trait LearnedMap: Send {
    fn write(&mut self, key: &Learned, value: &LearnedValue) -> io::Result<()>;
    fn delete(&mut self, key: &Learned) -> io::Result<()>;
    /// Every entry (read once, at start).
    fn all(&self) -> io::Result<Vec<(Learned, LearnedValue)>>;
}

impl LearnedMap for crate::dataplane::LearnedMap {
    fn write(&mut self, key: &Learned, value: &LearnedValue) -> io::Result<()> {
        self.insert(key, value, 0).map_err(io::Error::other)
    }

    fn delete(&mut self, key: &Learned) -> io::Result<()> {
        match self.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(io::Error::other(e)),
        }
    }

    fn all(&self) -> io::Result<Vec<(Learned, LearnedValue)>> {
        self.iter().map(|e| e.map_err(io::Error::other)).collect()
    }
}

/// The store's limits, from `[dns]`.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub ttl_min_ns: u64,
    pub ttl_max_ns: u64,
    pub max_names: usize,
    pub max_addresses: usize,
    pub wildcard_names: usize,
    pub wildcard_window_ns: u64,
}

impl Limits {
    pub fn of(dns: &crate::config::Dns) -> Self {
        const S: u64 = 1_000_000_000;
        Self {
            ttl_min_ns: u64::from(dns.ttl_min_seconds) * S,
            ttl_max_ns: u64::from(dns.ttl_max_seconds) * S,
            max_names: dns.max_names,
            max_addresses: dns.max_addresses,
            wildcard_names: dns.wildcard_names,
            wildcard_window_ns: dns.wildcard_window_seconds * S,
        }
    }
}

/// Who a query is from, for its record.
#[derive(Clone, Debug)]
pub struct Who {
    pub agent: Arc<str>,
    pub cgroup_id: u64,
    pub uid: u32,
    /// The grant in force (op, jti, origins), if any.
    pub table: Option<Arc<TableInfo>>,
}

/// Why the store refused: a reason (`decision::reason` or `dns::reason`) and the rule behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub reason: u8,
    pub rule_id: Option<u32>,
    /// Said in the daemon's log and the record's `detail`.
    pub detail: String,
}

impl Refused {
    fn new(reason: u8, detail: impl Into<String>) -> Self {
        Self { reason, rule_id: None, detail: detail.into() }
    }
}

/// A query the rules allow, to be forwarded.
#[derive(Clone, Debug)]
pub struct Admitted {
    pub cgroup_id: u64,
    /// The rules it was admitted under; CNAMEs are checked against them.
    pub rules: Arc<NameRules>,
    /// The grants allowing the name (indexes into `rules.grants`).
    pub grants: Vec<usize>,
}

/// What an install wrote: the TTL to hand out for each address, and the rule behind them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub ttls: Vec<u32>,
    pub rule_id: u32,
}

struct Grant {
    rules: Arc<NameRules>,
    deadline_ns: u64,
}

/// Distinct names queried under one wildcard in the current window.
struct Budget {
    since_ns: u64,
    names: HashSet<String>,
}

struct Agent {
    who: Who,
    grant: Option<Grant>,
    /// Name -> address -> expiry (boot ns).
    names: HashMap<String, HashMap<IpAddr, u64>>,
    /// What is in the kernel for this agent.
    keys: HashMap<Learned, LearnedValue>,
    /// Entries a previous daemon left, whose names are not known: kept while a rule of the
    /// same fingerprint is granted, until they expire.
    anonymous: HashMap<Learned, LearnedValue>,
    /// By wildcard pattern.
    budgets: HashMap<String, Budget>,
}

/// Every agent's names and addresses, and the map they are written to.
pub struct Store {
    map: Box<dyn LearnedMap>,
    limits: Limits,
    agents: HashMap<u64, Agent>,
    slots: HashMap<u32, u64>,
    /// Entries found in the pinned map at start, by cgroup, until that agent registers.
    adopted: HashMap<u64, Vec<(Learned, LearnedValue)>>,
}

/// The address as the kernel judges it: IPv4-mapped IPv6 as IPv4.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// An address an answer may not grant: this host and its loopback (the proxy included), the
/// unspecified address, link-local (cloud metadata services live there) and multicast or
/// broadcast. A name rule lets an agent reach the servers of a name, never the host it runs on.
pub fn forbidden_answer(addr: IpAddr) -> bool {
    match canonical(addr) {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_unspecified()
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local()
        }
    }
}

pub(crate) fn key(cgroup_id: u64, addr: IpAddr, proto: u8, port: u16) -> Learned {
    let (family, words) = match canonical(addr) {
        IpAddr::V4(v4) => (FAMILY_V4, [u32::from_ne_bytes(v4.octets()), 0, 0, 0]),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            (
                FAMILY_V6,
                [0, 1, 2, 3]
                    .map(|i| u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])),
            )
        }
    };
    Learned { cgroup_id, addr: words, port: port.to_be_bytes(), family, proto, _pad: 0 }
}

/// The ports of a grant as map keys: 0 for every port.
fn ports_of(ports: &Ports) -> Vec<u16> {
    match ports {
        Ports::All => vec![0],
        Ports::Ranges(ranges) => ranges.iter().flat_map(|r| r.lo..=r.hi).collect(),
    }
}

/// The entries `addrs` (address -> expiry) of a name allowed by `grants` of `rules` make.
fn entries_of(
    cgroup_id: u64,
    rules: &NameRules,
    grants: &[usize],
    addrs: &HashMap<IpAddr, u64>,
    into: &mut HashMap<Learned, LearnedValue>,
) {
    for &g in grants {
        let Some(grant) = rules.grants.get(g) else { continue };
        let ip = IpAddr::from([0u8; 4]);
        let protos = grant.protos.numbers(ipnet::IpNet::from(ip));
        for (&addr, &expires_ns) in addrs {
            for &proto in protos {
                for port in ports_of(&grant.ports) {
                    let value =
                        LearnedValue { expires_ns, rule_id: grant.rule_id, check: rules.fingerprint(g) };
                    into.entry(key(cgroup_id, addr, proto, port))
                        .and_modify(|v| v.expires_ns = v.expires_ns.max(expires_ns))
                        .or_insert(value);
                }
            }
        }
    }
}

impl Store {
    /// A store over `map`, which may hold entries a previous daemon wrote: they are kept for
    /// their agents (see [`Store::register`]) and the rest deleted by [`Store::forget_strangers`].
    pub fn new(map: Box<dyn LearnedMap>, limits: Limits) -> io::Result<Self> {
        let mut adopted: HashMap<u64, Vec<(Learned, LearnedValue)>> = HashMap::new();
        for (key, value) in map.all()? {
            adopted.entry(key.cgroup_id).or_default().push((key, value));
        }
        Ok(Self { map, limits, agents: HashMap::new(), slots: HashMap::new(), adopted })
    }

    /// An agent is registered in `slot` (its proxy address).
    pub fn register(&mut self, cgroup_id: u64, slot: u32, agent: &str, uid: u32) {
        let anonymous: HashMap<Learned, LearnedValue> =
            self.adopted.remove(&cgroup_id).unwrap_or_default().into_iter().collect();
        let who = Who { agent: agent.into(), cgroup_id, uid, table: None };
        self.slots.retain(|_, c| *c != cgroup_id);
        self.slots.insert(slot, cgroup_id);
        let keys = anonymous.clone();
        self.agents.insert(
            cgroup_id,
            Agent { who, grant: None, names: HashMap::new(), keys, anonymous, budgets: HashMap::new() },
        );
    }

    /// The agent is gone: its entries are deleted.
    pub fn unregister(&mut self, cgroup_id: u64) {
        self.withdraw(cgroup_id);
        self.agents.remove(&cgroup_id);
        self.slots.retain(|_, c| *c != cgroup_id);
    }

    /// Entries of cgroups no registered agent has (a previous daemon's agents that are gone).
    pub fn forget_strangers(&mut self) {
        for (_, entries) in std::mem::take(&mut self.adopted) {
            for (key, _) in entries {
                let _ = self.map.delete(&key);
            }
        }
    }

    /// The agent's grant is replaced (before the kernel switches to it): `rules` and the
    /// token's deadline. Every entry is derived again; the map is changed to match. Errors of
    /// single writes are logged: an entry that cannot be deleted still expires in the kernel.
    pub fn regrant(
        &mut self,
        cgroup_id: u64,
        rules: Arc<NameRules>,
        deadline_ns: u64,
        table: Arc<TableInfo>,
    ) {
        let Some(agent) = self.agents.get_mut(&cgroup_id) else { return };
        agent.who.table = Some(table);
        agent.grant = Some(Grant { rules, deadline_ns });
        Self::rederive(&mut *self.map, agent);
    }

    /// The agent holds no grant: every entry of it goes.
    pub fn withdraw(&mut self, cgroup_id: u64) {
        let Some(agent) = self.agents.get_mut(&cgroup_id) else { return };
        agent.grant = None;
        agent.who.table = None;
        agent.names.clear();
        agent.anonymous.clear();
        agent.budgets.clear();
        for key in std::mem::take(&mut agent.keys).into_keys() {
            if let Err(e) = self.map.delete(&key) {
                tracing::warn!(error = %e, "cannot delete a learned DNS entry; it expires in the kernel");
            }
        }
    }

    /// Derives the agent's entries from its names and grant and writes the difference.
    fn rederive(map: &mut dyn LearnedMap, agent: &mut Agent) {
        let mut wanted: HashMap<Learned, LearnedValue> = HashMap::new();
        if let Some(grant) = &agent.grant {
            let cgroup_id = agent.who.cgroup_id;
            agent.names.retain(|name, addrs| match grant.rules.judge(name) {
                Judged::Allowed { grants, .. } => {
                    for expires in addrs.values_mut() {
                        *expires = (*expires).min(grant.deadline_ns);
                    }
                    entries_of(cgroup_id, &grant.rules, &grants, addrs, &mut wanted);
                    true
                }
                _ => false,
            });
            agent.anonymous.retain(|key, value| match grant.rules.by_fingerprint(value.check) {
                Some(g) => {
                    let rule_id = grant.rules.grants[g].rule_id;
                    let kept = LearnedValue {
                        rule_id,
                        expires_ns: value.expires_ns.min(grant.deadline_ns),
                        ..*value
                    };
                    *value = kept;
                    wanted.entry(*key).or_insert(kept);
                    true
                }
                None => false,
            });
        } else {
            agent.names.clear();
            agent.anonymous.clear();
        }
        for key in agent.keys.keys().filter(|k| !wanted.contains_key(k)).copied().collect::<Vec<_>>() {
            if let Err(e) = map.delete(&key) {
                tracing::warn!(error = %e, "cannot delete a learned DNS entry; it expires in the kernel");
            }
            agent.keys.remove(&key);
        }
        for (key, value) in wanted {
            if agent.keys.get(&key) == Some(&value) {
                continue;
            }
            match map.write(&key, &value) {
                Ok(()) => {
                    agent.keys.insert(key, value);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write a learned DNS entry after a grant; the name is refused until asked again")
                }
            }
        }
    }

    /// Who is behind the proxy address of `slot`.
    pub fn who(&self, slot: u32) -> Option<Who> {
        let cgroup_id = self.slots.get(&slot)?;
        self.agents.get(cgroup_id).map(|a| a.who.clone())
    }

    /// Whether `name` may be asked upstream for the agent in `slot`: its grant allows it, its
    /// wildcard's budget has room (the name is counted), and it may hold one more name.
    pub fn admit(&mut self, slot: u32, name: &str, now_ns: u64) -> Result<Admitted, Refused> {
        let limits = self.limits;
        let agent = self
            .slots
            .get(&slot)
            .and_then(|c| self.agents.get_mut(c))
            .ok_or_else(|| Refused::new(reason::UNREGISTERED, "no agent has this proxy address"))?;
        let (rules, deadline_ns) = agent
            .grant
            .as_ref()
            .map(|g| (g.rules.clone(), g.deadline_ns))
            .ok_or_else(|| Refused::new(reason::NO_TOKEN, "the agent holds no token"))?;
        if now_ns >= deadline_ns {
            return Err(Refused::new(reason::EXPIRED, "the agent's token has expired"));
        }
        let (grants, wildcard) = match rules.judge(name) {
            Judged::Allowed { grants, wildcard } => (grants, wildcard),
            Judged::Denied(rule_id) => {
                return Err(Refused {
                    reason: reason::FORBIDDEN,
                    rule_id: Some(rule_id),
                    detail: "a deny rule names it".into(),
                });
            }
            Judged::NoRule => {
                return Err(Refused::new(reason::NO_RULE, "no rule of the agent allows this name"));
            }
        };
        if let Some(w) = wildcard {
            let pattern = rules.grants[w].pattern.to_string();
            let budget = agent
                .budgets
                .entry(pattern.clone())
                .or_insert_with(|| Budget { since_ns: now_ns, names: HashSet::new() });
            if now_ns.saturating_sub(budget.since_ns) >= limits.wildcard_window_ns {
                (budget.since_ns, budget.names) = (now_ns, HashSet::new());
            }
            if !budget.names.contains(name) {
                if budget.names.len() >= limits.wildcard_names {
                    return Err(Refused {
                        reason: dns_reason::BUDGET,
                        rule_id: Some(rules.grants[w].rule_id),
                        detail: format!(
                            "{} distinct names under {pattern} in this window already, the budget",
                            budget.names.len()
                        ),
                    });
                }
                budget.names.insert(name.to_owned());
            }
        }
        if !agent.names.contains_key(name) && agent.names.len() >= limits.max_names {
            Self::sweep_agent(&mut *self.map, agent, now_ns, limits.wildcard_window_ns);
            if agent.names.len() >= limits.max_names {
                return Err(Refused::new(
                    dns_reason::FULL,
                    format!("the agent holds {} names, its most", agent.names.len()),
                ));
            }
        }
        Ok(Admitted { cgroup_id: agent.who.cgroup_id, rules, grants })
    }

    /// Whether a CNAME target is allowed under the rules a query was admitted with.
    pub fn link_allowed(admitted: &Admitted, target: &str) -> bool {
        matches!(admitted.rules.judge(target), Judged::Allowed { .. })
    }

    /// Writes the addresses of an answer to `name` (each with its TTL in seconds) for the
    /// agent; returns the TTL to hand out for each. Nothing is written if the agent's grant
    /// no longer allows the name, or it would hold more than its limits; a failed write
    /// undoes this install's writes.
    pub fn install(
        &mut self,
        admitted: &Admitted,
        name: &str,
        addrs: &[(IpAddr, u32)],
        now_ns: u64,
    ) -> Result<Installed, Refused> {
        let limits = self.limits;
        let agent = self
            .agents
            .get_mut(&admitted.cgroup_id)
            .ok_or_else(|| Refused::new(reason::UNREGISTERED, "the agent is gone"))?;
        let (rules, deadline_ns) = agent
            .grant
            .as_ref()
            .map(|g| (g.rules.clone(), g.deadline_ns))
            .ok_or_else(|| Refused::new(reason::NO_TOKEN, "the agent holds no token"))?;
        if now_ns >= deadline_ns {
            return Err(Refused::new(reason::EXPIRED, "the agent's token has expired"));
        }
        // The grant may have changed while the upstream answered: judged again under the one
        // in force.
        let grants = if Arc::ptr_eq(&rules, &admitted.rules) {
            admitted.grants.clone()
        } else {
            match rules.judge(name) {
                Judged::Allowed { grants, .. } => grants,
                Judged::Denied(rule_id) => {
                    return Err(Refused {
                        reason: reason::FORBIDDEN,
                        rule_id: Some(rule_id),
                        detail: "a deny rule names it".into(),
                    });
                }
                Judged::NoRule => {
                    return Err(Refused::new(reason::NO_RULE, "no rule of the agent allows this name"));
                }
            }
        };
        let rule_id = grants.first().and_then(|&g| rules.grants.get(g)).map_or(u32::MAX, |g| g.rule_id);
        let mut expiries: HashMap<IpAddr, u64> = HashMap::new();
        let mut ttls = Vec::with_capacity(addrs.len());
        for &(addr, ttl) in addrs {
            let granted = (u64::from(ttl) * 1_000_000_000).clamp(limits.ttl_min_ns, limits.ttl_max_ns);
            let expires = now_ns.saturating_add(granted).min(deadline_ns);
            let kept = expiries.entry(canonical(addr)).or_insert(0);
            *kept = (*kept).max(expires);
            // Never longer than the entry lasts (nor than the upstream said).
            ttls.push(ttl.min(u32::try_from((expires - now_ns) / 1_000_000_000).unwrap_or(u32::MAX)));
        }
        let mut wanted = HashMap::new();
        entries_of(agent.who.cgroup_id, &rules, &grants, &expiries, &mut wanted);
        let new_name = !agent.names.contains_key(name);
        let count_new = |agent: &Agent| wanted.keys().filter(|k| !agent.keys.contains_key(k)).count();
        if agent.keys.len() + count_new(agent) > limits.max_addresses
            || (new_name && agent.names.len() >= limits.max_names)
        {
            Self::sweep_agent(&mut *self.map, agent, now_ns, limits.wildcard_window_ns);
            if agent.keys.len() + count_new(agent) > limits.max_addresses {
                return Err(Refused::new(
                    dns_reason::FULL,
                    format!(
                        "the agent holds {} learned addresses, and the answer needs {} more, past its most ({})",
                        agent.keys.len(),
                        count_new(agent),
                        limits.max_addresses
                    ),
                ));
            }
            if new_name && agent.names.len() >= limits.max_names {
                return Err(Refused::new(
                    dns_reason::FULL,
                    format!("the agent holds {} names, its most", agent.names.len()),
                ));
            }
        }
        let mut written: Vec<(Learned, Option<LearnedValue>)> = Vec::new();
        for (key, value) in &wanted {
            let before = agent.keys.get(key).copied();
            let next = match before {
                Some(old) if old.expires_ns >= value.expires_ns => continue,
                Some(old) => LearnedValue { expires_ns: value.expires_ns, ..old },
                None => *value,
            };
            if let Err(e) = self.map.write(key, &next) {
                for (key, before) in written {
                    let _ = match before {
                        Some(old) => self.map.write(&key, &old),
                        None => self.map.delete(&key),
                    };
                }
                return Err(Refused::new(
                    dns_reason::INSTALL,
                    format!("the kernel refused a learned entry: {e}"),
                ));
            }
            written.push((*key, before));
        }
        for (key, _) in &written {
            let value = wanted[key];
            agent
                .keys
                .entry(*key)
                .and_modify(|v| v.expires_ns = v.expires_ns.max(value.expires_ns))
                .or_insert(value);
        }
        let held = agent.names.entry(name.to_owned()).or_default();
        for (addr, expires) in expiries {
            let kept = held.entry(addr).or_insert(0);
            *kept = (*kept).max(expires);
        }
        Ok(Installed { ttls, rule_id })
    }

    /// Deletes what expired, for every agent (every second).
    pub fn sweep(&mut self, now_ns: u64) {
        for agent in self.agents.values_mut() {
            Self::sweep_agent(&mut *self.map, agent, now_ns, self.limits.wildcard_window_ns);
        }
    }

    fn sweep_agent(map: &mut dyn LearnedMap, agent: &mut Agent, now_ns: u64, window_ns: u64) {
        agent.keys.retain(|key, value| {
            if value.expires_ns > now_ns {
                return true;
            }
            if let Err(e) = map.delete(key) {
                tracing::warn!(error = %e, "cannot delete an expired learned DNS entry (the kernel no longer honours it)");
            }
            false
        });
        agent.anonymous.retain(|_, value| value.expires_ns > now_ns);
        for addrs in agent.names.values_mut() {
            addrs.retain(|_, expires| *expires > now_ns);
        }
        agent.names.retain(|_, addrs| !addrs.is_empty());
        // A window that ended counts nothing any more.
        agent.budgets.retain(|_, b| now_ns.saturating_sub(b.since_ns) < window_ns);
    }

    /// Names and entries held, all agents together.
    pub fn totals(&self) -> (usize, usize) {
        self.agents.values().fold((0, 0), |(n, k), a| (n + a.names.len(), k + a.keys.len()))
    }
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
