//! Verifying a token against the configured issuers.

use std::{collections::BTreeMap, fs, io, path::PathBuf, sync::Arc};

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};

use super::{
    Claims, TokenCode, TokenError,
    claims::{Header, RawClaims, Rules, expected},
    keys::{self, KeyError},
};
use crate::{agent_id::AgentId, config::Config};

/// Longest token accepted, in bytes. Real grants are well under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// A configured issuer whose key file cannot be trusted. Each names the issuer and the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenConfigError {
    #[error("cannot read key file {path} of issuer {iss:?}: {source}")]
    Read { iss: String, path: PathBuf, source: io::Error },
    #[error("key file {path} of issuer {iss:?} {source}")]
    Key { iss: String, path: PathBuf, source: KeyError },
    #[error(
        "key file {path} of issuer {iss:?} holds key {kid:?} for {alg}, but the issuer's algorithms are pinned to {pinned:?}"
    )]
    NotPinned { iss: String, path: PathBuf, kid: String, alg: &'static str, pinned: Vec<String> },
}

/// Verifies tokens: trusted keys per issuer, the required audience, the longest lifetime and the
/// clock skew tolerated. Built once from the config; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Verifier {
    issuers: BTreeMap<String, Vec<TrustedKey>>,
    audience: String,
    max_ttl_seconds: u64,
    leeway_seconds: u64,
    outcomes: Option<Outcomes>,
}

/// Told the outcome of each [`Verifier::verify_for`]: `None` for a valid token, else its code.
#[derive(Clone)]
struct Outcomes(Arc<dyn Fn(Option<TokenCode>) + Send + Sync>);

impl std::fmt::Debug for Outcomes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Outcomes")
    }
}

#[derive(Debug)]
struct TrustedKey {
    kid: String,
    alg: Algorithm,
    alg_name: &'static str,
    decoding: DecodingKey,
}

impl Verifier {
    /// Loads every configured issuer's key file: a PEM public key or a JWKS. A key whose algorithm
    /// (which follows from the key) is not in the issuer's pinned `algorithms` is an error.
    pub fn from_config(config: &Config) -> Result<Self, TokenConfigError> {
        let mut issuers = BTreeMap::new();
        for issuer in &config.issuers {
            let (iss, path) = (&issuer.iss, &issuer.key);
            let text = fs::read_to_string(path).map_err(|source| TokenConfigError::Read {
                iss: iss.clone(),
                path: path.clone(),
                source,
            })?;
            let entries = keys::parse_public_keys(&text).map_err(|source| TokenConfigError::Key {
                iss: iss.clone(),
                path: path.clone(),
                source,
            })?;
            let mut trusted = Vec::with_capacity(entries.len());
            for entry in entries {
                let alg_name = entry.key.alg_name();
                if !issuer.algorithms.iter().any(|a| a == alg_name) {
                    return Err(TokenConfigError::NotPinned {
                        iss: iss.clone(),
                        path: path.clone(),
                        kid: entry.kid,
                        alg: alg_name,
                        pinned: issuer.algorithms.clone(),
                    });
                }
                trusted.push(TrustedKey {
                    alg: entry.key.algorithm(),
                    alg_name,
                    decoding: entry.key.decoding_key(),
                    kid: entry.kid,
                });
            }
            issuers.insert(iss.clone(), trusted);
        }
        Ok(Self {
            issuers,
            audience: config.audience.clone(),
            max_ttl_seconds: config.max_ttl_seconds,
            leeway_seconds: config.leeway_seconds,
            outcomes: None,
        })
    }

    /// Tells `outcome` the result of every [`Verifier::verify_for`] from now on (the daemon's
    /// metrics count them): `None` for a valid token, else its refusal code.
    #[must_use]
    pub fn with_outcomes(mut self, outcome: impl Fn(Option<TokenCode>) + Send + Sync + 'static) -> Self {
        self.outcomes = Some(Outcomes(Arc::new(outcome)));
        self
    }

    /// The clock skew tolerated on `exp`, `nbf` and `iat` (also what the replay cache needs).
    pub fn leeway_seconds(&self) -> u64 {
        self.leeway_seconds
    }

    /// Verifies everything except replay and which agent presents the token. Surrounding
    /// whitespace (a trailing newline in a token file) is ignored.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claims, TokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong { bytes: token.len(), max: MAX_TOKEN_BYTES });
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, _signature] = parts[..] else {
            return Err(TokenError::Shape { parts: parts.len() });
        };
        // Our own reading of the header comes first, so `alg: none` is refused before any key is
        // chosen and no library ever sees it.
        let header = Header::parse(header)?;
        let unverified = RawClaims::parse(payload)?;

        let iss = unverified.issuer()?;
        let keys = self.issuers.get(iss).ok_or_else(|| TokenError::UnknownIssuer { iss: iss.to_owned() })?;
        let key = match (&header.kid, keys.as_slice()) {
            (Some(kid), keys) => keys
                .iter()
                .find(|k| k.kid == *kid)
                .ok_or_else(|| TokenError::UnknownKid { iss: iss.to_owned(), kid: kid.clone() })?,
            (None, [only]) => only,
            (None, keys) => return Err(TokenError::MissingKid { iss: iss.to_owned(), keys: keys.len() }),
        };
        // The key decides the algorithm. This is what stops an HS256 token "signed" with the
        // issuer's public key: the key's algorithm is EdDSA, ES256 or RS256, never HMAC.
        if header.alg != key.alg_name {
            return Err(TokenError::AlgNotPinned {
                alg: header.alg,
                iss: iss.to_owned(),
                kid: key.kid.clone(),
                expected: key.alg_name,
            });
        }

        let mut validation = Validation::new(key.alg);
        validation.set_issuer(&[iss]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = self.leeway_seconds;
        // jsonwebtoken compares exp/nbf with the system clock; the time rules are applied below
        // against `now_unix`, so they are checked once, against the caller's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let verified = jsonwebtoken::decode::<RawClaims>(token, &key.decoding, &validation)
            .map_err(|e| self.jwt_error(e, &unverified, iss, &key.kid))?
            .claims;

        let rules = Rules {
            audience: &self.audience,
            max_ttl_seconds: self.max_ttl_seconds,
            leeway_seconds: self.leeway_seconds,
        };
        verified.into_claims(header, &rules, now_unix)
    }

    /// [`Verifier::verify`], and the token's subject must be `agent`.
    pub fn verify_for(&self, token: &str, agent: &AgentId, now_unix: u64) -> Result<Claims, TokenError> {
        let verified = self.verify(token, now_unix).and_then(|claims| {
            if claims.sub != *agent {
                return Err(TokenError::WrongAgent { sub: claims.sub.to_string(), agent: agent.to_string() });
            }
            Ok(claims)
        });
        if let Some(Outcomes(outcome)) = &self.outcomes {
            outcome(verified.as_ref().err().map(TokenError::code));
        }
        verified
    }

    fn jwt_error(
        &self,
        error: jsonwebtoken::errors::Error,
        raw: &RawClaims,
        iss: &str,
        kid: &str,
    ) -> TokenError {
        let claim_name = |claim: &str| -> Option<&'static str> {
            ["exp", "iss", "aud", "sub", "nbf"].into_iter().find(|c| *c == claim)
        };
        match error.kind() {
            ErrorKind::InvalidSignature => {
                TokenError::BadSignature { iss: iss.to_owned(), kid: kid.to_owned() }
            }
            ErrorKind::Base64(_) => TokenError::Base64 { part: "signature" },
            ErrorKind::MissingRequiredClaim(claim) | ErrorKind::InvalidClaimFormat(claim) => {
                match claim_name(claim) {
                    Some(claim) if raw.has(claim) => {
                        TokenError::InvalidClaim { claim, expected: expected(claim) }
                    }
                    Some(claim) => TokenError::MissingClaim { claim },
                    None => TokenError::Rejected { source: error },
                }
            }
            ErrorKind::InvalidAudience => {
                TokenError::WrongAudience { aud: raw.audience_as_given(), expected: self.audience.clone() }
            }
            ErrorKind::InvalidIssuer => TokenError::UnknownIssuer { iss: iss.to_owned() },
            _ => TokenError::Rejected { source: error },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{fs, path::Path};

    use jsonwebtoken::{DecodingKey, EncodingKey};
    use serde_json::{Value, json};

    use super::*;
    use crate::token::{IssueParams, test_support::*};

    fn code(result: Result<Claims, TokenError>) -> &'static str {
        match result {
            Ok(claims) => panic!("token was accepted: {claims:?}"),
            Err(e) => e.code().as_str(),
        }
    }

    fn full_params() -> IssueParams {
        IssueParams {
            op: Some("op-42".into()),
            scopes: vec!["read:data.sales_q1_2026".into(), "write:reports".into()],
            tools: vec!["http".into()],
            forbid: vec!["shell".into()],
            ttl_seconds: 600,
            max_tokens: Some(20_000),
            ..IssueParams::new(ISS, agent(AGENT))
        }
    }

    #[test]
    fn an_issued_eddsa_token_round_trips_through_a_jwks_and_a_pem_key() {
        let issuer = TestIssuer::ed25519();
        let token = issuer.issue(&full_params());
        for verifier in [issuer.verifier(), issuer.pem_verifier()] {
            let claims = verifier.verify(&token, NOW).unwrap();
            assert_eq!(claims.iss, ISS);
            assert_eq!(claims.sub, agent(AGENT));
            assert_eq!(claims.aud, ["ztseg"]);
            assert_eq!(claims.jti.len(), 32);
            assert_eq!((claims.iat, claims.nbf, claims.exp), (NOW, Some(NOW), NOW + 600));
            assert_eq!(claims.op.as_deref(), Some("op-42"));
            assert_eq!(claims.scope, ["read:data.sales_q1_2026", "write:reports"]);
            assert_eq!(claims.tools, ["http"]);
            assert_eq!(claims.forbidden_tools, ["shell"]);
            assert_eq!(claims.max_tokens, Some(20_000));
            assert_eq!(claims.alg, "EdDSA");
            assert_eq!(claims.kid.as_deref(), Some(issuer.keys.kid.as_str()));
        }
        // A trailing newline from a token file does not matter.
        assert!(issuer.verifier().verify(&format!("{token}\n"), NOW).is_ok());
    }

    #[test]
    fn claims_serialize_for_inspect() {
        let issuer = TestIssuer::ed25519();
        let claims =
            issuer.verifier().verify(&issuer.issue(&IssueParams::new(ISS, agent(AGENT))), NOW).unwrap();
        let json = serde_json::to_value(&claims).unwrap();
        for key in [
            "iss",
            "sub",
            "aud",
            "jti",
            "iat",
            "nbf",
            "exp",
            "op",
            "scope",
            "tools",
            "forbidden_tools",
            "max_tokens",
            "alg",
            "kid",
        ] {
            assert!(json.get(key).is_some(), "{key} missing from {json}");
        }
        assert_eq!(json["sub"], AGENT);
        assert_eq!(json["scope"], json!([]));
        assert_eq!(json["op"], Value::Null);
    }

    #[test]
    fn es256_tokens_verify_with_a_pem_key_and_a_jwks() {
        let (private, public) = p256_key_pair();
        let dir = TempDir::new("es256");
        let pem = dir.write("ec.pub.pem", &public);
        let token = crate::token::issue(&private, &full_params(), NOW).unwrap();
        let verifier = Verifier::from_config(&config(&[(ISS, &pem, &["ES256"])])).unwrap();
        let claims = verifier.verify(&token, NOW).unwrap();
        assert_eq!(claims.alg, "ES256");

        let entry = keys::parse_public_keys(&public).unwrap().remove(0);
        let jwks = dir.write("jwks.json", &json!({ "keys": [entry.key.to_jwk("ec-1")] }).to_string());
        let verifier = Verifier::from_config(&config(&[(ISS, &jwks, &["ES256"])])).unwrap();
        // The token's kid is the thumbprint, the JWKS names the key "ec-1": the kid must match.
        assert_eq!(code(verifier.verify(&token, NOW)), "unknown_kid");
        let header = json!({ "alg": "ES256", "kid": "ec-1" });
        let key = EncodingKey::from_ec_pem(private.as_bytes()).unwrap();
        let token = sign_raw(&header, &Value::Object(claims_map()), &key, Algorithm::ES256);
        assert_eq!(verifier.verify(&token, NOW).unwrap().kid.as_deref(), Some("ec-1"));
    }

    fn claims_map() -> serde_json::Map<String, Value> {
        claims()
    }

    #[test]
    fn rs256_tokens_verify() {
        let dir = TempDir::new("rs256");
        let pem = dir.write("rsa.pub.pem", RSA_PUBLIC_PEM);
        let token = crate::token::issue(RSA_PRIVATE_PEM, &full_params(), NOW).unwrap();
        let verifier = Verifier::from_config(&config(&[(ISS, &pem, &["RS256"])])).unwrap();
        assert_eq!(verifier.verify(&token, NOW).unwrap().alg, "RS256");
        // The same key pinned to EdDSA only is refused when the config loads.
        let err = Verifier::from_config(&config(&[(ISS, &pem, &["EdDSA"])])).unwrap_err();
        assert!(matches!(err, TokenConfigError::NotPinned { alg: "RS256", .. }), "{err}");
    }

    #[test]
    fn alg_none_is_refused_before_anything_else() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let mut unknown_issuer = claims();
        unknown_issuer.insert("iss".into(), "nobody".into());
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = b64(json!({ "alg": alg, "typ": "JWT" }).to_string());
            for payload in [&claims(), &unknown_issuer] {
                let payload = b64(Value::Object(payload.clone()).to_string());
                for signature in ["", "c2lnbmF0dXJl"] {
                    let token = format!("{header}.{payload}.{signature}");
                    assert_eq!(code(verifier.verify(&token, NOW)), "alg_none", "{alg} {signature:?}");
                }
            }
        }
        // Positive control: the same claims, signed.
        assert!(verifier.verify(&issuer.sign(&claims()), NOW).is_ok());
    }

    /// The classic key-confusion attack: the attacker knows the issuer's public key (it is
    /// public), uses its bytes as an HMAC secret and labels the token HS256. A verifier that let the
    /// token choose the algorithm would check the HMAC with those same bytes and accept it.
    #[test]
    fn an_hs256_token_signed_with_the_public_key_is_refused() {
        let issuer = TestIssuer::ed25519();
        let pem_text = fs::read_to_string(&issuer.keys.public_key).unwrap();
        let jwks_text = fs::read_to_string(&issuer.keys.jwks).unwrap();
        let jwks: Value = serde_json::from_str(&jwks_text).unwrap();
        let raw_key = base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            jwks["keys"][0]["x"].as_str().unwrap(),
        )
        .unwrap();

        let mut naive = Validation::new(Algorithm::HS256);
        naive.validate_exp = false;
        naive.set_audience(&["ztseg"]);
        for (verifier, secret) in [
            (issuer.pem_verifier(), pem_text.as_bytes()),
            (issuer.pem_verifier(), pem_text.trim().as_bytes()),
            (issuer.verifier(), jwks_text.as_bytes()),
            (issuer.verifier(), raw_key.as_slice()),
        ] {
            for header in
                [json!({ "alg": "HS256", "typ": "JWT" }), json!({ "alg": "HS256", "kid": issuer.keys.kid })]
            {
                let forged = sign_raw(
                    &header,
                    &Value::Object(claims()),
                    &EncodingKey::from_secret(secret).unwrap(),
                    Algorithm::HS256,
                );
                // The forgery is a genuine HS256 token under that secret ...
                jsonwebtoken::decode::<Value>(&forged, &DecodingKey::from_secret(secret).unwrap(), &naive)
                    .unwrap();
                // ... and ztseg refuses it, because the key, not the token, decides the algorithm.
                let err = verifier.verify(&forged, NOW).unwrap_err();
                assert_eq!(err.code().as_str(), "alg_not_pinned", "{err}");
                assert!(err.to_string().contains("\"HS256\"") && err.to_string().contains("EdDSA"), "{err}");
            }
            // Positive control: the genuine token verifies with the same verifier.
            assert!(verifier.verify(&issuer.sign(&claims()), NOW).is_ok());
        }
    }

    #[test]
    fn an_algorithm_other_than_the_keys_is_refused() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let genuine = issuer.sign(&claims());
        let signature = genuine.rsplit('.').next().unwrap();
        let payload = b64(Value::Object(claims()).to_string());
        for alg in ["ES256", "RS256", "PS256", "HS512", "eddsa", "Ed25519", "EdDSA "] {
            let header = b64(json!({ "alg": alg, "kid": issuer.keys.kid }).to_string());
            let token = format!("{header}.{payload}.{signature}");
            assert_eq!(code(verifier.verify(&token, NOW)), "alg_not_pinned", "{alg}");
        }
        assert!(verifier.verify(&genuine, NOW).is_ok());
    }

    #[test]
    fn unknown_or_missing_issuers_are_refused() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let mut c = claims();
        c.insert("iss".into(), "someone-else".into());
        assert_eq!(code(verifier.verify(&issuer.sign(&c), NOW)), "unknown_issuer");
        c.remove("iss");
        assert_eq!(code(verifier.verify(&issuer.sign(&c), NOW)), "missing_claim");
        c.insert("iss".into(), json!([ISS]));
        assert_eq!(code(verifier.verify(&issuer.sign(&c), NOW)), "invalid_claim");
        assert!(verifier.verify(&issuer.sign(&claims()), NOW).is_ok());
    }

    #[test]
    fn kid_selects_the_key_when_an_issuer_has_several() {
        let (a, b) = (TestIssuer::ed25519(), TestIssuer::ed25519());
        let jwk = |i: &TestIssuer| {
            let jwks: Value = serde_json::from_str(&fs::read_to_string(&i.keys.jwks).unwrap()).unwrap();
            jwks["keys"][0].clone()
        };
        let dir = TempDir::new("two-keys");
        let path = dir.write("jwks.json", &json!({ "keys": [jwk(&a), jwk(&b)] }).to_string());
        let verifier = Verifier::from_config(&config(&[(ISS, &path, &["EdDSA"])])).unwrap();

        assert!(verifier.verify(&a.sign(&claims()), NOW).is_ok());
        assert!(verifier.verify(&b.sign(&claims()), NOW).is_ok());
        let sign_with = |signer: &TestIssuer, header: Value| {
            sign_raw(&header, &Value::Object(claims()), &signer.encoding_key(), Algorithm::EdDSA)
        };
        // a's signature under b's kid: b's key is used, so the signature is wrong.
        let swapped = sign_with(&a, json!({ "alg": "EdDSA", "kid": b.keys.kid }));
        assert_eq!(code(verifier.verify(&swapped, NOW)), "bad_signature");
        let unknown = sign_with(&a, json!({ "alg": "EdDSA", "kid": "no-such-key" }));
        assert_eq!(code(verifier.verify(&unknown, NOW)), "unknown_kid");
        let no_kid = sign_with(&a, json!({ "alg": "EdDSA" }));
        assert_eq!(code(verifier.verify(&no_kid, NOW)), "missing_kid");
        // With a single key, a token without kid is fine; with a wrong kid it is not.
        assert!(a.verifier().verify(&no_kid, NOW).is_ok());
        assert!(a.pem_verifier().verify(&no_kid, NOW).is_ok());
        assert_eq!(code(a.pem_verifier().verify(&unknown, NOW)), "unknown_kid");
    }

    #[test]
    fn a_bad_signature_is_refused() {
        let (issuer, other) = (TestIssuer::ed25519(), TestIssuer::ed25519());
        let verifier = issuer.verifier();
        let genuine = issuer.sign(&claims());
        assert!(verifier.verify(&genuine, NOW).is_ok());

        // Widen the grant and keep the signature.
        let mut wider = claims();
        wider.insert("scope".into(), json!(["read:data.sales", "admin:everything"]));
        let parts: Vec<&str> = genuine.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], b64(Value::Object(wider).to_string()), parts[2]);
        assert_eq!(code(verifier.verify(&tampered, NOW)), "bad_signature");

        // Signed by another key under this issuer's kid.
        let header = json!({ "alg": "EdDSA", "kid": issuer.keys.kid });
        let forged = sign_raw(&header, &Value::Object(claims()), &other.encoding_key(), Algorithm::EdDSA);
        assert_eq!(code(verifier.verify(&forged, NOW)), "bad_signature");

        let truncated = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(code(verifier.verify(&truncated, NOW)), "bad_signature");
        let not_base64 = format!("{}.{}.!!!!", parts[0], parts[1]);
        assert_eq!(code(verifier.verify(&not_base64, NOW)), "malformed");
    }

    #[test]
    fn an_embedded_jwk_header_is_ignored() {
        let (issuer, attacker) = (TestIssuer::ed25519(), TestIssuer::ed25519());
        let verifier = issuer.verifier();
        let attacker_jwk: Value =
            serde_json::from_str(&fs::read_to_string(&attacker.keys.jwks).unwrap()).unwrap();
        let header = json!({ "alg": "EdDSA", "kid": issuer.keys.kid, "jwk": attacker_jwk["keys"][0] });
        let forged = sign_raw(&header, &Value::Object(claims()), &attacker.encoding_key(), Algorithm::EdDSA);
        assert_eq!(code(verifier.verify(&forged, NOW)), "bad_signature");
        let genuine = sign_raw(&header, &Value::Object(claims()), &issuer.encoding_key(), Algorithm::EdDSA);
        assert!(verifier.verify(&genuine, NOW).is_ok());
    }

    #[test]
    fn time_rules_apply_with_the_configured_leeway() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let leeway = Config::default().leeway_seconds;
        let token = issuer.sign(&claims());
        let exp = NOW + 300;

        assert!(verifier.verify(&token, exp + leeway).is_ok());
        let err = verifier.verify(&token, exp + leeway + 1).unwrap_err();
        assert_eq!(err.code().as_str(), "expired");
        assert!(err.to_string().contains("exp"), "{err}");

        let mut later = claims();
        later.insert("nbf".into(), json!(NOW + 60));
        let later = issuer.sign(&later);
        assert!(verifier.verify(&later, NOW + 60 - leeway).is_ok());
        assert_eq!(code(verifier.verify(&later, NOW + 60 - leeway - 1)), "not_yet_valid");

        let mut future = claims();
        future.remove("nbf");
        future.insert("iat".into(), json!(NOW + 60));
        future.insert("exp".into(), json!(NOW + 360));
        let future = issuer.sign(&future);
        assert!(verifier.verify(&future, NOW + 60 - leeway).is_ok());
        assert_eq!(code(verifier.verify(&future, NOW + 60 - leeway - 1)), "issued_in_future");

        // Fractional dates (Python's time.time()) are accepted: exp and iat round down, nbf up.
        let mut fractional = claims();
        fractional.insert("exp".into(), json!(NOW as f64 + 300.9));
        fractional.insert("iat".into(), json!(NOW as f64 - 0.5));
        fractional.insert("nbf".into(), json!(NOW as f64 - 0.5));
        let claims = verifier.verify(&issuer.sign(&fractional), NOW).unwrap();
        assert_eq!((claims.iat, claims.nbf, claims.exp), (NOW - 1, Some(NOW), NOW + 300));
    }

    #[test]
    fn a_lifetime_over_the_maximum_is_refused() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let max = Config::default().max_ttl_seconds;
        let with = |iat: u64, nbf: Option<u64>, exp: u64| {
            let mut c = claims();
            c.insert("iat".into(), json!(iat));
            c.insert("exp".into(), json!(exp));
            match nbf {
                Some(nbf) => c.insert("nbf".into(), json!(nbf)),
                None => c.remove("nbf"),
            };
            verifier.verify(&issuer.sign(&c), NOW)
        };
        assert!(with(NOW, None, NOW + max).is_ok());
        assert_eq!(code(with(NOW, None, NOW + max + 1)), "lifetime_too_long");
        assert_eq!(code(with(NOW, Some(NOW), NOW + max + 1)), "lifetime_too_long");
        // The lifetime counts from the later of iat and nbf.
        assert!(with(NOW - 100, Some(NOW), NOW + max).is_ok());
        assert_eq!(code(with(NOW - 100, Some(NOW - 50), NOW + max)), "lifetime_too_long");
        // An exp at or before the start is no lifetime at all.
        assert_eq!(code(with(NOW, Some(NOW + 3), NOW + 3)), "invalid_claim");
    }

    #[test]
    fn required_claims_are_required_and_typed() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        for claim in ["exp", "iat", "jti", "sub", "aud"] {
            let mut c = claims();
            c.remove(claim);
            let err = verifier.verify(&issuer.sign(&c), NOW).unwrap_err();
            assert_eq!(err.code().as_str(), "missing_claim", "{claim}: {err}");
            assert!(err.to_string().contains(claim), "{err}");
            // null is absent.
            c.insert(claim.into(), Value::Null);
            assert_eq!(code(verifier.verify(&issuer.sign(&c), NOW)), "missing_claim", "{claim} = null");
        }
        for (claim, value) in [
            ("exp", json!("soon")),
            ("exp", json!(-5)),
            ("iat", json!(true)),
            ("nbf", json!("now")),
            ("jti", json!("")),
            ("jti", json!("x".repeat(257))),
            ("jti", json!(7)),
            ("sub", json!(7)),
            ("aud", json!(7)),
            ("aud", json!(["ztseg", 7])),
            ("op", json!(7)),
            ("tools", json!("http")),
            ("forbidden_tools", json!([""])),
            ("scope", json!({ "read": true })),
            ("max_tokens", json!("many")),
            ("max_tokens", json!(-1)),
            ("agent_id", json!(7)),
        ] {
            let mut c = claims();
            c.insert(claim.into(), value.clone());
            let err = verifier.verify(&issuer.sign(&c), NOW).unwrap_err();
            assert_eq!(err.code().as_str(), "invalid_claim", "{claim} = {value}: {err}");
            assert!(err.to_string().contains(claim), "{err}");
        }
        // Positive control: optional claims may be absent or null.
        let mut c = claims();
        for claim in ["op", "scope", "tools", "forbidden_tools", "nbf"] {
            c.remove(claim);
        }
        c.insert("max_tokens".into(), Value::Null);
        let claims = verifier.verify(&issuer.sign(&c), NOW).unwrap();
        assert_eq!((claims.op, claims.nbf, claims.max_tokens), (None, None, None));
        assert!(claims.scope.is_empty() && claims.tools.is_empty() && claims.forbidden_tools.is_empty());
    }

    #[test]
    fn the_audience_must_include_this_host() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let with = |aud: Value| {
            let mut c = claims();
            c.insert("aud".into(), aud);
            verifier.verify(&issuer.sign(&c), NOW)
        };
        assert_eq!(code(with(json!("another-service"))), "wrong_audience");
        assert_eq!(code(with(json!(["another-service"]))), "wrong_audience");
        assert_eq!(code(with(json!([]))), "wrong_audience");
        assert_eq!(code(with(json!("ZTSEG"))), "wrong_audience");
        assert_eq!(with(json!("ztseg")).unwrap().aud, ["ztseg"]);
        assert_eq!(with(json!(["another-service", "ztseg"])).unwrap().aud, ["another-service", "ztseg"]);
    }

    #[test]
    fn the_subject_must_be_a_valid_agent_id_and_agree_with_agent_id() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let with = |set: &[(&str, &str)]| {
            let mut c = claims();
            for (k, v) in set {
                c.insert((*k).into(), (*v).into());
            }
            verifier.verify(&issuer.sign(&c), NOW)
        };
        for bad in ["../analyst-7", "cgroup.procs", "", "a b"] {
            assert_eq!(code(with(&[("sub", bad)])), "invalid_subject", "{bad:?}");
        }
        assert_eq!(code(with(&[("agent_id", "analyst-8")])), "subject_mismatch");
        assert!(with(&[("agent_id", AGENT)]).is_ok());
        assert!(with(&[("sub", "agent_x-1")]).is_ok());
    }

    #[test]
    fn wildcard_scopes_and_tools_are_refused() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let with = |claim: &str, value: Value| {
            let mut c = claims();
            c.insert(claim.into(), value);
            verifier.verify(&issuer.sign(&c), NOW)
        };
        for (claim, value) in [
            ("scope", json!(["read:*"])),
            ("scope", json!(["read:a", "*"])),
            ("scope", json!("read:a write:*")),
            ("tools", json!(["*"])),
        ] {
            let err = with(claim, value.clone()).unwrap_err();
            assert_eq!(err.code().as_str(), "wildcard_scope", "{claim} = {value}");
            assert!(err.to_string().contains(claim), "{err}");
        }
        assert!(with("scope", json!(["read:a", "write:b"])).is_ok());
        assert!(with("tools", json!(["http"])).is_ok());
    }

    #[test]
    fn the_oauth_scope_string_form_is_parsed() {
        let issuer = TestIssuer::ed25519();
        let mut c = claims();
        c.insert("scope".into(), json!("read:data.sales_q1_2026  write:reports\tlist:x"));
        let claims = issuer.verifier().verify(&issuer.sign(&c), NOW).unwrap();
        assert_eq!(claims.scope, ["read:data.sales_q1_2026", "write:reports", "list:x"]);
        c.insert("scope".into(), json!(""));
        assert!(issuer.verifier().verify(&issuer.sign(&c), NOW).unwrap().scope.is_empty());
    }

    #[test]
    fn verify_for_binds_the_token_to_its_agent() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let token = issuer.sign(&claims());
        assert!(verifier.verify_for(&token, &agent(AGENT), NOW).is_ok());
        let err = verifier.verify_for(&token, &agent("intruder"), NOW).unwrap_err();
        assert_eq!(err.code().as_str(), "wrong_agent");
        assert!(err.to_string().contains("intruder") && err.to_string().contains(AGENT), "{err}");
    }

    #[test]
    fn each_verification_outcome_is_told() {
        let issuer = TestIssuer::ed25519();
        let told = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = told.clone();
        let verifier = issuer.verifier().with_outcomes(move |o| sink.lock().unwrap().push(o));
        let token = issuer.sign(&claims());
        assert!(verifier.verify_for(&token, &agent(AGENT), NOW).is_ok());
        assert!(verifier.verify_for(&token, &agent("intruder"), NOW).is_err());
        assert!(verifier.verify_for("x.y", &agent(AGENT), NOW).is_err());
        // `verify` alone (token inspect) is not a verification for an agent: not told.
        assert!(verifier.verify(&token, NOW).is_ok());
        assert_eq!(*told.lock().unwrap(), [None, Some(TokenCode::WrongAgent), Some(TokenCode::Malformed)]);
    }

    #[test]
    fn malformed_tokens_are_refused() {
        let issuer = TestIssuer::ed25519();
        let verifier = issuer.verifier();
        let genuine = issuer.sign(&claims());
        let parts: Vec<&str> = genuine.split('.').collect();
        let (payload, signature) = (parts[1], parts[2]);
        let with_header = |header: &str| format!("{}.{payload}.{signature}", b64(header));
        let cases = [
            String::new(),
            " \n".to_owned(),
            "abc".to_owned(),
            format!("{}.{}", parts[0], parts[1]),
            format!("{genuine}.extra.parts"),
            format!("!!.{payload}.{signature}"),
            format!("{}=.{payload}.{signature}", parts[0]),
            with_header("not json"),
            with_header(r#"["EdDSA"]"#),
            with_header(r#"{"typ":"JWT"}"#),
            with_header(r#"{"alg":7}"#),
            with_header(&format!(r#"{{"alg":"EdDSA","kid":"{}","alg":"none"}}"#, issuer.keys.kid)),
            with_header(&format!(r#"{{"alg":"EdDSA","kid":"{}","kid":"x"}}"#, issuer.keys.kid)),
            with_header(r#"{"alg":"EdDSA","kid":7}"#),
            with_header(&format!(r#"{{"alg":"EdDSA","kid":"{}","crit":["exp"],"exp":1}}"#, issuer.keys.kid)),
            format!("{}.{}.{signature}", parts[0], b64("[1,2]")),
            format!("{}.{}.{signature}", parts[0], b64(r#"{"iss":"orchestrator","iss":"other"}"#)),
            format!("{}.{}.{signature}", parts[0], "x".repeat(MAX_TOKEN_BYTES)),
        ];
        for token in &cases {
            let err = verifier.verify(token, NOW).unwrap_err();
            assert_eq!(err.code().as_str(), "malformed", "{token:.80}: {err}");
        }
        assert!(verifier.verify(&genuine, NOW).is_ok());
    }

    #[test]
    fn key_files_are_checked_when_the_config_loads() {
        let issuer = TestIssuer::ed25519();
        let dir = TempDir::new("load");
        let load = |path: &Path, algs: &[&str]| Verifier::from_config(&config(&[(ISS, path, algs)]));

        let err = load(&issuer.keys.public_key, &["ES256", "RS256"]).unwrap_err();
        assert!(matches!(err, TokenConfigError::NotPinned { alg: "EdDSA", .. }), "{err}");
        assert!(err.to_string().contains(&issuer.keys.public_key.display().to_string()), "{err}");
        assert!(load(&issuer.keys.public_key, &["ES256", "EdDSA"]).is_ok());

        let missing = dir.path().join("missing.pem");
        let err = load(&missing, &["EdDSA"]).unwrap_err();
        assert!(
            matches!(err, TokenConfigError::Read { .. }) && err.to_string().contains("missing.pem"),
            "{err}"
        );

        let err = load(&issuer.keys.private_key, &["EdDSA"]).unwrap_err();
        assert!(
            matches!(err, TokenConfigError::Key { source: KeyError::PrivateKeyGiven { .. }, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("ed25519.pem"), "{err}");

        let small = dir.write("rsa-1024.pub.pem", RSA_1024_PUBLIC_PEM);
        let err = load(&small, &["RS256"]).unwrap_err();
        assert!(
            matches!(err, TokenConfigError::Key { source: KeyError::RsaTooSmall { bits: 1024 }, .. }),
            "{err}"
        );
        let big = dir.write("rsa-2048.pub.pem", RSA_PUBLIC_PEM);
        assert!(load(&big, &["RS256"]).is_ok());

        let p384 = dir.write("p384.pub.pem", P384_PUBLIC_PEM);
        let err = load(&p384, &["ES256"]).unwrap_err();
        assert!(
            matches!(err, TokenConfigError::Key { source: KeyError::UnsupportedCurve { .. }, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("P-384"), "{err}");

        let oct = dir.write("oct.json", r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#);
        assert!(matches!(load(&oct, &["EdDSA"]).unwrap_err(), TokenConfigError::Key { .. }));

        let garbage = dir.write("garbage.json", "{ not json");
        let err = load(&garbage, &["EdDSA"]).unwrap_err();
        assert!(err.to_string().starts_with(&format!("key file {} of issuer", garbage.display())), "{err}");
    }
}
