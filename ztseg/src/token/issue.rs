//! `ztseg token keygen` and `ztseg token issue`: what an orchestrator (or a test, or an operator
//! by hand) needs to mint tokens the daemon accepts.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use ed25519_dalek::{SigningKey as Ed25519SigningKey, pkcs8::KeypairBytes};
use jsonwebtoken::{Header, encode};
use pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use serde_json::{Map, Value, json};

use super::keys::{KeyError, PublicKey, SigningKey};
use crate::agent_id::AgentId;

/// Lifetime of an issued token unless `--ttl` says otherwise.
pub const DEFAULT_TTL_SECONDS: u64 = 300;
/// `aud` of an issued token unless `--aud` says otherwise; the daemon's default audience.
pub const DEFAULT_AUDIENCE: &str = "ztseg";

/// Names of the files `keygen` writes into its directory.
const PRIVATE_KEY_FILE: &str = "ed25519.pem";
const PUBLIC_KEY_FILE: &str = "ed25519.pub.pem";
const JWKS_FILE: &str = "jwks.json";

#[derive(Debug, thiserror::Error)]
pub enum KeygenError {
    #[error("{path} already exists; keygen never overwrites a key")]
    Exists { path: PathBuf },
    #[error("cannot create key directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot get randomness from the operating system: {source}")]
    Random { source: getrandom::Error },
    #[error("cannot encode the new key as PEM: {source}")]
    Encode { source: pkcs8::Error },
}

/// What `keygen` wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct KeygenOutput {
    /// PKCS#8 PEM private key, mode 0600.
    pub private_key: PathBuf,
    /// SPKI PEM public key: what `key =` of an `[[issuers]]` entry may point at.
    pub public_key: PathBuf,
    /// A JWKS with the public key: the other thing `key =` may point at.
    pub jwks: PathBuf,
    /// The key's id (RFC 7638 thumbprint), in the JWKS and in the `kid` of tokens it signs.
    pub kid: String,
}

/// Writes a new Ed25519 key pair into `dir` (created if missing): `ed25519.pem` (PKCS#8, mode
/// 0600), `ed25519.pub.pem` (SPKI) and `jwks.json`. Refuses if any of them exists.
pub fn keygen(dir: &Path) -> Result<KeygenOutput, KeygenError> {
    let out = KeygenOutput {
        private_key: dir.join(PRIVATE_KEY_FILE),
        public_key: dir.join(PUBLIC_KEY_FILE),
        jwks: dir.join(JWKS_FILE),
        kid: String::new(),
    };
    for path in [&out.private_key, &out.public_key, &out.jwks] {
        if path.symlink_metadata().is_ok() {
            return Err(KeygenError::Exists { path: path.clone() });
        }
    }
    fs::create_dir_all(dir).map_err(|source| KeygenError::CreateDir { path: dir.to_owned(), source })?;

    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|source| KeygenError::Random { source })?;
    let verifying = Ed25519SigningKey::from_bytes(&seed).verifying_key();
    // PKCS#8 v1, without the optional public key that ed25519-dalek would add (v2): OpenSSL 3.0
    // and Python's cryptography (so PyJWT) cannot read v2 Ed25519 keys.
    let private_pem = KeypairBytes { secret_key: seed, public_key: None }
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|source| KeygenError::Encode { source })?;
    seed.fill(0);
    let public_pem = verifying
        .to_public_key_pem(LineEnding::LF)
        .map_err(|source| KeygenError::Encode { source: source.into() })?;
    let public = PublicKey::Ed25519(verifying);
    let kid = public.thumbprint();
    let jwks = format!("{:#}\n", json!({ "keys": [public.to_jwk(&kid)] }));

    let files = [
        (&out.private_key, private_pem.as_bytes(), 0o600),
        (&out.public_key, public_pem.as_bytes(), 0o644),
        (&out.jwks, jwks.as_bytes(), 0o644),
    ];
    let mut written: Vec<&PathBuf> = Vec::new();
    for (path, contents, mode) in files {
        if let Err(error) = write_new(path, contents, mode) {
            for done in written {
                let _ = fs::remove_file(done);
            }
            return Err(error);
        }
        written.push(path);
    }
    Ok(KeygenOutput { kid, ..out })
}

/// Creates `path` (never replacing anything, not even a dangling symlink) with `mode`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), KeygenError> {
    let write = || -> io::Result<()> {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
        f.write_all(contents)?;
        f.sync_all()
    };
    write().map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => KeygenError::Exists { path: path.to_owned() },
        _ => KeygenError::Write { path: path.to_owned(), source },
    })
}

/// What `ztseg token issue` grants.
#[derive(Clone, Debug, PartialEq)]
pub struct IssueParams {
    pub iss: String,
    pub agent: AgentId,
    pub op: Option<String>,
    pub scopes: Vec<String>,
    pub tools: Vec<String>,
    pub forbid: Vec<String>,
    pub ttl_seconds: u64,
    pub max_tokens: Option<u64>,
    pub aud: String,
}

impl IssueParams {
    /// A grant of nothing but the baseline, for [`DEFAULT_TTL_SECONDS`], to [`DEFAULT_AUDIENCE`].
    pub fn new(iss: impl Into<String>, agent: AgentId) -> Self {
        Self {
            iss: iss.into(),
            agent,
            op: None,
            scopes: Vec::new(),
            tools: Vec::new(),
            forbid: Vec::new(),
            ttl_seconds: DEFAULT_TTL_SECONDS,
            max_tokens: None,
            aud: DEFAULT_AUDIENCE.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the signing key {source}")]
    Key { source: KeyError },
    #[error("{param} {value:?} {problem}")]
    BadParam { param: &'static str, value: String, problem: &'static str },
    #[error("cannot get randomness from the operating system for the jti: {source}")]
    Random { source: getrandom::Error },
    #[error("cannot sign the token: {source}")]
    Sign { source: jsonwebtoken::errors::Error },
}

/// Signs a token for `params` with a PKCS#8 PEM private key; the algorithm follows from the key
/// (Ed25519 -> EdDSA, EC P-256 -> ES256, RSA -> RS256). The header's `kid` is the key's RFC 7638
/// thumbprint, which is what `keygen`'s JWKS and a PEM public key file answer to.
pub fn issue(key_pem: &str, params: &IssueParams, now_unix: u64) -> Result<String, IssueError> {
    check_params(params)?;
    let key = SigningKey::from_pkcs8_pem(key_pem).map_err(|source| IssueError::Key { source })?;

    let mut jti = [0u8; 16];
    getrandom::fill(&mut jti).map_err(|source| IssueError::Random { source })?;
    let mut claims = Map::new();
    claims.insert("iss".into(), params.iss.clone().into());
    claims.insert("sub".into(), params.agent.to_string().into());
    claims.insert("aud".into(), params.aud.clone().into());
    claims.insert("jti".into(), hex::encode(jti).into());
    claims.insert("iat".into(), now_unix.into());
    claims.insert("nbf".into(), now_unix.into());
    claims.insert("exp".into(), now_unix.saturating_add(params.ttl_seconds).into());
    if let Some(op) = &params.op {
        claims.insert("op".into(), op.clone().into());
    }
    claims.insert("scope".into(), params.scopes.clone().into());
    claims.insert("tools".into(), params.tools.clone().into());
    claims.insert("forbidden_tools".into(), params.forbid.clone().into());
    if let Some(max_tokens) = params.max_tokens {
        claims.insert("max_tokens".into(), max_tokens.into());
    }

    let mut header = Header::new(key.public.algorithm());
    header.kid = Some(key.public.thumbprint());
    encode(&header, &Value::Object(claims), &key.encoding).map_err(|source| IssueError::Sign { source })
}

/// Refuses what the daemon would refuse anyway, or what could not round-trip: a grant is checked
/// where it is made.
fn check_params(params: &IssueParams) -> Result<(), IssueError> {
    let bad =
        |param, value: &str, problem| Err(IssueError::BadParam { param, value: value.to_owned(), problem });
    if params.iss.is_empty() {
        return bad("iss", &params.iss, "must not be empty");
    }
    if params.aud.is_empty() {
        return bad("aud", &params.aud, "must not be empty");
    }
    if params.ttl_seconds == 0 {
        return bad("ttl", "0", "must be at least 1 second");
    }
    for (param, values) in [("scope", &params.scopes), ("tool", &params.tools), ("forbid", &params.forbid)] {
        for value in values {
            if value.is_empty() {
                return bad(param, value, "must not be empty");
            }
            if value.chars().any(char::is_whitespace) {
                return bad(param, value, "must not contain whitespace");
            }
            if param != "forbid" && value.contains('*') {
                return bad(param, value, "is a wildcard; grants must name exact scopes and tools");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use serde_json::Value;
    use sha2::Digest as _;

    use super::*;
    use crate::token::{Verifier, test_support::*};

    fn decode_part(token: &str, index: usize) -> Value {
        let part = token.split('.').nth(index).unwrap();
        serde_json::from_slice(
            &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, part).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn keygen_writes_a_key_pair_and_a_jwks() {
        let dir = TempDir::new("keygen");
        let out = keygen(&dir.path().join("keys")).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out.private_key), 0o600);
        let private = fs::read_to_string(&out.private_key).unwrap();
        assert!(private.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        // PKCS#8 v1 (no embedded public key), which OpenSSL 3.0 and PyJWT can read.
        let (_, der) = pkcs8::SecretDocument::from_pem(&private).unwrap();
        let info = pkcs8::PrivateKeyInfoRef::try_from(der.as_bytes()).unwrap();
        assert_eq!((info.version(), info.public_key.is_none()), (pkcs8::Version::V1, true));
        assert!(fs::read_to_string(&out.public_key).unwrap().starts_with("-----BEGIN PUBLIC KEY-----\n"));

        let jwks: Value = serde_json::from_str(&fs::read_to_string(&out.jwks).unwrap()).unwrap();
        let jwk = &jwks["keys"][0];
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 1);
        assert_eq!(
            (&jwk["kty"], &jwk["crv"], &jwk["alg"], &jwk["use"]),
            (&"OKP".into(), &"Ed25519".into(), &"EdDSA".into(), &"sig".into())
        );
        assert_eq!(jwk["kid"], out.kid.as_str());
        assert!(jwk.get("d").is_none(), "the JWKS must not carry the private key");

        // kid is the RFC 7638 thumbprint of {"crv","kty","x"}, computed independently here.
        let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#, jwk["x"].as_str().unwrap());
        assert_eq!(out.kid, b64(sha2::Sha256::digest(canonical.as_bytes())));
        // jsonwebtoken agrees.
        let parsed: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
        assert_eq!(parsed.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256).unwrap(), out.kid);
    }

    #[test]
    fn keygen_never_overwrites() {
        let dir = TempDir::new("keygen-twice");
        let first = keygen(dir.path()).unwrap();
        let before = fs::read(&first.private_key).unwrap();
        let err = keygen(dir.path()).unwrap_err();
        assert!(matches!(err, KeygenError::Exists { .. }), "{err}");
        assert_eq!(fs::read(&first.private_key).unwrap(), before);

        // Any one of the three files existing is enough to refuse, and nothing is written.
        let other = TempDir::new("keygen-jwks");
        let jwks = other.write("jwks.json", "{}");
        assert!(matches!(keygen(other.path()), Err(KeygenError::Exists { path }) if path == jwks));
        assert!(!other.path().join("ed25519.pem").exists());
    }

    #[test]
    fn issue_writes_the_documented_header_and_claims() {
        let issuer = TestIssuer::ed25519();
        let params = IssueParams {
            op: Some("op-9".into()),
            scopes: vec!["read:data.sales_q1_2026".into()],
            tools: vec!["http".into()],
            forbid: vec!["shell".into()],
            max_tokens: Some(5000),
            ..IssueParams::new(ISS, agent(AGENT))
        };
        let token = issuer.issue(&params);
        let header = decode_part(&token, 0);
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], issuer.keys.kid.as_str());

        let claims = decode_part(&token, 1);
        assert_eq!(claims["iss"], ISS);
        assert_eq!(claims["sub"], AGENT);
        assert_eq!(claims["aud"], DEFAULT_AUDIENCE);
        assert_eq!((claims["iat"].as_u64(), claims["nbf"].as_u64()), (Some(NOW), Some(NOW)));
        assert_eq!(claims["exp"].as_u64(), Some(NOW + DEFAULT_TTL_SECONDS));
        assert_eq!(claims["op"], "op-9");
        assert_eq!(claims["scope"], serde_json::json!(["read:data.sales_q1_2026"]));
        assert_eq!(claims["tools"], serde_json::json!(["http"]));
        assert_eq!(claims["forbidden_tools"], serde_json::json!(["shell"]));
        assert_eq!(claims["max_tokens"], 5000);
        let jti = claims["jti"].as_str().unwrap();
        assert!(jti.len() == 32 && jti.chars().all(|c| c.is_ascii_hexdigit()), "{jti}");

        let again = decode_part(&issuer.issue(&params), 1);
        assert_ne!(again["jti"], claims["jti"], "every token gets a fresh jti");
        let bare = decode_part(&issuer.issue(&IssueParams::new(ISS, agent(AGENT))), 1);
        assert!(bare.get("op").is_none() && bare.get("max_tokens").is_none());
    }

    #[test]
    fn issue_refuses_what_the_daemon_would_refuse() {
        let issuer = TestIssuer::ed25519();
        let base = IssueParams::new(ISS, agent(AGENT));
        let cases = [
            IssueParams { scopes: vec!["read:*".into()], ..base.clone() },
            IssueParams { tools: vec!["*".into()], ..base.clone() },
            IssueParams { scopes: vec!["read:a write:b".into()], ..base.clone() },
            IssueParams { forbid: vec![String::new()], ..base.clone() },
            IssueParams { ttl_seconds: 0, ..base.clone() },
            IssueParams { iss: String::new(), ..base.clone() },
            IssueParams { aud: String::new(), ..base.clone() },
        ];
        for params in &cases {
            let err = issue(&issuer.private_pem, params, NOW).unwrap_err();
            assert!(matches!(err, IssueError::BadParam { .. }), "{params:?}: {err}");
        }
        assert!(issue(&issuer.private_pem, &base, NOW).is_ok());
    }

    #[test]
    fn issue_needs_a_pkcs8_private_key() {
        let issuer = TestIssuer::ed25519();
        let params = IssueParams::new(ISS, agent(AGENT));
        let public = fs::read_to_string(&issuer.keys.public_key).unwrap();
        for key in [public.as_str(), "", "garbage", RSA_PUBLIC_PEM] {
            assert!(matches!(issue(key, &params, NOW), Err(IssueError::Key { .. })), "{key:.40}");
        }
        assert!(issue(&issuer.private_pem, &params, NOW).is_ok());
    }

    #[test]
    fn an_openssl_made_ed25519_key_signs_tokens_its_public_key_verifies() {
        let dir = TempDir::new("openssl-ed25519");
        let public = dir.write("ed25519.pub.pem", include_str!("testdata/ed25519-openssl.pub.pem"));
        let token =
            issue(include_str!("testdata/ed25519-openssl.pem"), &IssueParams::new(ISS, agent(AGENT)), NOW)
                .unwrap();
        let verifier = Verifier::from_config(&config(&[(ISS, &public, &["EdDSA"])])).unwrap();
        assert_eq!(verifier.verify(&token, NOW).unwrap().alg, "EdDSA");
    }

    #[test]
    fn the_algorithm_follows_the_key() {
        let params = IssueParams::new(ISS, agent(AGENT));
        let (ec_private, _) = p256_key_pair();
        for (key, alg) in [(ec_private.as_str(), "ES256"), (RSA_PRIVATE_PEM, "RS256")] {
            let token = issue(key, &params, NOW).unwrap();
            let header = decode_part(&token, 0);
            assert_eq!(header["alg"], alg);
            assert!(header["kid"].as_str().is_some_and(|k| k.len() == 43), "{header}");
        }
    }
}
