//! A bucket in trouble: errors that say what to do, retries, killed servers and runs, no secret printed.

use std::net::TcpListener;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::faults::*;
use super::harness::*;
use crate::helpers::*;

#[test]
fn bucket_failures_say_what_to_do() {
    let s = Server::start();
    let f = fixtures();
    let t = tmp();
    // Wrong secret: one sentence naming where the credentials came from; never the secret.
    let out = fails(
        nc(&s, t.path())
            .env("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
            .args(["push", "--dest", &s.url("x")])
            .arg(&f.top),
    );
    let err = stderr(&out);
    assert!(err.contains("refused the credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"), "{err}");
    assert!(!err.contains("wrong-secret-value") && !err.contains("X-Amz-Signature"), "{err}");
    // No credentials anywhere: where nixcache looked.
    let out = fails(
        nixcache()
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env("HOME", t.path())
            .args(["push", "--dest", &s.url("x")])
            .arg(&f.top),
    );
    let err = stderr(&out);
    assert!(err.contains("no S3 credentials found") && err.contains(".aws/credentials"), "{err}");
    // A profile in ~/.aws/credentials works.
    std::fs::create_dir_all(t.path().join(".aws")).unwrap();
    std::fs::write(
        t.path().join(".aws/credentials"),
        format!("[ci]\naws_access_key_id = {}\naws_secret_access_key = {}\n", s.key, s.secret),
    )
    .unwrap();
    ok(nixcache()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", t.path())
        .args(["push", "-q", "--dest", &format!("{}&profile=ci", s.url("profile"))])
        .arg(&f.top));
    // A bucket that does not exist.
    let out = fails(nc(&s, t.path()).args(["push", "--dest", &s.missing_bucket_url()]).arg(&f.top));
    let err = stderr(&out);
    assert!(err.contains("the bucket nosuch does not exist") || err.contains("nosuch"), "{err}");
    // An endpoint that refuses connections.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    let out = fails(nc(&s, t.path()).args(["verify", "--dest", &s.url_via("x", closed)]));
    let err = stderr(&out);
    assert!(err.contains("cannot reach http://127.0.0.1") && err.contains("refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "retried too long");
}

#[test]
fn bucket_survives_a_server_killed_mid_push() {
    let _alone = heavy();
    let mut s = Server::start();
    let t = tmp();
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3-kill"]))
        .trim()
        .to_owned();
    let f = fixtures();
    // The large path's parts slowed, so the push is surely still uploading when the server
    // goes, however fast the machine; killed two seconds after its upload began, when what
    // the push wrote first (nix-cache-info) has had time to reach the server's disk.
    let p = faulty(s.port, |h, _| {
        if h.lines().next().unwrap_or_default().contains("partNumber=") {
            Fault::Delay(Duration::from_secs(5))
        } else {
            Fault::Forward
        }
    });
    let push = nc_parts(&s, t.path())
        .args(["push", "-q", "-k", SECRET, "-j", "1", "--dest", &s.url_via("kill", p.port)])
        .args([&random, &f.top])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.uploads().is_empty() {
        assert!(Instant::now() < deadline, "no multipart upload started");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(2));
    s.kill();
    let out = push.wait_with_output().unwrap();
    if s.kill_stops_everything() {
        assert!(!out.status.success(), "the push should fail with the server gone");
    }
    let mut s = s.restart();
    // What the bucket holds now is the server's business: `weed mini` killed with SIGKILL
    // has lost an acknowledged PUT (nix-cache-info) here once, so no client can promise
    // what it shows. (With the server up and nixcache killed, consistency is checked: see
    // a_push_killed_mid_upload_leaves_a_consistent_bucket.) A re-run makes it whole.
    let url = s.url("kill");
    let rerun = |s: &Server| {
        nc(s, t.path())
            .args(["push", "-q", "-k", SECRET, "--dest", &url])
            .args([&random, &f.top])
            .output()
            .unwrap()
    };
    let mut out = rerun(&s);
    // `weed mini` restarted after SIGKILL has also gone away again mid re-run (connection
    // refused past every retry): nixcache must fail cleanly then, and the next re-run, with
    // the server back, makes the bucket whole.
    if !out.status.success() && stderr(&out).contains("cannot reach") {
        let e = stderr(&out);
        assert!(e.contains("the cache is consistent"), "{e}");
        eprintln!("the restarted server went away during the re-run: {e}");
        if let Some(log) = s.exited() {
            eprintln!("it exited; the end of its log:\n{log}");
            s = s.restart();
        } else {
            s.wait_ready();
        }
        out = rerun(&s);
    }
    assert!(out.status.success(), "the re-run failed: {}", stderr(&out));
    let broken = inconsistencies(&s, t.path(), &url, Some(PUBLIC));
    assert!(broken.is_empty(), "after the re-run: {broken:#?}");
    restore(&s.http("kill"), &t.path().join("root"), &[&random, &f.top]);
}

#[test]
fn bucket_slowdown_and_errors_are_retried_but_not_forever() {
    use std::sync::atomic::Ordering;
    let s = Server::start();
    let f = fixtures();
    let t = tmp();
    // The first two tries of every request answered 503 SlowDown, or 429, or 500: every
    // request gets through on its third try, and the cache is whole.
    for (status, prefix) in
        [("503 Slow Down", "slow"), ("429 Too Many Requests", "many"), ("500 Internal Server Error", "err")]
    {
        let p = flaky(s.port, status, |_, n| n < 2);
        let url = s.url_via(prefix, p.port);
        ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
        ok(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
        assert!(p.failed.load(Ordering::SeqCst) > 10, "{status}: the proxy failed too few requests");
        assert!(p.forwarded.load(Ordering::SeqCst) > 5);
        restore(&s.http(prefix), &t.path().join(format!("root-{prefix}")), &[&f.top]);
    }
    // A server that always answers 503: push gives up after its attempts, with the answer.
    let p = flaky(s.port, "503 Slow Down", |_, _| true);
    let started = Instant::now();
    let out = fails(nc(&s, t.path()).args(["push", "--dest", &s.url_via("never", p.port)]).arg(&f.top));
    let err = stderr(&out);
    assert!(err.contains("503") && err.contains("SlowDown"), "{err}");
    assert_eq!(p.failed.load(Ordering::SeqCst), nixcache::retry::ATTEMPTS as usize);
    assert!(started.elapsed() < Duration::from_secs(60));
}

#[test]
fn a_failed_push_aborts_its_multipart_uploads() {
    let s = Server::start();
    let t = tmp();
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3-abort"]))
        .trim()
        .to_owned();
    // Every part upload fails; everything else (the abort included) goes through.
    let p = flaky(s.port, "500 Internal Server Error", |line, _| {
        line.starts_with("PUT") && line.contains("partNumber=")
    });
    let out = fails(
        nc_parts(&s, t.path())
            .args(["push", "-k", SECRET, "--dest", &s.url_via("abort", p.port)])
            .arg(&random),
    );
    let err = stderr(&out);
    assert!(err.contains("500"), "{err}");
    assert!(p.failed.load(std::sync::atomic::Ordering::SeqCst) >= nixcache::retry::ATTEMPTS as usize);
    // The upload was aborted (a DELETE of it went through the proxy to the server)...
    let seen = p.seen.lock().unwrap().clone();
    assert!(seen.iter().any(|l| l.starts_with("DELETE") && l.contains("uploadId=")), "no abort: {seen:#?}");
    // ...and no upload is left behind. Garage's cluster lists an aborted upload for a moment
    // after acknowledging the abort (seen once in CI: listed, then gone when printed).
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = s.uploads();
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        left = s.uploads();
    }
    assert!(left.is_empty(), "left uploads: {left:?}");
    // No narinfo, and verify finds nothing wrong.
    assert_eq!(get(&format!("{}/{}.narinfo", s.http("abort"), hash_part(&random))).0, 404);
    ok(nc(&s, t.path()).args(["verify", "-q", "--dest", &s.url("abort")]));
}

#[test]
fn a_volume_server_killed_mid_push_leaves_a_consistent_bucket() {
    let _alone = heavy();
    let mut c = Cluster::start();
    let t = tmp();
    let f = fixtures();
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3-volume"]))
        .trim()
        .to_owned();
    let url = c.server.url("volume");
    let push = nc(&c.server, t.path())
        .args(["push", "-q", "-k", SECRET, "-j", "1", "--dest", &url])
        .args([&random, &f.top])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    c.kill("volume2");
    let out = push.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("the push with volume2 killed ({}): {said}", out.status);
    c.spawn("volume2");
    std::thread::sleep(Duration::from_secs(3));
    // Whatever got in is whole.
    let broken = inconsistencies(&c.server, t.path(), &url, None);
    assert!(broken.is_empty(), "after the push ({said}): {broken:#?}\n{}", c.logs());
    ok(nc(&c.server, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).args([&random, &f.top]));
    let broken = inconsistencies(&c.server, t.path(), &url, Some(PUBLIC));
    assert!(broken.is_empty(), "after the re-push: {broken:#?}");
    restore(&c.server.http("volume"), &t.path().join("root"), &[&random, &f.top]);
}

#[test]
fn a_push_killed_mid_upload_leaves_a_consistent_bucket() {
    let s = Server::start();
    let t = tmp();
    let f = fixtures();
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3-sigkill"]))
        .trim()
        .to_owned();
    let url = s.url("sigkill");
    // One thread, the large path first: killed while it is compressed into the spool or goes
    // up in one PUT, or (the spool off) while its parts go up, after some small paths may be in.
    for (delay, spool) in [300, 1500, 4000].into_iter().flat_map(|d| [(d, true), (d, false)]) {
        let mut push = if spool { nc(&s, t.path()) } else { nc_parts(&s, t.path()) };
        let mut push = push
            .args(["push", "-q", "-k", SECRET, "-j", "1", "--dest", &url])
            .args([&random, &f.top])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        let _ = push.kill();
        let _ = push.wait();
        let broken = inconsistencies(&s, t.path(), &url, None);
        assert!(broken.is_empty(), "killed after {delay} ms (spool {spool}): {broken:#?}");
    }
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).args([&random, &f.top]));
    ok(nc(&s, t.path())
        .args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url])
        .stdout(Stdio::null()));
    restore(&s.http("sigkill"), &t.path().join("root"), &[&random, &f.top]);
}

#[test]
fn no_secret_is_printed() {
    let s = Server::start();
    let t = tmp();
    // A user:password in the endpoint, and a server that quotes the signed request back.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("s3://cache/x?endpoint=http://KEYID:SUPERSECRET@127.0.0.1:{closed}");
    let out = fails(nc(&s, t.path()).args(["verify", "--dest", &url]));
    assert!(!stderr(&out).contains("SUPERSECRET") && stderr(&out).contains("127.0.0.1"), "{}", stderr(&out));
    let quoting = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = quoting.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        for stream in quoting.incoming() {
            let Ok(mut c) = stream else { continue };
            let mut line = String::new();
            let _ = BufReader::new(c.try_clone().unwrap()).read_line(&mut line);
            let body = format!(
                "<Error><Code>AccessDenied</Code><Message>denied: {}</Message></Error>",
                line.trim().replace('&', "&amp;")
            );
            let _ = write!(
                c,
                "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let out = fails(nc(&s, t.path()).env("AWS_SESSION_TOKEN", "SESSIONTOKEN0123456789abcdef").args([
        "verify",
        "--dest",
        &s.url_via("x", port),
    ]));
    let err = stderr(&out);
    assert!(err.contains("AccessDenied") && err.contains("denied"), "{err}");
    for leak in ["X-Amz-Signature", "X-Amz-Credential", &s.key, "SESSIONTOKEN", "Security-Token"] {
        assert!(!err.contains(leak), "{leak}: {err}");
    }
}
