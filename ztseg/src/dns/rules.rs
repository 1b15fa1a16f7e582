//! One agent's name rules, indexed for the proxy: what a query name is to the grant in force.

use std::{collections::HashMap, sync::Arc};

use crate::{
    dataplane::Verdict,
    policy::{NameGrant, NamePattern},
};

/// What the rules say of a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judged {
    /// Allowed by these rules (indexes into [`NameRules::grants`]); `wildcard` is set when no
    /// exact rule allows it, only wildcards: the budget of that wildcard (the first) applies.
    Allowed { grants: Vec<usize>, wildcard: Option<usize> },
    /// Refused by a deny rule (its rule id).
    Denied(u32),
    /// No rule allows it.
    NoRule,
}

/// The name rules of one grant.
#[derive(Debug, Default)]
pub struct NameRules {
    pub grants: Vec<NameGrant>,
    /// Allowed names and wildcard parents -> the grants allowing them.
    exact: HashMap<String, Vec<usize>>,
    wildcard: HashMap<String, Vec<usize>>,
    /// Denied names (and everything below) and wildcard parents (everything below) -> rule id.
    deny_exact: HashMap<String, u32>,
    deny_below: HashMap<String, u32>,
    /// Fingerprint of each grant (what a `learned` entry's `check` holds): its origin,
    /// pattern, ports and protocols.
    fingerprints: Vec<u32>,
}

impl NameRules {
    /// `origins` are the grant's (a name grant's `rule_id` indexes them).
    pub fn new(grants: Vec<NameGrant>, origins: &[String]) -> Arc<Self> {
        let mut rules = Self::default();
        for (i, grant) in grants.iter().enumerate() {
            match (&grant.pattern, grant.verdict) {
                (NamePattern::Exact(name), Verdict::Allow) => {
                    rules.exact.entry(name.clone()).or_default().push(i)
                }
                (NamePattern::Wildcard(parent), Verdict::Allow) => {
                    rules.wildcard.entry(parent.clone()).or_default().push(i);
                }
                // The proxy does not dry-run: a name denied by an entry in audit mode is denied.
                (NamePattern::Exact(name), Verdict::Deny | Verdict::AuditDeny) => {
                    rules.deny_exact.entry(name.clone()).or_insert(grant.rule_id);
                }
                (NamePattern::Wildcard(parent), Verdict::Deny | Verdict::AuditDeny) => {
                    rules.deny_below.entry(parent.clone()).or_insert(grant.rule_id);
                }
            }
            let origin = origins.get(grant.rule_id as usize).map_or("", String::as_str);
            rules.fingerprints.push(fingerprint(origin, grant));
        }
        rules.grants = grants;
        Arc::new(rules)
    }

    /// Whether any rule allows some name.
    pub fn allows_any(&self) -> bool {
        !self.exact.is_empty() || !self.wildcard.is_empty()
    }

    /// What the rules say of `name` (lower case, no trailing dot). A deny wins over any allow.
    pub fn judge(&self, name: &str) -> Judged {
        // The name and each domain above it: a deny of any of them covers the name.
        let mut suffix = name;
        let mut first = true;
        loop {
            if let Some(&rule) = self.deny_exact.get(suffix) {
                return Judged::Denied(rule);
            }
            if !first && let Some(&rule) = self.deny_below.get(suffix) {
                return Judged::Denied(rule);
            }
            first = false;
            match suffix.split_once('.') {
                Some((_, rest)) => suffix = rest,
                None => break,
            }
        }
        let exact = self.exact.get(name);
        let wild = name
            .split_once('.')
            .and_then(|(label, parent)| (!label.is_empty()).then(|| self.wildcard.get(parent)).flatten());
        let mut grants: Vec<usize> = exact.into_iter().chain(wild).flatten().copied().collect();
        if grants.is_empty() {
            return Judged::NoRule;
        }
        grants.sort_unstable();
        grants.dedup();
        let wildcard = if exact.is_some() { None } else { wild.and_then(|w| w.first().copied()) };
        Judged::Allowed { grants, wildcard }
    }

    pub fn fingerprint(&self, grant: usize) -> u32 {
        self.fingerprints.get(grant).copied().unwrap_or(0)
    }

    /// The grant with this fingerprint, if any (a restarted daemon's check of a kept entry).
    pub fn by_fingerprint(&self, check: u32) -> Option<usize> {
        self.fingerprints.iter().position(|&f| f == check && f != 0)
    }
}

/// FNV-1a over what a grant is, never 0 (0 marks "no fingerprint").
fn fingerprint(origin: &str, grant: &NameGrant) -> u32 {
    let text = format!("{origin}|{}|{:?}|{:?}|{:?}", grant.pattern, grant.ports, grant.protos, grant.verdict);
    let mut hash: u32 = 0x811c_9dc5;
    for byte in text.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Ports, Protos};

    fn grant(pattern: &str, verdict: Verdict, rule_id: u32) -> NameGrant {
        NameGrant {
            pattern: NamePattern::parse(pattern).unwrap(),
            verdict,
            rule_id,
            ports: Ports::All,
            protos: Protos::TcpUdp,
        }
    }

    fn rules() -> Arc<NameRules> {
        let origins: Vec<String> = (0..5).map(|i| format!("tool:t#{i}")).collect();
        NameRules::new(
            vec![
                grant("api.example.com", Verdict::Allow, 0),
                grant("*.example.com", Verdict::Allow, 1),
                grant("*.cdn.example.net", Verdict::Allow, 2),
                grant("evil.example.com", Verdict::Deny, 3),
                grant("*.bad.example.net", Verdict::Deny, 4),
            ],
            &origins,
        )
    }

    #[test]
    fn exact_and_one_label_wildcards_allow_denies_cover_everything_below() {
        let r = rules();
        assert_eq!(r.judge("api.example.com"), Judged::Allowed { grants: vec![0, 1], wildcard: None });
        assert_eq!(r.judge("www.example.com"), Judged::Allowed { grants: vec![1], wildcard: Some(1) });
        assert_eq!(r.judge("a.b.example.com"), Judged::NoRule);
        assert_eq!(r.judge("example.com"), Judged::NoRule);
        assert_eq!(r.judge("evil.example.com"), Judged::Denied(3));
        assert_eq!(r.judge("x.evil.example.com"), Judged::Denied(3));
        assert_eq!(r.judge("x.bad.example.net"), Judged::Denied(4));
        assert_eq!(r.judge("a.x.bad.example.net"), Judged::Denied(4));
        assert_eq!(r.judge("bad.example.net"), Judged::NoRule);
        assert_eq!(r.judge("img.cdn.example.net"), Judged::Allowed { grants: vec![2], wildcard: Some(2) });
        assert_eq!(r.judge("attacker.test"), Judged::NoRule);
        assert_eq!(r.judge(""), Judged::NoRule);
        assert!(r.allows_any());
        assert!(!NameRules::new(vec![grant("a.example", Verdict::Deny, 0)], &[]).allows_any());
    }

    #[test]
    fn a_fingerprint_names_a_grant_by_what_it_is() {
        let r = rules();
        let same = rules();
        assert_eq!(r.fingerprint(1), same.fingerprint(1));
        assert_eq!(same.by_fingerprint(r.fingerprint(2)), Some(2));
        assert_ne!(r.fingerprint(0), r.fingerprint(1));
        // The same pattern under another origin, or with other ports, is another rule.
        let moved = NameRules::new(vec![grant("*.example.com", Verdict::Allow, 0)], &["tool:u#0".into()]);
        assert_eq!(moved.by_fingerprint(r.fingerprint(1)), None);
        assert_eq!(r.by_fingerprint(0), None);
    }
}
