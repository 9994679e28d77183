//! bcrypt hashing and verification, on the blocking pool so a 250 ms hash never stalls the
//! async runtime.

use std::sync::OnceLock;

use crate::domain::Password;

/// bcrypt failed, or its task did: a fault of the server, never of the password.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

fn hash_error(error: impl std::fmt::Display) -> HashError {
    HashError(error.to_string())
}

pub async fn hash(password: &Password, cost: u32) -> Result<String, HashError> {
    let password = password.expose().to_owned();
    tokio::task::spawn_blocking(move || bcrypt::hash(password.as_bytes(), cost))
        .await
        .map_err(hash_error)?
        .map_err(hash_error)
}

/// Verifies against `stored`, or, for an unknown user, against a dummy hash of the same cost so
/// both failures take the same time and an attacker cannot tell which names exist.
pub async fn verify(
    password: &Password,
    stored: Option<String>,
    cost: u32,
) -> Result<bool, HashError> {
    let known = stored.is_some();
    let hash = stored.unwrap_or_else(|| dummy_hash(cost));
    let password = password.expose().to_owned();
    let matches = tokio::task::spawn_blocking(move || bcrypt::verify(password.as_bytes(), &hash))
        .await
        .map_err(hash_error)?
        .map_err(hash_error)?;
    Ok(known && matches)
}

/// Whether a stored hash was made at another cost than the configured one. A successful login
/// re-hashes it, so after a change of `BCRYPT_COST` known names converge on the cost that
/// unknown names (the dummy hash) are verified at, and timing cannot tell them apart.
pub fn needs_rehash(stored: &str, cost: u32) -> bool {
    stored.get(4..6).and_then(|c| c.parse::<u32>().ok()) != Some(cost)
}

/// A well-formed bcrypt hash at `cost` that no password is known to match. It is made from one
/// cheap cost-4 hash with the cost field rewritten, so verifying against it runs the full work
/// factor without paying for a full hash at start-up.
fn dummy_hash(cost: u32) -> String {
    static BASE: OnceLock<String> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        bcrypt::hash_with_salt(b"no password matches this dummy", 4, *b"secure-messenger")
            .expect("cost 4 is valid")
            .format_for_version(bcrypt::Version::TwoB)
    });
    format!("$2b${cost:02}${}", &base[7..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_of_another_cost_need_a_rehash() {
        let pw = Password::parse("correct horse battery").unwrap();
        let hashed = hash(&pw, 4).await.unwrap();
        assert!(!needs_rehash(&hashed, 4));
        assert!(needs_rehash(&hashed, 5));
        assert!(!needs_rehash(&dummy_hash(12), 12));
        assert!(needs_rehash("garbage", 12));
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let pw = Password::parse("correct horse battery").unwrap();
        let hashed = hash(&pw, 4).await.unwrap();
        assert!(hashed.starts_with("$2b$04$"));
        assert!(verify(&pw, Some(hashed.clone()), 4).await.unwrap());
        let wrong = Password::parse("wrong horse battery").unwrap();
        assert!(!verify(&wrong, Some(hashed), 4).await.unwrap());
    }

    #[tokio::test]
    async fn seventy_two_bytes_all_count() {
        let a = Password::parse(&format!("{}a", "x".repeat(71))).unwrap();
        let b = Password::parse(&format!("{}b", "x".repeat(71))).unwrap();
        let hashed = hash(&a, 4).await.unwrap();
        assert!(verify(&a, Some(hashed.clone()), 4).await.unwrap());
        assert!(
            !verify(&b, Some(hashed), 4).await.unwrap(),
            "the 72nd byte matters"
        );
    }

    #[tokio::test]
    async fn bytes_after_a_nul_still_count() {
        let a = Password::parse("abcd\0efgh").unwrap();
        let b = Password::parse("abcd\0zzzz").unwrap();
        let hashed = hash(&a, 4).await.unwrap();
        assert!(verify(&a, Some(hashed.clone()), 4).await.unwrap());
        assert!(
            !verify(&b, Some(hashed), 4).await.unwrap(),
            "no truncation at NUL"
        );
    }

    #[tokio::test]
    async fn unknown_user_never_matches_and_runs_the_same_cost() {
        let pw = Password::parse("no password matches this dummy").unwrap();
        assert!(!verify(&pw, None, 4).await.unwrap());
        for cost in [4, 10, 12, 31] {
            let dummy = dummy_hash(cost);
            let parts: bcrypt::HashParts = dummy.parse().unwrap();
            assert_eq!(parts.get_cost(), cost);
            assert_eq!(dummy.len(), 60);
        }
    }
}
