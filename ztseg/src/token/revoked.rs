//! The revocation list: token ids (`jti`) whose rights were taken back before their `exp` (a
//! binding deleted, `ztseg token revoke`), and for each agent a floor: no token of that agent
//! issued at or before the revoked one's `iat` is accepted again either (an older, still
//! unexpired token must not bring the rights back). Presenting such a token is refused with
//! reason `revoked` until it would have expired anyway. Kept in `state_dir/revoked.json`,
//! written (temp file, fsync, rename) before a revocation is reported done.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    list: List,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct List {
    /// jti -> until when it is refused (unix seconds; its `exp` plus the leeway).
    #[serde(default)]
    tokens: BTreeMap<String, u64>,
    /// agent -> its floor.
    #[serde(default)]
    agents: BTreeMap<String, Floor>,
}

/// Tokens of an agent issued at or before `iat` are refused until `until` (by then every such
/// token has expired: its lifetime is at most the configured maximum).
#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
struct Floor {
    iat: u64,
    until: u64,
}

/// One revocation: the token, its agent, and until when each part holds.
pub struct Revoked<'a> {
    pub jti: &'a str,
    pub agent: &'a str,
    pub iat: u64,
    /// The token's `exp` plus the leeway.
    pub token_until: u64,
    /// The token's `iat` plus the longest lifetime accepted plus the leeway.
    pub floor_until: u64,
}

impl Revocations {
    /// Reads the list at `path` (none yet: empty), dropping entries past their `exp`. An
    /// unreadable or damaged list is an error: starting without it would un-revoke tokens.
    pub fn load(path: &Path, now: u64) -> io::Result<Self> {
        let list: List = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("revocation list {}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => List::default(),
            Err(e) => return Err(e),
        };
        let mut revocations = Self { path: path.to_owned(), list };
        revocations.prune(now);
        Ok(revocations)
    }

    fn prune(&mut self, now: u64) {
        self.list.tokens.retain(|_, until| *until > now);
        self.list.agents.retain(|_, floor| floor.until > now);
    }

    /// Whether a token (`jti`, for `agent`, issued at `iat`) is refused as revoked at `now`.
    pub fn refuses(&self, jti: &str, agent: &str, iat: u64, now: u64) -> bool {
        self.list.tokens.get(jti).is_some_and(|until| *until > now)
            || self.list.agents.get(agent).is_some_and(|f| iat <= f.iat && f.until > now)
    }

    /// Records a revocation and saves the list durably.
    pub fn add(&mut self, revoked: &Revoked<'_>, now: u64) -> io::Result<()> {
        self.prune(now);
        self.list.tokens.insert(revoked.jti.to_owned(), revoked.token_until);
        let floor = self
            .list
            .agents
            .entry(revoked.agent.to_owned())
            .or_insert(Floor { iat: revoked.iat, until: revoked.floor_until });
        floor.iat = floor.iat.max(revoked.iat);
        floor.until = floor.until.max(revoked.floor_until);
        self.save()
    }

    /// How many tokens are on the list.
    pub fn len(&self) -> usize {
        self.list.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.tokens.is_empty()
    }

    fn save(&self) -> io::Result<()> {
        use std::io::Write as _;
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.list).map_err(io::Error::other)?;
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory removed on drop, even when the test fails.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!(
                "ztseg-revoked-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn list(&self) -> PathBuf {
            self.0.join("revoked.json")
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn revoked<'a>(jti: &'a str, agent: &'a str, iat: u64, exp: u64) -> Revoked<'a> {
        Revoked { jti, agent, iat, token_until: exp, floor_until: iat + 100 }
    }

    #[test]
    fn a_revocation_survives_a_reload_until_the_token_would_have_expired() {
        let scratch = Scratch::new();
        let path = scratch.list();
        let mut list = Revocations::load(&path, 100).unwrap();
        assert!(list.is_empty());
        list.add(&revoked("jti-a", "a", 90, 200), 100).unwrap();
        list.add(&revoked("jti-b", "b", 95, 150), 100).unwrap();
        let reloaded = Revocations::load(&path, 120).unwrap();
        assert!(reloaded.refuses("jti-a", "a", 90, 120) && reloaded.refuses("jti-b", "b", 95, 120));
        assert!(!reloaded.refuses("jti-c", "c", 90, 120));
        let later = Revocations::load(&path, 196).unwrap();
        assert_eq!(later.len(), 1, "jti-b's time is over");
        assert!(
            !later.refuses("jti-a", "x", 90, 200),
            "past its exp it is an expired token, not a revoked one"
        );
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn an_older_token_of_a_revoked_agent_is_refused_too_but_a_newer_one_is_not() {
        let scratch = Scratch::new();
        let path = scratch.list();
        Revocations::load(&path, 100).unwrap().add(&revoked("jti-new", "a", 90, 200), 100).unwrap();
        // What a restart reads back.
        let list = Revocations::load(&path, 100).unwrap();
        assert!(list.refuses("jti-old", "a", 80, 120), "issued before the revoked token");
        assert!(list.refuses("jti-same-second", "a", 90, 120));
        assert!(!list.refuses("jti-later", "a", 91, 120), "issued after the revocation's token");
        assert!(!list.refuses("jti-old", "b", 80, 120), "another agent's token");
        assert!(!list.refuses("jti-old", "a", 80, 190), "the floor ends when every older token has expired");
    }

    #[test]
    fn a_damaged_list_is_an_error_not_an_empty_list() {
        let scratch = Scratch::new();
        fs::write(scratch.list(), "{not json").unwrap();
        assert!(Revocations::load(&scratch.list(), 0).is_err());
    }
}
