//! Who is calling, and may they: passwords (argon2id), access tokens (short-lived HS256 JWTs
//! signed with a key generated on first start), refresh tokens (opaque, stored hashed, rotated on
//! every use), roles, per-client rate limits and per-account lockout.
//!
//! A refresh token is 32 random bytes, not a JWT, so it can never pass as an access token; an
//! access token carries `typ: "access"` and is checked for it. Every authenticated request
//! re-reads the user, so disabling a user or changing a role takes effect at once, not when the
//! token expires.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::{Store, StoreError, throttle};

/// Roles, each allowed what the one below it is and more.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything but users, API keys, settings and the audit log.
    Viewer,
    /// Also writes network objects (sites, links, topology, classes, policies).
    Operator,
    /// Also manages users, API keys and settings, and reads the audit log.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Random bytes from the operating system.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // getrandom fails only without an entropy source, where nothing here can be secure.
    if let Err(e) = getrandom::getrandom(&mut b) {
        panic!("no secure random source: {e}");
    }
    b
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// HMAC-SHA256 under `key` of `parts`, one after the other.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use hmac::Mac;
    let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC takes a key of any length")
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Lower-case hex.
pub fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Unpadded base64url.
pub fn b64url(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(B64URL[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// A name for signing key `key` that says nothing of it (an HMAC of a fixed text under it):
/// recorded in the database, so that a controller started with another key than the others is
/// refused (the tokens it issued would be refused by them) rather than found out by its users.
pub fn key_fingerprint(key: &[u8]) -> String {
    hex(&hmac_sha256(key, &[b"patronus access-token signing key fingerprint"])[..16])
}

/// The access-token key: read from `path`, or generated there (0600) when missing.
pub fn load_or_create_key(path: &Path) -> Result<Vec<u8>, StoreError> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |what: String| move |error| StoreError::Io { what, error };
    match std::fs::read(path) {
        Ok(key) => {
            let mode = std::fs::metadata(path)
                .map_err(io(format!("reading {}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(StoreError::Io {
                    what: format!("{}", path.display()),
                    error: std::io::Error::other(format!(
                        "the signing key is readable by others (mode {:o}); chmod 600 it",
                        mode & 0o777
                    )),
                });
            }
            if key.len() < 32 {
                return Err(StoreError::Io {
                    what: format!("{}", path.display()),
                    error: std::io::Error::other("the signing key must be at least 32 bytes"),
                });
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::store::create_private_dir(dir)?;
            }
            let key = random_bytes::<32>().to_vec();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(format!("creating {}", path.display())))?;
            f.write_all(&key)
                .and_then(|_| f.sync_all())
                .map_err(io(format!("writing {}", path.display())))?;
            Ok(key)
        }
        Err(error) => Err(StoreError::Io {
            what: format!("reading {}", path.display()),
            error,
        }),
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    pub role: Role,
    /// Always "access".
    pub typ: String,
    pub iat: i64,
    pub exp: i64,
    pub jti: String,
}

/// Signs and checks access tokens. The key can be replaced while the controller runs
/// ([`Tokens::replace`], after `patronus controller rotate-secrets`), and the controller can
/// be told its key is no longer the one every controller uses ([`Tokens::distrust`]): then it
/// signs nothing and accepts no access token until it has the right key.
pub struct Tokens {
    keys: std::sync::RwLock<Keys>,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
}

struct Keys {
    enc: EncodingKey,
    dec: DecodingKey,
    /// The key's [`key_fingerprint`].
    fingerprint: String,
    /// False once the database records another key as the one (this one was replaced).
    trusted: bool,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Tokens")
            .field("access_ttl", &self.access_ttl)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    pub fn new(key: &[u8], access_ttl: Duration, refresh_ttl: Duration) -> Self {
        Self {
            keys: std::sync::RwLock::new(Keys::of(key)),
            access_ttl,
            refresh_ttl,
        }
    }

    fn keys(&self) -> std::sync::RwLockReadGuard<'_, Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The key's fingerprint ([`key_fingerprint`]).
    pub fn fingerprint(&self) -> String {
        self.keys().fingerprint.clone()
    }

    /// Whether this key is the one every controller uses (as far as last checked).
    pub fn trusted(&self) -> bool {
        self.keys().trusted
    }

    /// Signs with `key` from now on: tokens signed with the one before are refused.
    pub fn replace(&self, key: &[u8]) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Keys::of(key);
    }

    /// The key was replaced elsewhere: sign nothing and accept nothing until [`Tokens::replace`].
    pub fn distrust(&self) {
        self.keys.write().unwrap_or_else(|e| e.into_inner()).trusted = false;
    }

    /// An access token for `user_id`; `None` while the key is distrusted.
    pub fn access(&self, user_id: i64, role: Role, now: i64) -> Option<String> {
        let claims = Claims {
            sub: user_id.to_string(),
            role,
            typ: "access".into(),
            iat: now,
            exp: now + self.access_ttl.as_secs() as i64,
            jti: b64url(&random_bytes::<12>()),
        };
        let keys = self.keys();
        // HS256 over our own claims cannot fail.
        keys.trusted.then(|| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.enc)
                .unwrap_or_default()
        })
    }

    /// The user id of a valid, unexpired access token.
    pub fn check_access(&self, token: &str) -> Option<i64> {
        let mut v = Validation::new(Algorithm::HS256);
        v.leeway = 0;
        v.set_required_spec_claims(&["exp", "sub"]);
        let keys = self.keys();
        if !keys.trusted {
            return None;
        }
        let data = jsonwebtoken::decode::<Claims>(token, &keys.dec, &v).ok()?;
        if data.claims.typ != "access" {
            return None;
        }
        data.claims.sub.parse().ok()
    }

    /// A new refresh token and the hash that is stored.
    pub fn refresh() -> (String, [u8; 32]) {
        let token = format!("prt_{}", b64url(&random_bytes::<32>()));
        let hash = sha256(token.as_bytes());
        (token, hash)
    }
}

impl Keys {
    fn of(key: &[u8]) -> Self {
        Self {
            enc: EncodingKey::from_secret(key),
            dec: DecodingKey::from_secret(key),
            fingerprint: key_fingerprint(key),
            trusted: true,
        }
    }
}

// ----- passwords -----

/// At least 12 characters and three of: lower case, upper case, digits, other; not containing
/// the account's email name.
pub fn password_problem(password: &str, email: &str) -> Option<String> {
    if password.chars().count() < 12 {
        return Some("must be at least 12 characters".into());
    }
    if password.chars().count() > 1024 {
        return Some("must be at most 1024 characters".into());
    }
    let classes = [
        password.chars().any(|c| c.is_lowercase()),
        password.chars().any(|c| c.is_uppercase()),
        password.chars().any(|c| c.is_ascii_digit()),
        password.chars().any(|c| !c.is_alphanumeric()),
    ]
    .iter()
    .filter(|&&b| b)
    .count();
    if classes < 3 {
        return Some(
            "must mix at least three of: lower case, upper case, digits, other characters".into(),
        );
    }
    let local = email.split('@').next().unwrap_or("").to_lowercase();
    if local.len() >= 4 && password.to_lowercase().contains(&local) {
        return Some("must not contain the email's name".into());
    }
    None
}

/// argon2id, the crate's default cost (19 MiB, 2 passes, 1 lane), random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::encode_b64(&random_bytes::<16>()).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the account does not exist, so that a login for an unknown
/// email takes as long as one with a wrong password.
pub fn dummy_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| hash_password("not the password of anyone").unwrap_or_default())
}

// ----- rate limits and lockout -----

/// Token buckets per client address: `per_minute` requests, refilled continuously. Each
/// controller keeps its own buckets as a first gate (what it refuses costs nothing more), and
/// the database keeps the shared ones ([`crate::store::throttle`]), so that the allowance is
/// one across every controller over it.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    local: Mutex<HashMap<IpAddr, (f64, i64)>>,
}

impl RateLimiter {
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            local: Mutex::new(HashMap::new()),
        }
    }

    fn cap(&self) -> f64 {
        f64::from(self.per_minute)
    }

    fn per_ms(&self) -> f64 {
        self.cap() / 60_000.0
    }

    /// `Ok(Ok)` to go on, or `Ok(Err(seconds))` to wait; one token taken from `ip`'s bucket,
    /// here and in the database.
    pub async fn check(
        &self,
        store: &Store,
        ip: IpAddr,
        now_ms: i64,
    ) -> Result<Result<(), u64>, sqlx::Error> {
        {
            let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
            if local.len() > 100_000 {
                // Forget full buckets rather than grow without bound under a spray of
                // addresses.
                let (cap, per_ms) = (self.cap(), self.per_ms());
                local.retain(|_, (tokens, at)| *tokens + (now_ms - *at) as f64 * per_ms < cap);
            }
            let bucket = local.get(&ip).copied();
            let (verdict, tokens) = self.take(bucket, now_ms);
            local.insert(ip, (tokens, now_ms.max(bucket.map_or(now_ms, |b| b.1))));
            if let Err(wait) = verdict {
                return Ok(Err(wait));
            }
        }
        let (taken, tokens) = throttle::take_token(
            &mut *store.conn().await?,
            &ip.to_string(),
            self.cap(),
            self.per_ms(),
            now_ms,
        )
        .await?;
        Ok(if taken {
            Ok(())
        } else {
            Err(self.wait_s(tokens))
        })
    }

    /// A bucket that held `bucket` (tokens, when counted), asked for one token at `now_ms`:
    /// the verdict, and the tokens left. A bucket counted "later" by a clock that is ahead is
    /// not refilled backwards. (The database's [`throttle::take_token`] is the same, in SQL.)
    fn take(&self, bucket: Option<(f64, i64)>, now_ms: i64) -> (Result<(), u64>, f64) {
        let cap = self.cap();
        let tokens = match bucket {
            Some((tokens, at)) => (tokens + (now_ms - at).max(0) as f64 * self.per_ms()).min(cap),
            None => cap,
        };
        if tokens >= 1.0 {
            (Ok(()), tokens - 1.0)
        } else {
            (Err(self.wait_s(tokens)), tokens)
        }
    }

    /// Seconds until a bucket holding `tokens` holds one.
    fn wait_s(&self, tokens: f64) -> u64 {
        (((1.0 - tokens).max(0.0) / self.per_ms() / 1000.0).ceil() as u64).max(1)
    }
}

/// Failed password checks per account (by the email given, existing or not, so that a lockout
/// says nothing about which accounts exist; kept as the SHA-256 of the email in lower case), in
/// the database and so counted across every controller. After `after` failures in a row the
/// account is locked for one minute, doubling with each further failure up to an hour; a
/// success clears it, and a count with no lock is forgotten after [`FAILURES_FORGOTTEN_MS`].
#[derive(Debug)]
pub struct Lockout {
    after: u32,
}

/// Failed checks in a row that led to no lock are forgotten this long after the last one.
pub const FAILURES_FORGOTTEN_MS: i64 = 24 * 3_600_000;

/// The key of `email`'s failure count: fixed in size whatever was typed, and no email at rest.
fn account(email: &str) -> String {
    hex(&sha256(email.to_lowercase().as_bytes()))
}

impl Lockout {
    pub fn new(after: u32) -> Self {
        Self {
            after: after.max(1),
        }
    }

    /// `Ok(Err(seconds))` while locked.
    pub async fn check(
        &self,
        store: &Store,
        email: &str,
        now_ms: i64,
    ) -> Result<Result<(), u64>, sqlx::Error> {
        let until = throttle::locked_until(&mut *store.conn().await?, &account(email)).await?;
        Ok(match until {
            Some(until) if until > now_ms => Err(((until - now_ms) as u64).div_ceil(1000)),
            _ => Ok(()),
        })
    }

    /// Counts a failure; returns the lock it starts, if the account is locked from now.
    pub async fn failed(
        &self,
        store: &Store,
        email: &str,
        now_ms: i64,
    ) -> Result<Option<Duration>, sqlx::Error> {
        let account = account(email);
        let mut conn = store.conn().await?;
        let n = throttle::count_failure(&mut conn, &account, now_ms).await?;
        let lock = self.lock_after(n);
        if let Some(l) = lock {
            throttle::lock(&mut conn, &account, now_ms + l.as_millis() as i64).await?;
        }
        Ok(lock)
    }

    /// The lock `n` failures in a row start, if any.
    fn lock_after(&self, n: i64) -> Option<Duration> {
        let after = i64::from(self.after);
        if n < after {
            return None;
        }
        let doublings = (n - after).min(6) as u32;
        Some(Duration::from_secs(60 << doublings).min(Duration::from_secs(3600)))
    }

    pub async fn succeeded(&self, store: &Store, email: &str) -> Result<(), sqlx::Error> {
        throttle::clear_failures(&mut *store.conn().await?, &account(email)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refresh_token_or_a_forged_or_expired_token_is_not_an_access_token() {
        let t = Tokens::new(&[7; 32], Duration::from_secs(60), Duration::from_secs(3600));
        let now = crate::store::now_s();
        let good = t.access(42, Role::Operator, now).unwrap();
        assert_eq!(t.check_access(&good), Some(42));
        let (refresh, _) = Tokens::refresh();
        assert_eq!(t.check_access(&refresh), None);
        let other = Tokens::new(&[8; 32], Duration::from_secs(60), Duration::from_secs(3600));
        assert_eq!(other.check_access(&good), None, "another key");
        let old = t.access(42, Role::Operator, now - 120).unwrap();
        assert_eq!(t.check_access(&old), None, "expired");
        // alg=none with the same claims.
        let parts: Vec<&str> = good.split('.').collect();
        let none = format!("{}.{}.", b64url(br#"{"alg":"none","typ":"JWT"}"#), parts[1]);
        assert_eq!(t.check_access(&none), None);
        // Replaced: the old key's tokens are refused; distrusted: nothing is signed or taken.
        t.replace(&[9; 32]);
        assert_eq!(t.check_access(&good), None, "signed with the key before");
        let fresh = t.access(42, Role::Operator, now).unwrap();
        assert_eq!(t.check_access(&fresh), Some(42));
        t.distrust();
        assert_eq!(t.check_access(&fresh), None);
        assert_eq!(t.access(42, Role::Operator, now), None);
    }

    #[test]
    fn base64url_matches_the_rfc_4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg"),
            ("fo", "Zm8"),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg"),
            ("fooba", "Zm9vYmE"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(b64url(i.as_bytes()), o);
        }
        assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
    }

    #[test]
    fn weak_passwords_are_refused_with_the_reason() {
        assert!(
            password_problem("short1A!", "a@b.c")
                .unwrap()
                .contains("12")
        );
        assert!(
            password_problem("alllowercaseletters", "a@b.c")
                .unwrap()
                .contains("three")
        );
        assert!(
            password_problem("Alice-Secret-99", "alice@x.org")
                .unwrap()
                .contains("email")
        );
        assert_eq!(password_problem("Correct-Horse-42", "alice@x.org"), None);
    }

    #[test]
    fn hashes_verify_only_their_password() {
        let h = hash_password("Correct-Horse-42").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("Correct-Horse-42", &h));
        assert!(!verify_password("Correct-Horse-43", &h));
        assert!(!verify_password("Correct-Horse-42", "not a hash"));
    }

    #[test]
    fn the_rate_limit_refills_and_the_lockout_doubles() {
        let r = RateLimiter::new(3);
        let now = 1_000_000;
        let mut bucket = None;
        for _ in 0..3 {
            let (verdict, left) = r.take(bucket, now);
            assert!(verdict.is_ok());
            bucket = Some((left, now));
        }
        let (verdict, left) = r.take(bucket, now);
        let wait = verdict.unwrap_err();
        assert!((1..=20).contains(&wait), "{wait}");
        assert!(r.take(Some((left, now)), now + 20_000).0.is_ok());
        // A bucket counted by a controller whose clock is ahead is not refilled backwards.
        assert!(r.take(Some((0.0, now + 5_000)), now).0.is_err());

        let l = Lockout::new(2);
        assert_eq!(l.lock_after(1), None);
        assert_eq!(l.lock_after(2), Some(Duration::from_secs(60)));
        assert_eq!(l.lock_after(3), Some(Duration::from_secs(120)));
        assert_eq!(l.lock_after(41), Some(Duration::from_secs(3600)));
        // One key per account, whatever the case, and of one size whatever was typed.
        assert_eq!(account("A@x"), account("a@X"));
        assert_eq!(account(&"a".repeat(100_000)).len(), 64);
    }
}
