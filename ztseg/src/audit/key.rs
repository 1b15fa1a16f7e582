//! The host's Ed25519 signing key for checkpoints and heads, and reading public keys back.

use std::{
    fmt, fs,
    io::{self, Write},
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use ed25519_dalek::{
    Signer, SigningKey, VerifyingKey,
    pkcs8::{
        DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey, spki::der::pem::LineEnding,
    },
};

use super::{AuditError, files::sync_dir};

/// The private key's file name inside the state dir.
pub const HOST_KEY_FILE: &str = "host-key.pem";

/// The host signing key (Ed25519), kept as PKCS#8 PEM, mode 0600, in the state dir.
pub struct HostKey {
    signing: SigningKey,
}

impl fmt::Debug for HostKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostKey").field("public", &self.key_id()).finish_non_exhaustive()
    }
}

impl HostKey {
    /// Load `<state_dir>/host-key.pem`, or create it (and the state dir, 0700) on first start.
    /// A key file that group or others may read is refused.
    pub fn load_or_create(state_dir: &Path) -> Result<Self, AuditError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)
            .map_err(|source| AuditError::Io { action: "create", path: state_dir.to_owned(), source })?;
        let path = state_dir.join(HOST_KEY_FILE);
        match Self::load(&path) {
            Err(AuditError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            loaded => return loaded,
        }
        let key = Self::generate()?;
        let pem = key
            .signing
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| AuditError::PrivateKey { path: path.clone(), reason: e.to_string() })?;
        // Written under a temporary name and linked into place, so a crash never leaves a
        // half-written key and two starting daemons cannot end up with different keys.
        let tmp = state_dir.join(format!("{HOST_KEY_FILE}.tmp-{}", std::process::id()));
        let written = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut f| f.write_all(pem.as_bytes()).and_then(|()| f.sync_all()));
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(AuditError::Io { action: "write", path: tmp, source });
        }
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(&path)?;
                Ok(key)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load(&path),
            Err(source) => Err(AuditError::Io { action: "create", path, source }),
        }
    }

    /// Load an existing `<state_dir>/host-key.pem` (never creating one); refused, like
    /// [`Self::load_or_create`], if group or others may read it.
    pub fn load_existing(state_dir: &Path) -> Result<Self, AuditError> {
        Self::load(&state_dir.join(HOST_KEY_FILE))
    }

    fn load(path: &Path) -> Result<Self, AuditError> {
        let io_err = |source| AuditError::Io { action: "read", path: path.to_owned(), source };
        let meta = fs::metadata(path).map_err(io_err)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AuditError::KeyPermissions { path: path.to_owned(), mode });
        }
        let pem = fs::read_to_string(path).map_err(io_err)?;
        let signing = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| AuditError::PrivateKey { path: path.to_owned(), reason: e.to_string() })?;
        Ok(Self { signing })
    }

    /// A fresh key from the system's random number generator (not stored anywhere).
    pub fn generate() -> Result<Self, AuditError> {
        let mut secret = [0; 32];
        getrandom::fill(&mut secret).map_err(|e| AuditError::Random { reason: e.to_string() })?;
        Ok(Self { signing: SigningKey::from_bytes(&secret) })
    }

    pub fn from_signing_key(signing: SigningKey) -> Self {
        Self { signing }
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The public key as 64 hex digits: what checkpoints carry in `key`.
    pub fn key_id(&self) -> String {
        hex::encode(self.verifying_key().to_bytes())
    }

    /// The public key as SPKI PEM: what `<log>.pub` holds.
    pub fn public_key_pem(&self) -> String {
        // Encoding a valid 32-byte key as SPKI cannot fail; the hex form is an equally valid
        // input to `parse_verifying_key` should it ever.
        self.verifying_key().to_public_key_pem(LineEnding::LF).unwrap_or_else(|_| self.key_id())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }
}

/// An Ed25519 public key from SPKI PEM (`-----BEGIN PUBLIC KEY-----`) or 64 hex digits.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, String> {
    let text = text.trim();
    if text.starts_with("-----BEGIN") {
        return VerifyingKey::from_public_key_pem(text).map_err(|e| e.to_string());
    }
    let mut raw = [0; 32];
    hex::decode_to_slice(text, &mut raw).map_err(|e| format!("not PEM and not 64 hex digits ({e})"))?;
    VerifyingKey::from_bytes(&raw).map_err(|e| e.to_string())
}

/// The host's public key, derived from the private key in `<state_dir>/host-key.pem`: what
/// `ztseg audit verify --config` trusts (never `<log>.pub`, which whoever writes the log
/// directory can replace).
pub fn load_host_public_key(state_dir: &Path) -> Result<VerifyingKey, AuditError> {
    HostKey::load_existing(state_dir).map(|key| key.verifying_key())
}

/// [`parse_verifying_key`] on a file's content (what `ztseg audit verify --key FILE` reads).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, AuditError> {
    let text = fs::read_to_string(path).map_err(|source| AuditError::Io {
        action: "read",
        path: path.to_owned(),
        source,
    })?;
    parse_verifying_key(&text).map_err(|reason| AuditError::PublicKey { path: PathBuf::from(path), reason })
}
