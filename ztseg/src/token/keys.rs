//! Keys: the public keys an issuer is trusted with (a PEM file or a JWKS), and the private keys
//! `ztseg token issue` signs with.
//!
//! A key's algorithm always follows from the key itself (Ed25519 -> EdDSA, EC P-256 -> ES256,
//! RSA -> RS256), never from a token, and each key is validated when it loads: a point that is not
//! on its curve, a small-order Ed25519 key, an RSA modulus under 2048 bits, a symmetric JWK or a
//! file holding private key material is refused before any token is looked at.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{SigningKey as Ed25519SigningKey, VerifyingKey as Ed25519VerifyingKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
use p256::elliptic_curve::sec1::ToSec1Point as _;
use pkcs8::{
    DecodePrivateKey as _, DecodePublicKey as _, ObjectIdentifier, PrivateKeyInfoRef,
    SubjectPublicKeyInfoRef,
    der::{Document, SecretDocument, pem},
};
use rsa::{BoxedUint, pkcs1::DecodeRsaPublicKey as _, traits::PublicKeyParts as _};
use serde_json::{Map, Value};
use sha2::{Digest as _, Sha256};

const ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");
const ED448: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.113");
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");

/// Smallest RSA modulus accepted, in bits.
pub const MIN_RSA_BITS: usize = 2048;

/// Why a key file or key text cannot be used. Phrased to follow "key file PATH ..." (or "the
/// key ...").
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("is neither a JWKS (JSON {{\"keys\": [...]}}) nor PEM: {source}")]
    NotPem { source: pem::Error },
    #[error("holds a PEM {label:?} block, which is private key material: trust the public key instead")]
    PrivateKeyGiven { label: String },
    #[error("holds a PEM {label:?} block, but a PKCS#8 \"PRIVATE KEY\" is needed to sign{hint}")]
    NotPkcs8PrivateKey { label: String, hint: &'static str },
    #[error(
        "holds a certificate: extract its public key with `openssl x509 -pubkey -noout -in FILE` and trust that"
    )]
    Certificate,
    #[error("holds a PEM {label:?} block, not a \"PUBLIC KEY\"")]
    UnexpectedLabel { label: String },
    #[error("is not valid DER inside its PEM armour: {source}")]
    Der { source: pkcs8::der::Error },
    #[error("is not a valid SubjectPublicKeyInfo public key: {source}")]
    Spki { source: pkcs8::spki::Error },
    #[error("is not a valid PKCS#8 private key: {source}")]
    Pkcs8 { source: pkcs8::Error },
    #[error("is an Ed448 key; ztseg supports Ed25519 (EdDSA), EC P-256 (ES256) and RSA (RS256)")]
    Ed448,
    #[error("has key algorithm OID {oid}; ztseg supports Ed25519 (EdDSA), EC P-256 (ES256) and RSA (RS256)")]
    UnsupportedAlgorithm { oid: String },
    #[error("is an EC key on curve {curve}; only P-256 (ES256) is supported")]
    UnsupportedCurve { curve: String },
    #[error("is not a valid {kind} key")]
    InvalidKey { kind: &'static str },
    #[error("is a weak (small-order) Ed25519 key that anyone could sign for")]
    WeakEd25519,
    #[error("is an RSA key of {bits} bits; at least {MIN_RSA_BITS} are required")]
    RsaTooSmall { bits: usize },
    #[error("is not a JWKS (JSON {{\"keys\": [...]}}): {source}")]
    Jwks { source: serde_json::Error },
    #[error("is a JWKS without keys")]
    EmptyJwks,
    #[error("has JWK #{index} that is not a JSON object")]
    JwkNotObject { index: usize },
    #[error("has JWK #{index} whose member {member:?} {problem}")]
    JwkMember { index: usize, member: &'static str, problem: &'static str },
    #[error("has JWK #{index} of kty {kty:?}{crv}, which is not Ed25519 (OKP), P-256 (EC) or RSA")]
    UnsupportedJwk { index: usize, kty: String, crv: String },
    #[error(
        "has JWK #{index} that holds private key material (member \"{member}\"): publish only public keys"
    )]
    PrivateJwk { index: usize, member: &'static str },
    #[error("has JWK #{index} whose alg {alg:?} disagrees with its key type, which is {expected}")]
    JwkAlgMismatch { index: usize, alg: String, expected: &'static str },
    #[error("has JWK #{index} for use {use_:?}, not \"sig\"")]
    JwkNotForSigning { index: usize, use_: String },
    #[error("has JWK #{index} without a kid, but a JWKS with several keys must name each one")]
    JwkWithoutKid { index: usize },
    #[error("has two keys with kid {kid:?}")]
    DuplicateKid { kid: String },
}

/// A validated public key of one of the supported types.
#[derive(Clone, Debug)]
pub(super) enum PublicKey {
    Ed25519(Ed25519VerifyingKey),
    P256(p256::PublicKey),
    Rsa(rsa::PublicKey),
}

/// A public key with the id tokens select it by.
#[derive(Clone, Debug)]
pub(super) struct KeyEntry {
    pub kid: String,
    pub key: PublicKey,
}

impl PublicKey {
    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::EdDSA,
            Self::P256(_) => Algorithm::ES256,
            Self::Rsa(_) => Algorithm::RS256,
        }
    }

    /// The algorithm's JOSE name, as a token header and a config file spell it.
    pub fn alg_name(&self) -> &'static str {
        match self {
            Self::Ed25519(_) => "EdDSA",
            Self::P256(_) => "ES256",
            Self::Rsa(_) => "RS256",
        }
    }

    pub fn decoding_key(&self) -> DecodingKey {
        match self {
            Self::Ed25519(key) => DecodingKey::from_ed_der(key.as_bytes()),
            Self::P256(key) => DecodingKey::from_ec_der(key.to_sec1_point(false).as_bytes()),
            Self::Rsa(key) => DecodingKey::from_rsa_raw_components(&key.n_bytes(), &key.e_bytes()),
        }
    }

    /// The JWK members that RFC 7638 hashes, in its (lexicographic) order.
    fn required_members(&self) -> Vec<(&'static str, String)> {
        match self {
            Self::Ed25519(key) => {
                vec![("crv", "Ed25519".into()), ("kty", "OKP".into()), ("x", b64(key.as_bytes()))]
            }
            Self::P256(key) => {
                // Uncompressed, so both coordinates are always there.
                let point = key.to_sec1_point(false);
                let (x, y) = (
                    point.x().map_or(&[][..], |x| x.as_slice()),
                    point.y().map_or(&[][..], |y| y.as_slice()),
                );
                vec![("crv", "P-256".into()), ("kty", "EC".into()), ("x", b64(x)), ("y", b64(y))]
            }
            Self::Rsa(key) => {
                vec![("e", b64(key.e_bytes())), ("kty", "RSA".into()), ("n", b64(key.n_bytes()))]
            }
        }
    }

    /// RFC 7638 JWK thumbprint: base64url SHA-256 of the required members as compact JSON with
    /// the names sorted. `ztseg token issue` puts it in `kid`; a PEM key file's key answers to it.
    pub fn thumbprint(&self) -> String {
        let members: Vec<String> = self
            .required_members()
            .into_iter()
            .map(|(name, value)| format!("\"{name}\":{}", Value::String(value)))
            .collect();
        b64(Sha256::digest(format!("{{{}}}", members.join(",")).as_bytes()))
    }

    /// The public JWK for a JWKS, with `alg`, `use` and `kid`.
    pub fn to_jwk(&self, kid: &str) -> Value {
        let mut jwk: Map<String, Value> = self
            .required_members()
            .into_iter()
            .map(|(name, value)| (name.to_owned(), value.into()))
            .collect();
        jwk.insert("alg".into(), self.alg_name().into());
        jwk.insert("use".into(), "sig".into());
        jwk.insert("kid".into(), kid.into());
        Value::Object(jwk)
    }

    /// A DER SubjectPublicKeyInfo ("BEGIN PUBLIC KEY").
    fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        let spki = SubjectPublicKeyInfoRef::try_from(der).map_err(|source| KeyError::Spki { source })?;
        let spki_error = |source| KeyError::Spki { source };
        let key = match spki.algorithm.oid {
            ED25519 => Self::Ed25519(Ed25519VerifyingKey::from_public_key_der(der).map_err(spki_error)?),
            EC_PUBLIC_KEY => {
                check_curve(spki.algorithm.parameters_oid().map_err(spki_error)?)?;
                Self::P256(p256::PublicKey::from_public_key_der(der).map_err(spki_error)?)
            }
            RSA_ENCRYPTION => Self::Rsa(rsa::PublicKey::from_public_key_der(der).map_err(spki_error)?),
            ED448 => return Err(KeyError::Ed448),
            oid => return Err(KeyError::UnsupportedAlgorithm { oid: oid.to_string() }),
        };
        key.checked()
    }

    /// One member of a JWKS `keys` array; returns the key and its `kid`, if it has one.
    fn from_jwk(index: usize, jwk: &Value) -> Result<(Option<String>, Self), KeyError> {
        let member_error = |member, problem| KeyError::JwkMember { index, member, problem };
        let Value::Object(jwk) = jwk else {
            return Err(KeyError::JwkNotObject { index });
        };
        let text = |member: &'static str| -> Result<Option<&str>, KeyError> {
            match jwk.get(member) {
                None => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(_) => Err(member_error(member, "must be a string")),
            }
        };
        let bytes = |member: &'static str| -> Result<Vec<u8>, KeyError> {
            let value = text(member)?.ok_or(member_error(member, "is missing"))?;
            URL_SAFE_NO_PAD.decode(value).map_err(|_| member_error(member, "is not unpadded base64url"))
        };
        for member in ["d", "p", "q", "dp", "dq", "qi", "k"] {
            if jwk.contains_key(member) {
                return Err(KeyError::PrivateJwk { index, member });
            }
        }
        let kty = text("kty")?.ok_or(member_error("kty", "is missing"))?;
        let crv = text("crv")?;
        let key = match (kty, crv) {
            ("OKP", Some("Ed25519")) => {
                let x: [u8; 32] =
                    bytes("x")?.try_into().map_err(|_| member_error("x", "is not 32 bytes long"))?;
                let key = Ed25519VerifyingKey::from_bytes(&x)
                    .map_err(|_| KeyError::InvalidKey { kind: "Ed25519" })?;
                Self::Ed25519(key)
            }
            ("EC", Some("P-256")) => {
                let (x, y) = (bytes("x")?, bytes("y")?);
                if x.len() != 32 || y.len() != 32 {
                    return Err(member_error("x", "and y must each be 32 bytes long"));
                }
                let point = [&[0x04][..], &x, &y].concat();
                let key = p256::PublicKey::from_sec1_bytes(&point)
                    .map_err(|_| KeyError::InvalidKey { kind: "EC P-256" })?;
                Self::P256(key)
            }
            ("RSA", _) => {
                let (n, e) = (bytes("n")?, bytes("e")?);
                let key = rsa::PublicKey::new(
                    BoxedUint::from_be_slice_vartime(&n),
                    BoxedUint::from_be_slice_vartime(&e),
                )
                .map_err(|_| KeyError::InvalidKey { kind: "RSA" })?;
                Self::Rsa(key)
            }
            (kty, crv) => {
                let crv = crv.map(|c| format!(" and crv {c:?}")).unwrap_or_default();
                return Err(KeyError::UnsupportedJwk { index, kty: kty.to_owned(), crv });
            }
        };
        if let Some(alg) = text("alg")?
            && alg != key.alg_name()
        {
            return Err(KeyError::JwkAlgMismatch { index, alg: alg.to_owned(), expected: key.alg_name() });
        }
        if let Some(use_) = text("use")?
            && use_ != "sig"
        {
            return Err(KeyError::JwkNotForSigning { index, use_: use_.to_owned() });
        }
        if let Some(ops) = jwk.get("key_ops")
            && !ops.as_array().is_some_and(|ops| ops.iter().any(|op| op == "verify"))
        {
            return Err(member_error("key_ops", "must be an array that includes \"verify\""));
        }
        Ok((text("kid")?.map(str::to_owned), key.checked()?))
    }

    /// Refuses keys that parse but must not be trusted.
    fn checked(self) -> Result<Self, KeyError> {
        match &self {
            Self::Ed25519(key) if key.is_weak() => Err(KeyError::WeakEd25519),
            Self::Rsa(key) if key.size() * 8 < MIN_RSA_BITS => {
                Err(KeyError::RsaTooSmall { bits: key.size() * 8 })
            }
            _ => Ok(self),
        }
    }
}

/// The trusted keys in a key file's text: a JWKS (each key's `kid` selects it; a key without one
/// answers to its thumbprint) or one PEM public key (which answers to its thumbprint).
pub(super) fn parse_public_keys(text: &str) -> Result<Vec<KeyEntry>, KeyError> {
    let text = text.trim();
    if text.starts_with('{') {
        return parse_jwks(text);
    }
    let label = pem::decode_label(text.as_bytes()).map_err(|source| KeyError::NotPem { source })?;
    let der_of =
        |text: &str| Document::from_pem(text).map(|(_, doc)| doc).map_err(|source| KeyError::Der { source });
    let key = match label {
        "PUBLIC KEY" => PublicKey::from_spki_der(der_of(text)?.as_bytes())?,
        "RSA PUBLIC KEY" => {
            let key = rsa::PublicKey::from_pkcs1_der(der_of(text)?.as_bytes())
                .map_err(|_| KeyError::InvalidKey { kind: "PKCS#1 RSA" })?;
            PublicKey::Rsa(key).checked()?
        }
        "CERTIFICATE" => return Err(KeyError::Certificate),
        label if label.contains("PRIVATE KEY") => {
            return Err(KeyError::PrivateKeyGiven { label: label.to_owned() });
        }
        label => return Err(KeyError::UnexpectedLabel { label: label.to_owned() }),
    };
    Ok(vec![KeyEntry { kid: key.thumbprint(), key }])
}

fn parse_jwks(text: &str) -> Result<Vec<KeyEntry>, KeyError> {
    #[derive(serde::Deserialize)]
    struct Jwks {
        keys: Vec<Value>,
    }
    let jwks: Jwks = serde_json::from_str(text).map_err(|source| KeyError::Jwks { source })?;
    if jwks.keys.is_empty() {
        return Err(KeyError::EmptyJwks);
    }
    let several = jwks.keys.len() > 1;
    let mut entries: Vec<KeyEntry> = Vec::with_capacity(jwks.keys.len());
    for (index, jwk) in jwks.keys.iter().enumerate() {
        let (kid, key) = PublicKey::from_jwk(index, jwk)?;
        let kid = match kid {
            Some(kid) => kid,
            None if several => return Err(KeyError::JwkWithoutKid { index }),
            None => key.thumbprint(),
        };
        if entries.iter().any(|e| e.kid == kid) {
            return Err(KeyError::DuplicateKid { kid });
        }
        entries.push(KeyEntry { kid, key });
    }
    Ok(entries)
}

/// A private key to sign with, its algorithm following from its PKCS#8 algorithm OID.
pub(super) struct SigningKey {
    pub encoding: EncodingKey,
    pub public: PublicKey,
}

impl SigningKey {
    /// A PKCS#8 PEM private key ("BEGIN PRIVATE KEY").
    pub fn from_pkcs8_pem(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let label = pem::decode_label(text.as_bytes()).map_err(|source| KeyError::NotPem { source })?;
        if label != "PRIVATE KEY" {
            let hint = match label {
                "RSA PRIVATE KEY" | "EC PRIVATE KEY" => {
                    "; convert it with `openssl pkcs8 -topk8 -nocrypt -in FILE -out FILE.pkcs8.pem`"
                }
                "ENCRYPTED PRIVATE KEY" => {
                    "; decrypt it with `openssl pkcs8 -nocrypt -in FILE -out FILE.plain.pem`"
                }
                _ => "",
            };
            return Err(KeyError::NotPkcs8PrivateKey { label: label.to_owned(), hint });
        }
        let (_, doc) = SecretDocument::from_pem(text).map_err(|source| KeyError::Der { source })?;
        let der = doc.as_bytes();
        let info = PrivateKeyInfoRef::try_from(der).map_err(|source| KeyError::Pkcs8 { source })?;
        let pkcs8_error = |source| KeyError::Pkcs8 { source };
        let (encoding, public) = match info.algorithm.oid {
            ED25519 => {
                let key = Ed25519SigningKey::from_pkcs8_der(der).map_err(pkcs8_error)?;
                (EncodingKey::from_ed_der(der), PublicKey::Ed25519(key.verifying_key()))
            }
            EC_PUBLIC_KEY => {
                check_curve(info.algorithm.parameters_oid().map_err(|source| KeyError::Spki { source })?)?;
                let key = p256::SecretKey::from_pkcs8_der(der).map_err(pkcs8_error)?;
                (EncodingKey::from_ec_der(der), PublicKey::P256(key.public_key()))
            }
            RSA_ENCRYPTION => {
                let key = rsa::PrivateKey::from_pkcs8_der(der).map_err(pkcs8_error)?;
                // jsonwebtoken's RSA signer takes the PKCS#1 key inside the PKCS#8 envelope.
                let pkcs1 = info.private_key.as_bytes();
                (EncodingKey::from_rsa_der(pkcs1), PublicKey::Rsa(key.to_public_key()))
            }
            ED448 => return Err(KeyError::Ed448),
            oid => return Err(KeyError::UnsupportedAlgorithm { oid: oid.to_string() }),
        };
        Ok(Self { encoding, public: public.checked()? })
    }
}

fn check_curve(curve: ObjectIdentifier) -> Result<(), KeyError> {
    if curve == P256 {
        return Ok(());
    }
    let name = match curve.to_string().as_str() {
        "1.3.132.0.34" => "P-384".to_owned(),
        "1.3.132.0.35" => "P-521".to_owned(),
        "1.3.132.0.10" => "secp256k1".to_owned(),
        oid => format!("with OID {oid}"),
    };
    Err(KeyError::UnsupportedCurve { curve: name })
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8037 appendix A.1/A.3: an Ed25519 public key and its RFC 7638 thumbprint.
    #[test]
    fn ed25519_thumbprint_matches_rfc_8037() {
        let jwk = serde_json::json!({
            "kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
        });
        let (kid, key) = PublicKey::from_jwk(0, &jwk).unwrap();
        assert_eq!(kid, None);
        assert_eq!(key.thumbprint(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k");
        assert_eq!(key.algorithm(), Algorithm::EdDSA);
    }

    /// RFC 7638 §3.1: the RSA example key and its thumbprint.
    #[test]
    fn rsa_thumbprint_matches_rfc_7638() {
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        let (kid, key) = PublicKey::from_jwk(0, &jwk).unwrap();
        assert_eq!(kid.as_deref(), Some("2011-04-29"));
        assert_eq!(key.thumbprint(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        assert_eq!(key.alg_name(), "RS256");
    }

    #[test]
    fn symmetric_and_private_jwks_are_refused() {
        let oct = r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#;
        assert!(matches!(parse_public_keys(oct), Err(KeyError::PrivateJwk { index: 0, member: "k" })));
        let oct = r#"{"keys":[{"kty":"oct"}]}"#;
        assert!(matches!(parse_public_keys(oct), Err(KeyError::UnsupportedJwk { .. })));
        let private = r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}]}"#;
        assert!(matches!(parse_public_keys(private), Err(KeyError::PrivateJwk { index: 0, member: "d" })));
        // Positive control: the same key without "d" loads.
        let public =
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#;
        assert_eq!(parse_public_keys(public).unwrap().len(), 1);
    }

    #[test]
    fn jwk_members_must_agree_with_the_key() {
        let x = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
        let jwks = |extra: &str| format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{x}"{extra}}}]}}"#);
        assert!(matches!(
            parse_public_keys(&jwks(r#","alg":"RS256""#)),
            Err(KeyError::JwkAlgMismatch { .. })
        ));
        assert!(matches!(
            parse_public_keys(&jwks(r#","use":"enc""#)),
            Err(KeyError::JwkNotForSigning { .. })
        ));
        assert!(matches!(
            parse_public_keys(&jwks(r#","key_ops":["sign"]"#)),
            Err(KeyError::JwkMember { .. })
        ));
        assert!(matches!(
            parse_public_keys(r#"{"keys":[{"kty":"OKP","crv":"Ed448","x":"AA"}]}"#),
            Err(KeyError::UnsupportedJwk { .. })
        ));
        assert!(matches!(parse_public_keys(r#"{"keys":[]}"#), Err(KeyError::EmptyJwks)));
        let ok = parse_public_keys(&jwks(r#","alg":"EdDSA","use":"sig","key_ops":["verify"],"kid":"k1""#))
            .unwrap();
        assert_eq!(ok[0].kid, "k1");
    }

    #[test]
    fn several_keys_need_distinct_kids() {
        let key = |kid: &str| {
            format!(
                r#"{{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"{kid}}}"#
            )
        };
        let two = |a: &str, b: &str| format!(r#"{{"keys":[{},{}]}}"#, key(a), key(b));
        assert!(matches!(
            parse_public_keys(&two(r#","kid":"a""#, "")),
            Err(KeyError::JwkWithoutKid { index: 1 })
        ));
        assert!(matches!(
            parse_public_keys(&two(r#","kid":"a""#, r#","kid":"a""#)),
            Err(KeyError::DuplicateKid { .. })
        ));
        assert_eq!(parse_public_keys(&two(r#","kid":"a""#, r#","kid":"b""#)).unwrap().len(), 2);
    }

    #[test]
    fn invalid_points_are_refused() {
        // (1, 1) is not on P-256: 1 != 1 - 3 + b.
        let one = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAE";
        let ec = format!(r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"{one}","y":"{one}"}}]}}"#);
        assert!(matches!(parse_public_keys(&ec), Err(KeyError::InvalidKey { kind: "EC P-256" })));
        // The Ed25519 identity point (small order) is weak.
        let weak =
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}]}"#;
        assert!(matches!(parse_public_keys(weak), Err(KeyError::WeakEd25519)));
    }

    #[test]
    fn pem_files_that_are_not_public_keys_are_refused_with_a_hint() {
        let pem = |label: &str| format!("-----BEGIN {label}-----\nMAA=\n-----END {label}-----\n");
        assert!(matches!(parse_public_keys(&pem("PRIVATE KEY")), Err(KeyError::PrivateKeyGiven { .. })));
        assert!(matches!(parse_public_keys(&pem("EC PRIVATE KEY")), Err(KeyError::PrivateKeyGiven { .. })));
        assert!(matches!(parse_public_keys(&pem("CERTIFICATE")), Err(KeyError::Certificate)));
        assert!(matches!(parse_public_keys(&pem("X509 CRL")), Err(KeyError::UnexpectedLabel { .. })));
        assert!(matches!(parse_public_keys("not a key"), Err(KeyError::NotPem { .. })));
        assert!(matches!(
            SigningKey::from_pkcs8_pem(&pem("PUBLIC KEY")),
            Err(KeyError::NotPkcs8PrivateKey { .. })
        ));
        let err = SigningKey::from_pkcs8_pem(&pem("RSA PRIVATE KEY")).err().unwrap().to_string();
        assert!(err.contains("openssl pkcs8 -topk8"), "{err}");
    }
}
