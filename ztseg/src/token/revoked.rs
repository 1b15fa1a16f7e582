//! The revocation list: token ids (`jti`) whose rights were taken back before their `exp` (a
//! binding deleted, `ztseg token revoke`). Presenting such a token again is refused with reason
//! `revoked` until it would have expired anyway. Kept in `state_dir/revoked.json`, written
//! (temp file, fsync, rename) before a revocation is reported done, so a restart keeps it.

use std::{
    collections::BTreeMap,
    fs, io,
    path::{Path, PathBuf},
};

#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    /// jti -> the token's `exp` (unix seconds): the entry is dropped after it.
    entries: BTreeMap<String, u64>,
}

impl Revocations {
    /// Reads the list at `path` (none yet: empty), dropping entries past their `exp`. An
    /// unreadable or damaged list is an error: starting without it would un-revoke tokens.
    pub fn load(path: &Path, now: u64) -> io::Result<Self> {
        let entries: BTreeMap<String, u64> = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("revocation list {}: {e}", path.display()))
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        let mut list = Self { path: path.to_owned(), entries };
        list.entries.retain(|_, exp| *exp > now);
        Ok(list)
    }

    pub fn contains(&self, jti: &str, now: u64) -> bool {
        self.entries.get(jti).is_some_and(|exp| *exp > now)
    }

    /// Adds `jti` (valid until `exp`) and saves the list durably.
    pub fn add(&mut self, jti: &str, exp: u64, now: u64) -> io::Result<()> {
        self.entries.retain(|_, e| *e > now);
        self.entries.insert(jti.to_owned(), exp);
        self.save()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn save(&self) -> io::Result<()> {
        use std::io::Write as _;
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.entries).map_err(io::Error::other)?;
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

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ztseg-revoked-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        fs::create_dir_all(&dir).unwrap();
        dir.join("revoked.json")
    }

    #[test]
    fn a_revocation_survives_a_reload_until_the_token_would_have_expired() {
        let path = scratch();
        let mut list = Revocations::load(&path, 100).unwrap();
        assert!(list.is_empty());
        list.add("jti-a", 200, 100).unwrap();
        list.add("jti-b", 150, 100).unwrap();
        let reloaded = Revocations::load(&path, 120).unwrap();
        assert!(reloaded.contains("jti-a", 120) && reloaded.contains("jti-b", 120));
        assert!(!reloaded.contains("jti-c", 120));
        let later = Revocations::load(&path, 160).unwrap();
        assert_eq!(later.len(), 1, "jti-b expired and is dropped");
        assert!(!later.contains("jti-a", 200), "past its exp it is an expired token, not a revoked one");
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn a_damaged_list_is_an_error_not_an_empty_list() {
        let path = scratch();
        fs::write(&path, "{not json").unwrap();
        assert!(Revocations::load(&path, 0).is_err());
        fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
