//! How a decision is reached, as plain functions the kernel programs call and the unit tests
//! exercise without a kernel.

use crate::{
    agent::AgentState,
    rule::{RuleValue, VERDICT_ALLOW, VERDICT_DENY},
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
    /// `VERDICT_ALLOW` or `VERDICT_DENY`.
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

    /// A socket the agent may create (sock_create has no rule behind it).
    pub const fn allow_socket() -> Self {
        Self { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: NO_RULE_ID }
    }

    pub const fn allowed(&self) -> bool {
        self.verdict == VERDICT_ALLOW
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
/// a paused agent's attempts on forbidden or unlisted destinations.
pub const fn held(decision: Decision, paused: bool) -> Decision {
    if paused && decision.verdict == VERDICT_ALLOW {
        return Decision::deny(reason::PAUSED);
    }
    decision
}

/// Joins the longest matches of the destination-port bucket and the every-port bucket: a deny in
/// either wins, then an allow in either, else default deny. Within one bucket the daemon never
/// stores an allow under a deny that covers it, so a bucket's longest match is a deny whenever
/// any deny of that bucket matches.
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
pub const fn combine_found(port: &RuleValue, any_port: &RuleValue) -> Decision {
    if port.verdict == VERDICT_DENY {
        return Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: port.rule_id };
    }
    if any_port.verdict == VERDICT_DENY {
        return Decision { verdict: VERDICT_DENY, reason: reason::FORBIDDEN, rule_id: any_port.rule_id };
    }
    if port.verdict == VERDICT_ALLOW {
        return Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: port.rule_id };
    }
    if any_port.verdict == VERDICT_ALLOW {
        return Decision { verdict: VERDICT_ALLOW, reason: reason::RULE, rule_id: any_port.rule_id };
    }
    Decision::deny(reason::NO_RULE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{FLAG_KILLED, FLAG_PAUSED, FLAG_SUSPENDED};

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
}
