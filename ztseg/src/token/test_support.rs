//! Helpers shared by the token tests: temporary directories, generated issuers, and a signer for
//! tokens that `issue` would never make.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey};
use pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use serde_json::{Map, Value, json};

use super::{IssueParams, KeygenOutput, Verifier, issue, keygen};
use crate::{
    agent_id::AgentId,
    config::{Config, Issuer},
};

/// The fixed "now" of every test: tokens are made and checked against it, never the real clock.
pub const NOW: u64 = 1_800_000_000;
pub const ISS: &str = "orchestrator";
pub const AGENT: &str = "analyst-7";

/// A 2048-bit RSA key pair made with `openssl genpkey -algorithm RSA` for these tests only.
pub const RSA_PRIVATE_PEM: &str = include_str!("testdata/rsa-2048.pem");
pub const RSA_PUBLIC_PEM: &str = include_str!("testdata/rsa-2048.pub.pem");
/// Made the same way, too small or on the wrong curve to be trusted.
pub const RSA_1024_PUBLIC_PEM: &str = include_str!("testdata/rsa-1024.pub.pem");
pub const P384_PUBLIC_PEM: &str = include_str!("testdata/p384.pub.pem");

/// A directory under the system temp dir, removed with everything in it on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ztseg-token-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        fs::write(&path, contents).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Never panics: a leftover temp dir must not hide the test failure that left it.
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn agent(id: &str) -> AgentId {
    id.parse().unwrap()
}

pub fn config(issuers: &[(&str, &Path, &[&str])]) -> Config {
    Config {
        issuers: issuers
            .iter()
            .map(|(iss, key, algorithms)| Issuer {
                iss: (*iss).to_owned(),
                key: key.to_path_buf(),
                algorithms: algorithms.iter().map(|a| (*a).to_owned()).collect(),
            })
            .collect(),
        ..Config::default()
    }
}

/// An Ed25519 issuer made by `keygen`.
pub struct TestIssuer {
    _dir: TempDir,
    pub keys: KeygenOutput,
    pub private_pem: String,
}

impl TestIssuer {
    pub fn ed25519() -> Self {
        let dir = TempDir::new("issuer");
        let keys = keygen(dir.path()).unwrap();
        let private_pem = fs::read_to_string(&keys.private_key).unwrap();
        Self { _dir: dir, keys, private_pem }
    }

    /// A verifier trusting this issuer through its JWKS.
    pub fn verifier(&self) -> Verifier {
        Verifier::from_config(&config(&[(ISS, &self.keys.jwks, &["EdDSA"])])).unwrap()
    }

    /// A verifier trusting this issuer through its PEM public key.
    pub fn pem_verifier(&self) -> Verifier {
        Verifier::from_config(&config(&[(ISS, &self.keys.public_key, &["EdDSA"])])).unwrap()
    }

    pub fn issue(&self, params: &IssueParams) -> String {
        issue(&self.private_pem, params, NOW).unwrap()
    }

    pub fn encoding_key(&self) -> EncodingKey {
        EncodingKey::from_ed_pem(self.private_pem.as_bytes()).unwrap()
    }

    /// Signs `claims` properly (EdDSA, this key's kid) whatever they say.
    pub fn sign(&self, claims: &Map<String, Value>) -> String {
        let header = json!({ "alg": "EdDSA", "typ": "JWT", "kid": self.keys.kid });
        sign_raw(&header, &Value::Object(claims.clone()), &self.encoding_key(), Algorithm::EdDSA)
    }
}

/// Valid claims for [`AGENT`] from [`ISS`] at [`NOW`], to be bent by each test.
pub fn claims() -> Map<String, Value> {
    let claims = json!({
        "iss": ISS, "sub": AGENT, "aud": "ztseg", "jti": "0123456789abcdef",
        "iat": NOW, "nbf": NOW, "exp": NOW + 300,
        "op": "op-1", "scope": ["read:data.sales"], "tools": ["http"], "forbidden_tools": ["shell"],
    });
    match claims {
        Value::Object(map) => map,
        _ => unreachable!(),
    }
}

pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS over any header and claims, signed with `alg` under `key`.
pub fn sign_raw(header: &Value, claims: &Value, key: &EncodingKey, alg: Algorithm) -> String {
    let message = format!("{}.{}", b64(header.to_string()), b64(claims.to_string()));
    let signature = jsonwebtoken::crypto::sign(message.as_bytes(), key, alg).unwrap();
    format!("{message}.{signature}")
}

/// A fresh EC P-256 key pair as (PKCS#8 private PEM, SPKI public PEM).
pub fn p256_key_pair() -> (String, String) {
    let secret = loop {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).unwrap();
        if let Ok(secret) = p256::SecretKey::from_slice(&bytes) {
            break secret;
        }
    };
    let private = secret.to_pkcs8_pem(LineEnding::LF).unwrap().to_string();
    let public = secret.public_key().to_public_key_pem(LineEnding::LF).unwrap();
    (private, public)
}
