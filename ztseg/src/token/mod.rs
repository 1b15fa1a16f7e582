//! Capability tokens: the signed JWTs an orchestrator grants an agent, verified before any rule
//! reaches the kernel; the replay cache that makes each `jti` single-use; and the key tools behind
//! `ztseg token keygen` and `ztseg token issue`.
//!
//! Verification refuses, in this order: anything that is not a compact signed JWT, `alg: none`,
//! an unknown `iss`, a `kid` naming no trusted key, an `alg` other than the one the selected key is
//! pinned to (which is how an HS256 token "signed" with the public key is stopped), a bad
//! signature, and then every claim rule (`exp`, `nbf`, `iat`, lifetime, `aud`, `jti`, `sub`,
//! `agent_id`, wildcard scopes). Each refusal is its own [`TokenError`] with a stable
//! [`TokenError::code`].

mod claims;
mod error;
mod issue;
mod keys;
mod replay;
mod revoked;
mod verify;

#[cfg(test)]
pub(crate) mod test_support;

pub use claims::Claims;
pub use error::{TokenCode, TokenError};
pub use issue::{
    DEFAULT_AUDIENCE, DEFAULT_TTL_SECONDS, IssueError, IssueParams, KeygenError, KeygenOutput, issue, keygen,
};
pub use keys::KeyError;
pub use replay::{ReplayCache, ReplayCacheError};
pub use revoked::{Revocations, Revoked};
pub use verify::{MAX_TOKEN_BYTES, TokenConfigError, Verifier};
