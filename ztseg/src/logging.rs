//! Where the daemon's log goes. Under systemd, when stderr is the journal's stream, each event
//! goes to the journal in its native protocol, its fields (`agent`, `op`, `jti`, `verdict`,
//! `reason`, ...) as journal fields; on a terminal, as coloured text; anywhere else (a file, a
//! pipe, a unit whose stderr is not the journal), as plain text without escape sequences.
//!
//! The choice is [`choose`], a plain function of what the process finds at start ([`Facts`]).

use std::{
    ffi::OsStr,
    fs::File,
    io::{self, IsTerminal as _},
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
};

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::{
    EnvFilter, Layer as _, fmt, layer::SubscriberExt as _, util::SubscriberInitExt as _,
};

/// The variable holding the log filter, in `tracing`'s `EnvFilter` syntax.
pub const FILTER_ENV: &str = "ZTSEG_LOG";
/// The filter when [`FILTER_ENV`] is unset, empty or invalid.
pub const DEFAULT_FILTER: &str = "info";
/// Set by systemd to the device and inode number (`DEV:INODE`, decimal) of the stream it
/// connected to the journal (systemd.exec(5)). Children inherit it whatever their stderr is, so
/// it counts only when it names stderr itself.
pub const JOURNAL_STREAM_ENV: &str = "JOURNAL_STREAM";
/// The journal's `SYSLOG_IDENTIFIER`, whatever the binary is called.
const SYSLOG_IDENTIFIER: &str = "ztseg";

/// Where log events go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// stderr is the journal's stream: the journal's native protocol, fields as journal fields.
    /// Should the journal's socket not answer, plain text on stderr without timestamps (the
    /// journal adds its own).
    Journal,
    /// stderr is a terminal: text with colours and timestamps.
    Terminal,
    /// Anything else: plain text with timestamps, no escape sequences.
    Plain,
}

/// What [`choose`] looks at, read from the process by [`Facts::of_process`].
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    pub stderr_is_terminal: bool,
    /// stderr's device and inode number, when `fstat` tells them.
    pub stderr_id: Option<(u64, u64)>,
    /// The value of `JOURNAL_STREAM`, if set.
    pub journal_stream: Option<&'a OsStr>,
    /// `NO_COLOR` is set and not empty (no-color.org): no colours on a terminal either.
    pub no_color: bool,
}

impl<'a> Facts<'a> {
    /// The facts of this process; `journal_stream` and `no_color` are the caller's reading of
    /// the environment, so that the borrow outlives the call.
    pub fn of_process(journal_stream: Option<&'a OsStr>, no_color: Option<&OsStr>) -> Self {
        let stderr = io::stderr();
        // A duplicate of fd 2, closed again at once: only its metadata is wanted.
        let stderr_id = stderr
            .as_fd()
            .try_clone_to_owned()
            .map(File::from)
            .and_then(|file| file.metadata())
            .map(|meta| (meta.dev(), meta.ino()))
            .ok();
        Self {
            stderr_is_terminal: stderr.is_terminal(),
            stderr_id,
            journal_stream,
            no_color: no_color.is_some_and(|v| !v.is_empty()),
        }
    }
}

/// Where the log goes, given `facts`. The journal only when `JOURNAL_STREAM` names stderr's own
/// device and inode; colours only on a terminal.
pub fn choose(facts: &Facts<'_>) -> Output {
    let journal = facts.journal_stream.and_then(parse_journal_stream);
    if journal.is_some() && journal == facts.stderr_id {
        Output::Journal
    } else if facts.stderr_is_terminal && !facts.no_color {
        Output::Terminal
    } else {
        Output::Plain
    }
}

/// `DEV:INODE`, both decimal; `None` for anything else.
fn parse_journal_stream(value: &OsStr) -> Option<(u64, u64)> {
    let (dev, ino) = value.to_str()?.split_once(':')?;
    let number = |s: &str| s.bytes().all(|b| b.is_ascii_digit()).then(|| s.parse().ok()).flatten();
    Some((number(dev)?, number(ino)?))
}

/// Installs the daemon's log subscriber, filtered by `ZTSEG_LOG` (default `info`), writing to
/// where [`choose`] says. Says so in the log if the filter is invalid or the journal's socket
/// does not answer.
pub fn init() {
    let journal_stream = std::env::var_os(JOURNAL_STREAM_ENV);
    let no_color = std::env::var_os("NO_COLOR");
    let output = choose(&Facts::of_process(journal_stream.as_deref(), no_color.as_deref()));
    let (filter, bad_filter) = match std::env::var(FILTER_ENV) {
        Ok(text) if !text.trim().is_empty() => match EnvFilter::try_new(&text) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(DEFAULT_FILTER), Some((text, e))),
        },
        _ => (EnvFilter::new(DEFAULT_FILTER), None),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let mut journal_error = None;
    match output {
        Output::Journal => match journal_layer() {
            Ok(journal) => registry.with(journal).init(),
            Err(e) => {
                registry.with(text_layer(false, false)).init();
                journal_error = Some(e);
            }
        },
        Output::Terminal => registry.with(text_layer(true, true)).init(),
        Output::Plain => registry.with(text_layer(true, false)).init(),
    }
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "cannot write to the journal's socket; logging to stderr as text");
    }
    if let Some((text, e)) = bad_filter {
        tracing::warn!(filter = %text, error = %e, "{FILTER_ENV} is not a valid filter; logging at {DEFAULT_FILTER}");
    }
}

/// Text on stderr, one line per event; the target (module path) is left out.
fn text_layer<S>(timestamps: bool, ansi: bool) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let layer = fmt::layer().with_writer(io::stderr).with_target(false).with_ansi(ansi);
    if timestamps { layer.boxed() } else { layer.without_time().boxed() }
}

/// The journal, with the fields under their own names (`AGENT`, `VERDICT`, ...: no prefix, so
/// `journalctl AGENT=analyst-7` finds them) and the levels at the priorities daemons use
/// (`info` is 6, not the crate's 5).
fn journal_layer() -> io::Result<tracing_journald::Layer> {
    let priorities = PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    };
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned())
        .with_priority_mappings(priorities))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(terminal: bool, stderr_id: Option<(u64, u64)>, stream: Option<&str>) -> Facts<'_> {
        Facts {
            stderr_is_terminal: terminal,
            stderr_id,
            journal_stream: stream.map(OsStr::new),
            no_color: false,
        }
    }

    #[test]
    fn the_journal_only_when_journal_stream_names_stderr() {
        assert_eq!(choose(&facts(false, Some((64769, 4242)), Some("64769:4242"))), Output::Journal);
        // Inherited from a unit by a process whose stderr is elsewhere (a file, a pipe).
        assert_eq!(choose(&facts(false, Some((64769, 4243)), Some("64769:4242"))), Output::Plain);
        assert_eq!(choose(&facts(false, Some((64768, 4242)), Some("64769:4242"))), Output::Plain);
        assert_eq!(choose(&facts(true, Some((1, 2)), Some("64769:4242"))), Output::Terminal);
        // stderr closed or unreadable: never the journal.
        assert_eq!(choose(&facts(false, None, Some("64769:4242"))), Output::Plain);
    }

    #[test]
    fn colours_only_on_a_terminal() {
        assert_eq!(choose(&facts(true, Some((1, 2)), None)), Output::Terminal);
        assert_eq!(choose(&facts(false, Some((1, 2)), None)), Output::Plain);
        assert_eq!(choose(&facts(false, None, None)), Output::Plain);
        let no_color = Facts { no_color: true, ..facts(true, Some((1, 2)), None) };
        assert_eq!(choose(&no_color), Output::Plain);
    }

    #[test]
    fn a_malformed_journal_stream_is_no_journal() {
        for value in
            ["", ":", "64769", "64769:", ":4242", "64769:4242:1", "0x10:4242", "+64769:4242", " 64769:4242"]
        {
            assert_eq!(parse_journal_stream(OsStr::new(value)), None, "{value:?}");
            assert_eq!(choose(&facts(false, Some((64769, 4242)), Some(value))), Output::Plain, "{value:?}");
        }
        assert_eq!(parse_journal_stream(OsStr::new("0:18446744073709551615")), Some((0, u64::MAX)));
    }

    #[test]
    fn this_process_stderr_has_an_identity() {
        let facts = Facts::of_process(None, Some(OsStr::new("")));
        assert!(facts.stderr_id.is_some());
        assert!(!facts.no_color, "an empty NO_COLOR does not count");
    }
}
