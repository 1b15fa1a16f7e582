//! Who a kernel decision belongs to: cgroup id -> agent, and (cgroup id, table) -> the token's
//! operation, `jti` and rule origins. The control side keeps it at each change, under its own
//! short write lock; the event reader attributes a batch under a read lock and never waits for
//! the state lock, so a flood of decisions and a kill never queue behind each other.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64},
};

use ztseg_common::event::Event;

pub use crate::events::TableInfo;
use crate::{agent_id::AgentId, events::Attribution};

#[derive(Default)]
pub struct Directory {
    /// The agent of each registered cgroup, and its count of decision records written.
    agents: HashMap<u64, (Arc<str>, Arc<AtomicU64>)>,
    tables: HashMap<(u64, u32), Arc<TableInfo>>,
}

impl Directory {
    pub fn add_agent(&mut self, cgroup_id: u64, agent: AgentId, written: Arc<AtomicU64>) {
        self.agents.insert(cgroup_id, (agent.to_string().into(), written));
    }

    pub fn remove_agent(&mut self, cgroup_id: u64) {
        self.agents.remove(&cgroup_id);
        self.tables.retain(|(cg, _), _| *cg != cgroup_id);
    }

    /// The agent's table `table` is about to come into force (its decisions may follow at once).
    pub fn add_table(&mut self, cgroup_id: u64, table: u32, info: TableInfo) {
        self.tables.insert((cgroup_id, table), Arc::new(info));
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

    /// Whose `event` is, and the counter of its agent's records: lookups and reference counts
    /// only, so the lock is held for as little as possible (the record is written after, from
    /// what this returns).
    pub fn who(&self, event: &Event) -> (Attribution, Option<Arc<AtomicU64>>) {
        let agent = self.agents.get(&event.cgroup_id);
        let who = Attribution {
            agent: agent.map(|(id, _)| id.clone()),
            table: self.tables.get(&(event.cgroup_id, event.table)).cloned(),
        };
        (who, agent.map(|(_, written)| written.clone()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::{audit::Chain, events};

    fn record(d: &Directory, e: &Event) -> (Value, Option<Arc<AtomicU64>>) {
        let (who, counter) = d.who(e);
        let body = events::decision_body(e, &who, 0, &mut events::Timestamps::default());
        (serde_json::from_slice(&body.to_vec(Chain::default())).unwrap(), counter)
    }

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
        let (r, counter) = record(&d, &event(7, 2, 0));
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
        let (r, _) = record(&d, &event(7, 2, 0));
        assert_eq!((r["agent"].as_str(), r["jti"].as_str()), (Some("alpha"), None));
        let (r, _) = record(&d, &event(7, 3, 0));
        assert_eq!(r["jti"].as_str(), Some("j3"));
        d.remove_agent(7);
        let (r, counter) = record(&d, &event(7, 4, 0));
        assert!(r["agent"].is_null() && r["jti"].is_null() && counter.is_none(), "{r:?}");
    }
}
