//! The kernel half of enforcement: load or adopt the programs and their pinned maps, and write
//! agents and rule tables into them.
//!
//! Programs are attached once, at the agents' root cgroup, through BPF links pinned under the pin
//! dir, so they keep enforcing when the daemon is gone. A later start loads the embedded programs
//! again, reuses the pinned maps, and swaps each link's program in place (BPF_LINK_UPDATE):
//! nothing is detached and nothing granted is reset.
//!
//! A rule set is replaced without a gap: the new rules go into a fresh table that no agent uses
//! yet, one update of the agent's entry switches to it, and the old table is deleted only after
//! an RCU grace period, when no running program can still be reading it.

mod bpf_sys;
pub mod observe;
pub mod pins;
mod summaries;
pub mod table;

use std::{
    collections::{BTreeSet, HashMap as StdHashMap},
    fs::{self, File},
    io,
    os::fd::{AsFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        HashMap, LpmTrie, MapData, MapError, MapInfo, MapType, PerCpuArray, PerCpuValues, RingBuf,
        lpm_trie::Key,
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSock, CgroupSockAddr, CgroupSockopt, ProgramError,
        cgroup_skb::CgroupSkbAttachType, cgroup_sock::CgroupSockAttachType,
        cgroup_sock_addr::CgroupSockAddrAttachType, cgroup_sockopt::CgroupSockoptAttachType, links::FdLink,
    },
};
use aya_obj::generated::bpf_attach_type;
use nix::fcntl::{Flock, FlockArg};
use tracing::{debug, info, warn};
use ztseg_common::{
    agent::{AgentState, FLAG_KILLED},
    dns::{self, DnsConfig, DnsPeer, Learned, LearnedValue},
    event::{AgentCounts, AgentStats, Summary, SummaryKey},
    maps,
    packet::Peers,
    rule::{ANY_PORT, Rule4, Rule6, RuleValue, TABLE_NO_EVERY_PORT},
};

pub use self::{
    pins::PinPaths,
    summaries::{Drained, Summaries},
    table::{Entry, Verdict},
};
use crate::cgroup::{self, CgroupError};

/// The kernel programs, built by `cargo xtask build` (empty in a plain `cargo build`).
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ztseg-ebpf.o"));

/// The rule table that holds no entries: what an agent without a grant points at.
const EMPTY_TABLE: u32 = 0;

/// `grant` reclaims replaced tables itself once this many wait (the owner normally does it first).
const RECLAIM_TABLES: usize = 1024;
/// ... or once they hold this many rule entries (a quarter of a family's map).
const RECLAIM_ENTRIES: usize = maps::MAX_RULES as usize / 4;

/// The two maps of the RCU barrier, as plain fds so a wait needs no `&mut Dataplane`.
struct BarrierFds {
    outer: OwnedFd,
    inner: OwnedFd,
}

impl BarrierFds {
    /// Returns once every program that was running has finished: storing into a map-in-map
    /// makes the kernel wait for an RCU grace period (kernel/bpf/syscall.c,
    /// maybe_wait_bpf_programs).
    fn wait(&self) -> Result<(), DataplaneError> {
        bpf_sys::map_update_fd(self.outer.as_fd(), 0, self.inner.as_fd()).map_err(DataplaneError::Barrier)
    }
}

/// A grace period to wait out before `Dataplane::finish_reclaim` (see `reclaim_barrier`).
pub struct ReclaimBarrier {
    fds: Arc<BarrierFds>,
    /// Tables retired (ever) when the barrier was taken: those are safe to delete after it.
    upto: u64,
}

impl ReclaimBarrier {
    /// Returns once every program that was running when the barrier was taken has finished.
    pub fn wait(&self) -> Result<(), DataplaneError> {
        self.fds.wait()
    }
}

/// The kernel hooks, by program name in the object.
#[derive(Clone, Copy, Debug)]
enum Hook {
    SockAddr(CgroupSockAddrAttachType),
    Sock(CgroupSockAttachType),
    Skb(CgroupSkbAttachType),
    Sockopt(CgroupSockoptAttachType),
}

impl Hook {
    fn attach_type(self) -> u32 {
        let t: bpf_attach_type = match self {
            Self::SockAddr(t) => t.into(),
            Self::Sock(t) => t.into(),
            Self::Skb(CgroupSkbAttachType::Ingress) => bpf_attach_type::BPF_CGROUP_INET_INGRESS,
            Self::Skb(CgroupSkbAttachType::Egress) => bpf_attach_type::BPF_CGROUP_INET_EGRESS,
            Self::Sockopt(t) => t.into(),
        };
        t as u32
    }
}

/// Every program ztseg attaches, by name in the object (also its link's pin name).
const PROGRAMS: [(&str, Hook); 12] = [
    ("connect4", Hook::SockAddr(CgroupSockAddrAttachType::Connect4)),
    ("connect6", Hook::SockAddr(CgroupSockAddrAttachType::Connect6)),
    ("sendmsg4", Hook::SockAddr(CgroupSockAddrAttachType::UDPSendMsg4)),
    ("sendmsg6", Hook::SockAddr(CgroupSockAddrAttachType::UDPSendMsg6)),
    ("sock_create", Hook::Sock(CgroupSockAttachType::SockCreate)),
    ("packets_in", Hook::Skb(CgroupSkbAttachType::Ingress)),
    ("packets_out", Hook::Skb(CgroupSkbAttachType::Egress)),
    ("setsockopt", Hook::Sockopt(CgroupSockoptAttachType::Set)),
    // DNS: the proxy's address shown as the resolver the agent asked (`ztseg_common::dns`).
    ("recvmsg4", Hook::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg4)),
    ("recvmsg6", Hook::SockAddr(CgroupSockAddrAttachType::UDPRecvMsg6)),
    ("getpeername4", Hook::SockAddr(CgroupSockAddrAttachType::GetPeerName4)),
    ("getpeername6", Hook::SockAddr(CgroupSockAddrAttachType::GetPeerName6)),
];

/// Names of the attached programs, for status output and tests.
pub fn program_names() -> impl Iterator<Item = &'static str> {
    PROGRAMS.iter().map(|(name, _)| *name)
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "this ztseg binary has no kernel programs embedded (built with plain cargo); build it with `cargo xtask build`"
    )]
    NoPrograms,
    #[error("pin dir {path} is not usable: {source}")]
    PinDir { path: PathBuf, source: io::Error },
    #[error("pin dir {path} is not on a BPF filesystem (mount one with `mount -t bpf bpf /sys/fs/bpf`)")]
    NotBpfFs { path: PathBuf },
    #[error("another ztseg process holds pin dir {path}; stop it first")]
    Busy { path: PathBuf },
    #[error(
        "pinned map {path} has another layout ({found}, this ztseg expects {expected}); `ztseg uninstall` removes the old pins (and every grant)"
    )]
    IncompatiblePin { path: PathBuf, found: String, expected: String },
    #[error("cannot load the kernel programs: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the kernel object lacks {0}")]
    Missing(&'static str),
    #[error("program {name}: {source}")]
    Program { name: &'static str, source: Box<ProgramError> },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: Box<MapError> },
    #[error("pinned link {path}: {source}")]
    Link { path: PathBuf, source: io::Error },
    #[error(
        "pinned link {path} is attached to cgroup id {found} with hook {found_hook}, not to the agents' root {expected} (was cgroup_root changed? `ztseg uninstall` first)"
    )]
    ForeignLink { path: PathBuf, found: u64, found_hook: u32, expected: u64 },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cgroup id {0} is not a registered agent")]
    NotRegistered(u64),
    #[error("no free agent slot: {} agents are registered", maps::MAX_AGENTS)]
    TooManyAgents,
    #[error("the RCU barrier maps (which wait out running programs) failed: {0}")]
    Barrier(#[source] io::Error),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source: Box::new(source) }
}

fn prog_err(name: &'static str) -> impl FnOnce(ProgramError) -> DataplaneError {
    move |source| DataplaneError::Program { name, source: Box::new(source) }
}

/// The `learned` map: (agent cgroup id, family, protocol, port, address) -> expiry and rule.
pub type LearnedMap = HashMap<MapData, Learned, LearnedValue>;

/// The name of the DNS settings in the object (`ztseg-ebpf/src/dns.rs`).
const DNS_CONFIG_GLOBAL: &str = "DNS_CONFIG";

/// How the programs are loaded.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Port 53 redirected to the DNS proxy, or not ([`DnsConfig::OFF`]: the rules judge it).
    pub dns: DnsConfig,
}

/// What `Dataplane::start` found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StartReport {
    /// Links that existed and had their program swapped in place.
    pub links_updated: usize,
    /// Links created (first start, or a hook that was missing).
    pub links_created: usize,
    /// Agents found in the pinned agents map.
    pub agents_adopted: usize,
    /// Rule entries of tables no agent referenced (left by a crash), deleted.
    pub orphans_removed: usize,
    /// Counters-only maps found pinned in an older layout and created anew (counts reset).
    pub counters_replaced: Vec<&'static str>,
}

/// What a grant did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The rule table now in force for the agent (events name it).
    pub table: u32,
    /// The table it replaced (0: none).
    pub previous: u32,
    /// Trie entries written.
    pub entries: usize,
}

/// Trie keys of one table, kept so the table can be deleted without scanning the tries.
#[derive(Default)]
struct TableKeys {
    v4: Vec<Key<Rule4>>,
    v6: Vec<Key<Rule6>>,
}

impl TableKeys {
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
}

/// Rule tables: ids in use and their keys. Ids only grow (wrapping after 2^32 grants, past the
/// ids in use): a decision record still in the ring names the table that decided it, and the
/// event reader attributes it to that table's token, which a reused id would make another's.
#[derive(Default)]
struct Tables {
    next: u32,
    keys: StdHashMap<u32, TableKeys>,
}

impl Tables {
    /// A new table id, with [`TABLE_NO_EVERY_PORT`] set when the table has no every-port entry.
    fn allocate(&mut self, no_every_port: bool) -> u32 {
        loop {
            self.next = self.next.wrapping_add(1) & !TABLE_NO_EVERY_PORT;
            let id = self.next | if no_every_port { TABLE_NO_EVERY_PORT } else { 0 };
            if self.next != EMPTY_TABLE && !self.keys.contains_key(&id) {
                return id;
            }
        }
    }
}

/// The enforcement maps, loaded or adopted, and the bookkeeping to write them safely.
pub struct Dataplane {
    paths: PinPaths,
    root_cgroup: PathBuf,
    root_cgroup_id: u64,
    agents: HashMap<MapData, u64, AgentState>,
    rules_v4: LpmTrie<MapData, Rule4, RuleValue>,
    rules_v6: LpmTrie<MapData, Rule6, RuleValue>,
    /// Handed to the event reader once (`take_events_fd`, or `take_events`), unmapped until
    /// then: each mapping of the ring holds its 4 MiB twice (its data pages are mapped twice,
    /// for records that wrap), which the daemon's resident size counts.
    events: Option<aya::maps::Map>,
    /// Handed to the summaries drain once (`take_summaries`).
    summaries: Option<Summaries>,
    /// Handed to the DNS proxy's store once (`take_learned`).
    learned: Option<LearnedMap>,
    drops: PerCpuArray<MapData, u64>,
    stats: PerCpuArray<MapData, AgentStats>,
    /// The RCU barrier's map-in-map and the inner map stored into it.
    barrier: Arc<BarrierFds>,
    tables: Tables,
    slots: BTreeSet<u32>,
    /// Tables switched away from, deleted after the next grace period, oldest first.
    retired: Vec<u32>,
    /// How many retired tables have been deleted, ever.
    reclaimed: u64,
    _lock: Flock<File>,
}

const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Makes sure the pin dir exists on a BPF filesystem, mounting bpffs at /sys/fs/bpf if that is
/// where the pin dir lives and nothing is mounted there yet (as systemd would).
fn prepare_pin_dir(dir: &Path) -> Result<(), DataplaneError> {
    let sys_bpf = Path::new("/sys/fs/bpf");
    if dir.starts_with(sys_bpf) && !is_bpffs(sys_bpf) {
        info!("mounting bpffs at /sys/fs/bpf");
        nix::mount::mount(Some("bpf"), sys_bpf, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .map_err(|e| DataplaneError::PinDir { path: sys_bpf.to_owned(), source: e.into() })?;
    }
    fs::create_dir_all(dir).map_err(|source| DataplaneError::PinDir { path: dir.to_owned(), source })?;
    if !is_bpffs(dir) {
        return Err(DataplaneError::NotBpfFs { path: dir.to_owned() });
    }
    Ok(())
}

/// Exclusive hold on the pin dir: one writer of the maps at a time.
fn lock_pin_dir(dir: &Path) -> Result<Flock<File>, DataplaneError> {
    let file = File::open(dir).map_err(|source| DataplaneError::PinDir { path: dir.to_owned(), source })?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == nix::errno::Errno::EWOULDBLOCK {
            DataplaneError::Busy { path: dir.to_owned() }
        } else {
            DataplaneError::PinDir { path: dir.to_owned(), source: errno.into() }
        }
    })
}

/// What a map must look like to be adopted: type, key and value size, entries.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Shape {
    /// None: a type this aya version does not name (never one ztseg expects).
    map_type: Option<MapType>,
    key: u32,
    value: u32,
    max: u32,
}

impl Shape {
    const fn new(map_type: MapType, key: usize, value: usize, max: u32) -> Self {
        Self { map_type: Some(map_type), key: key as u32, value: value as u32, max }
    }

    fn of(info: &MapInfo) -> Self {
        Self {
            map_type: info.map_type().ok(),
            key: info.key_size(),
            value: info.value_size(),
            max: info.max_entries(),
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.map_type {
            Some(t) => write!(f, "{t:?}")?,
            None => f.write_str("unknown type")?,
        }
        write!(f, ", key {} B, value {} B, {} entries", self.key, self.value, self.max)
    }
}

/// Every pinned map and the shape these programs expect of it.
fn expected_shapes() -> [(&'static str, Shape); 11] {
    [
        (
            maps::AGENTS,
            Shape::new(MapType::Hash, size_of::<u64>(), size_of::<AgentState>(), maps::MAX_AGENTS),
        ),
        (
            maps::RULES_V4,
            Shape::new(MapType::LpmTrie, size_of::<Key<Rule4>>(), size_of::<RuleValue>(), maps::MAX_RULES),
        ),
        (
            maps::RULES_V6,
            Shape::new(MapType::LpmTrie, size_of::<Key<Rule6>>(), size_of::<RuleValue>(), maps::MAX_RULES),
        ),
        (maps::EVENTS, Shape::new(MapType::RingBuf, 0, 0, maps::EVENTS_BYTES)),
        (maps::DROPS, Shape::new(MapType::PerCpuArray, size_of::<u32>(), size_of::<u64>(), 1)),
        (
            maps::STATS,
            Shape::new(MapType::PerCpuArray, size_of::<u32>(), size_of::<AgentStats>(), maps::MAX_AGENTS + 1),
        ),
        (maps::REPLIES, Shape::new(MapType::SkStorage, size_of::<i32>(), size_of::<Peers>(), 0)),
        (
            maps::SUMMARIES,
            Shape::new(
                MapType::PerCpuHash,
                size_of::<SummaryKey>(),
                size_of::<Summary>(),
                maps::MAX_SUMMARIES,
            ),
        ),
        (maps::SUMMARY_EPOCH, Shape::new(MapType::Array, size_of::<u32>(), size_of::<u32>(), 1)),
        (
            dns::LEARNED,
            Shape::new(MapType::Hash, size_of::<Learned>(), size_of::<LearnedValue>(), dns::MAX_LEARNED),
        ),
        (dns::DNS_PEERS, Shape::new(MapType::SkStorage, size_of::<i32>(), size_of::<DnsPeer>(), 0)),
    ]
}

/// What `start` does with a map it finds pinned.
#[derive(Debug, PartialEq, Eq)]
enum PinFate {
    /// The expected shape: adopted, contents and all.
    Adopt,
    /// A counters-only map of another shape (`stats` was a plain array before it was per-CPU):
    /// unpinned and created afresh, its counts restart at zero. Nothing enforced reads it.
    Replace,
    /// An enforcement map of another shape: refused. Replacing it would drop grants or kill
    /// switches behind the operator's back; `ztseg uninstall` is the explicit way.
    Refuse,
}

fn pin_fate(name: &str, found: &Shape, expected: &Shape) -> PinFate {
    if found == expected {
        PinFate::Adopt
    } else if pins::COUNTER_MAPS.contains(&name) {
        PinFate::Replace
    } else {
        PinFate::Refuse
    }
}

/// Refuses pinned enforcement maps whose shape differs from what these programs expect, and
/// unpins counters-only maps of another shape so that the load creates them anew. Nothing is
/// unpinned unless every enforcement map can be adopted. Returns the maps it unpinned.
fn check_pinned_layout(paths: &PinPaths) -> Result<Vec<&'static str>, DataplaneError> {
    let mut replace = Vec::new();
    for (name, expected) in expected_shapes() {
        let path = paths.map(name);
        if !path.exists() {
            continue;
        }
        let found = Shape::of(&MapInfo::from_pin(&path).map_err(map_err(name))?);
        match pin_fate(name, &found, &expected) {
            PinFate::Adopt => {}
            PinFate::Replace => replace.push((name, path, found)),
            PinFate::Refuse => {
                return Err(DataplaneError::IncompatiblePin {
                    path,
                    found: found.to_string(),
                    expected: expected.to_string(),
                });
            }
        }
    }
    let mut replaced = Vec::new();
    for (name, path, found) in replace {
        warn!(
            map = name,
            path = %path.display(),
            %found,
            "pinned counters map has an older layout; replacing it (its counts restart at zero)"
        );
        fs::remove_file(&path).map_err(|source| DataplaneError::PinDir { path, source })?;
        replaced.push(name);
    }
    Ok(replaced)
}

impl Dataplane {
    /// Loads the programs and attaches them at `root_cgroup` (an absolute cgroup2 directory,
    /// created if missing), or, when pins exist under `pin_dir`, adopts them: the pinned maps
    /// keep their contents and each pinned link gets the new program swapped in atomically.
    pub fn start(pin_dir: &Path, root_cgroup: &Path) -> Result<(Self, StartReport), DataplaneError> {
        Self::start_with(pin_dir, root_cgroup, &LoadOptions::default())
    }

    /// [`Self::start`] with the programs loaded with `options` (the DNS proxy's settings).
    pub fn start_with(
        pin_dir: &Path,
        root_cgroup: &Path,
        options: &LoadOptions,
    ) -> Result<(Self, StartReport), DataplaneError> {
        if PROGRAM_OBJECT.is_empty() {
            return Err(DataplaneError::NoPrograms);
        }
        let paths = PinPaths::new(pin_dir);
        prepare_pin_dir(paths.dir())?;
        let lock = lock_pin_dir(paths.dir())?;
        let counters_replaced = check_pinned_layout(&paths)?;
        let root_cgroup_id = cgroup::ensure(root_cgroup)?;

        let mut loader = EbpfLoader::new();
        loader.override_global(DNS_CONFIG_GLOBAL, &options.dns, true);
        let map_pins: Vec<(&str, PathBuf)> = pins::PINNED_MAPS.iter().map(|m| (*m, paths.map(m))).collect();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAM_OBJECT).map_err(|e| DataplaneError::Load(Box::new(e)))?;

        let mut report = StartReport { counters_replaced, ..StartReport::default() };
        let links_dir = paths.links_dir();
        fs::create_dir_all(&links_dir)
            .map_err(|source| DataplaneError::PinDir { path: links_dir.clone(), source })?;
        let root = File::open(root_cgroup)
            .map_err(|source| CgroupError::Stat { path: root_cgroup.to_owned(), source })?;

        let mut dataplane = Self {
            agents: take_map(&mut ebpf, maps::AGENTS)?,
            rules_v4: take_map(&mut ebpf, maps::RULES_V4)?,
            rules_v6: take_map(&mut ebpf, maps::RULES_V6)?,
            events: Some(ebpf.take_map(maps::EVENTS).ok_or(DataplaneError::Missing(maps::EVENTS))?),
            summaries: None,
            learned: Some(take_map(&mut ebpf, dns::LEARNED)?),
            drops: take_map(&mut ebpf, maps::DROPS)?,
            stats: take_map(&mut ebpf, maps::STATS)?,
            barrier: Arc::new(BarrierFds {
                outer: take_map_fd(&mut ebpf, maps::RCU_BARRIER)?,
                inner: take_map_fd(&mut ebpf, maps::RCU_BARRIER_INNER)?,
            }),
            paths,
            root_cgroup: root_cgroup.to_owned(),
            root_cgroup_id,
            tables: Tables::default(),
            slots: BTreeSet::new(),
            retired: Vec::new(),
            reclaimed: 0,
            _lock: lock,
        };
        // The maps are made consistent with these programs before the programs are swapped in.
        dataplane.summaries = Some(Summaries::new(
            take_map(&mut ebpf, maps::SUMMARIES)?,
            take_map(&mut ebpf, maps::SUMMARY_EPOCH)?,
            dataplane.barrier.clone(),
        ));
        let (agents, orphans) = dataplane.adopt()?;
        report.agents_adopted = agents;
        report.orphans_removed = orphans;
        for (name, hook) in PROGRAMS {
            if attach(&mut ebpf, name, hook, &root, root_cgroup_id, &dataplane.paths.link(name))? {
                report.links_updated += 1;
            } else {
                report.links_created += 1;
            }
        }
        info!(
            pin_dir = %dataplane.paths.dir().display(),
            root = %root_cgroup.display(),
            links_updated = report.links_updated,
            links_created = report.links_created,
            agents = report.agents_adopted,
            counters_replaced = ?report.counters_replaced,
            "dataplane up"
        );
        Ok((dataplane, report))
    }

    /// Rebuilds the bookkeeping from the pinned maps and deletes rule entries of tables no agent
    /// references (a crash between writing a table and switching to it leaves such entries).
    fn adopt(&mut self) -> Result<(usize, usize), DataplaneError> {
        let mut in_use = BTreeSet::new();
        let mut adopted = Vec::new();
        for entry in self.agents.iter() {
            let (cgroup_id, state) = entry.map_err(map_err(maps::AGENTS))?;
            self.slots.insert(state.slot);
            in_use.insert(state.table);
            adopted.push((cgroup_id, state));
        }
        let mut orphans = TableKeys::default();
        for key in self.rules_v4.keys() {
            let key = key.map_err(map_err(maps::RULES_V4))?;
            let table = key.data().table;
            if in_use.contains(&table) && table != EMPTY_TABLE {
                self.tables.keys.entry(table).or_default().v4.push(key);
            } else {
                orphans.v4.push(key);
            }
        }
        for key in self.rules_v6.keys() {
            let key = key.map_err(map_err(maps::RULES_V6))?;
            let table = key.data().table;
            if in_use.contains(&table) && table != EMPTY_TABLE {
                self.tables.keys.entry(table).or_default().v6.push(key);
            } else {
                orphans.v6.push(key);
            }
        }
        // A table marked as having no every-port entry that has one was written by a daemon that
        // did not know the mark (an older one, after adopting ids that carried it): these
        // programs would skip its every-port denies. Its agents lose it (no token) until the
        // daemon grants again from their saved tokens; fail closed.
        let mislabelled: BTreeSet<u32> = self
            .tables
            .keys
            .iter()
            .filter(|(table, keys)| {
                **table & TABLE_NO_EVERY_PORT != 0
                    && (keys.v4.iter().any(|k| k.data().port == ANY_PORT)
                        || keys.v6.iter().any(|k| k.data().port == ANY_PORT))
            })
            .map(|(table, _)| *table)
            .collect();
        for (cgroup_id, state) in adopted.into_iter().filter(|(_, s)| mislabelled.contains(&s.table)) {
            warn!(
                cgroup_id,
                table = state.table,
                "a pinned rule table is mislabelled (every-port entries under the no-every-port mark); withdrawing it until the agent's token is granted again"
            );
            let next = AgentState { deadline_ns: 0, table: EMPTY_TABLE, ..state };
            self.agents.insert(cgroup_id, next, 0).map_err(map_err(maps::AGENTS))?;
        }
        for table in &mislabelled {
            if let Some(keys) = self.tables.keys.remove(table) {
                orphans.v4.extend(keys.v4);
                orphans.v6.extend(keys.v6);
            }
        }
        self.tables.next = in_use.iter().copied().max().unwrap_or(EMPTY_TABLE) & !TABLE_NO_EVERY_PORT;
        let orphan_count = orphans.len();
        if orphan_count > 0 {
            warn!(entries = orphan_count, "deleting rule entries no agent references");
            self.barrier.wait()?;
            self.delete_keys(&orphans);
        }
        Ok((self.slots.len(), orphan_count))
    }

    pub fn pin_paths(&self) -> &PinPaths {
        &self.paths
    }

    pub fn root_cgroup(&self) -> &Path {
        &self.root_cgroup
    }

    pub fn root_cgroup_id(&self) -> u64 {
        self.root_cgroup_id
    }

    /// Registers an agent cgroup with no rights (default deny until a grant). Registering an
    /// agent that is already registered changes nothing and returns its state.
    pub fn register(&mut self, cgroup_id: u64) -> Result<AgentState, DataplaneError> {
        if let Some(state) = self.agent(cgroup_id)? {
            return Ok(state);
        }
        let slot =
            (0..maps::MAX_AGENTS).find(|s| !self.slots.contains(s)).ok_or(DataplaneError::TooManyAgents)?;
        let state = AgentState { deadline_ns: 0, table: EMPTY_TABLE, slot, flags: 0, mode: 0 };
        // A reused slot starts counting from zero, on every CPU.
        let zeros = aya::util::nr_cpus()
            .map_err(|(_, e)| e)
            .and_then(|cpus| PerCpuValues::try_from(vec![AgentStats::default(); cpus]))
            .map_err(|e| map_err(maps::STATS)(MapError::IoError(e)))?;
        self.stats.set(slot, zeros, 0).map_err(map_err(maps::STATS))?;
        self.agents.insert(cgroup_id, state, 0).map_err(map_err(maps::AGENTS))?;
        self.slots.insert(slot);
        debug!(cgroup_id, slot, "agent registered");
        Ok(state)
    }

    /// Removes an agent: its cgroup falls back to "unregistered" (everything denied) and its
    /// rule table is reclaimed.
    pub fn unregister(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        let Some(state) = self.agent(cgroup_id)? else {
            return Ok(());
        };
        self.agents.remove(&cgroup_id).map_err(map_err(maps::AGENTS))?;
        self.slots.remove(&state.slot);
        self.retire(state.table);
        self.reclaim_if_piled_up()
    }

    /// The agent's state as the kernel sees it.
    pub fn agent(&self, cgroup_id: u64) -> Result<Option<AgentState>, DataplaneError> {
        match self.agents.get(&cgroup_id, 0) {
            Ok(state) => Ok(Some(state)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(map_err(maps::AGENTS)(e)),
        }
    }

    /// Every registered agent: cgroup id and state.
    pub fn agents(&self) -> Result<Vec<(u64, AgentState)>, DataplaneError> {
        self.agents.iter().map(|e| e.map_err(map_err(maps::AGENTS))).collect()
    }

    /// Replaces the agent's whole rule set and token deadline (`CLOCK_BOOTTIME` ns) at once.
    ///
    /// The entries go into a new table first; one update of the agent's entry then switches every
    /// later decision to the new table and deadline together. If writing the table fails, it is
    /// removed again and the agent keeps what it had. Returns the number of trie entries written.
    pub fn grant(
        &mut self,
        cgroup_id: u64,
        entries: &[Entry],
        deadline_ns: u64,
    ) -> Result<Granted, DataplaneError> {
        self.grant_announced(cgroup_id, entries, deadline_ns, |_| {})
    }

    /// [`Self::grant`], telling `announce` the new table's id once its entries are written and
    /// before any decision can use it (the agent's entry still names the old table), so whoever
    /// attributes decisions by table knows the table before its first decision.
    pub fn grant_announced(
        &mut self,
        cgroup_id: u64,
        entries: &[Entry],
        deadline_ns: u64,
        announce: impl FnOnce(u32),
    ) -> Result<Granted, DataplaneError> {
        let state = self.agent(cgroup_id)?.ok_or(DataplaneError::NotRegistered(cgroup_id))?;
        let mut announce = Some(announce);
        let table = self.tables.allocate(entries.iter().all(|e| e.port != 0));
        let encoded = table::encode(table, entries);
        let mut written = TableKeys::default();
        let result = (|| {
            for (key, value) in &encoded.v4 {
                self.rules_v4.insert(key, value, 0).map_err(map_err(maps::RULES_V4))?;
                written.v4.push(*key);
            }
            for (key, value) in &encoded.v6 {
                self.rules_v6.insert(key, value, 0).map_err(map_err(maps::RULES_V6))?;
                written.v6.push(*key);
            }
            if let Some(announce) = announce.take() {
                announce(table);
            }
            let next = AgentState { deadline_ns: deadline_ns.max(1), table, ..state };
            self.agents.insert(cgroup_id, next, 0).map_err(map_err(maps::AGENTS))
        })();
        if let Err(e) = result {
            // Nothing references the half-written table: delete it right away.
            self.delete_keys(&written);
            return Err(e);
        }
        let count = written.len();
        self.tables.keys.insert(table, written);
        self.retire(state.table);
        self.reclaim_if_piled_up()?;
        debug!(cgroup_id, table, entries = count, "rule set replaced");
        Ok(Granted { table, previous: state.table, entries: count })
    }

    /// Withdraws the agent's rights: no rules, no token. The agent stays registered.
    pub fn revoke(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        let state = self.agent(cgroup_id)?.ok_or(DataplaneError::NotRegistered(cgroup_id))?;
        let next = AgentState { deadline_ns: 0, table: EMPTY_TABLE, ..state };
        self.agents.insert(cgroup_id, next, 0).map_err(map_err(maps::AGENTS))?;
        self.retire(state.table);
        self.reclaim_if_piled_up()
    }

    /// Moves the agent's token deadline without touching its rules.
    pub fn set_deadline(&mut self, cgroup_id: u64, deadline_ns: u64) -> Result<(), DataplaneError> {
        self.update(cgroup_id, |s| s.deadline_ns = deadline_ns)
    }

    /// Turns the agent's kill switch on or off.
    pub fn set_killed(&mut self, cgroup_id: u64, killed: bool) -> Result<(), DataplaneError> {
        self.update(cgroup_id, |s| set_flag(&mut s.flags, FLAG_KILLED, killed))
    }

    /// Sets or clears one of the agent's `FLAG_*` bits: the risk engine's pause
    /// (`FLAG_PAUSED`) and suspension (`FLAG_SUSPENDED`).
    pub fn set_flag(&mut self, cgroup_id: u64, flag: u32, on: bool) -> Result<(), DataplaneError> {
        self.update(cgroup_id, |s| set_flag(&mut s.flags, flag, on))
    }

    /// Sets the agent's enforcement mode (`AgentState::mode`: `MODE_ENFORCE` or `MODE_AUDIT`),
    /// keeping everything else of its entry.
    pub fn set_mode(&mut self, cgroup_id: u64, mode: u32) -> Result<(), DataplaneError> {
        self.update(cgroup_id, |s| s.mode = mode)
    }

    /// Writes a whole new value for the agent (never a field in place).
    fn update(&mut self, cgroup_id: u64, change: impl FnOnce(&mut AgentState)) -> Result<(), DataplaneError> {
        let mut state = self.agent(cgroup_id)?.ok_or(DataplaneError::NotRegistered(cgroup_id))?;
        change(&mut state);
        self.agents.insert(cgroup_id, state, 0).map_err(map_err(maps::AGENTS))
    }

    /// Number of trie entries of the agent's table in force.
    pub fn rule_count(&self, cgroup_id: u64) -> Result<usize, DataplaneError> {
        let state = self.agent(cgroup_id)?.ok_or(DataplaneError::NotRegistered(cgroup_id))?;
        Ok(self.tables.keys.get(&state.table).map_or(0, TableKeys::len))
    }

    /// The decision events ring buffer, as aya's reader (which maps it), for a reader that
    /// drains it with aya.
    pub fn take_events(&mut self) -> Option<Result<RingBuf<MapData>, DataplaneError>> {
        self.events.take().map(|map| RingBuf::try_from(map).map_err(map_err(maps::EVENTS)))
    }

    /// The decision events ring buffer's fd, for a reader that maps it itself (the daemon's
    /// `daemon::ring`).
    pub fn take_events_fd(&mut self) -> Option<Result<OwnedFd, DataplaneError>> {
        let map = self.events.take()?;
        let aya::maps::Map::RingBuf(data) = &map else {
            return Some(Err(DataplaneError::Missing(maps::EVENTS)));
        };
        Some(data.fd().as_fd().try_clone_to_owned().map_err(DataplaneError::Barrier))
    }

    /// The summaries and their epoch, for the one task that drains them.
    pub fn take_summaries(&mut self) -> Option<Summaries> {
        self.summaries.take()
    }

    /// The `learned` map (addresses of names the DNS proxy answered), for its one writer.
    pub fn take_learned(&mut self) -> Option<LearnedMap> {
        self.learned.take()
    }

    /// Events lost to a full ring buffer, per CPU, since the maps were created.
    pub fn drops_per_cpu(&self) -> Result<Vec<u64>, DataplaneError> {
        let values = self.drops.get(&0, 0).map_err(map_err(maps::DROPS))?;
        Ok(values.iter().copied().collect())
    }

    /// Kernel counters of an agent slot (or `event::UNREGISTERED_SLOT`), summed over the CPUs.
    pub fn stats(&self, slot: u32) -> Result<AgentCounts, DataplaneError> {
        let per_cpu = self.stats.get(&slot, 0).map_err(map_err(maps::STATS))?;
        Ok(AgentStats::total(per_cpu.iter()))
    }

    fn retire(&mut self, table: u32) {
        if table != EMPTY_TABLE {
            self.retired.push(table);
        }
    }

    /// Deletes replaced tables once no program can be reading them (after an RCU grace period).
    /// `grant` calls it when replaced tables pile up; a long-running owner calls
    /// `reclaim_barrier`, waits on it without holding the dataplane, then `finish_reclaim`.
    pub fn reclaim(&mut self) -> Result<(), DataplaneError> {
        if let Some(barrier) = self.reclaim_barrier() {
            barrier.wait()?;
            self.finish_reclaim(&barrier);
        }
        Ok(())
    }

    /// The grace period after which the tables replaced so far can be deleted, if there are any.
    /// Waiting on it takes milliseconds and needs no access to the dataplane.
    #[must_use]
    pub fn reclaim_barrier(&self) -> Option<ReclaimBarrier> {
        (!self.retired.is_empty()).then(|| ReclaimBarrier {
            fds: self.barrier.clone(),
            upto: self.reclaimed + self.retired.len() as u64,
        })
    }

    /// Deletes the tables that were replaced before `barrier` was taken (and waited on).
    pub fn finish_reclaim(&mut self, barrier: &ReclaimBarrier) {
        while self.finish_reclaim_some(barrier, usize::MAX) {}
    }

    /// Deletes at most `max_keys` entries' worth of the tables replaced before `barrier` was
    /// taken (at least one table); returns whether some are left, so an owner can delete a
    /// large backlog (10,000 tables replaced at a restart) in short steps under its lock.
    pub fn finish_reclaim_some(&mut self, barrier: &ReclaimBarrier, max_keys: usize) -> bool {
        // `retired` is in retirement order; `reclaimed` counts the tables already deleted from
        // its front, so an inline `reclaim` in between cannot make this delete newer tables.
        let due = barrier.upto.saturating_sub(self.reclaimed).min(self.retired.len() as u64) as usize;
        // Whole tables, in order, while their entries fit in `max_keys` (the first always).
        let n = self.retired[..due]
            .iter()
            .scan(0usize, |sum, table| {
                *sum += self.tables.keys.get(table).map_or(0, TableKeys::len);
                Some(*sum)
            })
            .enumerate()
            .take_while(|&(i, sum)| i == 0 || sum <= max_keys)
            .count();
        self.reclaimed += n as u64;
        for table in self.retired.drain(..n).collect::<Vec<_>>() {
            if let Some(keys) = self.tables.keys.remove(&table) {
                self.delete_keys(&keys);
            }
        }
        n < due
    }

    /// Reclaiming waits for an RCU grace period (milliseconds): an owner does it periodically
    /// without holding the dataplane (`reclaim_barrier`); here only when replaced tables pile up.
    fn reclaim_if_piled_up(&mut self) -> Result<(), DataplaneError> {
        if self.retired.len() >= RECLAIM_TABLES || self.retired_entries() >= RECLAIM_ENTRIES {
            self.reclaim()?;
        }
        Ok(())
    }

    /// Rule entries held by replaced tables not yet deleted.
    fn retired_entries(&self) -> usize {
        self.retired.iter().filter_map(|t| self.tables.keys.get(t)).map(TableKeys::len).sum()
    }

    fn delete_keys(&mut self, keys: &TableKeys) {
        // A key that is already gone is fine; anything else leaves an unreachable entry behind,
        // which the next start's orphan sweep removes.
        for key in &keys.v4 {
            if let Err(e) = self.rules_v4.remove(key)
                && !matches!(e, MapError::KeyNotFound)
            {
                warn!(error = %e, "could not delete an IPv4 rule entry");
            }
        }
        for key in &keys.v6 {
            if let Err(e) = self.rules_v6.remove(key)
                && !matches!(e, MapError::KeyNotFound)
            {
                warn!(error = %e, "could not delete an IPv6 rule entry");
            }
        }
    }
}

impl Drop for Dataplane {
    fn drop(&mut self) {
        // Best effort: whatever is left is found as orphans by the next start.
        if let Err(e) = self.reclaim() {
            warn!(error = %e, "could not reclaim replaced rule tables");
        }
    }
}

fn set_flag(flags: &mut u32, flag: u32, on: bool) {
    if on { *flags |= flag } else { *flags &= !flag }
}

/// A map of the object as a plain fd (for the few maps only raw syscalls touch).
fn take_map_fd(ebpf: &mut Ebpf, name: &'static str) -> Result<OwnedFd, DataplaneError> {
    let map = ebpf.take_map(name).ok_or(DataplaneError::Missing(name))?;
    let (aya::maps::Map::Array(data) | aya::maps::Map::ArrayOfMaps(data)) = &map else {
        return Err(DataplaneError::Missing(name));
    };
    data.fd().as_fd().try_clone_to_owned().map_err(DataplaneError::Barrier)
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DataplaneError::Missing(name))?;
    T::try_from(map).map_err(map_err(name))
}

/// Loads one program and puts it behind its pinned link: swaps it into the existing link
/// (returns true) or attaches and pins a new link (returns false).
fn attach(
    ebpf: &mut Ebpf,
    name: &'static str,
    hook: Hook,
    root: &File,
    root_id: u64,
    link_path: &Path,
) -> Result<bool, DataplaneError> {
    let program = ebpf.program_mut(name).ok_or(DataplaneError::Missing(name))?;
    let link_err = |source| DataplaneError::Link { path: link_path.to_owned(), source };
    let existing = match bpf_sys::obj_get(link_path) {
        Ok(fd) => Some(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(link_err(e)),
    };
    if let Some(link) = &existing {
        let info = bpf_sys::link_info(link.as_fd()).map_err(link_err)?;
        if info.link_type != bpf_sys::LINK_TYPE_CGROUP
            || info.cgroup_id != root_id
            || info.attach_type != hook.attach_type()
        {
            return Err(DataplaneError::ForeignLink {
                path: link_path.to_owned(),
                found: info.cgroup_id,
                found_hook: info.attach_type,
                expected: root_id,
            });
        }
    }
    // The four program types share these steps but not a trait: load, then swap into the
    // pinned link or attach a new one.
    macro_rules! load_and_link {
        ($ty:ty, |$p:ident| $attach:expr) => {{
            let $p: &mut $ty = program.try_into().map_err(prog_err(name))?;
            $p.load().map_err(prog_err(name))?;
            if let Some(link) = &existing {
                let fd = $p.fd().map_err(prog_err(name))?;
                bpf_sys::link_update(link.as_fd(), fd.as_fd()).map_err(link_err)?;
                return Ok(true);
            }
            let id = $attach.map_err(prog_err(name))?;
            FdLink::try_from($p.take_link(id).map_err(prog_err(name))?)
                .map_err(|e| link_err(io::Error::other(e.to_string())))?
        }};
    }
    let fd_link: FdLink = match hook {
        Hook::SockAddr(_) => load_and_link!(CgroupSockAddr, |p| p.attach(root, CgroupAttachMode::Single)),
        Hook::Sock(_) => load_and_link!(CgroupSock, |p| p.attach(root, CgroupAttachMode::Single)),
        Hook::Skb(attach_type) => {
            load_and_link!(CgroupSkb, |p| p.attach(root, attach_type, CgroupAttachMode::Single))
        }
        Hook::Sockopt(_) => {
            // aya's setsockopt link does not convert to an `FdLink`: create and pin it directly.
            let p: &mut CgroupSockopt = program.try_into().map_err(prog_err(name))?;
            p.load().map_err(prog_err(name))?;
            let fd = p.fd().map_err(prog_err(name))?;
            if let Some(link) = &existing {
                bpf_sys::link_update(link.as_fd(), fd.as_fd()).map_err(link_err)?;
                return Ok(true);
            }
            let link =
                bpf_sys::link_create(fd.as_fd(), root.as_fd(), hook.attach_type()).map_err(link_err)?;
            bpf_sys::obj_pin(link.as_fd(), link_path).map_err(link_err)?;
            return Ok(false);
        }
    };
    fd_link.pin(link_path).map_err(|e| link_err(io::Error::other(e.to_string())))?;
    Ok(false)
}

/// What `uninstall` removed and what it left.
#[derive(Debug, Default)]
pub struct UninstallReport {
    pub links_detached: usize,
    pub maps_unpinned: usize,
    /// Agent cgroups that still hold processes (no longer confined) and were left in place.
    pub busy_cgroups: Vec<PathBuf>,
}

/// Detaches every program, removes every pin and the empty agent cgroups. Explicit only: the
/// daemon never calls it. Refuses while another process (a running daemon) holds the pin dir.
pub fn uninstall(pin_dir: &Path, root_cgroup: &Path) -> Result<UninstallReport, DataplaneError> {
    let paths = PinPaths::new(pin_dir);
    let mut report = UninstallReport::default();
    if paths.dir().exists() {
        let _lock = lock_pin_dir(paths.dir())?;
        for (name, _) in PROGRAMS {
            let path = paths.link(name);
            let link_err = |source| DataplaneError::Link { path: path.clone(), source };
            match bpf_sys::obj_get(&path) {
                Ok(link) => {
                    bpf_sys::link_detach(link.as_fd()).map_err(link_err)?;
                    fs::remove_file(&path).map_err(link_err)?;
                    report.links_detached += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(link_err(e)),
            }
        }
        for name in pins::PINNED_MAPS {
            let path = paths.map(name);
            match fs::remove_file(&path) {
                Ok(()) => report.maps_unpinned += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DataplaneError::PinDir { path, source }),
            }
        }
        for dir in [paths.links_dir(), paths.dir().to_owned()] {
            match fs::remove_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DataplaneError::PinDir { path: dir, source }),
            }
        }
    }
    if root_cgroup.exists() {
        let children = fs::read_dir(root_cgroup)
            .map_err(|source| CgroupError::Stat { path: root_cgroup.to_owned(), source })?;
        for child in children.flatten() {
            let path = child.path();
            if !path.is_dir() {
                continue;
            }
            if cgroup::processes(&path).map(|p| p.is_empty()).unwrap_or(false) {
                cgroup::remove(&path)?;
            } else {
                report.busy_cgroups.push(path);
            }
        }
        if report.busy_cgroups.is_empty() {
            cgroup::remove(root_cgroup)?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape_of(name: &str) -> Shape {
        expected_shapes().into_iter().find(|(n, _)| *n == name).map(|(_, s)| s).unwrap()
    }

    #[test]
    fn every_pinned_map_has_an_expected_shape() {
        let named: Vec<&str> = expected_shapes().iter().map(|(n, _)| *n).collect();
        assert_eq!(named, pins::PINNED_MAPS);
        for counters in pins::COUNTER_MAPS {
            assert!(named.contains(&counters), "{counters}");
        }
    }

    #[test]
    fn a_pin_of_the_expected_shape_is_adopted() {
        for (name, expected) in expected_shapes() {
            assert_eq!(pin_fate(name, &expected, &expected), PinFate::Adopt, "{name}");
        }
    }

    #[test]
    fn the_plain_stats_array_of_older_versions_is_replaced() {
        let expected = shape_of(maps::STATS);
        let old = Shape { map_type: Some(MapType::Array), ..expected };
        assert_eq!(pin_fate(maps::STATS, &old, &expected), PinFate::Replace);
        // Any other difference in a counters-only map too, and an unknown type.
        let drops = shape_of(maps::DROPS);
        assert_eq!(pin_fate(maps::DROPS, &Shape { max: 2, ..drops }, &drops), PinFate::Replace);
        assert_eq!(pin_fate(maps::DROPS, &Shape { map_type: None, ..drops }, &drops), PinFate::Replace);
    }

    #[test]
    fn an_enforcement_map_of_another_type_or_size_is_refused() {
        for name in [maps::AGENTS, maps::RULES_V4, maps::RULES_V6, maps::EVENTS, maps::REPLIES] {
            let expected = shape_of(name);
            let retyped = Shape { map_type: Some(MapType::Array), ..expected };
            assert_eq!(pin_fate(name, &retyped, &expected), PinFate::Refuse, "{name}");
            let resized = Shape { value: expected.value + 8, ..expected };
            assert_eq!(pin_fate(name, &resized, &expected), PinFate::Refuse, "{name}");
            let unknown = Shape { map_type: None, ..expected };
            assert_eq!(pin_fate(name, &unknown, &expected), PinFate::Refuse, "{name}");
        }
    }

    #[test]
    fn a_shape_reads_as_type_and_sizes() {
        let stats = shape_of(maps::STATS);
        assert_eq!(stats.to_string(), "PerCpuArray, key 4 B, value 80 B, 16385 entries");
        assert_eq!(
            Shape { map_type: None, ..stats }.to_string(),
            "unknown type, key 4 B, value 80 B, 16385 entries"
        );
    }
}
