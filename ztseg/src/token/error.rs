//! Why a token was refused: one variant per rule, each naming the claim or header at fault.

use crate::agent_id::InvalidAgentId;

/// A refused token. `Display` is one sentence for the operator; [`TokenError::code`] is the stable
/// machine-readable reason (audit log, `ztseg token inspect`, control socket replies).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token is empty")]
    Empty,
    #[error("token is {bytes} bytes long, more than the {max} bytes a ztseg token may have")]
    TooLong { bytes: usize, max: usize },
    #[error(
        "token has {parts} dot-separated parts, but a signed JWT (JWS compact serialization) has exactly 3"
    )]
    Shape { parts: usize },
    #[error("token {part} is not valid unpadded base64url")]
    Base64 { part: &'static str },
    #[error("token {part} is not a JSON object")]
    NotAnObject { part: &'static str },
    #[error("token {part} is not valid JSON: {source}")]
    Json { part: &'static str, source: serde_json::Error },
    #[error("token header {name} {problem}")]
    BadHeader { name: &'static str, problem: &'static str },
    #[error("token header alg {alg:?} is refused: unsigned tokens are never accepted")]
    AlgNone { alg: String },
    #[error("token header alg {alg:?} is refused: key {kid:?} of issuer {iss:?} is pinned to {expected}")]
    AlgNotPinned { alg: String, iss: String, kid: String, expected: &'static str },
    #[error("token claim iss {iss:?} is not a configured issuer")]
    UnknownIssuer { iss: String },
    #[error("token header kid {kid:?} names no trusted key of issuer {iss:?}")]
    UnknownKid { iss: String, kid: String },
    #[error("token header has no kid, but issuer {iss:?} has {keys} keys, so the token must name one")]
    MissingKid { iss: String, keys: usize },
    #[error("token signature does not verify with key {kid:?} of issuer {iss:?}")]
    BadSignature { iss: String, kid: String },
    #[error("token was refused by the JWT verifier: {source}")]
    Rejected { source: jsonwebtoken::errors::Error },
    #[error("token claim {claim} is missing")]
    MissingClaim { claim: &'static str },
    #[error("token claim {claim} must be {expected}")]
    InvalidClaim { claim: &'static str, expected: &'static str },
    #[error("token claim exp ({exp}) has passed (now {now}, leeway {leeway} s)")]
    Expired { exp: u64, now: u64, leeway: u64 },
    #[error("token claim nbf ({nbf}) is still in the future (now {now}, leeway {leeway} s)")]
    NotYetValid { nbf: u64, now: u64, leeway: u64 },
    #[error("token claim iat ({iat}) is in the future (now {now}, leeway {leeway} s)")]
    IssuedInFuture { iat: u64, now: u64, leeway: u64 },
    #[error("token claim aud {aud:?} does not include this host's audience {expected:?}")]
    WrongAudience { aud: Vec<String>, expected: String },
    #[error(
        "token lifetime (claim exp minus the later of iat and nbf) is {lifetime} s, more than max_ttl_seconds = {max}"
    )]
    LifetimeTooLong { lifetime: u64, max: u64 },
    #[error("token claim agent_id {agent_id:?} does not match claim sub {sub:?}")]
    SubjectMismatch { sub: String, agent_id: String },
    #[error("token claim sub is not a valid agent id: {source}")]
    InvalidSubject { source: InvalidAgentId },
    #[error("token claim {claim} has {value:?}, a wildcard; grants must name exact scopes and tools")]
    WildcardScope { claim: &'static str, value: String },
    #[error("token claim sub says it is for agent {sub:?}, not agent {agent:?}")]
    WrongAgent { sub: String, agent: String },
    #[error(
        "token claim jti {jti:?} was already used by another token or another agent; a jti is single-use"
    )]
    Replayed { jti: String },
}

impl TokenError {
    /// The stable machine-readable reason, for machines: audit records, JSON replies, tests
    /// outside this repository. Never changes for an existing refusal.
    pub fn code(&self) -> TokenCode {
        match self {
            Self::Empty
            | Self::TooLong { .. }
            | Self::Shape { .. }
            | Self::Base64 { .. }
            | Self::NotAnObject { .. }
            | Self::Json { .. }
            | Self::BadHeader { .. }
            | Self::Rejected { .. } => TokenCode::Malformed,
            Self::AlgNone { .. } => TokenCode::AlgNone,
            Self::AlgNotPinned { .. } => TokenCode::AlgNotPinned,
            Self::UnknownIssuer { .. } => TokenCode::UnknownIssuer,
            Self::UnknownKid { .. } => TokenCode::UnknownKid,
            Self::MissingKid { .. } => TokenCode::MissingKid,
            Self::BadSignature { .. } => TokenCode::BadSignature,
            Self::MissingClaim { .. } => TokenCode::MissingClaim,
            Self::InvalidClaim { .. } => TokenCode::InvalidClaim,
            Self::Expired { .. } => TokenCode::Expired,
            Self::NotYetValid { .. } => TokenCode::NotYetValid,
            Self::IssuedInFuture { .. } => TokenCode::IssuedInFuture,
            Self::WrongAudience { .. } => TokenCode::WrongAudience,
            Self::LifetimeTooLong { .. } => TokenCode::LifetimeTooLong,
            Self::SubjectMismatch { .. } => TokenCode::SubjectMismatch,
            Self::InvalidSubject { .. } => TokenCode::InvalidSubject,
            Self::WildcardScope { .. } => TokenCode::WildcardScope,
            Self::WrongAgent { .. } => TokenCode::WrongAgent,
            Self::Replayed { .. } => TokenCode::Replay,
        }
    }
}

/// Why a token was refused, as a stable snake_case code ([`TokenError::code`]); serialised as
/// that string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenCode {
    Malformed,
    AlgNone,
    AlgNotPinned,
    UnknownIssuer,
    UnknownKid,
    MissingKid,
    BadSignature,
    MissingClaim,
    InvalidClaim,
    Expired,
    NotYetValid,
    IssuedInFuture,
    WrongAudience,
    LifetimeTooLong,
    SubjectMismatch,
    InvalidSubject,
    WildcardScope,
    WrongAgent,
    Replay,
}

impl TokenCode {
    /// Every code, for tests that check each one's spelling.
    pub const ALL: [Self; 19] = [
        Self::Malformed,
        Self::AlgNone,
        Self::AlgNotPinned,
        Self::UnknownIssuer,
        Self::UnknownKid,
        Self::MissingKid,
        Self::BadSignature,
        Self::MissingClaim,
        Self::InvalidClaim,
        Self::Expired,
        Self::NotYetValid,
        Self::IssuedInFuture,
        Self::WrongAudience,
        Self::LifetimeTooLong,
        Self::SubjectMismatch,
        Self::InvalidSubject,
        Self::WildcardScope,
        Self::WrongAgent,
        Self::Replay,
    ];

    /// The code as it appears on the wire and in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::AlgNone => "alg_none",
            Self::AlgNotPinned => "alg_not_pinned",
            Self::UnknownIssuer => "unknown_issuer",
            Self::UnknownKid => "unknown_kid",
            Self::MissingKid => "missing_kid",
            Self::BadSignature => "bad_signature",
            Self::MissingClaim => "missing_claim",
            Self::InvalidClaim => "invalid_claim",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::WrongAudience => "wrong_audience",
            Self::LifetimeTooLong => "lifetime_too_long",
            Self::SubjectMismatch => "subject_mismatch",
            Self::InvalidSubject => "invalid_subject",
            Self::WildcardScope => "wildcard_scope",
            Self::WrongAgent => "wrong_agent",
            Self::Replay => "replay",
        }
    }
}

impl std::fmt::Display for TokenCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::TokenCode;

    #[test]
    fn token_codes_serialise_as_their_stable_strings() {
        for code in TokenCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str(), "{code:?}");
            assert_eq!(serde_json::from_value::<TokenCode>(code.as_str().into()).unwrap(), code);
        }
    }
}
