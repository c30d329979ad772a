//! SMTP AUTH credentials (`[relay] auth_users`): who may log in on the relay (submission) and
//! then relay to any domain.
//!
//! The file uses Dovecot's passwd-file format, so an operator can point mxlb at the file Dovecot
//! already uses: `user:{SCHEME}secret` with optional further `:`-separated fields, which are
//! ignored. Schemes: `{SHA512-CRYPT}` and `{SHA256-CRYPT}` (`$6$`/`$5$` crypt strings, checked
//! with the RustCrypto `sha-crypt` crate), and `{PLAIN}` for tests and migrations. Unknown
//! schemes are refused at load, with the file and line.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::RwLock,
};

/// A credentials file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Parse { path: String, line: usize, reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Secret {
    Plain(String),
    ShaCrypt(String),
}

/// The users who may authenticate; reloadable like the mailbox list.
#[derive(Debug)]
pub struct Credentials {
    path: PathBuf,
    users: RwLock<HashMap<String, Secret>>,
}

fn parse(text: &str, path: &Path) -> Result<HashMap<String, Secret>, AuthError> {
    let mut users = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim_end_matches('\r');
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let err = |reason: &str| AuthError::Parse { path: path.display().to_string(), line: i + 1, reason: reason.into() };
        let (user, rest) = line.split_once(':').ok_or_else(|| err("expected user:{SCHEME}secret"))?;
        let secret = rest.split(':').next().unwrap_or_default();
        if user.is_empty() || user.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("bad user name"));
        }
        let secret = if let Some(s) = secret.strip_prefix("{PLAIN}") {
            Secret::Plain(s.to_string())
        } else if let Some(s) = secret.strip_prefix("{SHA512-CRYPT}").or_else(|| secret.strip_prefix("{SHA256-CRYPT}")) {
            if !(s.starts_with("$6$") || s.starts_with("$5$")) {
                return Err(err("a SHA-CRYPT secret starts with $6$ or $5$"));
            }
            Secret::ShaCrypt(s.to_string())
        } else {
            return Err(err("unknown scheme (expected {SHA512-CRYPT}, {SHA256-CRYPT} or {PLAIN})"));
        };
        if users.insert(user.to_ascii_lowercase(), secret).is_some() {
            return Err(err("user listed twice"));
        }
    }
    Ok(users)
}

fn read(path: &Path) -> Result<HashMap<String, Secret>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Io { path: path.display().to_string(), source })?;
    parse(&text, path)
}

/// Equal in time independent of where the inputs differ (no timing oracle on passwords).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Credentials, AuthError> {
        Ok(Credentials { users: RwLock::new(read(path)?), path: path.to_path_buf() })
    }

    /// Re-reads the file; on error the old users stay.
    pub fn reload(&self) -> Result<usize, AuthError> {
        let users = read(&self.path)?;
        let n = users.len();
        *self.users.write().unwrap_or_else(|p| p.into_inner()) = users;
        Ok(n)
    }

    /// Whether `password` is `user`'s (user names are case-insensitive). Blocking: a crypt
    /// check costs milliseconds by design, so callers run it off the async threads.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        let secret = self.users.read().unwrap_or_else(|p| p.into_inner()).get(&user.to_ascii_lowercase()).cloned();
        match secret {
            Some(Secret::Plain(s)) => same(s.as_bytes(), password.as_bytes()),
            Some(Secret::ShaCrypt(h)) if h.starts_with("$6$") => sha_crypt::sha512_check(password, &h).is_ok(),
            Some(Secret::ShaCrypt(h)) => sha_crypt::sha256_check(password, &h).is_ok(),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_file_users_verify_and_errors_name_the_line() {
        let dir = std::env::temp_dir().join(format!("mxlb-auth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("users");
        let hashed = sha_crypt::sha512_simple("s3cret", &sha_crypt::Sha512Params::new(5000).unwrap()).unwrap();
        std::fs::write(&path, format!("# users\nalice@example.net:{{SHA512-CRYPT}}{hashed}:1000:1000::/home/a::\nbob:{{PLAIN}}pw\n")).unwrap();
        let c = Credentials::load(&path).unwrap();
        assert!(c.verify("alice@example.net", "s3cret"));
        assert!(c.verify("ALICE@example.net", "s3cret"), "user names are case-insensitive");
        assert!(!c.verify("alice@example.net", "s3cret "));
        assert!(c.verify("bob", "pw") && !c.verify("bob", "PW") && !c.verify("carol", "pw"));
        std::fs::write(&path, "bob:{PLAIN}pw\neve:{MD5}x\n").unwrap();
        let e = c.reload().unwrap_err().to_string();
        assert!(e.ends_with(":2: unknown scheme (expected {SHA512-CRYPT}, {SHA256-CRYPT} or {PLAIN})"), "{e}");
        assert!(c.verify("alice@example.net", "s3cret"), "a broken reload keeps the old users");
        std::fs::write(&path, "bob:{PLAIN}new\n").unwrap();
        assert_eq!(c.reload().unwrap(), 1);
        assert!(c.verify("bob", "new") && !c.verify("alice@example.net", "s3cret"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
