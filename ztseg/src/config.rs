//! The daemon's configuration file (`/etc/ztseg/ztseg.toml`, or `--config FILE`).
//!
//! Every key has a built-in default, so the daemon runs without a file. Unknown keys are an
//! error: a typo in a security configuration must not silently change what is enforced.

use std::{
    fmt, fs, io,
    net::SocketAddr,
    path::{Component, Path, PathBuf},
};

use serde::Deserialize;

/// Where the daemon looks when no `--config` is given.
pub const DEFAULT_PATH: &str = "/etc/ztseg/ztseg.toml";

/// Signature algorithms a configured issuer may be pinned to.
pub const ALGORITHMS: [&str; 3] = ["EdDSA", "ES256", "RS256"];

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Policy files (catalogue and agent bindings), watched for changes.
    pub policy_dir: PathBuf,
    /// Host signing key, replay cache, last good state.
    pub state_dir: PathBuf,
    /// The hash-chained audit log.
    pub audit_log: PathBuf,
    /// The control socket; client commands take `--socket` or `ZTSEG_SOCKET`.
    pub socket: PathBuf,
    /// Where programs, links and maps are pinned (on bpffs).
    pub pin_dir: PathBuf,
    /// The agents' root cgroup, relative to the cgroup2 mount; created if missing.
    pub cgroup_root: PathBuf,
    /// Required `aud` of every token.
    pub audience: String,
    /// Longest token lifetime (`exp - iat`, or `exp - nbf`) accepted.
    pub max_ttl_seconds: u64,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway_seconds: u64,
    /// Group (name) whose members may use the control socket besides root; none by default.
    pub control_group: Option<String>,
    /// Uids (and gids of the same number) the daemon gives agents, one each, as "FIRST-LAST".
    /// The default is systemd's DynamicUser range; uids with a passwd or group entry, or that
    /// systemd has handed to a DynamicUser service, are skipped.
    pub agent_uids: UidRange,
    /// Whether policy files may put agents or catalogue entries in audit mode (dry run: what
    /// the rules deny is recorded as `would_deny` and let through). Off by default: a file that
    /// asks for it is refused.
    pub allow_audit_mode: bool,
    /// Trusted token issuers.
    pub issuers: Vec<Issuer>,
    pub risk: Risk,
    /// Rotation, retention and the disk reserve of the audit log.
    pub audit: Audit,
    /// The Prometheus metrics endpoint (off unless `listen` is set).
    pub metrics: Metrics,
    /// The DNS proxy that agents' port 53 goes to.
    pub dns: Dns,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            policy_dir: PathBuf::from("/etc/ztseg/policies"),
            state_dir: PathBuf::from("/var/lib/ztseg"),
            audit_log: PathBuf::from("/var/log/ztseg/audit.jsonl"),
            socket: PathBuf::from("/run/ztseg/ztseg.sock"),
            pin_dir: PathBuf::from("/sys/fs/bpf/ztseg"),
            cgroup_root: PathBuf::from("ztseg.slice"),
            audience: "ztseg".to_owned(),
            max_ttl_seconds: 3600,
            leeway_seconds: 5,
            control_group: None,
            agent_uids: UidRange { first: 61184, last: 65519 },
            allow_audit_mode: false,
            issuers: Vec::new(),
            risk: Risk::default(),
            audit: Audit::default(),
            metrics: Metrics::default(),
            dns: Dns::default(),
        }
    }
}

/// An inclusive range of uids, written "FIRST-LAST" in the config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl std::str::FromStr for UidRange {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a uid range like \"61184-65519\"");
        let (first, last) = text.split_once('-').ok_or_else(bad)?;
        let first: u32 = first.trim().parse().map_err(|_| bad())?;
        let last: u32 = last.trim().parse().map_err(|_| bad())?;
        Ok(Self { first, last })
    }
}

impl TryFrom<String> for UidRange {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl UidRange {
    pub fn contains(self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Issuer {
    /// The `iss` claim this issuer's tokens carry.
    pub iss: String,
    /// PEM public key, or JWKS file (the token's `kid` selects the key).
    pub key: PathBuf,
    /// The only algorithms accepted for this issuer's tokens.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["EdDSA".to_owned()]
}

/// `[risk]`: the thresholds, what a suspension does to the agent's processes, and the
/// signals' tuning (docs/configuration.md; the defaults and their reasons are in
/// [`crate::risk`]).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Risk {
    /// Whether decisions are scored at all. Off, no agent is ever paused or suspended by a
    /// score and every agent's risk reads 0 (for a host where another system judges agents).
    pub enabled: bool,
    /// Score at which an agent is paused (new connections refused, flagged for review).
    pub pause_at: u32,
    /// Score at which an agent is suspended (connections cut, token revoked, processes
    /// frozen or terminated).
    pub suspend_at: u32,
    /// What a suspension does to the agent's processes: `freeze` or `terminate`.
    pub on_suspend: OnSuspend,
    /// Destinations (CIDRs) no agent has a reason to try: one attempt, allowed or not, sets
    /// the score to at least `suspend_at`. Default: the cloud metadata services.
    pub tripwires: Vec<ipnet::IpNet>,
    /// The sliding window scans are counted in.
    pub scan_window_seconds: u64,
    /// Distinct denied ports of one host in the window before each further one scores.
    pub scan_ports: u32,
    /// Distinct denied hosts in the window before each further one scores.
    pub scan_hosts: u32,
    /// Distinct allowed destinations an agent reaches before each further new one scores.
    pub baseline_destinations: u32,
    /// Decisions in one second above which that second scores as a rate spike.
    pub rate_per_second: u64,
    /// Per signal class (`denied`, `forbidden`, `scan`, `new_destination`, `rate`,
    /// `side_door`, `stale_token`, `tripwire`): `points`, `cap`, `half_life_seconds`, each
    /// optional.
    pub classes: std::collections::BTreeMap<String, ClassWeights>,
}

impl Default for Risk {
    fn default() -> Self {
        Self {
            enabled: true,
            pause_at: 70,
            suspend_at: 90,
            on_suspend: OnSuspend::Freeze,
            // AWS, GCP and Azure (IPv4), AWS (IPv6), Alibaba Cloud.
            tripwires: [
                std::net::IpAddr::from([169, 254, 169, 254]),
                std::net::IpAddr::from([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254]),
                std::net::IpAddr::from([100, 100, 100, 200]),
            ]
            .into_iter()
            .map(ipnet::IpNet::from)
            .collect(),
            scan_window_seconds: 60,
            scan_ports: 8,
            scan_hosts: 8,
            baseline_destinations: 32,
            rate_per_second: 1000,
            classes: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnSuspend {
    Freeze,
    Terminate,
}

/// One signal class's tuning; what is absent keeps its default.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassWeights {
    /// Points per signal.
    pub points: Option<f64>,
    /// The most the class contributes to the score.
    pub cap: Option<f64>,
    /// The time its contribution takes to halve.
    pub half_life_seconds: Option<f64>,
}

/// `[audit]`: sizes in MiB, ages in days.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Audit {
    /// The live file is rotated once it passes this size.
    pub rotate_mib: u64,
    /// Rotated files kept, in total; the oldest beyond it are deleted (each deletion recorded in
    /// the chain). 0: no size limit.
    pub keep_mib: u64,
    /// Rotated files last written longer ago than this are deleted likewise. 0: no age limit.
    pub keep_days: u64,
    /// Free space the log leaves on its filesystem; a write that would leave less is not made,
    /// and allowed decisions are refused once the kernel's ring fills, until there is room.
    /// 0: no reserve.
    pub reserve_mib: u64,
}

impl Default for Audit {
    fn default() -> Self {
        Self { rotate_mib: 64, keep_mib: 4096, keep_days: 0, reserve_mib: 256 }
    }
}

impl Audit {
    /// The audit log's options for these settings.
    pub fn options(&self) -> crate::audit::AuditOptions {
        const DAY: u64 = 24 * 60 * 60;
        crate::audit::AuditOptions {
            rotate_bytes: self.rotate_mib << 20,
            keep_bytes: self.keep_mib << 20,
            keep_age: (self.keep_days > 0).then(|| std::time::Duration::from_secs(self.keep_days * DAY)),
            reserve_bytes: self.reserve_mib << 20,
            ..crate::audit::AuditOptions::default()
        }
    }
}

/// `[metrics]`: where `/metrics` is served, if anywhere.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Metrics {
    /// A loopback address and port (`127.0.0.1:9464`, `[::1]:9464`) or `unix:/absolute/path`.
    /// Absent: no metrics are served.
    pub listen: Option<Listen>,
    /// Agents whose decisions (and risk) get series of their own, labelled `agent`: the first
    /// this many seen since the daemon started. Later ones are counted together, unlabelled, so a
    /// host with 10,000 agents does not make 10,000 times the series.
    pub agent_series: usize,
}

/// The most `[metrics] agent_series` may be.
pub const MAX_AGENT_SERIES: usize = 4096;

impl Default for Metrics {
    fn default() -> Self {
        Self { listen: None, agent_series: 64 }
    }
}

/// Where the metrics endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Listen {
    Tcp(SocketAddr),
    /// A Unix socket at this absolute path.
    Unix(PathBuf),
}

impl std::str::FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            return Ok(Self::Unix(PathBuf::from(path)));
        }
        text.parse().map(Self::Tcp).map_err(|_| {
            format!(
                "metrics.listen {text:?} is not an IP address and port like \"127.0.0.1:9464\" or \"[::1]:9464\", nor \"unix:/absolute/path\""
            )
        })
    }
}

impl TryFrom<String> for Listen {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        text.parse()
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "{addr}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl Listen {
    /// Why the daemon must not listen here, if it must not: only this host may read the
    /// metrics (they name agents and what they are refused).
    fn refusal(&self, control_socket: &Path) -> Option<String> {
        match self {
            Self::Tcp(addr) if !addr.ip().is_loopback() => Some(format!(
                "is {addr}, which other hosts could reach; use a loopback address (127.0.0.1, ::1) or a unix: path"
            )),
            Self::Tcp(addr) if addr.port() == 0 => {
                Some(format!("is {addr} without a port; name the port to scrape, e.g. 127.0.0.1:9464"))
            }
            Self::Unix(path) if !path.is_absolute() || path.file_name().is_none() => {
                Some(format!("is unix:{}; the socket path must be absolute", path.display()))
            }
            Self::Unix(path) if path == control_socket => {
                Some(format!("is unix:{}, the control socket's path", path.display()))
            }
            _ => None,
        }
    }
}

/// `[dns]`: the DNS proxy every agent's DNS goes to (docs/configuration.md#dns).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Dns {
    /// Port 53 of every agent (UDP and TCP, any address) goes to the proxy. Off: port 53 is an
    /// ordinary destination that rules grant or not, and rules to DNS names grant nothing.
    pub enabled: bool,
    /// A /16 inside 127.0.0.0/8 (not 127.0.0.0/16): the agent in slot N is sent to address
    /// N + 1 of it, which is how the proxy knows whose query it reads.
    pub proxy_net: ipnet::Ipv4Net,
    /// The proxy's port on those addresses (UDP and TCP).
    pub port: u16,
    /// The resolvers the proxy asks, as "IP:PORT". Empty: the nameservers of the host's
    /// /etc/resolv.conf.
    pub upstream: Vec<SocketAddr>,
    /// How long an upstream resolver is waited for before the next one is asked.
    pub upstream_timeout_ms: u64,
    /// An answer's addresses are granted for its TTL clamped to this range (and never past
    /// the token's `exp`); the TTLs the agent sees are at most that.
    pub ttl_min_seconds: u32,
    pub ttl_max_seconds: u32,
    /// Distinct names an agent may hold answers for at once.
    pub max_names: usize,
    /// Learned entries (address x port x protocol) an agent may hold at once.
    pub max_addresses: usize,
    /// Distinct names an agent may query under one wildcard rule per window.
    pub wildcard_names: usize,
    pub wildcard_window_seconds: u64,
}

impl Default for Dns {
    fn default() -> Self {
        Self {
            enabled: true,
            proxy_net: ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 53, 0, 0), 16)
                .unwrap_or_else(|_| ipnet::Ipv4Net::default()),
            port: 10053,
            upstream: Vec::new(),
            upstream_timeout_ms: 2000,
            ttl_min_seconds: 5,
            ttl_max_seconds: 300,
            max_names: 1024,
            max_addresses: 4096,
            wildcard_names: 64,
            wildcard_window_seconds: 60,
        }
    }
}

impl Dns {
    /// What is wrong with `[dns]`, if anything: (key, problem).
    fn problem(&self) -> Option<(&'static str, String)> {
        let net = self.proxy_net;
        let loopback: ipnet::Ipv4Net = ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8).ok()?;
        if net.prefix_len() != 16 || !loopback.contains(&net) || net.network() != net.addr() {
            return Some((
                "dns.proxy_net",
                format!("must be a /16 network inside 127.0.0.0/8, like \"127.53.0.0/16\", got {net}"),
            ));
        }
        if net.addr().octets()[1] == 0 {
            return Some((
                "dns.proxy_net",
                format!(
                    "is {net}, which holds 127.0.0.1 and the host's own resolvers; use another /16, like \"127.53.0.0/16\""
                ),
            ));
        }
        if self.port == 0 {
            return Some(("dns.port", "must be a port number, 1-65535".to_owned()));
        }
        if let Some(bad) = self.upstream.iter().find(|u| u.port() == 0 || u.ip().is_unspecified()) {
            return Some((
                "dns.upstream",
                format!("has {bad}; give each resolver as \"IP:PORT\", e.g. \"192.0.2.53:53\""),
            ));
        }
        if let Some(own) =
            self.upstream.iter().find(|u| matches!(u.ip(), std::net::IpAddr::V4(ip) if net.contains(&ip)))
        {
            return Some((
                "dns.upstream",
                format!("has {own}, an address of the proxy itself (dns.proxy_net)"),
            ));
        }
        if !(1..=60_000).contains(&self.upstream_timeout_ms) {
            return Some((
                "dns.upstream_timeout_ms",
                format!("must be 1-60000, got {}", self.upstream_timeout_ms),
            ));
        }
        if self.ttl_min_seconds == 0
            || self.ttl_min_seconds > self.ttl_max_seconds
            || self.ttl_max_seconds > 86_400
        {
            return Some((
                "dns.ttl_min_seconds",
                format!(
                    "and dns.ttl_max_seconds need 1 <= min <= max <= 86400, got {} and {}",
                    self.ttl_min_seconds, self.ttl_max_seconds
                ),
            ));
        }
        let most = ztseg_common::dns::MAX_LEARNED as usize;
        if self.max_names == 0 || self.max_names > most {
            return Some(("dns.max_names", format!("must be 1-{most}, got {}", self.max_names)));
        }
        if self.max_addresses == 0 || self.max_addresses > most {
            return Some(("dns.max_addresses", format!("must be 1-{most}, got {}", self.max_addresses)));
        }
        if self.wildcard_names == 0
            || self.wildcard_window_seconds == 0
            || self.wildcard_window_seconds > 86_400
        {
            return Some((
                "dns.wildcard_names",
                format!(
                    "must be at least 1 per dns.wildcard_window_seconds of 1-86400, got {} per {}",
                    self.wildcard_names, self.wildcard_window_seconds
                ),
            ));
        }
        None
    }

    /// The settings the kernel programs are loaded with.
    pub fn kernel_config(&self) -> ztseg_common::dns::DnsConfig {
        if self.enabled {
            ztseg_common::dns::DnsConfig::new(self.proxy_net.addr().octets(), self.port)
        } else {
            ztseg_common::dns::DnsConfig::OFF
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}:{line}:{column}: {message}")]
    Parse { path: PathBuf, line: usize, column: usize, message: String },
    #[error("{path}: {key} {problem}")]
    Invalid { path: PathBuf, key: String, problem: String },
}

/// 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl Config {
    /// Reads `path`; a missing file at the default path means "all defaults".
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        match fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Parses and validates a config text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| line_col(text, s.start));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim_end_matches('\n').to_owned(),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, problem: String| {
            Err(ConfigError::Invalid { path: path.to_owned(), key: key.to_owned(), problem })
        };
        for (key, value) in [
            ("policy_dir", &self.policy_dir),
            ("state_dir", &self.state_dir),
            ("audit_log", &self.audit_log),
            ("socket", &self.socket),
            ("pin_dir", &self.pin_dir),
        ] {
            if !value.is_absolute() {
                return invalid(key, format!("must be an absolute path, not {value:?}"));
            }
        }
        if self.cgroup_root.as_os_str().is_empty()
            || !self.cgroup_root.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return invalid(
                "cgroup_root",
                format!(
                    "must be a path relative to the cgroup2 mount without '..', not {:?}",
                    self.cgroup_root
                ),
            );
        }
        let UidRange { first, last } = self.agent_uids;
        // Below 1000 are system accounts; 65534 is `nobody` and 65535 the 16-bit -1; u32::MAX
        // is -1 itself. Larger fleets than the default range holds (4,336 agents) pick a range
        // above 65535 that no /etc/subuid entry uses.
        let reserved = |uid: u32| uid == 65534 || uid == 65535;
        if first < 1000
            || first > last
            || last == u32::MAX
            || reserved(first)
            || reserved(last)
            || (first < 65534 && last > 65535)
        {
            return invalid(
                "agent_uids",
                format!(
                    "needs 1000 <= FIRST <= LAST, not spanning 65534-65535 (e.g. \"61184-65519\" or \"200000-299999\"), got {first}-{last}"
                ),
            );
        }
        if self.audience.is_empty() {
            return invalid("audience", "must not be empty".to_owned());
        }
        if self.max_ttl_seconds == 0 {
            return invalid("max_ttl_seconds", "must be at least 1".to_owned());
        }
        if self.leeway_seconds > 300 {
            return invalid(
                "leeway_seconds",
                format!("is {}; more than 300 s of clock skew is not tolerated", self.leeway_seconds),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, issuer) in self.issuers.iter().enumerate() {
            let key = |field: &str| format!("issuers[{i}].{field}");
            if issuer.iss.is_empty() {
                return invalid(&key("iss"), "must not be empty".to_owned());
            }
            if !seen.insert(&issuer.iss) {
                return invalid(&key("iss"), format!("{:?} is configured twice", issuer.iss));
            }
            if issuer.algorithms.is_empty() {
                return invalid(&key("algorithms"), "must name at least one algorithm".to_owned());
            }
            if let Some(bad) = issuer.algorithms.iter().find(|a| !ALGORITHMS.contains(&a.as_str())) {
                return invalid(&key("algorithms"), format!("has {bad:?}; supported: EdDSA, ES256, RS256"));
            }
        }
        let Audit { rotate_mib, keep_mib, keep_days, reserve_mib } = self.audit;
        if !(1..=1 << 20).contains(&rotate_mib) {
            return invalid("audit.rotate_mib", format!("must be 1-1048576 (MiB), got {rotate_mib}"));
        }
        if keep_mib != 0 && keep_mib < rotate_mib {
            return invalid(
                "audit.keep_mib",
                format!("must be 0 (no limit) or at least audit.rotate_mib ({rotate_mib}), got {keep_mib}"),
            );
        }
        if keep_mib > 1 << 40 || reserve_mib > 1 << 40 || keep_days > 365_000 {
            return invalid("audit", "has a size or age beyond any disk or lifetime".to_owned());
        }
        if let Some(problem) = self.metrics.listen.as_ref().and_then(|l| l.refusal(&self.socket)) {
            return invalid("metrics.listen", problem);
        }
        if self.metrics.agent_series > MAX_AGENT_SERIES {
            return invalid(
                "metrics.agent_series",
                format!("must be 0-{MAX_AGENT_SERIES}, got {}", self.metrics.agent_series),
            );
        }
        if let Err((key, problem)) = crate::risk::Params::from_config(&self.risk) {
            return invalid(&key, problem);
        }
        if let Some((key, problem)) = self.dns.problem() {
            return invalid(key, problem);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("ztseg.toml"))
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn the_documented_example_parses() {
        let config = parse(
            r#"
policy_dir = "/etc/ztseg/policies"
state_dir = "/var/lib/ztseg"
audit_log = "/var/log/ztseg/audit.jsonl"
socket = "/run/ztseg/ztseg.sock"
pin_dir = "/sys/fs/bpf/ztseg"
cgroup_root = "ztseg.slice"
audience = "ztseg"
max_ttl_seconds = 3600
leeway_seconds = 5
agent_uids = "61184-65519"

[[issuers]]
iss = "moltbot-orchestrator"
key = "/etc/ztseg/keys/orchestrator.pub.pem"
algorithms = ["EdDSA"]

[risk]
pause_at = 70
suspend_at = 90
"#,
        )
        .unwrap();
        assert_eq!(config.issuers.len(), 1);
        assert_eq!(config.issuers[0].algorithms, ["EdDSA"]);
        assert_eq!(config.risk, Risk::default());
        assert_eq!(config.agent_uids, UidRange { first: 61184, last: 65519 });
        let large = parse("agent_uids = \"200000-299999\"").unwrap();
        assert_eq!(large.agent_uids, UidRange { first: 200_000, last: 299_999 });
    }

    #[test]
    fn the_example_in_the_configuration_docs_parses() {
        let doc = include_str!("../../docs/configuration.md");
        let example = doc.split("## Example").nth(1).and_then(|s| s.split("```toml").nth(1)).unwrap();
        let example = example.split("```").next().unwrap();
        let config = parse(example).unwrap();
        assert_eq!(config.audit, Audit::default());
        assert_eq!(config.metrics, Metrics::default());
        // With its commented-out `listen` taken in, it serves on loopback.
        let config = parse(&example.replace("# listen =", "listen =")).unwrap();
        assert_eq!(config.metrics.listen.map(|l| l.to_string()).as_deref(), Some("127.0.0.1:9464"));
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let err = parse("audience = \"x\"\npolicy_dirr = \"/tmp\"\n").unwrap_err().to_string();
        assert!(err.starts_with("ztseg.toml:2:1: unknown field `policy_dirr`"), "{err}");
        let err = parse("[risk]\npause = 5\n").unwrap_err().to_string();
        assert!(err.contains("ztseg.toml:2:1") && err.contains("pause"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            ("cgroup_root = \"../escape\"", "cgroup_root"),
            ("pin_dir = \"relative\"", "pin_dir"),
            ("agent_uids = \"0-100\"", "agent_uids"),
            ("agent_uids = \"62000-61000\"", "agent_uids"),
            ("agent_uids = \"61184-65534\"", "agent_uids"),
            ("agent_uids = \"60000-70000\"", "agent_uids"),
            ("agent_uids = \"100000-4294967295\"", "agent_uids"),
            ("max_ttl_seconds = 0", "max_ttl_seconds"),
            ("[risk]\npause_at = 95\nsuspend_at = 90", "risk"),
            ("[audit]\nrotate_mib = 0", "audit.rotate_mib"),
            ("[audit]\nrotate_mib = 64\nkeep_mib = 10", "audit.keep_mib"),
            ("[audit]\nreserve_mib = 9223372036854775807", "audit"),
            ("[metrics]\nlisten = \"0.0.0.0:9464\"", "metrics.listen"),
            ("[metrics]\nlisten = \"[::]:9464\"", "metrics.listen"),
            ("[metrics]\nlisten = \"192.0.2.1:9464\"", "metrics.listen"),
            ("[metrics]\nlisten = \"127.0.0.1:0\"", "metrics.listen"),
            ("[metrics]\nlisten = \"unix:metrics.sock\"", "metrics.listen"),
            ("[metrics]\nlisten = \"unix:/run/ztseg/ztseg.sock\"", "metrics.listen"),
            ("[metrics]\nagent_series = 5000", "metrics.agent_series"),
            ("[dns]\nproxy_net = \"10.53.0.0/16\"", "dns.proxy_net"),
            ("[dns]\nproxy_net = \"127.53.0.0/24\"", "dns.proxy_net"),
            ("[dns]\nproxy_net = \"127.0.0.0/16\"", "dns.proxy_net"),
            ("[dns]\nport = 0", "dns.port"),
            ("[dns]\nupstream = [\"127.53.0.9:53\"]", "dns.upstream"),
            ("[dns]\nupstream = [\"0.0.0.0:53\"]", "dns.upstream"),
            ("[dns]\nttl_min_seconds = 400", "dns.ttl_min_seconds"),
            ("[dns]\nmax_names = 0", "dns.max_names"),
            ("[dns]\nwildcard_names = 0", "dns.wildcard_names"),
            ("[[issuers]]\niss = \"a\"\nkey = \"/k\"\nalgorithms = [\"HS256\"]", "issuers[0].algorithms"),
            (
                "[[issuers]]\niss = \"a\"\nkey = \"/k\"\n[[issuers]]\niss = \"a\"\nkey = \"/k\"",
                "issuers[1].iss",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.starts_with(&format!("ztseg.toml: {key} ")), "{text:?} -> {err}");
        }
        assert!(parse("max_ttl_seconds = \"long\"").unwrap_err().to_string().starts_with("ztseg.toml:1:19:"));
        let err = parse("agent_uids = \"lots\"").unwrap_err().to_string();
        assert!(err.starts_with("ztseg.toml:1:14:") && err.contains("not a uid range"), "{err}");
    }

    #[test]
    fn audit_settings_become_log_options() {
        let config = parse("[audit]\nrotate_mib = 8\nkeep_mib = 0\nkeep_days = 30\nreserve_mib = 1").unwrap();
        let options = config.audit.options();
        assert_eq!((options.rotate_bytes, options.keep_bytes, options.reserve_bytes), (8 << 20, 0, 1 << 20));
        assert_eq!(options.keep_age, Some(std::time::Duration::from_secs(30 * 86400)));
        assert_eq!(Config::default().audit.options().keep_age, None);
        assert!(parse("[audit]\nkeep_bytes = 1").unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn metrics_are_off_by_default_and_listen_on_loopback_or_a_unix_socket() {
        assert_eq!(parse("").unwrap().metrics.listen, None);
        for (text, listen) in [
            ("127.0.0.1:9464", "127.0.0.1:9464"),
            ("127.3.4.5:9464", "127.3.4.5:9464"),
            ("[::1]:9464", "[::1]:9464"),
            ("unix:/run/ztseg/metrics.sock", "unix:/run/ztseg/metrics.sock"),
        ] {
            let config = parse(&format!("[metrics]\nlisten = {text:?}\nagent_series = 10")).unwrap();
            assert_eq!(config.metrics.listen.unwrap().to_string(), listen);
            assert_eq!(config.metrics.agent_series, 10);
        }
        // A host name is not an address (it could resolve anywhere).
        let err = parse("[metrics]\nlisten = \"localhost:9464\"").unwrap_err().to_string();
        assert!(err.starts_with("ztseg.toml:2:10: metrics.listen \"localhost:9464\" is not"), "{err}");
        let err = parse("[metrics]\nlisten = \"0.0.0.0:9464\"").unwrap_err().to_string();
        assert_eq!(
            err,
            "ztseg.toml: metrics.listen is 0.0.0.0:9464, which other hosts could reach; use a loopback address (127.0.0.1, ::1) or a unix: path"
        );
        assert!(parse("[metrics]\nport = 9464").unwrap_err().to_string().contains("unknown field `port`"));
    }

    #[test]
    fn a_missing_explicit_file_is_an_error_but_a_missing_default_is_not() {
        assert!(Config::load(Some(Path::new("/nonexistent/ztseg.toml"))).is_err());
    }
}
