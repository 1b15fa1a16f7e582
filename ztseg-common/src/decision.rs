//! How a decision is reached, as plain functions the kernel programs call and the unit tests
//! exercise without a kernel.

use crate::{
    agent::{AgentState, MODE_AUDIT},
    rule::{
        RuleValue, VERDICT_ALLOW, VERDICT_AUDIT_DENY, VERDICT_AUDIT_DENY_ALLOWED, VERDICT_DENY,
        VERDICT_WOULD_DENY,
    },
};

/// Why a decision came out the way it did. Stable numbers: they travel in events.
pub mod reason {
    /// Allowed by an allow rule.
    pub const RULE: u8 = 1;
    /// No rule of the agent's table matches: default deny.
    pub const NO_RULE: u8 = 2;
    /// A deny rule matches (denies win over allows).
    pub const FORBIDDEN: u8 = 3;
    /// The agent's token deadline has passed.
    pub const EXPIRED: u8 = 4;
    /// The agent holds no valid token.
    pub const NO_TOKEN: u8 = 5;
    /// The agent's kill switch is on.
    pub const KILLED: u8 = 6;
    /// The agent is paused.
    pub const PAUSED: u8 = 7;
    /// The process is under the agents' root cgroup but its cgroup is no registered agent.
    pub const UNREGISTERED: u8 = 8;
    /// A raw socket.
    pub const RAW_SOCKET: u8 = 9;
    /// A socket protocol ztseg does not judge (SCTP, MPTCP, UDP-Lite, ping ...): refused whole.
    pub const PROTOCOL: u8 = 10;
    /// An operation the rules allow whose record could not be written (the events ring was
    /// full): refused, since nothing is allowed unrecorded.
    pub const UNRECORDED: u8 = 11;
    /// The agent is suspended (risk score at `suspend_at`).
    pub const SUSPENDED: u8 = 12;
}

/// Marks "no rule" in [`Decision::rule_id`].
pub const NO_RULE_ID: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// `VERDICT_ALLOW`, `VERDICT_DENY` or `VERDICT_WOULD_DENY`.
    pub verdict: u8,
    /// One of [`reason`].
    pub reason: u8,
    /// The rule that decided, or [`NO_RULE_ID`].
    pub rule_id: u32,
}

impl Decision {
    pub const fn deny(reason: u8) -> Self {
        Self { verdict: VERDICT_DENY, reason, rule_id: NO_RULE_ID }
    }

    /// Denied by the rules but let through (audit mode): `reason` and `rule_id` say what
    /// would have denied it.
    pub const fn would_deny(reason: u8, rule_id: u32) -> Self {
        Self { verdict: VERDICT_WOULD_DENY, reason, rule_id }
    }

    /// Whether the operation goes ahead: allowed, or a would-be denial let through in audit mode.
    /// Everything that passes is recorded (or refused `unrecorded`).
    pub const fn passes(&self) -> bool {
        self.verdict == VERDICT_ALLOW || self.verdict == VERDICT_WOULD_DENY
    }
}

/// The agent-level checks that come before any rule: registration, kill switch, suspension,
/// token deadline, pause. Returns the rule table to consult, or the deny that ends the decision.
pub const fn gate(agent: Option<&AgentState>, now_boot_ns: u64) -> Result<u32, Decision> {
    // Written out rather than through `gate_rules`: composed, LLVM spills the `None` payload
    // of the agent and the verifier refuses the read of an uninitialised register.
    let Some(agent) = agent else {
        return Err(Decision::deny(reason::UNREGISTERED));
    };
    if agent.killed() {
        return Err(Decision::deny(reason::KILLED));
    }
    if agent.suspended() {
        return Err(Decision::deny(reason::SUSPENDED));
    }
    if agent.deadline_ns == 0 {
        return Err(Decision::deny(reason::NO_TOKEN));
    }
    if now_boot_ns >= agent.deadline_ns {
        return Err(Decision::deny(reason::EXPIRED));
    }
    if agent.paused() {
        return Err(Decision::deny(reason::PAUSED));
    }
    Ok(agent.table)
}

/// [`gate`] but the pause, for a connect or send, whose rules a paused agent still has
/// consulted (then [`held`]). (A plain table, not a pair: the verifier loses track of a
/// pair's fields behind a `Result`.)
pub const fn gate_rules(agent: Option<&AgentState>, now_boot_ns: u64) -> Result<u32, Decision> {
    let Some(agent) = agent else {
        return Err(Decision::deny(reason::UNREGISTERED));
    };
    if agent.killed() {
        return Err(Decision::deny(reason::KILLED));
    }
    if agent.suspended() {
        return Err(Decision::deny(reason::SUSPENDED));
    }
    if agent.deadline_ns == 0 {
        return Err(Decision::deny(reason::NO_TOKEN));
    }
    if now_boot_ns >= agent.deadline_ns {
        return Err(Decision::deny(reason::EXPIRED));
    }
    Ok(agent.table)
}

/// The decision of a connect or send of a paused agent: what its rules allow is refused
/// (reason `paused`); what they deny keeps its own reason, so the risk engine goes on scoring
/// a paused agent's attempts on forbidden or unlisted destinations. A pause is never dry-run:
/// what audit mode would let through is denied, with the reason it would have had.
pub const fn held(decision: Decision, paused: bool) -> Decision {
    if paused {
        if decision.verdict == VERDICT_ALLOW {
            return Decision::deny(reason::PAUSED);
        }
        if decision.verdict == VERDICT_WOULD_DENY {
            return Decision { verdict: VERDICT_DENY, reason: decision.reason, rule_id: decision.rule_id };
        }
    }
    decision
}

/// The agent's mode applied to what its rules decided about a connect or send: in audit mode
/// ([`MODE_AUDIT`]) a denial by the rules (`no_rule`, `forbidden`) is let through as
/// `would_deny`, with its reason and rule. Every other decision is left as it is, and so is
/// every decision in any other mode.
pub const fn dry_run(decision: Decision, mode: u32) -> Decision {
    if mode == MODE_AUDIT
        && decision.verdict == VERDICT_DENY
        && (decision.reason == reason::NO_RULE || decision.reason == reason::FORBIDDEN)
    {
        return Decision::would_deny(decision.reason, decision.rule_id);
    }
    decision
}

/// A decision about what comes into the agent, which is never dry-run: a would-be denial (an
/// audit entry's deny, which the compiler never writes for inbound rules) is denied.
pub const fn enforced(decision: Decision) -> Decision {
    if decision.verdict == VERDICT_WOULD_DENY {
        return Decision { verdict: VERDICT_DENY, reason: decision.reason, rule_id: decision.rule_id };
    }
    decision
}

/// Joins the longest matches of the destination-port bucket and the every-port bucket: an
/// enforced deny in either wins (`forbidden`); then, if an allow in either covers the address,
/// a deny of an audit-mode catalogue entry in either makes it a would-be denial (`would_deny`,
/// `forbidden`, naming that deny), else it is allowed; with no allow it is a default deny
/// (`no_rule`), audit denies or not: an audit deny never admits what no allow grants. Within
/// one bucket the daemon never stores an allow or an audit deny under an enforced deny that
/// covers it, and marks an allow under an audit deny (and an audit deny under an allow) as
/// [`VERDICT_AUDIT_DENY_ALLOWED`], so a bucket's longest match says all the bucket holds about
/// the address.
pub const fn combine(port: Option<&RuleValue>, any_port: Option<&RuleValue>) -> Decision {
    combine_found(
        match port {
            Some(v) => v,
            None => &NO_MATCH,
        },
        match any_port {
            Some(v) => v,
            None => &NO_MATCH,
        },
    )
}

/// What a bucket lookup that found nothing stands for in [`combine_found`]: neither an allow nor
/// a deny.
pub const NO_MATCH: RuleValue = RuleValue { rule_id: NO_RULE_ID, verdict: 0, _pad: [0; 3] };

/// [`combine`] over lookups that always hold a value ([`NO_MATCH`] for none), as the programs
/// make them: every byte the verifier sees is written on every path.
///
/// Ordered so that a table without audit entries pays two compares more than before them.
pub const fn combine_found(port: &RuleValue, any_port: &RuleValue) -> Decision {
    let (p, a) = (port.verdict, any_port.verdict);
    if p == VERDICT_DENY {
        return Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: port.rule_id };
    }
    if a == VERDICT_DENY {
        return Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: any_port.rule_id };
    }
    if p == VERDICT_ALLOW {
        if a == VERDICT_AUDIT_DENY || a == VERDICT_AUDIT_DENY_ALLOWED {
            return Decision::would_deny(reason::FORBIDDEN, any_port.rule_id);
        }
        return Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: port.rule_id };
    }
    if p == VERDICT_AUDIT_DENY_ALLOWED || (p == VERDICT_AUDIT_DENY && a == VERDICT_ALLOW) {
        return Decision::would_deny(reason::FORBIDDEN, port.rule_id);
    }
    if a == VERDICT_ALLOW {
        return Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: any_port.rule_id };
    }
    if a == VERDICT_AUDIT_DENY_ALLOWED {
        if p == VERDICT_AUDIT_DENY {
            return Decision::would_deny(reason::FORBIDDEN, port.rule_id);
        }
        return Decision::would_deny(reason::FORBIDDEN, any_port.rule_id);
    }
    Decision::deny(reason::NO_RULE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{FLAG_KILLED, FLAG_PAUSED, FLAG_SUSPENDED, MODE_ENFORCE};

    const fn agent(deadline_ns: u64, flags: u32) -> AgentState {
        AgentState { deadline_ns, table: 9, slot: 3, flags, mode: 0 }
    }

    #[test]
    fn gate_checks_registration_kill_suspension_deadline_pause_in_that_order() {
        assert_eq!(gate(None, 5), Err(Decision::deny(reason::UNREGISTERED)));
        assert_eq!(gate(Some(&agent(10, 0)), 5), Ok(9));
        assert_eq!(gate(Some(&agent(10, 0)), 10), Err(Decision::deny(reason::EXPIRED)));
        assert_eq!(gate(Some(&agent(0, 0)), 5), Err(Decision::deny(reason::NO_TOKEN)));
        assert_eq!(gate(Some(&agent(10, FLAG_PAUSED)), 5), Err(Decision::deny(reason::PAUSED)));
        let both = agent(10, FLAG_KILLED | FLAG_PAUSED);
        assert_eq!(gate(Some(&both), 5), Err(Decision::deny(reason::KILLED)));
        assert_eq!(gate(Some(&agent(0, FLAG_KILLED)), 5), Err(Decision::deny(reason::KILLED)));
        // A suspended agent's token is revoked: the suspension, not the missing token, is why.
        assert_eq!(gate(Some(&agent(0, FLAG_SUSPENDED)), 5), Err(Decision::deny(reason::SUSPENDED)));
        let paused_then_suspended = agent(10, FLAG_PAUSED | FLAG_SUSPENDED);
        assert_eq!(gate(Some(&paused_then_suspended), 5), Err(Decision::deny(reason::SUSPENDED)));
        assert_eq!(
            gate(Some(&agent(10, FLAG_KILLED | FLAG_SUSPENDED)), 5),
            Err(Decision::deny(reason::KILLED))
        );
    }

    #[test]
    fn a_paused_agents_rules_are_consulted_and_only_their_allows_are_refused() {
        let paused = agent(10, FLAG_PAUSED);
        assert_eq!(gate_rules(Some(&paused), 5), Ok(9));
        assert_eq!(gate(Some(&paused), 5), Err(Decision::deny(reason::PAUSED)));
        assert_eq!(
            gate_rules(Some(&agent(10, FLAG_PAUSED | FLAG_SUSPENDED)), 5),
            Err(Decision::deny(reason::SUSPENDED))
        );
        let allowed = Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: 4 };
        let forbidden = Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: 5 };
        assert_eq!(held(allowed, true), Decision::deny(reason::PAUSED));
        assert_eq!(held(allowed, false), allowed);
        assert_eq!(held(forbidden, true), forbidden);
        assert_eq!(held(Decision::deny(reason::NO_RULE), true), Decision::deny(reason::NO_RULE));
    }

    #[test]
    fn deny_in_either_bucket_wins() {
        let allow = RuleValue::new(1, VERDICT_ALLOW);
        let deny = RuleValue::new(2, VERDICT_DENY);
        let forbidden = |id| Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: id };
        let allowed = |id| Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: id };
        assert_eq!(combine(Some(&allow), Some(&deny)), forbidden(2));
        assert_eq!(combine(Some(&deny), Some(&allow)), forbidden(2));
        assert_eq!(combine(Some(&allow), None), allowed(1));
        assert_eq!(combine(None, Some(&allow)), allowed(1));
        assert_eq!(combine(None, None), Decision::deny(reason::NO_RULE));
        // A value with an unknown verdict grants nothing.
        assert_eq!(combine(Some(&RuleValue::new(5, 0)), None), Decision::deny(reason::NO_RULE));
    }

    #[test]
    fn audit_deny_values_combine_with_allows_and_denies() {
        let allow = |id| RuleValue::new(id, VERDICT_ALLOW);
        let deny = |id| RuleValue::new(id, VERDICT_DENY);
        let audit = |id| RuleValue::new(id, VERDICT_AUDIT_DENY);
        let audit_allowed = |id| RuleValue::new(id, VERDICT_AUDIT_DENY_ALLOWED);
        let forbidden = |id| Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: id };
        let allowed = |id| Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: id };
        let would = |id| Decision::would_deny(reason::FORBIDDEN, id);
        let no_rule = Decision::deny(reason::NO_RULE);
        let cases = [
            // (destination-port bucket, every-port bucket, decision)
            (Some(audit_allowed(7)), None, would(7)),
            (None, Some(audit_allowed(7)), would(7)),
            // An audit deny in one bucket, an allow in the other.
            (Some(audit(7)), Some(allow(1)), would(7)),
            (Some(allow(1)), Some(audit(7)), would(7)),
            (Some(allow(1)), Some(audit_allowed(7)), would(7)),
            (Some(audit_allowed(7)), Some(allow(1)), would(7)),
            // The destination port's audit deny is named first.
            (Some(audit(7)), Some(audit_allowed(8)), would(7)),
            (Some(audit_allowed(7)), Some(audit(8)), would(7)),
            // An enforced deny in either bucket wins over everything an audit entry says.
            (Some(audit_allowed(7)), Some(deny(2)), forbidden(2)),
            (Some(deny(2)), Some(audit_allowed(7)), forbidden(2)),
            (Some(audit(7)), Some(deny(2)), forbidden(2)),
            // An audit deny admits nothing no allow grants.
            (Some(audit(7)), None, no_rule),
            (None, Some(audit(7)), no_rule),
            (Some(audit(7)), Some(audit(8)), no_rule),
            // Without audit values, as before.
            (Some(allow(1)), Some(allow(3)), allowed(1)),
            (None, Some(allow(3)), allowed(3)),
        ];
        for (port, any, expected) in cases {
            assert_eq!(combine(port.as_ref(), any.as_ref()), expected, "{port:?} {any:?}");
        }
        // Never a would-deny value in a rule table: it grants nothing.
        assert_eq!(combine(Some(&RuleValue::new(5, VERDICT_WOULD_DENY)), None), no_rule);
    }

    #[test]
    fn audit_mode_lets_through_only_what_the_rules_deny() {
        let forbidden = Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: 5 };
        assert_eq!(dry_run(forbidden, MODE_AUDIT), Decision::would_deny(reason::FORBIDDEN, 5));
        assert_eq!(
            dry_run(Decision::deny(reason::NO_RULE), MODE_AUDIT),
            Decision::would_deny(reason::NO_RULE, NO_RULE_ID)
        );
        assert!(dry_run(forbidden, MODE_AUDIT).passes());
        // Every other refusal stands, in audit mode as in enforce mode.
        for why in [
            reason::EXPIRED,
            reason::NO_TOKEN,
            reason::KILLED,
            reason::PAUSED,
            reason::UNREGISTERED,
            reason::RAW_SOCKET,
            reason::PROTOCOL,
            reason::UNRECORDED,
            reason::SUSPENDED,
        ] {
            assert_eq!(dry_run(Decision::deny(why), MODE_AUDIT), Decision::deny(why), "reason {why}");
        }
        let allowed = Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: 4 };
        assert_eq!(dry_run(allowed, MODE_AUDIT), allowed);
        // Enforce mode, and a mode this build does not know, enforce.
        for mode in [MODE_ENFORCE, 2, u32::MAX] {
            assert_eq!(dry_run(forbidden, mode), forbidden);
            assert_eq!(dry_run(Decision::deny(reason::NO_RULE), mode), Decision::deny(reason::NO_RULE));
        }
        // An audit entry's would-be denial stays one in enforce mode.
        let would = Decision::would_deny(reason::FORBIDDEN, 5);
        assert_eq!(dry_run(would, MODE_ENFORCE), would);
        assert_eq!(dry_run(would, MODE_AUDIT), would);
    }

    #[test]
    fn the_gate_is_never_dry_run() {
        let audit = |deadline_ns, flags| AgentState { mode: MODE_AUDIT, ..agent(deadline_ns, flags) };
        assert_eq!(gate_rules(Some(&audit(10, FLAG_KILLED)), 5), Err(Decision::deny(reason::KILLED)));
        assert_eq!(gate_rules(Some(&audit(0, FLAG_SUSPENDED)), 5), Err(Decision::deny(reason::SUSPENDED)));
        assert_eq!(gate_rules(Some(&audit(0, 0)), 5), Err(Decision::deny(reason::NO_TOKEN)));
        assert_eq!(gate_rules(Some(&audit(10, 0)), 10), Err(Decision::deny(reason::EXPIRED)));
        assert_eq!(gate(Some(&audit(10, FLAG_PAUSED)), 5), Err(Decision::deny(reason::PAUSED)));
        assert_eq!(gate_rules(Some(&audit(10, 0)), 5), Ok(9));
        assert!(audit(10, 0).audit() && !agent(10, 0).audit());
    }

    #[test]
    fn a_pause_and_inbound_traffic_are_never_dry_run() {
        let would = Decision::would_deny(reason::FORBIDDEN, 5);
        let denied = Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: 5 };
        // Paused: denied, with the reason it would have had (the risk engine scores it so).
        assert_eq!(held(would, true), denied);
        assert_eq!(
            held(Decision::would_deny(reason::NO_RULE, NO_RULE_ID), true),
            Decision::deny(reason::NO_RULE)
        );
        assert_eq!(held(would, false), would);
        assert_eq!(enforced(would), denied);
        let allowed = Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: 4 };
        assert_eq!(enforced(allowed), allowed);
        assert_eq!(enforced(Decision::deny(reason::NO_RULE)), Decision::deny(reason::NO_RULE));
        assert!(!enforced(would).passes());
    }
}
