//! Token interoperability with PyJWT (Debian's python3-jwt with `cryptography`): tokens PyJWT
//! issues (EdDSA and ES256) verify in ztseg, and tokens ztseg issues verify in PyJWT, with the
//! public key as PEM and as ztseg's JWKS. No root and no kernel needed, but it runs with the
//! integration tests because it drives the real binary.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::{fs, process::Command};

use serde_json::Value;
use ztseg_integration::{TempDir, bin};

const PYTHON: &str = "/usr/bin/python3";

fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new(PYTHON).arg("-c").arg(script).args(args).output().expect("run /usr/bin/python3");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Makes a key pair of `kind` (ed25519 | p256) in DIR, writes DIR/<kind>.pub.pem, and prints a
/// token PyJWT signed with it for agent "py-agent".
const PYJWT_ISSUE: &str = r#"
import sys, time, jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, ec
kind, out = sys.argv[1], sys.argv[2]
key = ed25519.Ed25519PrivateKey.generate() if kind == "ed25519" else ec.generate_private_key(ec.SECP256R1())
alg = "EdDSA" if kind == "ed25519" else "ES256"
pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
open(f"{out}/{kind}.pub.pem", "wb").write(pub)
now = int(time.time())
claims = {"iss": "py-orchestrator", "aud": "ztseg", "sub": "py-agent", "jti": f"py-{kind}", "iat": now,
          "nbf": now, "exp": now + 120, "op": "interop", "scope": "read:a read:b", "tools": ["pandas"]}
print(jwt.encode(claims, key, algorithm=alg))
"#;

/// Verifies argv[1] with the PEM public key argv[2] (or, with argv[3] = "jwks", the first key of
/// the JWKS file argv[2]) for algorithm EdDSA, and prints the claims as JSON.
const PYJWT_VERIFY: &str = r#"
import sys, json, jwt
token, keyfile = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3 and sys.argv[3] == "jwks":
    key = jwt.PyJWK(json.load(open(keyfile))["keys"][0]).key
else:
    key = open(keyfile, "rb").read()
print(json.dumps(jwt.decode(token, key, algorithms=["EdDSA"], audience="ztseg")))
"#;

#[test]
fn tokens_issued_by_pyjwt_verify_in_ztseg() {
    let dir = TempDir::new("ztseg-interop");
    for (kind, alg) in [("ed25519", "EdDSA"), ("p256", "ES256")] {
        let token = python(PYJWT_ISSUE, &[kind, dir.path.to_str().unwrap()]);
        let config = dir.path.join(format!("{kind}.toml"));
        fs::write(
            &config,
            format!(
                "[[issuers]]\niss = \"py-orchestrator\"\nkey = {:?}\nalgorithms = [\"{alg}\"]\n",
                dir.path.join(format!("{kind}.pub.pem"))
            ),
        )
        .unwrap();
        let out = Command::new(bin("ztseg"))
            .args(["token", "inspect", "--config"])
            .arg(&config)
            .arg(token.trim())
            .output()
            .unwrap();
        assert!(out.status.success(), "{kind}: {}", String::from_utf8_lossy(&out.stderr));
        let claims: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(claims["sub"], "py-agent");
        assert_eq!(claims["jti"], format!("py-{kind}"));
        assert_eq!(claims["alg"], alg);
        assert_eq!(claims["scope"], serde_json::json!(["read:a", "read:b"]));
        assert_eq!(claims["tools"], serde_json::json!(["pandas"]));
        // Negative control: the same token under an issuer pinned to the other algorithm fails.
        let other = if alg == "EdDSA" { "ES256" } else { "EdDSA" };
        fs::write(
            &config,
            format!(
                "[[issuers]]\niss = \"py-orchestrator\"\nkey = {:?}\nalgorithms = [\"{other}\"]\n",
                dir.path.join(format!("{kind}.pub.pem"))
            ),
        )
        .unwrap();
        let out = Command::new(bin("ztseg"))
            .args(["token", "inspect", "--config"])
            .arg(&config)
            .arg(token.trim())
            .output()
            .unwrap();
        assert_ne!(out.status.code(), Some(0), "{kind} accepted under the wrong pin");
    }
}

#[test]
fn tokens_issued_by_ztseg_verify_in_pyjwt() {
    let dir = TempDir::new("ztseg-interop");
    let keys = dir.path.join("keys");
    let status =
        Command::new(bin("ztseg")).args(["token", "keygen", "--out"]).arg(&keys).output().unwrap().status;
    assert!(status.success());
    let out = Command::new(bin("ztseg"))
        .args(["token", "issue", "--key"])
        .arg(keys.join("ed25519.pem"))
        .args(["--iss", "orch", "--agent", "analyst-7", "--op", "report", "--scope", "read:x"])
        .args(["--tool", "pandas", "--forbid", "bash", "--ttl", "60", "--max-tokens", "5000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let token = token.trim();
    for how in [
        &[keys.join("ed25519.pub.pem").to_str().unwrap().to_owned()][..],
        &[keys.join("jwks.json").to_str().unwrap().to_owned(), "jwks".to_owned()],
    ] {
        let mut args = vec![token];
        args.extend(how.iter().map(String::as_str));
        let claims: Value = serde_json::from_str(&python(PYJWT_VERIFY, &args)).unwrap();
        assert_eq!(claims["sub"], "analyst-7");
        assert_eq!(claims["iss"], "orch");
        assert_eq!(claims["op"], "report");
        assert_eq!(claims["scope"], serde_json::json!(["read:x"]));
        assert_eq!(claims["forbidden_tools"], serde_json::json!(["bash"]));
        assert_eq!(claims["max_tokens"], 5000);
        assert_eq!(claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(), 60);
    }
    // Negative control: PyJWT refuses it under another key.
    let other = dir.path.join("other");
    let status =
        Command::new(bin("ztseg")).args(["token", "keygen", "--out"]).arg(&other).output().unwrap().status;
    assert!(status.success());
    let out = Command::new(PYTHON)
        .arg("-c")
        .arg(PYJWT_VERIFY)
        .arg(token)
        .arg(other.join("ed25519.pub.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "PyJWT accepted a token under the wrong key");
}
