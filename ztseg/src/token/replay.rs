//! The replay cache: every `jti` is single-use while its token lives.
//!
//! The same token presented again for the same agent is not a replay: a daemon restart or a
//! re-read binding file re-presents it. Any other reuse of a live `jti` (another token, or the same
//! token for another agent) is refused. The cache is kept in the daemon's state dir so that this
//! holds across restarts.

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{Claims, TokenError};
use crate::agent_id::AgentId;

const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ReplayCacheError {
    #[error("cannot read replay cache {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("replay cache {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("replay cache {path} has format version {found}, this ztseg reads version {FORMAT_VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("replay cache {path} has an entry for jti {jti:?} with an invalid {field}")]
    Entry { path: PathBuf, jti: String, field: &'static str },
    #[error("cannot write replay cache {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// `jti` -> the token that used it: when it expires, for which agent, and its SHA-256.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReplayCache {
    /// Shared strings: a copy of the cache (the daemon saves one each second, taken under its
    /// state lock) costs reference counts, not an allocation per entry.
    entries: BTreeMap<Arc<str>, Entry>,
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    exp: u64,
    agent: Arc<str>,
    sha256: [u8; 32],
}

/// The file's shape: `{"version":1,"entries":{"<jti>":{"exp":..,"agent":"..","sha256":"<hex>"}}}`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheFile {
    version: u32,
    entries: BTreeMap<String, FileEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    exp: u64,
    agent: String,
    sha256: String,
}

fn token_hash(token: &str) -> [u8; 32] {
    // The verifier ignores surrounding whitespace, so the same token read with or without a
    // trailing newline is the same token here too.
    Sha256::digest(token.trim().as_bytes()).into()
}

impl ReplayCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the cache; a missing file is an empty cache.
    pub fn load(path: &Path) -> Result<Self, ReplayCacheError> {
        let text = match fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::new()),
            Err(source) => return Err(ReplayCacheError::Read { path: path.to_owned(), source }),
        };
        let file: CacheFile = serde_json::from_str(&text)
            .map_err(|source| ReplayCacheError::Parse { path: path.to_owned(), source })?;
        if file.version != FORMAT_VERSION {
            return Err(ReplayCacheError::Version { path: path.to_owned(), found: file.version });
        }
        let mut entries = BTreeMap::new();
        for (jti, e) in file.entries {
            let bad = |field| ReplayCacheError::Entry { path: path.to_owned(), jti: jti.clone(), field };
            let agent: AgentId = e.agent.parse().map_err(|_| bad("agent"))?;
            let sha256 =
                hex::decode(&e.sha256).ok().and_then(|h| h.try_into().ok()).ok_or_else(|| bad("sha256"))?;
            entries.insert(jti.into(), Entry { exp: e.exp, agent: agent.as_str().into(), sha256 });
        }
        Ok(Self { entries })
    }

    /// Writes the cache atomically (a temporary file beside it, then rename), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), ReplayCacheError> {
        let json =
            self.to_bytes().map_err(|source| ReplayCacheError::Write { path: path.to_owned(), source })?;
        Self::write_bytes(path, &json)
    }

    /// The cache as its file's bytes (to write later, e.g. outside a lock, with `write_bytes`).
    pub fn to_bytes(&self) -> io::Result<Vec<u8>> {
        let file = CacheFile {
            version: FORMAT_VERSION,
            entries: self
                .entries
                .iter()
                .map(|(jti, e)| {
                    let entry =
                        FileEntry { exp: e.exp, agent: e.agent.to_string(), sha256: hex::encode(e.sha256) };
                    (jti.to_string(), entry)
                })
                .collect(),
        };
        let mut json = serde_json::to_vec_pretty(&file).map_err(io::Error::other)?;
        json.push(b'\n');
        Ok(json)
    }

    /// Writes bytes from `to_bytes` atomically and durably (temp file, fsync, rename, fsync dir).
    pub fn write_bytes(path: &Path, json: &[u8]) -> Result<(), ReplayCacheError> {
        let write_error = |source| ReplayCacheError::Write { path: path.to_owned(), source };
        let name = path.file_name().ok_or_else(|| write_error(io::ErrorKind::InvalidInput.into()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let result = (|| {
            let mut f =
                fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            // `mode` applies only when the file is created; a leftover temporary file keeps its own.
            f.set_permissions(fs::Permissions::from_mode(0o600))?;
            f.write_all(json)?;
            f.sync_all()?;
            fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(write_error)
    }

    /// Records that `agent` presents `token` (already verified into `claims`). A `jti` held by a
    /// still-live entry (`exp + leeway >= now`) is a replay unless it is the very same token for
    /// the same agent, which is accepted again without change.
    pub fn check_and_record(
        &mut self,
        claims: &Claims,
        token: &str,
        agent: &AgentId,
        now_unix: u64,
        leeway: u64,
    ) -> Result<(), TokenError> {
        let sha256 = token_hash(token);
        if let Some(seen) = self.entries.get(claims.jti.as_str())
            && is_live(seen.exp, now_unix, leeway)
        {
            return if seen.sha256 == sha256 && *seen.agent == *agent.as_str() {
                Ok(())
            } else {
                Err(TokenError::Replayed { jti: claims.jti.clone() })
            };
        }
        self.entries.insert(
            claims.jti.as_str().into(),
            Entry { exp: claims.exp, agent: agent.as_str().into(), sha256 },
        );
        Ok(())
    }

    /// Drops entries whose tokens have expired (`exp + leeway < now`): those tokens can no longer
    /// verify, so their `jti`s need no guarding.
    pub fn prune(&mut self, now_unix: u64, leeway: u64) {
        self.entries.retain(|_, e| is_live(e.exp, now_unix, leeway));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, jti: &str) -> bool {
        self.entries.contains_key(jti)
    }
}

fn is_live(exp: u64, now: u64, leeway: u64) -> bool {
    exp.saturating_add(leeway) >= now
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::token::{IssueParams, test_support::*};

    const LEEWAY: u64 = 5;

    /// Claims as the verifier would return them; only `jti` and `exp` matter here.
    fn claims(jti: &str, exp: u64) -> Claims {
        Claims {
            iss: ISS.into(),
            sub: agent(AGENT),
            aud: vec!["ztseg".into()],
            jti: jti.into(),
            iat: NOW,
            nbf: Some(NOW),
            exp,
            op: None,
            scope: Vec::new(),
            tools: Vec::new(),
            forbidden_tools: Vec::new(),
            max_tokens: None,
            alg: "EdDSA".into(),
            kid: None,
        }
    }

    #[test]
    fn the_same_token_for_the_same_agent_is_idempotent() {
        let mut cache = ReplayCache::new();
        let c = claims("jti-1", NOW + 300);
        cache.check_and_record(&c, "token-a", &agent(AGENT), NOW, LEEWAY).unwrap();
        cache.check_and_record(&c, "token-a", &agent(AGENT), NOW + 10, LEEWAY).unwrap();
        // A token file re-read with a trailing newline is the same token.
        cache.check_and_record(&c, "token-a\n", &agent(AGENT), NOW + 20, LEEWAY).unwrap();
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn the_same_jti_in_another_token_is_a_replay() {
        let mut cache = ReplayCache::new();
        cache.check_and_record(&claims("jti-1", NOW + 300), "token-a", &agent(AGENT), NOW, LEEWAY).unwrap();
        let err = cache
            .check_and_record(&claims("jti-1", NOW + 300), "token-b", &agent(AGENT), NOW + 1, LEEWAY)
            .unwrap_err();
        assert_eq!(err.code().as_str(), "replay");
        assert!(err.to_string().contains("jti-1"), "{err}");
        // Positive control: another jti in another token is fine.
        cache
            .check_and_record(&claims("jti-2", NOW + 300), "token-b", &agent(AGENT), NOW + 1, LEEWAY)
            .unwrap();
    }

    #[test]
    fn the_same_token_for_another_agent_is_a_replay() {
        let mut cache = ReplayCache::new();
        let c = claims("jti-1", NOW + 300);
        cache.check_and_record(&c, "token-a", &agent(AGENT), NOW, LEEWAY).unwrap();
        let err = cache.check_and_record(&c, "token-a", &agent("intruder"), NOW, LEEWAY).unwrap_err();
        assert_eq!(err.code().as_str(), "replay");
        // The first agent keeps its grant.
        cache.check_and_record(&c, "token-a", &agent(AGENT), NOW, LEEWAY).unwrap();
    }

    #[test]
    fn expired_entries_are_pruned_and_no_longer_block_their_jti() {
        let mut cache = ReplayCache::new();
        cache.check_and_record(&claims("old", NOW + 10), "token-a", &agent(AGENT), NOW, LEEWAY).unwrap();
        cache.check_and_record(&claims("new", NOW + 300), "token-b", &agent(AGENT), NOW, LEEWAY).unwrap();

        // Still live within the leeway: kept, and the jti is still guarded.
        cache.prune(NOW + 10 + LEEWAY, LEEWAY);
        assert!(cache.contains("old") && cache.contains("new"));
        let reuse = claims("old", NOW + 400);
        assert!(cache.check_and_record(&reuse, "token-c", &agent(AGENT), NOW + 10 + LEEWAY, LEEWAY).is_err());

        cache.prune(NOW + 10 + LEEWAY + 1, LEEWAY);
        assert!(!cache.contains("old") && cache.contains("new"));
        // Its token can no longer verify, so reusing the jti guards nothing and is allowed.
        cache.check_and_record(&reuse, "token-c", &agent(AGENT), NOW + 10 + LEEWAY + 1, LEEWAY).unwrap();
    }

    #[test]
    fn a_dead_entry_is_replaced_even_before_pruning() {
        let mut cache = ReplayCache::new();
        cache.check_and_record(&claims("j", NOW + 10), "token-a", &agent(AGENT), NOW, LEEWAY).unwrap();
        let later = NOW + 10 + LEEWAY + 1;
        cache.check_and_record(&claims("j", later + 300), "token-b", &agent("other"), later, LEEWAY).unwrap();
        assert!(
            cache
                .check_and_record(&claims("j", later + 300), "token-a", &agent(AGENT), later, LEEWAY)
                .is_err()
        );
    }

    #[test]
    fn the_cache_survives_a_restart() {
        let dir = TempDir::new("replay");
        let path = dir.path().join("replay.json");
        assert!(ReplayCache::load(&path).unwrap().is_empty(), "a missing file is an empty cache");

        let issuer = TestIssuer::ed25519();
        let token = issuer.issue(&IssueParams::new(ISS, agent(AGENT)));
        let c = issuer.verifier().verify(&token, NOW).unwrap();
        let mut cache = ReplayCache::new();
        cache.check_and_record(&c, &token, &agent(AGENT), NOW, LEEWAY).unwrap();
        cache.save(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file is left behind");

        let mut reloaded = ReplayCache::load(&path).unwrap();
        assert_eq!(reloaded, cache);
        reloaded.check_and_record(&c, &token, &agent(AGENT), NOW + 1, LEEWAY).unwrap();
        assert_eq!(
            reloaded
                .check_and_record(&c, &token, &agent("other"), NOW + 1, LEEWAY)
                .unwrap_err()
                .code()
                .as_str(),
            "replay"
        );

        // Saving again replaces the file in place, still 0600.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        reloaded.prune(NOW + 1000, LEEWAY);
        reloaded.save(&path).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(ReplayCache::load(&path).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_cache_file_is_an_error_naming_it() {
        let dir = TempDir::new("replay-bad");
        for (name, text) in [
            ("garbage.json", "not json"),
            ("version.json", r#"{"version":2,"entries":{}}"#),
            ("agent.json", r#"{"version":1,"entries":{"j":{"exp":1,"agent":"../x","sha256":"00"}}}"#),
            ("hash.json", r#"{"version":1,"entries":{"j":{"exp":1,"agent":"a","sha256":"00"}}}"#),
            ("unknown.json", r#"{"version":1,"entries":{},"extra":1}"#),
        ] {
            let path = dir.write(name, text);
            let err = ReplayCache::load(&path).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
        let ok = dir.write("ok.json", r#"{"version":1,"entries":{}}"#);
        assert!(ReplayCache::load(&ok).unwrap().is_empty());
    }
}
