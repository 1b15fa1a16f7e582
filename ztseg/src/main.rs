//! The `ztseg` command: the daemon and its client commands, one binary.
//!
//! Exit codes (stable): 0 success, 1 runtime error, 2 usage error, 3 refused (verification
//! failed, policy invalid, access denied). Errors are one sentence on stderr. A closed stdout
//! (`ztseg events | head`) is a normal exit.

use std::{
    ffi::OsString,
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Args, CommandFactory as _, Parser, Subcommand};
use ztseg::{
    agent_id::AgentId,
    audit,
    cgroup::CgroupFs,
    clock,
    config::Config,
    control::{self, AgentRow, Client, ClientError, KillProcesses, ProcessesOutcome, Request},
    dataplane, policy,
    run::{self, RunOptions},
    token::{self, IssueParams, Verifier},
};

#[derive(Parser)]
#[command(name = "ztseg", version, about = "Zero-trust network segmentation for AI agents")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct SocketArg {
    /// Control socket of the daemon (default: $ZTSEG_SOCKET, else the config's `socket`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the enforcement daemon (foreground, systemd-friendly).
    Daemon {
        /// Daemon config (default: /etc/ztseg/ztseg.toml; built-in defaults when it is absent).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run CMD as agent ID inside its own cgroup; never starts CMD unconfined.
    Run {
        /// The agent to run CMD as (its binding or token decides what it may reach).
        #[arg(long, value_name = "ID")]
        agent: String,
        /// Token file, or - for stdin.
        #[arg(long, value_name = "FILE|-")]
        token: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
        /// The command and its arguments, after `--`.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Capability tokens: keys, issuing, inspecting, applying.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Agents, token expiry, state, risk and counters.
    Agents {
        /// One JSON object per agent instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Daemon status: pins, event counters, audit log.
    Status {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Pull the kill switch: no packet of the agent's connections passes, its sockets are
    /// closed, every new connect and send is refused.
    Kill {
        /// The agent's id.
        id: String,
        /// Also freeze the agent's processes (cgroup.freeze); `ztseg revive` thaws them.
        #[arg(long, conflicts_with = "terminate")]
        freeze: bool,
        /// Also kill every process of the agent (SIGKILL through cgroup.kill).
        #[arg(long)]
        terminate: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Release the kill switch: the agent gets back what a still-valid token grants.
    Revive {
        /// The agent's id.
        id: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Lift a risk pause or suspension (a person's decision, recorded with its reason): the
    /// score starts again from 0; a suspended agent's token stays revoked.
    Resume {
        /// The agent's id.
        id: String,
        /// Why: goes in the audit log.
        #[arg(long, value_name = "TEXT")]
        reason: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// An agent's risk score, standing and top contributors, each with its reason.
    Risk {
        /// The agent's id.
        id: String,
        /// The answer as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Decision events as JSON lines.
    Events {
        /// Keep printing new events as they arrive (until interrupted).
        #[arg(long)]
        follow: bool,
        /// Only this agent's events.
        #[arg(long, value_name = "ID")]
        agent: Option<String>,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Detach the programs and remove the pins and empty agent cgroups (explicit; never implicit).
    Uninstall {
        /// Daemon config naming the pin dir and agents' root (default: /etc/ztseg/ztseg.toml).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print a shell completion script for ztseg.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Print the manual page ztseg(1) in roff, or write it and one page per subcommand to DIR.
    Man {
        /// Write ztseg.1 and ztseg-SUBCOMMAND.1 pages here (created if missing) instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make an Ed25519 key pair (PEM) and a JWKS with the public key.
    Keygen {
        /// Directory to write ed25519.pem, ed25519.pub.pem and jwks.json into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Issue a signed capability token (printed on stdout).
    Issue {
        /// The issuer's private key (PEM: Ed25519, P-256 or RSA; e.g. ed25519.pem from keygen).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Issuer name (`iss`); the daemon's config must list it with this key.
        #[arg(long, value_name = "ISS")]
        iss: String,
        /// The agent the token is for (`sub`).
        #[arg(long, value_name = "ID")]
        agent: String,
        /// Operation id (`op`), recorded with every decision the token allows.
        #[arg(long, value_name = "OP")]
        op: Option<String>,
        /// A scope from the host's catalogue (repeatable).
        #[arg(long = "scope", value_name = "S")]
        scopes: Vec<String>,
        /// A tool from the host's catalogue (repeatable).
        #[arg(long = "tool", value_name = "T")]
        tools: Vec<String>,
        /// A tool whose rules become denies that win over any allow (repeatable).
        #[arg(long = "forbid", value_name = "T")]
        forbid: Vec<String>,
        /// Lifetime in seconds (`exp` - `iat`).
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        ttl: u64,
        /// The `max_tokens` claim (carried, not enforced by ztseg).
        #[arg(long, value_name = "N")]
        max_tokens: Option<u64>,
        /// Audience (`aud`); must match the daemon's `audience`.
        #[arg(long, value_name = "AUD", default_value = "ztseg")]
        aud: String,
    },
    /// Verify a token and print its claims as JSON (exit 3 if invalid).
    Inspect {
        /// Daemon config whose issuers, audience and limits to verify against.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The token itself (eyJ...), or - to read it from stdin.
        #[arg(value_name = "TOKEN|-")]
        token: String,
    },
    /// Revoke the token in force for an agent: refused again until its exp, restarts included.
    Revoke {
        /// The agent whose token is revoked.
        #[arg(long, value_name = "ID")]
        agent: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Hand a (refreshed) token to the daemon for an agent.
    Apply {
        /// The agent the token is for.
        #[arg(long, value_name = "ID")]
        agent: String,
        /// The token itself (eyJ...), or - to read it from stdin.
        #[arg(value_name = "TOKEN|-")]
        token: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate catalogue and agent files (a file or a directory) without a daemon.
    Check {
        /// A policy file or a directory of them.
        path: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the hash chain, the checkpoint signatures and the signed head with a trusted key.
    Verify {
        /// The log file(s), oldest rotated file first.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        trust: TrustArgs,
        /// Check the chain only, no signature: anyone who can write the log directory can forge
        /// a log that passes (not with --key or --config).
        #[arg(long, conflicts_with_all = ["key", "config"])]
        no_signatures: bool,
        /// Accept a live log without <log>.head (records cut from its end, or rewritten after
        /// its last checkpoint, then go unnoticed).
        #[arg(long)]
        allow_missing_head: bool,
        /// Accept records at the end that no checkpoint or head signature vouches for.
        #[arg(long)]
        allow_unsigned_tail: bool,
        /// An anchor file from `ztseg audit anchor` (repeatable): the chain must hold every
        /// record it names, or the log was rolled back.
        #[arg(long = "anchor", value_name = "ANCHOR_FILE")]
        anchors: Vec<PathBuf>,
    },
    /// Verify the live log, then print where its chain ends as one JSON line to keep off the host.
    Anchor {
        /// The live log (its rotated files are found next to it).
        #[arg(value_name = "FILE")]
        file: PathBuf,
        #[command(flatten)]
        trust: TrustArgs,
        /// Also append the anchor line to this file (created if missing).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
}

/// The key `audit verify` and `audit anchor` trust: never `<log>.pub`.
#[derive(Args)]
struct TrustArgs {
    /// Ed25519 public key file (SPKI PEM or 64 hex digits) kept off the log's directory.
    #[arg(long, value_name = "PUBKEY", conflicts_with = "config")]
    key: Option<PathBuf>,
    /// Daemon config whose state dir holds the host key (default: /etc/ztseg/ztseg.toml, or the
    /// built-in defaults when it is absent, as the daemon does).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

/// How a command failed; decides the exit code.
enum Failure {
    /// 1
    Runtime(anyhow::Error),
    /// 2
    Usage(String),
    /// 3
    Refused(String),
    /// A daemon answer carries its own exit code.
    Client(ClientError),
    Exit(u8, String),
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::Runtime(e)
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Self::Client(e)
    }
}

/// Exit codes of a daemon that cannot start for a reason an operator acts on differently
/// (docs/cli.md): found by the error's type anywhere in its chain, never by its message.
fn start_failure(e: anyhow::Error) -> Failure {
    use ztseg::{audit::AuditError, dataplane::DataplaneError};
    let code = e.chain().find_map(|cause| {
        if let Some(e) = cause.downcast_ref::<DataplaneError>() {
            return match e {
                DataplaneError::NoPrograms => Some(10),
                DataplaneError::Busy { .. } => Some(11),
                DataplaneError::IncompatiblePin { .. } | DataplaneError::ForeignLink { .. } => Some(12),
                DataplaneError::NotBpfFs { .. } | DataplaneError::PinDir { .. } => Some(13),
                _ => None,
            };
        }
        match cause.downcast_ref::<AuditError>() {
            Some(AuditError::Locked { .. }) => Some(14),
            _ => None,
        }
    });
    match code {
        Some(code) => Failure::Exit(code, format!("{e:#}")),
        None => Failure::Runtime(e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (code, message) = match try_main(cli) {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Runtime(e)) => {
            if e.downcast_ref::<io::Error>().is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe) {
                return ExitCode::SUCCESS;
            }
            (1, format!("{e:#}"))
        }
        Err(Failure::Usage(m)) => (2, m),
        Err(Failure::Refused(m)) => (3, m),
        Err(Failure::Client(e)) => (e.exit_code(), e.to_string()),
        Err(Failure::Exit(code, m)) => (code, m),
    };
    eprintln!("ztseg: {message}");
    ExitCode::from(code)
}

fn read_arg_or_stdin(value: &str, what: &str) -> Result<String, Failure> {
    if value != "-" {
        return Ok(value.trim().to_owned());
    }
    let mut text = String::new();
    io::stdin().read_to_string(&mut text).with_context(|| format!("cannot read the {what} from stdin"))?;
    Ok(text.trim().to_owned())
}

fn read_token_file(value: &str) -> Result<String, Failure> {
    if value == "-" {
        return read_arg_or_stdin(value, "token");
    }
    std::fs::read_to_string(value)
        .map(|t| t.trim().to_owned())
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot read token file {value}: {e}")))
}

fn agent_id(value: &str) -> Result<AgentId, Failure> {
    value.parse().map_err(|e: ztseg::agent_id::InvalidAgentId| Failure::Usage(e.to_string()))
}

fn socket_of(arg: &SocketArg) -> Result<PathBuf, Failure> {
    if let Some(path) = &arg.socket {
        return Ok(path.clone());
    }
    if let Some(path) = std::env::var_os(control::SOCKET_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    let config = Config::load(None).map_err(|e| Failure::Runtime(e.into()))?;
    Ok(config.socket)
}

fn client(socket: &SocketArg) -> Result<Client, Failure> {
    let path = socket_of(socket)?;
    Ok(Client::connect(&path)?)
}

fn print(text: &str) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    writeln!(out, "{text}").map_err(|e| Failure::Runtime(e.into()))
}

/// Prints a daemon's answer as JSON, indented or on one line.
fn print_json(value: &impl serde::Serialize, pretty: bool) -> Result<(), Failure> {
    let text = if pretty { serde_json::to_string_pretty(value) } else { serde_json::to_string(value) };
    print(&text.map_err(|e| Failure::Runtime(e.into()))?)
}

fn try_main(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Daemon { config } => {
            ztseg::logging::init();
            let config = Config::load(config.as_deref()).map_err(|e| Failure::Runtime(e.into()))?;
            ztseg::daemon::run(config).map_err(start_failure)
        }
        Command::Run { agent, token, socket, command } => {
            let agent = agent_id(&agent)?;
            let token = token.as_deref().map(read_token_file).transpose()?;
            let options = RunOptions { agent, token, socket: socket_of(&socket)?, command };
            let e = run::run(options);
            Err(Failure::Exit(e.exit_code(), e.to_string()))
        }
        Command::Token(command) => token_command(command),
        Command::Agents { json, socket } => {
            let agents = client(&socket)?.agents()?;
            if json {
                // The rows as the daemon sent them: same fields, same order (see `AgentRow`).
                return print_json(&agents, true);
            }
            print_agents(&agents)
        }
        Command::Status { socket } => print_json(&client(&socket)?.status()?, true),
        Command::Kill { id, freeze, terminate, socket } => {
            agent_id(&id)?;
            let processes = match (freeze, terminate) {
                (true, _) => KillProcesses::Freeze,
                (_, true) => KillProcesses::Terminate,
                _ => KillProcesses::Keep,
            };
            let answer = client(&socket)?.kill(&id, processes)?;
            let closed = match answer.sockets_closed {
                Some(n) => format!("{n} socket(s) closed"),
                None => "its sockets could not all be closed (see the daemon's log)".to_owned(),
            };
            let outcome = answer.processes();
            let then = match &outcome {
                Some(ProcessesOutcome::Failed(error)) => {
                    format!("; its processes were left running: {error}")
                }
                Some(ProcessesOutcome::Frozen(true)) => "; its processes are frozen".to_owned(),
                Some(ProcessesOutcome::Frozen(false)) => "; its processes are freezing".to_owned(),
                Some(ProcessesOutcome::Terminated(n)) => format!("; {n} process(es) killed"),
                None => String::new(),
            };
            print(&format!(
                "{id}: kill switch on; no packet of its connections passes, every new connection and send is refused; {closed}{then}"
            ))?;
            if let Some(ProcessesOutcome::Failed(_)) = outcome {
                return Err(Failure::Runtime(anyhow::anyhow!(
                    "the kill switch is on, but the agent's processes could not be frozen or terminated"
                )));
            }
            Ok(())
        }
        Command::Revive { id, socket } => {
            agent_id(&id)?;
            let answer = client(&socket)?.revive(&id)?;
            let thawed = match answer.thawed {
                Some(true) => "; its processes are thawed",
                Some(false) => "; its processes are still thawing",
                None => "",
            };
            print(&format!("{id}: kill switch off; the agent has what its token still grants{thawed}"))
        }
        Command::Resume { id, reason, socket } => {
            agent_id(&id)?;
            if reason.trim().is_empty() {
                return Err(Failure::Usage("--reason must say why the agent is resumed".to_owned()));
            }
            let answer = client(&socket)?.resume(&id, &reason)?;
            let thawed = match answer.thawed {
                Some(true) => "; its processes are thawed",
                Some(false) => "; its processes are still thawing",
                None => "",
            };
            let token = if answer.was == control::AgentState::Suspended {
                "; its token stays revoked: it needs a new one"
            } else {
                ""
            };
            print(&format!(
                "{id}: resumed (was {}), risk score back to 0{thawed}{token}",
                answer.was.as_str()
            ))
        }
        Command::Risk { id, json, socket } => {
            agent_id(&id)?;
            let view = client(&socket)?.risk(&id)?;
            if json {
                return print_json(&view, true);
            }
            let mut text = format!(
                "{}: risk {:.2} ({}; paused at {}, suspended at {})",
                view.agent, view.score, view.standing, view.pause_at, view.suspend_at
            );
            for c in &view.contributors {
                text.push_str(&format!("\n  {:>6.2}  {:<16} {}", c.points, c.class, c.reason));
            }
            print(&text)
        }
        Command::Events { follow, agent, socket } => {
            if let Some(agent) = &agent {
                agent_id(agent)?;
            }
            let path = socket_of(&socket)?;
            let mut client = Client::connect(&path)?;
            let mut out = io::stdout().lock();
            let mut closed = false;
            client.stream(&Request::Events { follow, agent }, |line| {
                let ok = writeln!(out, "{line}").and_then(|()| out.flush()).is_ok();
                closed = !ok;
                ok
            })?;
            Ok(())
        }
        Command::Policy(PolicyCommand::Check { path }) => match policy::check_path(&path) {
            Ok(summary) => print(&summary.to_string()),
            Err(errors) => {
                let mut err = io::stderr().lock();
                for e in errors.iter().skip(1) {
                    let _ = writeln!(err, "ztseg: {e}");
                }
                Err(Failure::Refused(errors.first().map(ToString::to_string).unwrap_or_default()))
            }
        },
        Command::Audit(AuditCommand::Verify {
            files,
            trust,
            no_signatures,
            allow_missing_head,
            allow_unsigned_tail,
            anchors,
        }) => {
            let key = if no_signatures { None } else { Some(trusted_key(&trust)?) };
            let mut options = audit::VerifyOptions::new(key);
            options.allow_missing_head = allow_missing_head;
            options.allow_unsigned_tail = allow_unsigned_tail;
            for path in &anchors {
                options
                    .anchors
                    .extend(audit::Anchor::read_file(path).map_err(|e| Failure::Runtime(e.into()))?);
            }
            audit_verify(&files, &options).and_then(|report| print(&report.to_string()))
        }
        Command::Audit(AuditCommand::Anchor { file, trust, out }) => {
            audit_anchor(&file, &trust, out.as_deref())
        }
        Command::Uninstall { config } => {
            let config = Config::load(config.as_deref()).map_err(|e| Failure::Runtime(e.into()))?;
            let root = CgroupFs::discover()
                .map_err(|e| Failure::Runtime(e.into()))?
                .resolve(&config.cgroup_root)
                .map_err(|e| Failure::Usage(e.to_string()))?;
            let report =
                dataplane::uninstall(&config.pin_dir, &root).map_err(|e| Failure::Runtime(e.into()))?;
            for busy in &report.busy_cgroups {
                eprintln!(
                    "ztseg: warning: {} still holds processes, which are no longer confined",
                    busy.display()
                );
            }
            print(&format!(
                "detached {} programs, removed {} map pins from {}",
                report.links_detached,
                report.maps_unpinned,
                config.pin_dir.display()
            ))
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ztseg", &mut script);
            write_stdout(&script)
        }
        Command::Man { dir: None } => {
            let mut page = Vec::new();
            man_page(manual_command()).render(&mut page).context("cannot render the manual page")?;
            write_stdout(&page)
        }
        Command::Man { dir: Some(dir) } => {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            write_man_pages(manual_command(), &dir)
                .with_context(|| format!("cannot write the manual pages to {}", dir.display()))?;
            print(&format!("wrote the manual pages to {}", dir.display()))
        }
    }
}

/// The command line as the manual pages show it, built (each subcommand's display name is then
/// `ztseg-token-issue` and so on) and without `help`, which has no page of its own.
fn manual_command() -> clap::Command {
    let mut command = Cli::command().disable_help_subcommand(true);
    command.build();
    command
}

/// The page of `command`, footed `ztseg VERSION` like the top page (clap gives subcommands no
/// version).
fn man_page(command: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(command).source(format!("ztseg {}", env!("CARGO_PKG_VERSION")))
}

/// Writes the page of `command` and of each of its subcommands, recursively, into `dir`.
fn write_man_pages(command: clap::Command, dir: &Path) -> io::Result<()> {
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        write_man_pages(sub.clone(), dir)?;
    }
    man_page(command).generate_to(dir).map(drop)
}

/// Writes `bytes` to stdout as they are (a generated script or page).
fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut out = io::stdout().lock();
    out.write_all(bytes).and_then(|()| out.flush()).map_err(|e| Failure::Runtime(e.into()))
}

fn token_command(command: TokenCommand) -> Result<(), Failure> {
    match command {
        TokenCommand::Keygen { out } => {
            let written = token::keygen(&out).map_err(|e| Failure::Runtime(e.into()))?;
            print(&format!(
                "private key {} (keep it with the orchestrator)\npublic key  {}\njwks        {} (kid {})",
                written.private_key.display(),
                written.public_key.display(),
                written.jwks.display(),
                written.kid
            ))
        }
        TokenCommand::Issue { key, iss, agent, op, scopes, tools, forbid, ttl, max_tokens, aud } => {
            let agent = agent_id(&agent)?;
            if ttl == 0 {
                return Err(Failure::Usage("--ttl must be at least 1 second".to_owned()));
            }
            let pem = std::fs::read_to_string(&key)
                .map_err(|e| Failure::Runtime(anyhow::anyhow!("cannot read key {}: {e}", key.display())))?;
            let params =
                IssueParams { iss, agent, op, scopes, tools, forbid, ttl_seconds: ttl, max_tokens, aud };
            let now = clock::unix_now_secs();
            let jwt = token::issue(&pem, &params, now).map_err(|e| Failure::Runtime(e.into()))?;
            print(&jwt)
        }
        TokenCommand::Inspect { config, token } => {
            let config = Config::load(config.as_deref()).map_err(|e| Failure::Runtime(e.into()))?;
            let verifier = Verifier::from_config(&config).map_err(|e| Failure::Runtime(e.into()))?;
            let token = read_arg_or_stdin(&token, "token")?;
            let now = clock::unix_now_secs();
            let claims = verifier.verify(&token, now).map_err(|e| Failure::Refused(e.to_string()))?;
            print(&serde_json::to_string_pretty(&claims).unwrap_or_default())
        }
        TokenCommand::Revoke { agent, socket } => {
            agent_id(&agent)?;
            let answer = client(&socket)?.token_revoke(&agent)?;
            match answer.revoked {
                Some(jti) => {
                    print(&format!("{agent}: token {jti} revoked until its exp; the agent has no rights"))
                }
                None => print(&format!("{agent}: no token in force; nothing to revoke")),
            }
        }
        TokenCommand::Apply { agent, token, socket } => {
            agent_id(&agent)?;
            let token = read_arg_or_stdin(&token, "token")?;
            let granted = client(&socket)?.token_apply(&agent, &token)?;
            print_json(&granted, false)
        }
    }
}

/// The key from `--key`, or the host key through the daemon's config; never `<log>.pub`.
fn trusted_key(trust: &TrustArgs) -> Result<audit::TrustedKey, Failure> {
    if let Some(path) = &trust.key {
        let key = audit::load_verifying_key(path).map_err(|e| Failure::Runtime(e.into()))?;
        return Ok(audit::TrustedKey { key, source: audit::KeySource::Given });
    }
    let config = Config::load(trust.config.as_deref()).map_err(|e| Failure::Runtime(e.into()))?;
    let key_file = config.state_dir.join(audit::HOST_KEY_FILE);
    match audit::load_host_public_key(&config.state_dir) {
        Ok(key) => Ok(audit::TrustedKey { key, source: audit::KeySource::HostKey(key_file) }),
        Err(audit::AuditError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Err(Failure::Refused(format!(
                "no trusted key: give --key PUBKEY or --config FILE ({} does not exist; <log>.pub is never trusted)",
                key_file.display()
            )))
        }
        Err(e) => Err(Failure::Runtime(anyhow::Error::new(e).context(format!(
            "cannot take the host key from {} (it is root's: run as root, or give --key PUBKEY)",
            key_file.display()
        )))),
    }
}

fn audit_verify(files: &[PathBuf], options: &audit::VerifyOptions) -> Result<audit::VerifyReport, Failure> {
    if options.key.is_none() {
        eprintln!(
            "ztseg: warning: --no-signatures: no signature is checked; anyone who can write the log directory could have forged a log that passes"
        );
    }
    let mut all = Vec::new();
    for file in files {
        all.extend(audit::resolve_files(file).map_err(|e| Failure::Runtime(e.into()))?);
    }
    match audit::verify(&all, options) {
        Ok(report) => Ok(report),
        // An unreadable file is a runtime error; anything else is a failed verification.
        Err(damage) if damage.kind == audit::DamageKind::Unreadable => {
            Err(Failure::Runtime(anyhow::anyhow!("{damage}")))
        }
        Err(damage) => Err(Failure::Refused(damage.to_string())),
    }
}

fn audit_anchor(file: &Path, trust: &TrustArgs, out: Option<&Path>) -> Result<(), Failure> {
    if audit::live_path_of(file) != file {
        return Err(Failure::Usage(format!(
            "{} is a rotated file: anchor the live log it belongs to",
            file.display()
        )));
    }
    let options = audit::VerifyOptions::new(Some(trusted_key(trust)?));
    let report = audit_verify(&[file.to_owned()], &options)?;
    let (Some(seq), Some(hash), Some(key)) = (report.last_seq, report.last_hash, report.key_id) else {
        return Err(Failure::Refused(format!("{}: the log holds no record to anchor", file.display())));
    };
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let line = audit::Anchor::new(name, seq, hash, key, std::time::SystemTime::now()).to_line();
    if let Some(out) = out {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(out)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_all()))
            .with_context(|| format!("cannot append the anchor to {}", out.display()))?;
    }
    print(&line)
}

fn print_agents(agents: &[AgentRow]) -> Result<(), Failure> {
    let mut lines = vec![format!(
        "{:<20} {:<9} {:<7} {:>6} {:>10} {:<18} {:>6} {:>5} {:>9} {:>7} {:>7}",
        "AGENT", "STATE", "MODE", "UID", "EXPIRES", "OP", "RULES", "RISK", "DECISIONS", "DENIED", "DROPPED"
    )];
    for a in agents {
        let expires = match a.expires_in {
            Some(secs) if secs > 0 => format!("in {secs}s"),
            Some(secs) => format!("{}s ago", -secs),
            None => "-".to_owned(),
        };
        lines.push(format!(
            "{:<20} {:<9} {:<7} {:>6} {:>10} {:<18} {:>6} {:>5} {:>9} {:>7} {:>7}",
            a.agent,
            a.state.as_str(),
            a.mode.as_str(),
            a.uid,
            expires,
            a.op.as_deref().unwrap_or("-"),
            a.rules,
            a.risk,
            a.decisions,
            a.denied,
            a.events_dropped
        ));
    }
    print(&lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::Cli;

    /// Every option and argument of every command says in one line what it is for.
    #[test]
    fn every_option_has_a_help_line() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "ztseg", &mut missing);
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }
}
