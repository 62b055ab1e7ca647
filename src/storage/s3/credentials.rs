//! S3 credentials, found the way AWS tools find them, in this order:
//!
//! 1. `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`);
//! 2. the profile (`profile=` in the URL, else `AWS_PROFILE`, else `default`) in
//!    `~/.aws/credentials` (`AWS_SHARED_CREDENTIALS_FILE`) and `~/.aws/config`
//!    (`AWS_CONFIG_FILE`);
//! 3. container credentials: `AWS_CONTAINER_CREDENTIALS_FULL_URI` or
//!    `AWS_CONTAINER_CREDENTIALS_RELATIVE_URI` (ECS, EKS Pod Identity), with
//!    `AWS_CONTAINER_AUTHORIZATION_TOKEN` when set;
//! 4. the instance metadata service (EC2, IMDSv2), at `AWS_EC2_METADATA_SERVICE_ENDPOINT` or
//!    169.254.169.254, unless `AWS_EC2_METADATA_DISABLED=true`.
//!
//! Temporary credentials from 3 and 4 say when they expire; a run that outlives them fetches
//! them again [`REFRESH_BEFORE`] their expiry (the bucket client asks before each request), so
//! a push of many hours never signs with an expired key. Credentials from 1 and 2 do not
//! expire and are read once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rusty_s3::Credentials;
use serde::Deserialize;

use thiserror::Error;

/// No credentials were found.
#[derive(Debug, Error)]
#[error(
    "no S3 credentials found; looked in {looked}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add the profile to ~/.aws/credentials"
)]
pub struct CredentialsError {
    looked: String,
}

/// How long before their expiry temporary credentials are fetched again: the AWS SDKs' margin,
/// long enough for a request signed just before to reach the server.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);

/// Credentials and where they came from (for messages; never the secret).
pub struct Creds {
    pub creds: Credentials,
    pub source: String,
    /// When temporary credentials stop working; `None` for ones that do not expire.
    pub expires: Option<SystemTime>,
}

impl Creds {
    /// Credentials that do not expire.
    pub fn lasting(creds: Credentials, source: impl Into<String>) -> Creds {
        Creds { creds, source: source.into(), expires: None }
    }

    /// Whether they should be fetched again before signing at `now`.
    pub fn due(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| e.duration_since(now).unwrap_or_default() < REFRESH_BEFORE)
    }
}

/// Reads an AWS-style INI file: section name -> key -> value.
pub fn read_ini(path: &Path) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else { return out };
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.trim().to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            out.entry(section.clone()).or_default().insert(k.trim().to_owned(), v.trim().to_owned());
        }
    }
    out
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.trim().is_empty())
}

/// What the container and instance credential services answer.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Temporary {
    access_key_id: String,
    secret_access_key: String,
    token: Option<String>,
    /// RFC 3339; absent or unreadable: treated as not expiring (fetched once).
    expiration: Option<String>,
}

impl Temporary {
    fn into_creds(self, source: String) -> Creds {
        let expires =
            self.expiration.as_deref().and_then(|e| e.parse::<jiff::Timestamp>().ok()).map(SystemTime::from);
        Creds {
            creds: Credentials::new_with_token(
                self.access_key_id,
                self.secret_access_key,
                self.token.unwrap_or_default(),
            ),
            source,
            expires,
        }
    }
}

/// An HTTP client that gives up quickly: these services are local or absent.
fn local_agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::config::Config::builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(1)))
            .timeout_global(Some(Duration::from_secs(3)))
            .build(),
    )
}

/// Container credentials, when the environment points at them.
fn container() -> Option<Result<Creds, String>> {
    let uri = env("AWS_CONTAINER_CREDENTIALS_FULL_URI").or_else(|| {
        env("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI").map(|r| format!("http://169.254.170.2{r}"))
    })?;
    let mut req = local_agent().get(&uri);
    if let Some(token) = env("AWS_CONTAINER_AUTHORIZATION_TOKEN") {
        req = req.header("Authorization", token);
    }
    let source = format!("container credentials at {uri}");
    Some(match req.call() {
        Ok(mut r) if r.status().is_success() => r
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_str::<Temporary>(&b).map_err(|e| e.to_string()))
            .map(|t| t.into_creds(source))
            .map_err(|e| format!("{uri} answered something other than credentials: {e}")),
        Ok(r) => Err(format!("{uri} answered {}", r.status())),
        Err(e) => Err(format!("{uri}: {e}")),
    })
}

/// Credentials of the instance's role, from the metadata service (IMDSv2).
fn instance(endpoint: &str) -> Option<Creds> {
    let agent = local_agent();
    let token = agent
        .put(format!("{endpoint}/latest/api/token"))
        .header("X-aws-ec2-metadata-token-ttl-seconds", "21600")
        .send_empty()
        .ok()
        .filter(|r| r.status().is_success())?
        .body_mut()
        .read_to_string()
        .ok()?;
    let get = |path: &str| {
        agent
            .get(format!("{endpoint}/latest/meta-data/iam/security-credentials/{path}"))
            .header("X-aws-ec2-metadata-token", token.trim())
            .call()
            .ok()
            .filter(|r| r.status().is_success())
    };
    let role = get("")?.body_mut().read_to_string().ok()?;
    let role = role.lines().next()?.trim().to_owned();
    let t: Temporary = serde_json::from_str(&get(&role)?.body_mut().read_to_string().ok()?).ok()?;
    Some(t.into_creds(format!("the instance role {role} (metadata service at {endpoint})")))
}

/// Finds credentials (see the module's documentation).
pub fn find(profile: Option<&str>) -> Result<Creds, CredentialsError> {
    if let Some(creds) = Credentials::from_env() {
        return Ok(Creds::lasting(creds, "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"));
    }
    let profile =
        profile.map(str::to_owned).or_else(|| env("AWS_PROFILE")).unwrap_or_else(|| "default".into());
    let home = env("HOME").map(PathBuf::from).unwrap_or_default();
    let credentials_file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".aws/credentials"));
    let config_file = env("AWS_CONFIG_FILE").map(PathBuf::from).unwrap_or_else(|| home.join(".aws/config"));
    let config_section =
        if profile == "default" { "default".to_owned() } else { format!("profile {profile}") };
    let sources = [
        (credentials_file.clone(), profile.clone(), read_ini(&credentials_file)),
        (config_file.clone(), config_section, read_ini(&config_file)),
    ];
    for (file, section, ini) in &sources {
        if let Some(s) = ini.get(section)
            && let (Some(k), Some(v)) = (s.get("aws_access_key_id"), s.get("aws_secret_access_key"))
        {
            let token = s.get("aws_session_token").cloned();
            return Ok(Creds::lasting(
                Credentials::new_with_token(k.clone(), v.clone(), token.unwrap_or_default()),
                format!("profile {profile} in {}", file.display()),
            ));
        }
    }
    let mut looked = format!(
        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, profile {profile} in {} and {}",
        credentials_file.display(),
        config_file.display()
    );
    match container() {
        Some(Ok(c)) => return Ok(c),
        // Pointed at and failing: that is the error to see.
        Some(Err(why)) => return Err(CredentialsError { looked: format!("{looked}, then {why}") }),
        None => looked.push_str(", AWS_CONTAINER_CREDENTIALS_FULL_URI/RELATIVE_URI (unset)"),
    }
    if env("AWS_EC2_METADATA_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        looked.push_str(", the instance metadata service (AWS_EC2_METADATA_DISABLED)");
    } else {
        let endpoint =
            env("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| "http://169.254.169.254".into());
        let endpoint = endpoint.trim_end_matches('/');
        if let Some(c) = instance(endpoint) {
            return Ok(c);
        }
        looked.push_str(&format!(", the instance metadata service at {endpoint}"));
    }
    Err(CredentialsError { looked })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_files() {
        let t = tempfile::tempdir().unwrap();
        let creds = t.path().join("credentials");
        std::fs::write(
            &creds,
            "[default]\naws_access_key_id = AKD\naws_secret_access_key = SKD\n# comment\n[ci]\naws_access_key_id=AKC\naws_secret_access_key=SKC\n",
        )
        .unwrap();
        let ini = read_ini(&creds);
        assert_eq!(ini["ci"]["aws_access_key_id"], "AKC");
        assert_eq!(ini["default"]["aws_secret_access_key"], "SKD");
    }

    #[test]
    fn service_answers() {
        let t: Temporary =
            serde_json::from_str(r#"{"AccessKeyId":"A","SecretAccessKey":"S","Token":"T","Expiration":"2026-11-23T20:00:00Z","Code":"Success"}"#)
                .unwrap();
        let c = t.into_creds("x".into());
        assert_eq!((c.creds.key(), c.creds.secret(), c.creds.token()), ("A", "S", Some("T")));
        let at = |s: &str| SystemTime::from(s.parse::<jiff::Timestamp>().unwrap());
        assert_eq!(c.expires, Some(at("2026-11-23T20:00:00Z")));
        // Fetched again within five minutes of the expiry, not before.
        assert!(!c.due(at("2026-11-23T19:54:00Z")));
        assert!(c.due(at("2026-11-23T19:56:00Z")));
        assert!(c.due(at("2026-11-23T21:00:00Z")));
        assert!(!Creds::lasting(Credentials::new("a", "b"), "env").due(at("2099-01-01T00:00:00Z")));
    }
}
