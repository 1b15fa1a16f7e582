//! `[metrics]`: a real daemon, real decisions from a real agent, scraped over loopback TCP and a
//! Unix socket. The counters move by exactly what the agent did, and those it did nothing for do
//! not; with metrics off the daemon listens on no TCP port; a non-loopback address is refused; a
//! crowd of idle or slow clients cannot keep the endpoint (or the control socket) busy for good.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{
    collections::BTreeMap,
    fs,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::{fd::FromRawFd as _, unix::fs::PermissionsExt as _, unix::net::UnixStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use ztseg_integration::{Daemon, Netns, Site, TempDir, bin, run_agent, serve};

const CATALOGUE: &str = r#"
[scopes."read:svc"]
allow = [{ to = "10.78.0.1/32", ports = [8001] }]

[tools.shell]
allow = [{ to = "10.78.0.1/32", ports = [8003] }]
"#;

/// A port on loopback that nothing listened on a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Writes the config as the harness does, with `[metrics]` after it.
fn configure(site: &Site, dir: &Path, metrics: &str) -> Daemon {
    let daemon = Daemon::configure(site, dir, "");
    let mut config = fs::OpenOptions::new().append(true).open(&daemon.config).unwrap();
    writeln!(config, "\n[metrics]\n{metrics}").unwrap();
    daemon
}

/// One HTTP exchange on `stream`: (status code, headers as one lowercase string, body); status
/// 0 if the server closed the connection without an answer.
fn exchange(mut stream: impl std::io::Read + std::io::Write, request: &str) -> (u16, String, String) {
    // A connection turned away may be closed before the request is written, or while.
    let _ = stream.write_all(request.as_bytes());
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_lowercase(), body.to_owned())
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
}

fn tcp(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    stream
}

/// Every sample of a scrape: series (name and labels, as written) -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, head, body) = exchange(tcp(port), &get("/metrics"));
    assert_eq!(status, 200, "{head}\n{body}");
    assert!(head.contains("content-type: text/plain; version=0.0.4"), "{head}");
    samples(&body)
}

/// A series' value, 0 if absent (a counter that never moved is not written).
fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    samples.get(series).copied().unwrap_or(0.0)
}

/// Scrapes until `series` has `want` (gauges housekeeping refreshes every second).
fn wait_for(port: u16, series: &str, want: f64) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = scrape(port);
        if value(&s, series) == want {
            return s;
        }
        assert!(Instant::now() < deadline, "{series} never became {want}: {s:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ports of the TCP sockets `pid` listens on (its fds' inodes looked up in /proc/net/tcp{,6}).
/// The TCP ports `daemon` listens on, less its DNS proxy's (which listens on the loopback
/// device only, for the agents' DNS: see tests/tests/dns.rs).
fn listening(daemon: &Daemon) -> Vec<u16> {
    listening_ports(daemon.pid()).into_iter().filter(|p| *p != daemon.dns_port).collect()
}

fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in fs::read_to_string(table).unwrap().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; st 0A is LISTEN; field 9 is the inode.
            if fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                let port = fields[1].rsplit_once(':').unwrap().1;
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// BPF run-time statistics on while this lives (`BPF_ENABLE_STATS`: the sysctl is not changed,
/// and the kernel turns them off again when the fd closes, even if the test fails).
struct BpfStats(#[allow(dead_code, reason = "held for its drop")] std::os::fd::OwnedFd);

impl BpfStats {
    fn enable() -> Self {
        const BPF_ENABLE_STATS: libc::c_long = 32;
        #[repr(C)]
        struct Attr {
            kind: u32,
        }
        let mut attr = Attr { kind: 0 }; // BPF_STATS_RUN_TIME
        // SAFETY: a bpf(2) command with its attr, of the size given.
        let fd = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_ENABLE_STATS, std::ptr::from_mut(&mut attr), size_of::<Attr>())
        };
        assert!(fd >= 0, "BPF_ENABLE_STATS: {}", std::io::Error::last_os_error());
        // SAFETY: a new fd that nothing else owns.
        Self(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
    }
}

#[test]
fn counters_move_by_exactly_the_decisions_an_agent_made() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-metrics");
    let ns = Netns::new(&["10.78.0.1/32"]);
    let _server = serve(&ns, &["10.78.0.1:8001", "10.78.0.1:8002"]);
    let port = free_port();
    let mut daemon = configure(&site, &dir.path, &format!("listen = \"127.0.0.1:{port}\""));
    daemon.launch();
    // Positive control of the listening check below: exactly the configured port.
    assert_eq!(listening(&daemon), [port]);
    daemon.write_policy("catalogue.toml", CATALOGUE);
    daemon.bind_new("analyst", &["--op", "op-metrics", "--scope", "read:svc"]);
    let first = wait_for(port, "ztseg_agents{state=\"active\"}", 1.0);
    assert_eq!(value(&first, "ztseg_agents{state=\"no_token\"}"), 0.0, "{first:#?}");
    assert_eq!(value(&first, "ztseg_token_verifications_total{result=\"valid\"}"), 1.0, "{first:#?}");
    let sysctl = fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap();
    assert_eq!(value(&first, "ztseg_bpf_stats_enabled"), sysctl.trim().parse::<f64>().unwrap());

    let stats = BpfStats::enable();
    let from = daemon.next_seq();
    let before = scrape(port);
    // Two allowed (TCP, UDP), three denied (no rule); the last denial marks the end.
    let ops = [
        "tcp:10.78.0.1:8001",
        "udp-sendto:10.78.0.1:8001",
        "tcp:10.78.0.1:8002",
        "udp-sendto:10.78.0.1:8002",
        "tcp:10.78.0.1:9",
    ];
    let (code, out, err) = run_agent(&daemon, &ns, "analyst", None, &ops);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, ["ok", "ok", "EPERM", "EPERM", "EPERM"]);
    // A token that does not parse, handed over the control socket: refused and counted.
    let (code, _, err) = daemon.ztseg(&["token", "apply", "--agent", "analyst", "not-a-token"]);
    assert_eq!(code, 3, "{err}");
    daemon.collect_events(from, |r: &Value| r["dport"] == 9 && r["action"] == "connect");
    let after = wait_for(port, "ztseg_audit_pending_records", 0.0);
    drop(stats);

    // The series the negative controls below read as 0 are there, not missing (which `value`
    // would read as 0 too).
    for series in [
        "ztseg_bpf_stats_enabled",
        "ztseg_ring_dropped_records_total",
        "ztseg_program_runs_total{program=\"connect6\"}",
        "ztseg_control_request_duration_seconds_count{kind=\"kill\"}",
        "ztseg_control_request_duration_seconds_count{kind=\"status\"}",
    ] {
        assert!(before.contains_key(series) && after.contains_key(series), "{series} missing: {after:#?}");
    }
    let delta = |series: &str| value(&after, series) - value(&before, series);
    let moved: Vec<(&str, f64)> = [
        ("ztseg_decisions_total{verdict=\"allow\",reason=\"rule\"}", 2.0),
        ("ztseg_decisions_total{verdict=\"deny\",reason=\"no_rule\"}", 3.0),
        ("ztseg_agent_decisions_total{agent=\"analyst\",verdict=\"allow\",reason=\"rule\"}", 2.0),
        ("ztseg_agent_decisions_total{agent=\"analyst\",verdict=\"deny\",reason=\"no_rule\"}", 3.0),
        ("ztseg_audit_records_total{kind=\"decision\"}", 5.0),
        ("ztseg_audit_write_lag_seconds_count", 5.0),
        ("ztseg_token_verifications_total{result=\"malformed\"}", 1.0),
        ("ztseg_control_request_duration_seconds_count{kind=\"run\"}", 1.0),
        ("ztseg_control_request_duration_seconds_count{kind=\"token_apply\"}", 1.0),
        ("ztseg_program_runs_total{program=\"connect4\"}", 3.0),
        ("ztseg_program_runs_total{program=\"sendmsg4\"}", 2.0),
        // Negative controls: nothing was forbidden, killed, dropped or unrecorded, no other
        // agent decided, no token was valid, nobody asked for a kill or the status.
        ("ztseg_decisions_total{verdict=\"deny\",reason=\"forbidden\"}", 0.0),
        ("ztseg_decisions_total{verdict=\"deny\",reason=\"killed\"}", 0.0),
        ("ztseg_decisions_total{verdict=\"deny\",reason=\"unrecorded\"}", 0.0),
        ("ztseg_other_agents_decisions_total{verdict=\"deny\",reason=\"no_rule\"}", 0.0),
        ("ztseg_ring_dropped_records_total", 0.0),
        ("ztseg_token_verifications_total{result=\"valid\"}", 0.0),
        ("ztseg_control_request_duration_seconds_count{kind=\"kill\"}", 0.0),
        ("ztseg_control_request_duration_seconds_count{kind=\"status\"}", 0.0),
        ("ztseg_program_runs_total{program=\"connect6\"}", 0.0),
    ]
    .into_iter()
    .filter(|(series, want)| delta(series) != *want)
    .collect();
    assert!(
        moved.is_empty(),
        "these did not move as expected (series, expected): {moved:?}\nbefore {before:#?}\nafter {after:#?}"
    );
    assert!(delta("ztseg_program_run_seconds_total{program=\"connect4\"}") > 0.0, "{after:#?}");
    assert_eq!(value(&after, "ztseg_agents{state=\"active\"}"), 1.0);
    assert_eq!(value(&after, "ztseg_agents_with_series"), 1.0);
    assert_eq!(value(&after, "ztseg_ring_size_bytes"), f64::from(4u32 << 20));
    assert_eq!(value(&after, "ztseg_audit_unwritable"), 0.0);
    assert!(value(&after, "ztseg_audit_checkpoint_age_seconds") < 3600.0, "{after:#?}");

    // The kill switch shows in agents by state (read from the pinned agents map).
    let (code, _, err) = daemon.ztseg(&["kill", "analyst"]);
    assert_eq!(code, 0, "{err}");
    let killed = wait_for(port, "ztseg_agents{state=\"killed\"}", 1.0);
    assert_eq!(value(&killed, "ztseg_agents{state=\"active\"}"), 0.0);
    assert_eq!(value(&killed, "ztseg_control_request_duration_seconds_count{kind=\"kill\"}"), 1.0);
}

#[test]
fn with_metrics_off_the_daemon_listens_on_no_tcp_port() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-metrics-off");
    let daemon = Daemon::start(&site, &dir.path);
    assert!(fs::read_to_string(&daemon.config).unwrap().find("[metrics]").is_none());
    assert_eq!(listening(&daemon), Vec::<u16>::new());
    // The control socket still works (the daemon is up, not merely quiet).
    assert_eq!(daemon.ztseg(&["status"]).0, 0);
}

#[test]
fn an_address_other_hosts_could_reach_is_refused_before_anything_starts() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-metrics-refused");
    let port = free_port();
    for (listen, says) in [
        (
            format!("0.0.0.0:{port}"),
            format!("metrics.listen is 0.0.0.0:{port}, which other hosts could reach"),
        ),
        (format!("[::]:{port}"), format!("metrics.listen is [::]:{port}, which other hosts could reach")),
        (format!("localhost:{port}"), format!("metrics.listen \"localhost:{port}\" is not an IP address")),
    ] {
        let daemon = configure(&site, &dir.path, &format!("listen = {listen:?}"));
        let out =
            Command::new(bin("ztseg")).args(["daemon", "--config"]).arg(&daemon.config).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{listen}: {stderr}");
        assert!(stderr.contains(&says), "{listen}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one sentence: {stderr}");
        // Refused before the dataplane: nothing pinned, nothing listening.
        assert!(!site.pin_dir.exists(), "{listen}: pins were made");
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "{listen}: something listens");
        fs::remove_dir_all(&dir.path).unwrap();
        fs::create_dir_all(&dir.path).unwrap();
    }
}

#[test]
fn a_unix_socket_endpoint_serves_only_metrics_and_outlasts_idle_and_slow_clients() {
    let site = Site::new();
    let dir = TempDir::new("ztseg-metrics-unix");
    let socket = dir.path.join("run/metrics.sock");
    let mut daemon = configure(&site, &dir.path, &format!("listen = \"unix:{}\"", socket.display()));
    daemon.launch();
    assert_eq!(fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o660);
    assert_eq!(listening(&daemon), Vec::<u16>::new());
    let unix = || {
        let stream = UnixStream::connect(&socket).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream
    };
    let (status, head, body) = exchange(unix(), &get("/metrics"));
    assert_eq!(status, 200, "{head}");
    assert!(samples(&body).keys().any(|k| k.starts_with("ztseg_build_info{version=")), "{body}");
    // OpenMetrics for a scraper that asks for it.
    let ask = "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close\r\n\r\n";
    let (status, head, body) = exchange(unix(), ask);
    assert_eq!(status, 200);
    assert!(head.contains("content-type: application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");
    // Nothing but /metrics, and nothing but GET and HEAD.
    assert_eq!(exchange(unix(), &get("/")).0, 404);
    assert_eq!(exchange(unix(), &get("/metrics/../state")).0, 404);
    let post = "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    assert_eq!(exchange(unix(), post).0, 405);

    // A slow client (half a request head, then silence) is cut off once its time is up.
    let mut slow = unix();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
    let started = Instant::now();
    // Eight idle connections take every slot: the ninth is closed at once, unanswered.
    let idle: Vec<UnixStream> = (0..7).map(|_| unix()).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let turned_away = loop {
        let (status, _, _) = exchange(unix(), &get("/metrics"));
        if status == 0 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
    };
    assert!(turned_away, "a ninth client was served while eight held every slot");
    // Meanwhile the control socket answers as ever.
    assert_eq!(daemon.ztseg(&["status"]).0, 0);
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(4) && waited < Duration::from_secs(15), "cut after {waited:?}");
    // Once the idle clients go, scrapes are served again.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(10);
    while exchange(unix(), &get("/metrics")).0 != 200 {
        assert!(Instant::now() < deadline, "the endpoint did not recover");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A clean stop removes the socket.
    daemon.stop();
    assert!(!socket.exists(), "the metrics socket outlived the daemon");
}
