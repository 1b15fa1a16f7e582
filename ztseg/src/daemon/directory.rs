//! Who a kernel decision belongs to: cgroup id -> agent, and (cgroup id, table) -> the token's
//! operation, `jti` and rule origins. The control side keeps it at each change, under its own
//! short write lock; the event reader attributes a batch under a read lock and never waits for
//! the state lock, so a flood of decisions and a kill never queue behind each other.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64},
    time::SystemTime,
};

use ztseg_common::event::Event;

use super::audit_writer::Decision;
use crate::{
    agent_id::AgentId,
    events::{self, Attribution},
};

/// What attributes a decision of one rule table.
#[derive(Clone, Debug)]
pub struct TableInfo {
    pub origins: Arc<Vec<String>>,
    pub op: Option<String>,
    pub jti: String,
}

#[derive(Default)]
pub struct Directory {
    /// The agent of each registered cgroup, and its count of decision records written.
    agents: HashMap<u64, (AgentId, Arc<AtomicU64>)>,
    tables: HashMap<(u64, u32), TableInfo>,
}

impl Directory {
    pub fn add_agent(&mut self, cgroup_id: u64, agent: AgentId, written: Arc<AtomicU64>) {
        self.agents.insert(cgroup_id, (agent, written));
    }

    pub fn remove_agent(&mut self, cgroup_id: u64) {
        self.agents.remove(&cgroup_id);
        self.tables.retain(|(cg, _), _| *cg != cgroup_id);
    }

    /// The agent's table `table` is about to come into force (its decisions may follow at once).
    pub fn add_table(&mut self, cgroup_id: u64, table: u32, info: TableInfo) {
        self.tables.insert((cgroup_id, table), info);
    }

    /// The agent's table `table` is in force; of its older tables only `previous` (still in the
    /// kernel until the swap is reclaimed) stays attributable.
    pub fn keep_tables(&mut self, cgroup_id: u64, table: u32, previous: u32) {
        self.tables.retain(|(cg, t), _| *cg != cgroup_id || *t == table || *t == previous);
    }

    /// The agent has no table in force.
    pub fn clear_tables(&mut self, cgroup_id: u64) {
        self.tables.retain(|(cg, _), _| *cg != cgroup_id);
    }

    /// Whose `event` is, and the counter of its agent's records: lookups only, so the lock
    /// is held for as little as possible (the record is built after, see [`record`]).
    pub fn who(&self, event: &Event) -> (Attribution, Option<Arc<AtomicU64>>) {
        let agent = self.agents.get(&event.cgroup_id);
        let table = self.tables.get(&(event.cgroup_id, event.table));
        let who = Attribution {
            agent: agent.map(|(id, _)| id.to_string()),
            op: table.and_then(|t| t.op.clone()),
            jti: table.map(|t| t.jti.clone()),
            rule: events::rule_id(event)
                .and_then(|id| table.and_then(|t| t.origins.get(id as usize).cloned())),
        };
        (who, agent.map(|(_, written)| written.clone()))
    }
}

/// The record of `event` (without `seq`) as attributed by [`Directory::who`].
pub fn record(
    event: &Event,
    (who, written): (Attribution, Option<Arc<AtomicU64>>),
    ts: SystemTime,
) -> Decision {
    (events::record(event, &who, ts), written)
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn event(cgroup_id: u64, table: u32, rule_id: u32) -> Event {
        // SAFETY: `Event` is plain data, valid for every bit pattern.
        let mut e: Event = unsafe { std::mem::zeroed() };
        (e.cgroup_id, e.table, e.rule_id) = (cgroup_id, table, rule_id);
        (e.action, e.family, e.proto, e.verdict) = (ztseg_common::event::ACTION_CONNECT, 4, 6, 1);
        e
    }

    fn info(jti: &str) -> TableInfo {
        TableInfo { origins: Arc::new(vec!["scope:s#0".into()]), op: Some("op-1".into()), jti: jti.into() }
    }

    #[test]
    fn decisions_are_attributed_to_agent_table_and_rule_until_removed() {
        let mut d = Directory::default();
        let written = Arc::new(AtomicU64::new(0));
        d.add_agent(7, "alpha".parse().unwrap(), written.clone());
        d.add_table(7, 2, info("j2"));
        d.keep_tables(7, 2, 1);
        let (r, counter) = record(&event(7, 2, 0), d.who(&event(7, 2, 0)), UNIX_EPOCH);
        assert_eq!(
            (r["agent"].as_str(), r["jti"].as_str(), r["rule"].as_str()),
            (Some("alpha"), Some("j2"), Some("scope:s#0"))
        );
        assert!(Arc::ptr_eq(&counter.unwrap(), &written));
        // A decision of a table no longer kept names the agent but no token.
        d.add_table(7, 3, info("j3"));
        d.keep_tables(7, 3, 2);
        d.add_table(7, 4, info("j4"));
        d.keep_tables(7, 4, 3);
        let (r, _) = record(&event(7, 2, 0), d.who(&event(7, 2, 0)), UNIX_EPOCH);
        assert_eq!((r["agent"].as_str(), r["jti"].as_str()), (Some("alpha"), None));
        let (r, _) = record(&event(7, 3, 0), d.who(&event(7, 3, 0)), UNIX_EPOCH);
        assert_eq!(r["jti"].as_str(), Some("j3"));
        d.remove_agent(7);
        let (r, counter) = record(&event(7, 4, 0), d.who(&event(7, 4, 0)), UNIX_EPOCH);
        assert!(r["agent"].is_null() && r["jti"].is_null() && counter.is_none(), "{r:?}");
    }
}
