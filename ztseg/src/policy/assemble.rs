//! The files of a policy dir, together: one catalogue and the agent bindings.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
};

use super::{Binding, Errors, Group, Mode, PolicyError, PolicyFile};
use crate::agent_id::AgentId;

/// What each tool and scope means on the network, from every file of the policy dir.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalogue {
    /// Granted to every agent that holds a valid token.
    pub baseline: Option<Group>,
    pub tools: BTreeMap<String, Group>,
    pub scopes: BTreeMap<String, Group>,
}

impl Catalogue {
    /// No baseline, tools or scopes: every grant compiles to nothing (or is refused).
    pub fn is_empty(&self) -> bool {
        self.baseline.is_none() && self.tools.is_empty() && self.scopes.is_empty()
    }

    /// Catalogue rules (allow and deny).
    pub fn rule_count(&self) -> usize {
        self.baseline
            .iter()
            .chain(self.tools.values())
            .chain(self.scopes.values())
            .map(Group::rule_count)
            .sum()
    }
}

/// The whole policy dir.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicySet {
    pub catalogue: Catalogue,
    pub bindings: BTreeMap<AgentId, Binding>,
}

impl PolicySet {
    /// The catalogue entries and agent bindings in audit mode, in that order (by name).
    pub fn in_audit_mode(&self) -> Vec<Definition> {
        let audit = |g: &Group| g.mode == Mode::Audit;
        let catalogue = &self.catalogue;
        let baseline = catalogue.baseline.as_ref().filter(|g| audit(g)).map(|_| Definition::Baseline);
        baseline
            .into_iter()
            .chain(catalogue.tools.iter().filter(|(_, g)| audit(g)).map(|(n, _)| Definition::Tool(n.clone())))
            .chain(
                catalogue.scopes.iter().filter(|(_, g)| audit(g)).map(|(n, _)| Definition::Scope(n.clone())),
            )
            .chain(
                self.bindings
                    .values()
                    .filter(|b| b.mode == Mode::Audit)
                    .map(|b| Definition::Agent(b.id.clone())),
            )
            .collect()
    }
}

/// Something that may be defined only once across the policy dir.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Definition {
    Baseline,
    Tool(String),
    Scope(String),
    Agent(AgentId),
    /// An explicit `cgroup` of an agent binding: two agents in one cgroup (or one inside the
    /// other's) would share an identity.
    Cgroup(PathBuf),
}

impl fmt::Display for Definition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Baseline => f.write_str("[baseline]"),
            Self::Tool(name) => write!(f, "tool {name:?}"),
            Self::Scope(name) => write!(f, "scope {name:?}"),
            Self::Agent(id) => write!(f, "agent {:?}", id.as_str()),
            Self::Cgroup(path) => write!(f, "agent cgroup {path:?}"),
        }
    }
}

/// Merges `files` (in order) into one policy set. A tool or scope defined in two files, two
/// baselines, two bindings of one agent id or of one cgroup are refused, naming both places.
pub fn assemble(files: &[PolicyFile]) -> Result<PolicySet, PolicyError> {
    let (set, errors) = merge(files);
    match Errors::from_vec(errors) {
        None => Ok(set),
        Some(errors) => Err(errors.first),
    }
}

/// Merges `files`, keeping the first of each duplicate; returns every duplicate found.
pub(super) fn merge(files: &[PolicyFile]) -> (PolicySet, Vec<PolicyError>) {
    let mut set = PolicySet::default();
    let mut errors = Vec::new();
    let mut baseline_at: Option<(&Path, usize)> = None;
    let mut groups_at: BTreeMap<Definition, (&Path, usize)> = BTreeMap::new();
    let mut cgroups: BTreeMap<&Path, (&Path, usize)> = BTreeMap::new();
    let mut duplicate = |path: &Path, line, what, (first_path, first_line): (&Path, usize)| {
        errors.push(PolicyError::Duplicate {
            path: path.to_owned(),
            line,
            what,
            first_path: first_path.to_owned(),
            first_line,
        });
    };

    for file in files {
        let here = file.path.as_path();
        if let Some(baseline) = &file.baseline {
            match baseline_at {
                Some(first) => duplicate(here, baseline.line, Definition::Baseline, first),
                None => {
                    baseline_at = Some((here, baseline.line));
                    set.catalogue.baseline = Some(baseline.clone());
                }
            }
        }
        for (kind, groups, into) in [
            (Definition::Tool as fn(String) -> Definition, &file.tools, &mut set.catalogue.tools),
            (Definition::Scope, &file.scopes, &mut set.catalogue.scopes),
        ] {
            for (name, group) in groups {
                let what = kind(name.clone());
                match groups_at.get(&what) {
                    Some(&first) => duplicate(here, group.line, what, first),
                    None => {
                        groups_at.insert(what, (here, group.line));
                        into.insert(name.clone(), group.clone());
                    }
                }
            }
        }
        if let Some(binding) = &file.binding {
            if let Some(first) = set.bindings.get(&binding.id) {
                let first = (first.path.as_path(), first.line);
                duplicate(here, binding.line, Definition::Agent(binding.id.clone()), first);
                continue;
            }
            if let Some(cgroup) = &binding.cgroup {
                // One agent's cgroup inside another's: the outer agent's kill, freeze or
                // removal would reach the inner one.
                let overlapping = cgroups
                    .iter()
                    .find(|(c, _)| c.starts_with(cgroup) || cgroup.starts_with(c))
                    .map(|(_, &at)| at);
                if let Some(first) = overlapping {
                    duplicate(here, binding.line, Definition::Cgroup(cgroup.clone()), first);
                    continue;
                }
                cgroups.insert(cgroup, (here, binding.line));
            }
            set.bindings.insert(binding.id.clone(), binding.clone());
        }
    }
    (set, errors)
}
