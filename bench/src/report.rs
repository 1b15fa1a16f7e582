//! The report: a markdown table headed by the machine, and an SVG chart of connect cost against
//! table size.

use std::fmt::Write as _;

use crate::{
    Case, Options, Results, Setup,
    control_plane::Figures,
    net::NftShape,
    stats::{Stat, stat},
};

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cpu}, {cpus} CPUs, Linux {kernel}")
}

fn cell(s: Stat, scale: f64, digits: usize) -> String {
    if s.n == 0 {
        return "-".to_owned();
    }
    format!("{:.d$} ({:.d$}-{:.d$})", s.median * scale, s.min * scale, s.max * scale, d = digits)
}

pub fn markdown(opts: &Options, r: &Results, control: Option<&Figures>, dns: Option<&Figures>) -> String {
    let mut md = String::from("# ztseg benchmark\n\n");
    let _ = writeln!(
        md,
        "Machine: {}. Runs: {} interleaved runs per case; {} TCP connect+close and {} UDP sendto per run and case, from a process in the case's cgroup, on loopback inside a network namespace of the bench's own.",
        machine(),
        opts.runs,
        opts.tcp_ops,
        opts.udp_ops
    );
    md.push_str("Figures: every operation is timed on its own; a cell is the median over runs of each run's per-operation median (p50) or 99th percentile (p99), with the spread over runs (min-max) in parentheses, so a few stalled operations move p99, not p50. Ratios: each case runs in alternating turns of 64 operations with a baseline worker (outside every enforcing cgroup, to the allowed destination, in a namespace of its own set up the same way, so nftables rules of the case do not touch it), so both see the same moment of the machine; the ratio is the case's p50 over the baseline's p50 of that pair. The \"no programs\" row pairs the baseline with itself: the spread of its ratio is the bench's own noise. Kernel decision: BPF run-time statistics (run_time_ns / run_cnt) of connect4 (TCP) and sendmsg4 (UDP) during the case. Denied TCP connects end at the hook (EPERM) for ztseg and with a reset (reject) for nftables; denied UDP datagrams are refused (EPERM) by ztseg and dropped by nftables (which sendto also reports as EPERM). Every ztseg decision is recorded: as a ring record, which a reader thread drains as the daemon would, while the case's agent is within its record budget (2048 records per CPU per second), then counted in the kernel's summaries map (which the daemon would drain into one record per flow per second), so most decisions of a case are measured on the summary path; the control-plane figures compare the two paths' cost. The listeners' accept queues hold 4096 connections; \"TCP trouble\" counts the runs of a case in which the namespace's ListenOverflows, ListenDrops or RetransSegs grew (some connect then waited for a retransmission), with the counts summed.\n\n");
    md.push_str("The socket hook column is the socket-creation hook in the TCP case: it reads the socket's type and protocol and lets a TCP or UDP socket through with no lookup (its connects and sends are judged), so it is also this machine's floor, what the kernel's run-time statistics charge for running a program that does nothing. The packet programs column is the time `packets_in` and `packets_out` took per TCP connect (every packet of the agent's side of the connect and the close, both ways): with the decision and the socket hook, the kernel side of what the ratio column shows.\n\n");
    md.push_str("| case | TCP p50 ns | TCP p99 ns | ratio | UDP p50 ns | UDP p99 ns | ratio | decision ns (TCP / UDP) | socket hook ns | packet programs ns per connect | TCP trouble |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    let mut seen = std::collections::BTreeSet::new();
    for case in &r.order {
        let label = case.label();
        if !seen.insert((label.clone(), matches!(case.setup, Setup::None)))
            && matches!(case.setup, Setup::None)
        {
            continue;
        }
        let _ = writeln!(
            md,
            "| {label} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            cell(r.op(case, "tcp"), 1.0, 0),
            cell(r.p99(case, "tcp"), 1.0, 0),
            cell(r.ratio(case, "tcp"), 1.0, 3),
            cell(r.op(case, "udp"), 1.0, 0),
            cell(r.p99(case, "udp"), 1.0, 0),
            cell(r.ratio(case, "udp"), 1.0, 3),
            cell(r.kernel(case, "tcp"), 1.0, 0),
            cell(r.kernel(case, "udp"), 1.0, 0),
            cell(r.kernel(case, "socket"), 1.0, 0),
            cell(r.kernel(case, "packets"), 1.0, 0),
            trouble_cell(r, case),
        );
    }
    if !r.bulk.is_empty() {
        let without: Vec<f64> = r.bulk.iter().map(|b| b.0 / 1e9 * 8.0).collect();
        let with: Vec<f64> = r.bulk.iter().map(|b| b.1 / 1e9 * 8.0).collect();
        let ratio: Vec<f64> = r.bulk.iter().map(|b| b.1 / b.0).collect();
        md.push_str("\n## Per-packet cost (cgroup_skb)\n\n");
        let _ = writeln!(
            md,
            "Bulk TCP for {} ms per run across a veth link into a second namespace, 64 KiB writes, {} interleaved runs; the agent's every data packet out and ACK in runs `packets_out`/`packets_in`.\n\n| sender | Gbit/s | ratio to no programs |\n|---|---:|---:|\n| no programs | {} | 1.000 |\n| ztseg agent, 1 rule | {} | {} |",
            opts.bulk_ms,
            r.bulk.len(),
            cell(stat(&without), 1.0, 2),
            cell(stat(&with), 1.0, 2),
            cell(stat(&ratio), 1.0, 3),
        );
    }
    md.push_str("\n## Aims (reported, not asserted)\n\n");
    md.push_str(&aims(r, control));
    if let Some(fig) = control {
        md.push_str("\n## Control plane\n\n| figure | value |\n|---|---|\n");
        for (name, value) in &fig.lines {
            let _ = writeln!(md, "| {name} | {value} |");
        }
    }
    if let Some(fig) = dns {
        md.push_str("\n## DNS\n\nThe daemon's DNS proxy against the bench's own resolver, both in a namespace of their own; clients inside an agent's cgroup (through the proxy) or outside it (the resolver directly). Kernel costs from BPF run-time statistics of connect4, connects that end in a reset (allowed) or at the hook (refused).\n\n| figure | value |\n|---|---|\n");
        for (name, value) in &fig.lines {
            let _ = writeln!(md, "| {name} | {value} |");
        }
    }
    if !r.notes.is_empty() {
        md.push_str("\n## Notes from the run\n\n");
        for note in &r.notes {
            let _ = writeln!(md, "- {note}");
        }
    }
    md.push_str("\nChart: `connect.svg` (TCP connect cost against table size).\n");
    md
}

fn trouble_cell(r: &Results, case: &Case) -> String {
    let (runs, sum) = r.trouble(case, "tcp");
    if runs == 0 {
        return "none".to_owned();
    }
    format!(
        "{runs} run(s): {} overflows, {} drops, {} retransmits",
        sum.listen_overflows, sum.listen_drops, sum.retransmits
    )
}

/// A verdict on "value at most `limit`" from a spread over runs: met only if every run met it,
/// missed only if none did, otherwise the run cannot tell.
fn verdict(s: Stat, limit: f64) -> String {
    if s.max <= limit {
        "met".to_owned()
    } else if s.min > limit {
        "missed".to_owned()
    } else {
        format!("too noisy to conclude (runs from {:.3} to {:.3})", s.min, s.max)
    }
}

/// The p99 of a control-plane figure ("p50 N µs, p99 N µs ...").
fn p99_of(value: &str) -> Option<f64> {
    value.split("p99 ").nth(1).and_then(|v| v.split(' ').next()).and_then(|v| v.parse().ok())
}

fn find(r: &Results, pred: impl Fn(&Case) -> bool) -> Vec<&Case> {
    let mut out: Vec<&Case> = r.order.iter().filter(|c| pred(c)).collect();
    out.dedup_by_key(|c| c.label());
    out
}

fn aims(r: &Results, control: Option<&Figures>) -> String {
    let mut text = String::new();
    let ztseg = find(r, |c| matches!(c.setup, Setup::Ztseg { .. }));
    // A TCP connect runs two programs (sock_create for its socket, connect4); a UDP send on an
    // open socket runs sendmsg4.
    let range = |values: Vec<f64>| {
        let values: Vec<f64> = values.into_iter().filter(|v| *v > 0.0).collect();
        Some((values.iter().copied().reduce(f64::min)?, values.iter().copied().reduce(f64::max)?))
    };
    let tcp = range(ztseg.iter().map(|c| r.kernel(c, "tcp").median + r.kernel(c, "socket").median).collect());
    let udp = range(ztseg.iter().map(|c| r.kernel(c, "udp").median).collect());
    if let (Some((tcp_lo, tcp_hi)), Some((udp_lo, udp_hi))) = (tcp, udp) {
        let _ = writeln!(
            text,
            "- Full decision at or under 300 ns, flat from 1 to 1M rules and 1 to 10k agents: TCP (connect4 + sock_create) {tcp_lo:.0}-{tcp_hi:.0} ns, UDP (sendmsg4) {udp_lo:.0}-{udp_hi:.0} ns across all ztseg cases -> {}.",
            if tcp_hi.max(udp_hi) <= 300.0 { "met" } else { "missed" }
        );
    }
    // The run's own noise: the baseline paired with itself, and trouble.
    if let Some(base) = r.order.iter().find(|c| c.setup == Setup::None) {
        let b = r.ratio(base, "tcp");
        let troubled: Vec<String> = find(r, |_| true)
            .into_iter()
            .filter(|c| r.trouble(c, "tcp").0 > 0)
            .map(|c| c.label())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let _ = writeln!(
            text,
            "- Noise in this run: the baseline against itself, TCP p50 ratio {:.3}; middle half of its pairs {:.3}-{:.3}, all {:.3}-{:.3} (±{:.1}%); cases with TCP trouble: {}.",
            b.median,
            r.ratio_percentile(base, "tcp", 25.0),
            r.ratio_percentile(base, "tcp", 75.0),
            b.min,
            b.max,
            (b.max - 1.0).abs().max((1.0 - b.min).abs()) * 100.0,
            if troubled.is_empty() { "none".to_owned() } else { troubled.join("; ") }
        );
    }
    let at = |rules: usize, allowed: bool| {
        ztseg.iter().find(|c| c.setup == Setup::Ztseg { rules, agents: 1 } && c.allowed == allowed).copied()
    };
    if let Some(c) = at(100_000, true) {
        let ratio = r.ratio(c, "tcp");
        let _ = writeln!(
            text,
            "- Connect overhead at 100k rules within 2% of no enforcement (p50 ratio in every run at most 1.020): median {:.3} ({:+.1}%) -> {}.",
            ratio.median,
            (ratio.median - 1.0) * 100.0,
            verdict(ratio, 1.02)
        );
    }
    // nftables' fastest configuration from 1k rules up against ztseg's slowest, compared run by
    // run through the ratios to the same run's baseline.
    let nft = find(r, |c| matches!(c.setup, Setup::Nft(s) if s.size() >= 1_000) && c.allowed);
    let nft_best =
        nft.iter().map(|c| (c.label(), r.ratio(c, "tcp"))).min_by(|a, b| a.1.median.total_cmp(&b.1.median));
    let ztseg_worst = [1_000, 100_000, 1_000_000]
        .iter()
        .filter_map(|n| at(*n, true))
        .map(|c| (c.label(), r.ratio(c, "tcp")))
        .max_by(|a, b| a.1.median.total_cmp(&b.1.median));
    if let (Some((nft_label, best)), Some((ztseg_label, worst))) = (nft_best, ztseg_worst) {
        let outcome = if worst.max < best.min {
            "met".to_owned()
        } else if worst.min >= best.max {
            "missed".to_owned()
        } else {
            "too noisy to conclude (the spreads overlap)".to_owned()
        };
        let _ = writeln!(
            text,
            "- Below every nftables configuration from 1k rules up (allowed TCP connect, p50 ratio): ztseg's slowest {:.3} ({:.3}-{:.3}, {ztseg_label}) vs nftables' fastest {:.3} ({:.3}-{:.3}, {nft_label}) -> {outcome}.",
            worst.median, worst.min, worst.max, best.median, best.min, best.max
        );
    }
    let Some(fig) = control else { return text };
    let under_1ms = [
        (
            "token apply -> enforced",
            "Token apply to enforced under 1 ms p99, with the agent flooding connects",
        ),
        ("ztseg kill -> enforced", "Kill to enforced under 1 ms p99, with the agent flooding connects"),
        ("ztseg kill -> last byte", "Kill to no more bytes delivered under 1 ms p99"),
    ];
    for (prefix, aim) in under_1ms {
        for (name, value) in fig.lines.iter().filter(|(n, _)| n.starts_with(prefix)) {
            let disk = if name.contains("fdatasync") { " (audit disk slow: fdatasync +50 ms)" } else { "" };
            if let Some(p99) = p99_of(value) {
                let _ = writeln!(
                    text,
                    "- {aim}{disk}: {p99:.0} µs -> {}.",
                    if p99 < 1000.0 { "met" } else { "missed" }
                );
            }
        }
    }
    let leading = |prefix: &str| -> Option<f64> {
        let (_, value) = fig.lines.iter().find(|(n, _)| n.starts_with(prefix))?;
        value.split_whitespace().next()?.parse().ok()
    };
    if let Some(rate) = leading("event pipeline") {
        // A drain whose backlog did not all arrive measured something else.
        let whole =
            fig.lines.iter().all(|(n, v)| !n.starts_with("event pipeline") || !v.contains("short drains"));
        let _ = writeln!(
            text,
            "- Event pipeline at least 300,000 records/s from a backlog: {rate:.0}/s -> {}.",
            match (rate >= 300_000.0, whole) {
                (true, true) => "met",
                (_, false) => "missed (a drain was short)",
                (false, true) => "missed",
            }
        );
    }
    let scoring = fig.lines.iter().find(|(n, _)| n.starts_with("event pipeline without risk scoring"));
    let after = |value: &str, marker: &str| -> Option<f64> {
        value.split(marker).nth(1)?.split('%').next()?.parse().ok()
    };
    if let Some((_, value)) = scoring
        && let Some(share) = after(value, "with scoring ")
    {
        let engine = after(value, "the engine alone takes ")
            .map(|e| format!(" (the engine alone {e:.1}% of a record's time)"))
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "- Risk scoring lowers the pipeline's throughput by at most 10% (median of paired turns): {:.1}% lower{engine} -> {}.",
            100.0 - share,
            if share >= 90.0 { "met" } else { "missed" }
        );
    }
    if let Some(kib) = leading("daemon RSS, idle") {
        let _ = writeln!(
            text,
            "- Daemon RSS idle at most 25 MB: {:.1} MB -> {}.",
            kib / 1024.0,
            if kib <= 25.0 * 1024.0 { "met" } else { "missed" }
        );
    }
    text
}

/// A chart line: its label, colour and (rules, ns) points.
type Series = (&'static str, &'static str, Vec<(f64, f64)>);

/// A log-x line chart of TCP connect cost for the allowed destination.
pub fn chart(r: &Results) -> String {
    let (w, h, left, bottom, top, right) = (760.0, 420.0, 70.0, 50.0, 30.0, 230.0);
    let series: Vec<Series> = vec![
        (
            "ztseg, allowed",
            "#1b7837",
            points(r, |c| matches!(c.setup, Setup::Ztseg { agents: 1, .. }) && c.allowed),
        ),
        (
            "ztseg, denied",
            "#7fbf7b",
            points(r, |c| matches!(c.setup, Setup::Ztseg { agents: 1, .. }) && !c.allowed),
        ),
        (
            "ztseg, 10k agents, allowed",
            "#5aae61",
            points(r, |c| matches!(c.setup, Setup::Ztseg { agents: 10_000, .. }) && c.allowed),
        ),
        (
            "nftables list, allowed",
            "#b2182b",
            points(r, |c| matches!(c.setup, Setup::Nft(NftShape::List(_))) && c.allowed),
        ),
        (
            "nftables set, allowed",
            "#ef8a62",
            points(r, |c| matches!(c.setup, Setup::Nft(NftShape::Set(_))) && c.allowed),
        ),
    ];
    let base = r.order.iter().find(|c| c.setup == Setup::None).map_or(0.0, |c| r.op(c, "tcp").median);
    let ymax = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).fold(base, f64::max) * 1.15;
    let x = |rules: f64| left + (rules.max(1.0).log10() / 6.0) * (w - left - right);
    let y = |ns: f64| h - bottom - (ns / ymax.max(1.0)) * (h - bottom - top);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        svg,
        "<text x=\"{left}\" y=\"18\" font-size=\"14\">TCP connect+close, p50 ns per connect (median over runs) vs rules in the agent's table</text>"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom
    );
    for e in 0..=6 {
        let xv = x(10f64.powi(e));
        let _ =
            writeln!(svg, "<text x=\"{xv}\" y=\"{}\" text-anchor=\"middle\">1e{e}</text>", h - bottom + 18.0);
    }
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>",
            left - 6.0,
            y(v) + 4.0
        );
    }
    if base > 0.0 {
        let _ = writeln!(
            svg,
            "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"#444\" stroke-dasharray=\"4 3\"/>",
            y(base),
            w - right
        );
    }
    let mut legend_y = top + 10.0;
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{legend_y}\" fill=\"#444\">- - no programs</text>",
        w - right + 12.0
    );
    for (name, color, pts) in &series {
        legend_y += 18.0;
        let path: Vec<String> =
            pts.iter().map(|(rules, ns)| format!("{:.1},{:.1}", x(*rules), y(*ns))).collect();
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
            path.join(" ")
        );
        for (rules, ns) in pts {
            let _ = writeln!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                x(*rules),
                y(*ns)
            );
        }
        let _ =
            writeln!(svg, "<text x=\"{}\" y=\"{legend_y}\" fill=\"{color}\">{name}</text>", w - right + 12.0);
    }
    svg.push_str("</svg>\n");
    svg
}

fn points(r: &Results, pred: impl Fn(&Case) -> bool) -> Vec<(f64, f64)> {
    let mut pts: Vec<(f64, f64)> = r
        .order
        .iter()
        .filter(|c| pred(c))
        .map(|c| {
            let rules = match c.setup {
                Setup::Ztseg { rules, .. } => rules,
                Setup::Nft(shape) => shape.size(),
                Setup::None => 1,
            };
            (rules as f64, r.op(c, "tcp").median)
        })
        .collect();
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    pts.dedup_by(|a, b| a.0 == b.0);
    pts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_verdict_needs_every_run_on_one_side() {
        let s = |min, median, max| Stat { median, min, max, n: 3 };
        assert_eq!(verdict(s(0.99, 1.0, 1.01), 1.02), "met");
        assert_eq!(verdict(s(1.03, 1.1, 1.5), 1.02), "missed");
        assert!(verdict(s(0.9, 1.0, 1.8), 1.02).starts_with("too noisy"));
    }
}
