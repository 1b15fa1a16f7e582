//! A token's header and claims as ztseg reads them, and the claim rules.
//!
//! Both JSON parts are read into structs whose fields are the names ztseg knows, so a part that
//! repeats one of them (`{"alg":"EdDSA","alg":"none"}`) is malformed rather than read one way here
//! and another way by jsonwebtoken.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize, Serializer, de::DeserializeOwned};
use serde_json::Value;

use super::TokenError;
use crate::agent_id::AgentId;

/// Longest accepted `jti`; each one is kept in the replay cache until its token expires.
pub const MAX_JTI_LEN: usize = 256;

/// The claims of a verified token, plus the header's `alg` and `kid`. Serializes to the JSON that
/// `ztseg token inspect` prints; absent optional values are `null`, absent lists are `[]`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    #[serde(serialize_with = "serialize_agent")]
    pub sub: AgentId,
    /// The audiences as the token gives them (a single string becomes a one-element list).
    pub aud: Vec<String>,
    pub jti: String,
    pub iat: u64,
    pub nbf: Option<u64>,
    pub exp: u64,
    /// The operation this grant is for.
    pub op: Option<String>,
    /// Catalogue scopes, normalised to a list whether the token has an array or an OAuth
    /// space-separated string.
    pub scope: Vec<String>,
    pub tools: Vec<String>,
    pub forbidden_tools: Vec<String>,
    pub max_tokens: Option<u64>,
    /// The header's algorithm (always the selected key's pinned one).
    pub alg: String,
    /// The header's key id, if it had one.
    pub kid: Option<String>,
}

fn serialize_agent<S: Serializer>(agent: &AgentId, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(agent.as_str())
}

/// The limits a verifier applies to claims.
pub(super) struct Rules<'a> {
    pub audience: &'a str,
    pub max_ttl_seconds: u64,
    pub leeway_seconds: u64,
}

/// The header fields ztseg reads before choosing a key.
#[derive(Debug)]
pub(super) struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<Value>,
    kid: Option<Value>,
    crit: Option<Value>,
}

impl Header {
    /// Reads the (still unverified) header segment. `alg: none` in any spelling is refused here,
    /// before anything else about the token is looked at.
    pub fn parse(segment: &str) -> Result<Self, TokenError> {
        let raw: RawHeader = parse_segment(segment, "header")?;
        let alg = match raw.alg {
            Some(Value::String(alg)) => alg,
            None => return Err(TokenError::BadHeader { name: "alg", problem: "is missing" }),
            Some(_) => return Err(TokenError::BadHeader { name: "alg", problem: "must be a string" }),
        };
        if alg.trim().eq_ignore_ascii_case("none") {
            return Err(TokenError::AlgNone { alg });
        }
        let kid = match raw.kid {
            None => None,
            Some(Value::String(kid)) => Some(kid),
            Some(_) => return Err(TokenError::BadHeader { name: "kid", problem: "must be a string" }),
        };
        if raw.crit.is_some() {
            return Err(TokenError::BadHeader {
                name: "crit",
                problem: "lists extensions that must be understood, and ztseg understands none",
            });
        }
        Ok(Self { alg, kid })
    }
}

/// The payload with every claim ztseg knows, each still untyped. JSON `null` reads as absent.
#[derive(Debug, Deserialize)]
pub(super) struct RawClaims {
    iss: Option<Value>,
    sub: Option<Value>,
    aud: Option<Value>,
    jti: Option<Value>,
    iat: Option<Value>,
    nbf: Option<Value>,
    exp: Option<Value>,
    op: Option<Value>,
    scope: Option<Value>,
    tools: Option<Value>,
    forbidden_tools: Option<Value>,
    max_tokens: Option<Value>,
    agent_id: Option<Value>,
}

impl RawClaims {
    /// Reads the payload segment (unverified until the signature has been checked).
    pub fn parse(segment: &str) -> Result<Self, TokenError> {
        parse_segment(segment, "payload")
    }

    /// The `iss` claim, which selects the issuer and so the trusted keys.
    pub fn issuer(&self) -> Result<&str, TokenError> {
        match &self.iss {
            Some(Value::String(iss)) => Ok(iss),
            None => Err(TokenError::MissingClaim { claim: "iss" }),
            Some(_) => Err(TokenError::InvalidClaim { claim: "iss", expected: expected("iss") }),
        }
    }

    /// Whether one of the registered claims jsonwebtoken checks is present (with any type).
    pub fn has(&self, claim: &str) -> bool {
        match claim {
            "iss" => self.iss.is_some(),
            "sub" => self.sub.is_some(),
            "aud" => self.aud.is_some(),
            "exp" => self.exp.is_some(),
            "nbf" => self.nbf.is_some(),
            _ => false,
        }
    }

    /// `aud` as given, for error messages; an ill-typed value reads as no audience.
    pub fn audience_as_given(&self) -> Vec<String> {
        audience(self.aud.as_ref()).ok().flatten().unwrap_or_default()
    }

    /// Applies every claim rule to a payload whose signature has been verified.
    pub fn into_claims(self, header: Header, rules: &Rules<'_>, now: u64) -> Result<Claims, TokenError> {
        let iss = self.issuer()?.to_owned();
        let (iat, nbf, exp) = self.times(rules, now)?;

        let aud = audience(self.aud.as_ref())?.ok_or(TokenError::MissingClaim { claim: "aud" })?;
        if !aud.iter().any(|a| a == rules.audience) {
            return Err(TokenError::WrongAudience { aud, expected: rules.audience.to_owned() });
        }

        let jti = string("jti", self.jti.as_ref())?.ok_or(TokenError::MissingClaim { claim: "jti" })?;
        if jti.is_empty() || jti.len() > MAX_JTI_LEN {
            return Err(TokenError::InvalidClaim { claim: "jti", expected: expected("jti") });
        }

        let sub = string("sub", self.sub.as_ref())?.ok_or(TokenError::MissingClaim { claim: "sub" })?;
        if let Some(agent_id) = string("agent_id", self.agent_id.as_ref())?
            && agent_id != sub
        {
            return Err(TokenError::SubjectMismatch { sub, agent_id });
        }
        let sub: AgentId = sub.parse().map_err(|source| TokenError::InvalidSubject { source })?;

        let scope = match &self.scope {
            Some(Value::String(scopes)) => scopes.split_whitespace().map(str::to_owned).collect(),
            other => string_list("scope", other.as_ref())?,
        };
        let tools = string_list("tools", self.tools.as_ref())?;
        for (claim, list) in [("scope", &scope), ("tools", &tools)] {
            if let Some(wild) = list.iter().find(|v| v.contains('*')) {
                return Err(TokenError::WildcardScope { claim, value: wild.clone() });
            }
        }
        let forbidden_tools = string_list("forbidden_tools", self.forbidden_tools.as_ref())?;
        let op = string("op", self.op.as_ref())?;
        let max_tokens =
            match &self.max_tokens {
                None => None,
                Some(v) => Some(v.as_u64().ok_or(TokenError::InvalidClaim {
                    claim: "max_tokens",
                    expected: expected("max_tokens"),
                })?),
            };

        Ok(Claims {
            iss,
            sub,
            aud,
            jti,
            iat,
            nbf,
            exp,
            op,
            scope,
            tools,
            forbidden_tools,
            max_tokens,
            alg: header.alg,
            kid: header.kid,
        })
    }
    /// `exp`, `nbf` and `iat` against `now` with the leeway, and the lifetime against the maximum.
    fn times(&self, rules: &Rules<'_>, now: u64) -> Result<(u64, Option<u64>, u64), TokenError> {
        let leeway = rules.leeway_seconds;
        let exp = numeric_date("exp", self.exp.as_ref(), Round::Down)?
            .ok_or(TokenError::MissingClaim { claim: "exp" })?;
        let nbf = numeric_date("nbf", self.nbf.as_ref(), Round::Up)?;
        let iat = numeric_date("iat", self.iat.as_ref(), Round::Down)?
            .ok_or(TokenError::MissingClaim { claim: "iat" })?;

        if now > exp.saturating_add(leeway) {
            return Err(TokenError::Expired { exp, now, leeway });
        }
        if let Some(nbf) = nbf
            && nbf > now.saturating_add(leeway)
        {
            return Err(TokenError::NotYetValid { nbf, now, leeway });
        }
        if iat > now.saturating_add(leeway) {
            return Err(TokenError::IssuedInFuture { iat, now, leeway });
        }
        let start = nbf.map_or(iat, |nbf| nbf.max(iat));
        if exp <= start {
            return Err(TokenError::InvalidClaim { claim: "exp", expected: "later than iat and nbf" });
        }
        if exp - start > rules.max_ttl_seconds {
            return Err(TokenError::LifetimeTooLong { lifetime: exp - start, max: rules.max_ttl_seconds });
        }
        Ok((iat, nbf, exp))
    }
}

/// What a claim must look like, for [`TokenError::InvalidClaim`].
pub(super) fn expected(claim: &str) -> &'static str {
    match claim {
        "exp" | "nbf" | "iat" => "a non-negative number of seconds since the Unix epoch",
        "aud" => "a string or an array of strings",
        "jti" => "a non-empty string of at most 256 bytes",
        "scope" => "an array of non-empty strings or a space-separated string",
        "tools" | "forbidden_tools" => "an array of non-empty strings",
        "max_tokens" => "a non-negative integer",
        _ => "a string",
    }
}

fn parse_segment<T: DeserializeOwned>(segment: &str, part: &'static str) -> Result<T, TokenError> {
    let json = URL_SAFE_NO_PAD.decode(segment).map_err(|_| TokenError::Base64 { part })?;
    // serde reads a struct from a JSON array too; a JWT part is an object and nothing else.
    if json.trim_ascii_start().first() != Some(&b'{') {
        return Err(TokenError::NotAnObject { part });
    }
    serde_json::from_slice(&json).map_err(|source| TokenError::Json { part, source })
}

fn string(claim: &'static str, value: Option<&Value>) -> Result<Option<String>, TokenError> {
    match value {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenError::InvalidClaim { claim, expected: expected(claim) }),
    }
}

fn string_list(claim: &'static str, value: Option<&Value>) -> Result<Vec<String>, TokenError> {
    let invalid = || TokenError::InvalidClaim { claim, expected: expected(claim) };
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) if !s.is_empty() => Ok(s.clone()),
                _ => Err(invalid()),
            })
            .collect(),
        Some(_) => Err(invalid()),
    }
}

fn audience(value: Option<&Value>) -> Result<Option<Vec<String>>, TokenError> {
    match value {
        None => Ok(None),
        Some(Value::String(aud)) => Ok(Some(vec![aud.clone()])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or(TokenError::InvalidClaim { claim: "aud", expected: expected("aud") }),
        Some(_) => Err(TokenError::InvalidClaim { claim: "aud", expected: expected("aud") }),
    }
}

/// How a fractional NumericDate becomes whole seconds.
#[derive(Clone, Copy)]
enum Round {
    /// `exp` ends at the whole second before it; `iat` (which only bounds the lifetime and must
    /// not be in the future) counts from the second before it, so a token made a moment ago with
    /// `time.time()` is not "issued in the future".
    Down,
    /// `nbf` starts at the whole second after it.
    Up,
}

/// A NumericDate (RFC 7519 §2): integer seconds, or a non-integer one rounded as [`Round`] says.
fn numeric_date(claim: &'static str, value: Option<&Value>, round: Round) -> Result<Option<u64>, TokenError> {
    let invalid = || TokenError::InvalidClaim { claim, expected: expected(claim) };
    let Some(value) = value else { return Ok(None) };
    let Value::Number(n) = value else { return Err(invalid()) };
    if let Some(secs) = n.as_u64() {
        return Ok(Some(secs));
    }
    match n.as_f64() {
        // 1e15 s is thirty million years: anything beyond is a bug or an attack, not a date.
        Some(f) if f.is_finite() && (0.0..1e15).contains(&f) => {
            let secs = match round {
                Round::Down => f.floor(),
                Round::Up => f.ceil(),
            };
            Ok(Some(secs as u64))
        }
        _ => Err(invalid()),
    }
}
