//! A [`Snapshot`] as text: the Prometheus text format (0.0.4), or OpenMetrics when the scraper
//! asks for it. prometheus-client writes the descriptors, escapes label values and adds the
//! `_total`, unit and `_bucket` suffixes; the names, help texts and labels are here.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::{Registry, Unit},
};

use super::{AGENT_STATES, HistogramSnapshot, Snapshot};
use crate::events::{reason_name, verdict_name};

/// The text format of a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (what node_exporter serves).
    Prometheus,
    /// OpenMetrics 1.0 text (`# UNIT`, `# EOF`), for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// The format a request's `Accept` header asks for: OpenMetrics only if it names it.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Prometheus => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// The text of one scrape.
pub fn render(snapshot: Snapshot, format: Format) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Families(snapshot)));
    let mut text = String::new();
    let written = match format {
        Format::Prometheus => prometheus_client::encoding::prometheus_text::encode(&mut text, &registry),
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut text, &registry),
    };
    // Writing to a String does not fail; an encoder's error would be a bug in a name or label.
    if let Err(e) = written {
        tracing::error!(error = %e, "cannot render the metrics");
    }
    text
}

static SECONDS: Unit = Unit::Seconds;
static BYTES: Unit = Unit::Bytes;

#[derive(Debug)]
struct Families(Snapshot);

/// Starts a family.
fn family<'s>(
    encoder: &'s mut DescriptorEncoder<'_>,
    name: &'s str,
    help: &str,
    unit: Option<&'s Unit>,
    metric_type: MetricType,
) -> Result<MetricEncoder<'s>, std::fmt::Error> {
    encoder.encode_descriptor(name, help, unit, metric_type)
}

fn counter(m: &mut MetricEncoder<'_>, labels: &impl EncodeLabelSet, value: u64) -> std::fmt::Result {
    m.encode_family(labels)?.encode_counter::<NoLabelSet, u64, u64>(&value, None)
}

fn gauge(
    m: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    value: impl EncodeGaugeValue,
) -> std::fmt::Result {
    m.encode_family(labels)?.encode_gauge(&value)
}

fn histogram(
    m: &mut MetricEncoder<'_>,
    labels: &impl EncodeLabelSet,
    h: &HistogramSnapshot,
) -> std::fmt::Result {
    let buckets: Vec<(f64, u64)> =
        h.bounds.iter().copied().chain([f64::INFINITY]).zip(h.counts.iter().copied()).collect();
    m.encode_family(labels)?.encode_histogram::<NoLabelSet>(h.sum_seconds, h.count(), &buckets, None)
}

/// An unlabelled sample.
const NONE: [(&str, &str); 0] = [];

impl Collector for Families {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let mut m = family(
            &mut e,
            "ztseg_build_info",
            "The ztseg version serving these metrics.",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut m, &[("version", env!("CARGO_PKG_VERSION"))], 1u64)?;

        let mut m = family(
            &mut e,
            "ztseg_decisions",
            "Kernel decisions handed to the audit log since the daemon started, by verdict and reason (a summary record counts as the decisions it stands for).",
            None,
            MetricType::Counter,
        )?;
        for &(v, r, n) in &s.decisions {
            counter(&mut m, &[("verdict", verdict_name(v)), ("reason", reason_name(r))], n)?;
        }
        let mut m = family(
            &mut e,
            "ztseg_agent_decisions",
            "ztseg_decisions of each agent with series of its own (the first metrics.agent_series agents seen since the daemon started).",
            None,
            MetricType::Counter,
        )?;
        for (agent, v, r, n) in &s.agent_decisions {
            let labels = [("agent", &**agent), ("verdict", verdict_name(*v)), ("reason", reason_name(*r))];
            counter(&mut m, &labels, *n)?;
        }
        let mut m = family(
            &mut e,
            "ztseg_other_agents_decisions",
            "ztseg_decisions of the agents beyond metrics.agent_series, together.",
            None,
            MetricType::Counter,
        )?;
        for &(v, r, n) in &s.other_agent_decisions {
            counter(&mut m, &[("verdict", verdict_name(v)), ("reason", reason_name(r))], n)?;
        }
        let mut m = family(
            &mut e,
            "ztseg_agents_with_series",
            "Agents that have series of their own (at most metrics.agent_series).",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut m, &NONE, s.agents_with_series as u64)?;

        let mut m = family(
            &mut e,
            "ztseg_agents",
            "Registered agents by state, as ztseg agents shows them (refreshed every second).",
            None,
            MetricType::Gauge,
        )?;
        for state in AGENT_STATES {
            let n = s.agents_by_state.iter().find(|(st, _)| *st == state).map_or(0, |(_, n)| *n);
            gauge(&mut m, &[("state", state)], n)?;
        }
        if !s.agent_risk.is_empty() {
            let mut m = family(
                &mut e,
                "ztseg_agent_risk",
                "Risk score (0-100) of each agent with series of its own.",
                None,
                MetricType::Gauge,
            )?;
            for (agent, risk) in &s.agent_risk {
                gauge(&mut m, &[("agent", &**agent)], *risk)?;
            }
        }

        let mut m = family(
            &mut e,
            "ztseg_token_verifications",
            "Token verifications (signature and claims) since the daemon started, by result: valid, or the refusal code.",
            None,
            MetricType::Counter,
        )?;
        for (result, n) in &s.tokens {
            counter(&mut m, &[("result", *result)], *n)?;
        }
        let mut m = family(
            &mut e,
            "ztseg_control_request_duration",
            "Time from reading a control request to having written its answer, by request kind.",
            Some(&SECONDS),
            MetricType::Histogram,
        )?;
        for (kind, h) in &s.requests {
            histogram(&mut m, &[("kind", *kind)], h)?;
        }

        let a = &s.audit;
        let mut m = family(
            &mut e,
            "ztseg_audit_records",
            "Records appended to the audit log since the daemon started: decision records, and the others (daemon records, checkpoints, ...).",
            None,
            MetricType::Counter,
        )?;
        counter(&mut m, &[("kind", "decision")], a.decision_records)?;
        counter(&mut m, &[("kind", "other")], a.records.saturating_sub(a.decision_records))?;
        let mut m = family(
            &mut e,
            "ztseg_audit_pending_records",
            "Decision records taken from the ring or the summaries and not yet appended to the audit log.",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut m, &NONE, a.pending_records)?;
        let mut m = family(
            &mut e,
            "ztseg_audit_write_lag",
            "Time from a kernel decision to the append of its record to the audit log.",
            Some(&SECONDS),
            MetricType::Histogram,
        )?;
        histogram(&mut m, &NONE, &a.lag)?;
        let mut m = family(
            &mut e,
            "ztseg_audit_unwritable",
            "1 while the audit log cannot be written (full disk, audit.reserve_mib, a write error): records wait, and allowed decisions are refused once the ring is full.",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut m, &NONE, u64::from(a.unwritable))?;
        let mut m = family(
            &mut e,
            "ztseg_audit_checkpoint_age",
            "Time since the audit log's last signed checkpoint (or since the daemon opened the log).",
            Some(&SECONDS),
            MetricType::Gauge,
        )?;
        gauge(&mut m, &NONE, a.checkpoint_age_seconds)?;
        let mut m = family(
            &mut e,
            "ztseg_audit_unsigned_records",
            "Records appended since the last checkpoint, which no signed checkpoint covers yet.",
            None,
            MetricType::Gauge,
        )?;
        gauge(&mut m, &NONE, a.unsigned_records)?;

        if let Some(ring) = s.ring {
            let mut m = family(
                &mut e,
                "ztseg_ring_used",
                "Bytes of decision records in the events ring that the kernel cannot reuse yet (not read, or read and not yet written to the audit log).",
                Some(&BYTES),
                MetricType::Gauge,
            )?;
            gauge(&mut m, &NONE, ring.used_bytes)?;
            let mut m = family(
                &mut e,
                "ztseg_ring_size",
                "Size of the events ring's data area.",
                Some(&BYTES),
                MetricType::Gauge,
            )?;
            gauge(&mut m, &NONE, ring.size_bytes)?;
        }
        if let Some(dropped) = s.ring_dropped {
            let mut m = family(
                &mut e,
                "ztseg_ring_dropped_records",
                "Decision records the kernel could not put in the full events ring (the drops map, summed over CPUs, since the map was created).",
                None,
                MetricType::Counter,
            )?;
            counter(&mut m, &NONE, dropped)?;
        }
        if let Some(enabled) = s.bpf_stats_enabled {
            let mut m = family(
                &mut e,
                "ztseg_bpf_stats_enabled",
                "1 while the sysctl kernel.bpf_stats_enabled is on: the program run counters move only then (or while some process holds a BPF_ENABLE_STATS fd).",
                None,
                MetricType::Gauge,
            )?;
            gauge(&mut m, &NONE, u64::from(enabled))?;
        }
        if !s.programs.is_empty() {
            let mut m = family(
                &mut e,
                "ztseg_program_run",
                "Time the kernel spent running each ztseg program (BPF run-time statistics, counted only while they are enabled).",
                Some(&SECONDS),
                MetricType::Counter,
            )?;
            for p in &s.programs {
                m.encode_family(&[("program", p.name)])?
                    .encode_counter::<NoLabelSet, f64, u64>(&(p.run_time_ns as f64 / 1e9), None)?;
            }
            let mut m = family(
                &mut e,
                "ztseg_program_runs",
                "Runs of each ztseg program (counted only while BPF run-time statistics are enabled).",
                None,
                MetricType::Counter,
            )?;
            for p in &s.programs {
                counter(&mut m, &[("program", p.name)], p.runs)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::metrics::{AuditSnapshot, ProgramSnapshot, RingSnapshot};

    fn snapshot() -> Snapshot {
        let agent: Arc<str> = "analyst-7".into();
        Snapshot {
            decisions: vec![(1, 1, 3), (2, 2, 2), (3, 3, 4)],
            agent_decisions: vec![(agent.clone(), 1, 1, 3)],
            other_agent_decisions: vec![(2, 2, 2)],
            agents_with_series: 1,
            agent_risk: vec![(agent, 42)],
            agents_by_state: vec![("active", 1), ("killed", 2)],
            tokens: vec![("valid", 4), ("expired", 1)],
            requests: vec![(
                "kill",
                HistogramSnapshot { bounds: &[0.001, 0.01], counts: vec![1, 2, 0], sum_seconds: 0.0125 },
            )],
            audit: AuditSnapshot {
                decision_records: 5,
                records: 9,
                pending_records: 1,
                unwritable: false,
                checkpoint_age_seconds: 2.5,
                unsigned_records: 3,
                lag: HistogramSnapshot { bounds: &[0.05], counts: vec![5, 0], sum_seconds: 0.1 },
            },
            ring: Some(RingSnapshot { used_bytes: 800, size_bytes: 4 << 20 }),
            ring_dropped: Some(7),
            bpf_stats_enabled: Some(true),
            programs: vec![ProgramSnapshot { name: "connect4", run_time_ns: 1_500_000_000, runs: 12 }],
        }
    }

    /// The sample lines (not comments) of a text.
    fn samples(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn the_prometheus_text_has_help_type_and_every_sample() {
        let text = render(snapshot(), Format::Prometheus);
        for line in [
            "# HELP ztseg_decisions_total Kernel decisions handed to the audit log",
            "# TYPE ztseg_decisions_total counter",
            "# TYPE ztseg_control_request_duration_seconds histogram",
            "# TYPE ztseg_ring_used_bytes gauge",
        ] {
            assert!(text.lines().any(|l| l.starts_with(line)), "{line:?} missing:\n{text}");
        }
        let expected = [
            "ztseg_decisions_total{verdict=\"allow\",reason=\"rule\"} 3",
            "ztseg_decisions_total{verdict=\"deny\",reason=\"no_rule\"} 2",
            "ztseg_decisions_total{verdict=\"would_deny\",reason=\"forbidden\"} 4",
            "ztseg_agent_decisions_total{agent=\"analyst-7\",verdict=\"allow\",reason=\"rule\"} 3",
            "ztseg_other_agents_decisions_total{verdict=\"deny\",reason=\"no_rule\"} 2",
            "ztseg_agents_with_series 1",
            "ztseg_agents{state=\"killed\"} 2",
            "ztseg_agents{state=\"suspended\"} 0",
            "ztseg_agents{state=\"paused\"} 0",
            "ztseg_agents{state=\"active\"} 1",
            "ztseg_agent_risk{agent=\"analyst-7\"} 42",
            "ztseg_token_verifications_total{result=\"valid\"} 4",
            "ztseg_token_verifications_total{result=\"expired\"} 1",
            "ztseg_control_request_duration_seconds_bucket{kind=\"kill\",le=\"0.001\"} 1",
            "ztseg_control_request_duration_seconds_bucket{kind=\"kill\",le=\"0.01\"} 3",
            "ztseg_control_request_duration_seconds_bucket{kind=\"kill\",le=\"+Inf\"} 3",
            "ztseg_control_request_duration_seconds_sum{kind=\"kill\"} 0.0125",
            "ztseg_control_request_duration_seconds_count{kind=\"kill\"} 3",
            "ztseg_audit_records_total{kind=\"decision\"} 5",
            "ztseg_audit_records_total{kind=\"other\"} 4",
            "ztseg_audit_pending_records 1",
            "ztseg_audit_write_lag_seconds_count 5",
            "ztseg_audit_unwritable 0",
            "ztseg_audit_checkpoint_age_seconds 2.5",
            "ztseg_audit_unsigned_records 3",
            "ztseg_ring_used_bytes 800",
            "ztseg_ring_size_bytes 4194304",
            "ztseg_ring_dropped_records_total 7",
            "ztseg_bpf_stats_enabled 1",
            "ztseg_program_run_seconds_total{program=\"connect4\"} 1.5",
            "ztseg_program_runs_total{program=\"connect4\"} 12",
        ];
        let samples = samples(&text);
        for line in expected {
            assert!(samples.contains(&line), "{line:?} missing:\n{text}");
        }
        assert!(samples.iter().any(|l| l.starts_with("ztseg_build_info{version=")), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"), "{text}");
    }

    #[test]
    fn every_family_has_help_and_type_and_a_ztseg_name() {
        let text = render(snapshot(), Format::Prometheus);
        let helped: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        let typed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split(' ').next().unwrap())
            .collect();
        assert_eq!(helped, typed);
        assert!(helped.len() >= 20, "{helped:?}");
        for sample in samples(&text) {
            let name = sample.split(['{', ' ']).next().unwrap();
            assert!(name.starts_with("ztseg_"), "{sample}");
            let family = helped.iter().any(|f| {
                name == *f || ["_bucket", "_sum", "_count"].iter().any(|s| name.strip_suffix(s) == Some(f))
            });
            assert!(family, "{sample} has no HELP/TYPE:\n{text}");
        }
    }

    #[test]
    fn openmetrics_is_served_to_scrapers_that_ask_for_it() {
        assert_eq!(Format::from_accept(None), Format::Prometheus);
        assert_eq!(Format::from_accept(Some("text/plain;version=0.0.4")), Format::Prometheus);
        let prometheus = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        let text = render(snapshot(), Format::OpenMetrics);
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(text.contains("# UNIT ztseg_control_request_duration_seconds seconds"), "{text}");
        assert!(text.contains("ztseg_decisions_total{verdict=\"allow\",reason=\"rule\"} 3"), "{text}");
    }

    #[test]
    fn label_values_are_escaped_and_unset_parts_are_left_out() {
        let mut s = Snapshot { agent_decisions: vec![("a\"b\\c".into(), 1, 1, 1)], ..Snapshot::default() };
        let text = render(s.clone(), Format::Prometheus);
        assert!(
            text.contains(r#"ztseg_agent_decisions_total{agent="a\"b\\c",verdict="allow",reason="rule"} 1"#),
            "{text}"
        );
        // No ring, drops, stats or programs read: no such families (rather than a false zero).
        for absent in ["ztseg_ring_", "ztseg_bpf_stats_enabled", "ztseg_program_", "ztseg_agent_risk"] {
            assert!(!text.contains(absent), "{absent}:\n{text}");
        }
        // Every state is shown, zeros included.
        assert!(text.contains("ztseg_agents{state=\"no_token\"} 0"), "{text}");
        s.audit.unwritable = true;
        assert!(render(s, Format::Prometheus).contains("ztseg_audit_unwritable 1"));
    }
}
