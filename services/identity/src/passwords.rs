//! Password hashing and verification (Argon2id), bounded: each check holds
//! about 19 MiB and a core while it runs, so only a few run at once. A call
//! that cannot start within a short wait is answered 503 with `Retry-After`
//! instead of queueing memory without end.

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use runtime::ApiError;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Argon2's working memory (`m_cost` blocks of 1 KiB): one per permit,
/// allocated once and reused, so a storm of checks neither allocates nor
/// leaves freed memory behind in the allocator's per-thread arenas.
type Memory = Vec<Block>;

pub struct Passwords {
    permits: Arc<Semaphore>,
    memories: Arc<Mutex<Vec<Memory>>>,
    wait: Duration,
}

/// A hash to verify against when the e-mail is unknown, so that the answer
/// takes as long as for a wrong password.
static DUMMY_HASH: LazyLock<String> =
    LazyLock::new(|| hash_with(b"not a password", &mut Vec::new()).expect("hashing a constant"));

/// Runs Argon2 in `memory` (grown to the parameters' size if need be).
fn argon2(
    algorithm: Algorithm,
    version: Version,
    params: Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
    memory: &mut Memory,
) -> Result<(), argon2::Error> {
    let blocks = params.block_count();
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    Argon2::new(algorithm, version, params).hash_password_into_with_memory(password, salt, out, &mut memory[..blocks])
}

/// A new PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) for `password`.
fn hash_with(password: &[u8], memory: &mut Memory) -> anyhow::Result<String> {
    let e = |e: argon2::password_hash::Error| anyhow::anyhow!("hashing: {e}");
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.as_salt().decode_b64(&mut salt_bytes).map_err(e)?;
    let params = Params::default();
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon2(Algorithm::Argon2id, Version::V0x13, params.clone(), password, salt_bytes, &mut out, memory)
        .map_err(|err| anyhow::anyhow!("hashing: {err}"))?;
    let phc = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(&params).map_err(e)?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out).map_err(e)?),
    };
    Ok(phc.to_string())
}

/// Whether `password` matches the PHC string `hash` (Argon2 only).
fn matches(password: &[u8], hash: &str, memory: &mut Memory) -> bool {
    let mut check = || -> Option<bool> {
        let phc = PasswordHash::new(hash).ok()?;
        let algorithm = Algorithm::try_from(phc.algorithm).ok()?;
        let version = phc.version.map(Version::try_from).transpose().ok()?.unwrap_or_default();
        let params = Params::try_from(&phc).ok()?;
        let expected = phc.hash?;
        let mut salt = [0u8; 64];
        let salt = phc.salt?.decode_b64(&mut salt).ok()?;
        let mut out = vec![0u8; expected.len()];
        argon2(algorithm, version, params, password, salt, &mut out, memory).ok()?;
        // Output's equality is constant-time.
        Some(Output::new(&out).ok()? == expected)
    };
    check().unwrap_or(false)
}

impl Passwords {
    /// At most `concurrency` hashes at once (0: one per core: Argon2 keeps a
    /// core busy, more at once only cost memory); a call waits at most `wait`
    /// for its turn.
    pub fn new(concurrency: usize, wait: Duration) -> Self {
        let concurrency = match concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Passwords { permits: Arc::new(Semaphore::new(concurrency)), memories: Arc::default(), wait }
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = match tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => {
                tracing::warn!("password checks saturated; shedding");
                return Err(ApiError::unavailable(
                    "too many password checks at once, try again",
                    Duration::from_secs(1),
                ));
            }
        };
        let memories = self.memories.clone();
        // The permit moves into the blocking task: a client that gives up
        // does not free it before the hash is done.
        tokio::task::spawn_blocking(move || {
            let mut memory = memories.lock().expect("not poisoned").pop().unwrap_or_default();
            let result = work(&mut memory);
            memories.lock().expect("not poisoned").push(memory);
            drop(permit);
            result
        })
        .await
        .map_err(ApiError::internal)
    }

    pub async fn hash(&self, password: String) -> Result<String, ApiError> {
        Ok(self.run(move |memory| hash_with(password.as_bytes(), memory)).await??)
    }

    /// Whether `password` matches `hash`; `None` (an unknown user) costs the
    /// same and never matches.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, ApiError> {
        self.run(move |memory| {
            let known = hash.is_some();
            let hash = hash.as_deref().unwrap_or(&DUMMY_HASH);
            matches(password.as_bytes(), hash, memory) && known
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

    #[test]
    fn hashes_are_standard_argon2id_and_verify_both_ways() {
        let mut memory = Vec::new();
        let hash = hash_with(b"correct horse", &mut memory).unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{hash}");
        // The crate's own verifier agrees (hashes stored before stay valid too).
        let phc = PasswordHash::new(&hash).unwrap();
        assert!(Argon2::default().verify_password(b"correct horse", &phc).is_ok());
        assert!(matches(b"correct horse", &hash, &mut memory));
        assert!(!matches(b"wrong horse", &hash, &mut memory));
        assert!(!matches(b"correct horse", "not a hash", &mut memory));
        let theirs =
            argon2::PasswordHasher::hash_password(&Argon2::default(), b"pw 12345", &SaltString::generate(&mut OsRng))
                .unwrap()
                .to_string();
        assert!(matches(b"pw 12345", &theirs, &mut memory));
    }
}
