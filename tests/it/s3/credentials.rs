//! Credentials from a container or the instance metadata service, fetched again before they expire.

use std::net::TcpListener;
use std::time::Duration;

use super::faults::*;
use super::harness::*;
use crate::helpers::*;

#[test]
fn credentials_from_a_container_or_the_instance_metadata_service() {
    let s = Server::start();
    let f = fixtures();
    let t = tmp();
    let port = credential_service(s.key.clone(), s.secret.clone());
    let bare = || {
        let mut c = nixcache();
        c.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_PROFILE")
            .env("HOME", t.path());
        c
    };
    // The instance's role, through IMDSv2.
    let out = bare()
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .args(["push", "--dest", &s.url("imds")])
        .arg(&f.top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A container's, with its authorization token.
    ok(bare()
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("http://127.0.0.1:{port}/creds"))
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN", "secret-token")
        .args(["push", "-q", "--dest", &s.url("container")])
        .arg(&f.top));
    // Pointed at a container endpoint that refuses: that is what the error says.
    let out = fails(
        bare()
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("http://127.0.0.1:{port}/creds"))
            .args(["push", "--dest", &s.url("container")])
            .arg(&f.top),
    );
    let err = stderr(&out);
    assert!(err.contains("no S3 credentials found") && err.contains("/creds answered 401"), "{err}");
    assert!(!err.contains(&s.secret), "{err}");
    // Neither: every place looked is named.
    let out = fails(
        bare()
            .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", format!("http://127.0.0.1:{}", free_base()))
            .args(["push", "--dest", &s.url("none")])
            .arg(&f.top),
    );
    let err = stderr(&out);
    for place in
        [".aws/credentials", ".aws/config", "AWS_CONTAINER_CREDENTIALS_FULL_URI", "instance metadata service"]
    {
        assert!(err.contains(place), "{place}: {err}");
    }
}

#[test]
fn temporary_credentials_are_fetched_again_before_they_expire() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let s = Server::start();
    let t = tmp();
    let f = fixtures();
    // A container credential service whose credentials expire in 5 minutes and 2 seconds:
    // due for a refresh 2 seconds after each fetch.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fetches = Arc::new(AtomicUsize::new(0));
    let (count, key, secret) = (fetches.clone(), s.key.clone(), s.secret.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut c) = stream else { continue };
            let mut reader = BufReader::new(c.try_clone().unwrap());
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            count.fetch_add(1, Ordering::SeqCst);
            let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(302);
            let json = format!(
                r#"{{"AccessKeyId":"{key}","SecretAccessKey":"{secret}","Token":"","Expiration":"{expires}"}}"#
            );
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
                json.len()
            );
        }
    });
    // Every request slowed: the push outlives the first credentials' refresh point.
    let p = faulty(s.port, |_, _| Fault::Delay(Duration::from_millis(150)));
    let out = nixcache()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("HOME", t.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONTAINER_CREDENTIALS_FULL_URI", format!("http://127.0.0.1:{port}/creds"))
        .args(["push", "-j", "1", "--dest", &s.url_via("creds", p.port)])
        .arg(&f.top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let n = fetches.load(Ordering::SeqCst);
    assert!(n >= 2, "fetched {n} times in a push of {}", stderr(&out));
    assert!(stderr(&out).contains("credentials"), "{}", stderr(&out));
}
