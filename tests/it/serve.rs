//! `nixcache serve`: real Nix substitutes from it, static and lazily filled; HTTP semantics,
//! escapes, load, timeouts and shutdown on raw connections.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// A running `nixcache serve` on a free loopback port; killed when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// Starts `nixcache serve --listen 127.0.0.1:0 ARGS` and waits for its startup line.
    pub fn start<S: AsRef<OsStr>>(args: &[S]) -> Server {
        let mut cmd = nixcache();
        cmd.arg("serve").args(["--listen", "127.0.0.1:0"]).args(args);
        Self::spawn(cmd)
    }

    pub fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd.stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let kept = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                // Kept before it is announced: a test that reads the lines once told has it.
                kept.lock().unwrap().push(line.clone());
                // The first line: what a client pastes into nix.conf.
                if line.starts_with("substituters = ") {
                    let _ = tx.send(line);
                }
            }
        });
        let Ok(first) = rx.recv_timeout(Duration::from_secs(60)) else {
            let _ = child.kill();
            let status = child.wait().unwrap();
            panic!("serve did not start ({status}):\n{}", lines.lock().unwrap().join("\n"));
        };
        let url = first
            .strip_prefix("substituters = ")
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no URL in {first:?}"))
            .to_owned();
        let started = |l: &str| l.starts_with("serving ");
        let end = Instant::now() + Duration::from_secs(10);
        while !lines.lock().unwrap().iter().any(|l| started(l)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(10));
        }
        // A server on every address is named by this host's name: reached on loopback.
        let hostport = url.trim_start_matches("http://");
        let addr = hostport.parse().unwrap_or_else(|_| {
            let port: u16 = hostport.rsplit(':').next().unwrap().parse().unwrap();
            std::net::SocketAddr::from(([127, 0, 0, 1], port))
        });
        Server { child, addr, url, lines }
    }

    /// Everything it printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits up to `secs` for a line matching `pred`.
    pub fn wait_for(&self, secs: u64, pred: impl Fn(&str) -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if self.lines().iter().any(|l| pred(l)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then the exit status.
    pub fn term(&mut self) -> ExitStatus {
        signal(&self.child, rustix::process::Signal::TERM);
        self.child.wait().unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// An HTTP answer read off a raw connection.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Sends `request` (a whole HTTP/1.1 request head, `Connection: close` added) and reads the
/// answer to the end.
pub fn raw(addr: SocketAddr, request: &str) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let request = request.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    s.write_all(request.as_bytes()).unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    parse_answer(&all)
}

fn parse_answer(all: &[u8]) -> Answer {
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no head in {all:?}"));
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    Answer { status, head, body: all[end + 4..].to_vec() }
}

pub fn get(addr: SocketAddr, path: &str) -> Answer {
    raw(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
}

fn push_to(cache: &Path, compression: &str, top: &str) {
    ok(nixcache().args(["push", "-q", "-c", compression, "-k", SECRET, "--dest"]).arg(cache).arg(top));
}

#[test]
fn nix_restores_every_compression_from_serve() {
    let f = fixtures();
    let t = tmp();
    for c in ["xz", "bzip2", "zstd", "none"] {
        let cache = t.path().join(format!("cache-{c}"));
        push_to(&cache, c, &f.top);
        let server = Server::start(&[OsStr::new("-q"), OsStr::new("--dest"), cache.as_os_str()]);
        let root = t.path().join(format!("root-{c}"));
        restore(&server.url, &root, &[&f.top]);
        assert_restored_identical(&root, &f.closure);
    }
}

#[test]
fn nix_build_substitutes_a_deleted_output_from_serve() {
    let t = tmp();
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures.nix");
    let top = build_fixtures("serve-substitute");
    let cache = t.path().join("cache");
    push_to(&cache, "zstd", &top);
    ok(nix_cmd("nix-store").args(["--delete", &top]));
    assert!(!Path::new(&top).exists());
    let server = Server::start(&[OsStr::new("--dest"), cache.as_os_str()]);
    let out = nix_cmd("nix-build")
        .args([fixtures, "--no-out-link", "--argstr", "salt", "serve-substitute", "--arg", "extra", "0"])
        .args(["--option", "substituters", &server.url, "--option", "trusted-public-keys", PUBLIC])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), top);
    assert!(err.contains(&format!("from '{}'", server.url)), "not substituted:\n{err}");
    assert!(!err.contains("building '"), "built instead of substituted:\n{err}");
    let nar = narinfo(&cache, &top).url;
    assert!(server.wait_for(5, |l| l.contains(&format!("GET /{nar} 200"))), "{:?}", server.lines());
}

#[test]
fn http_semantics_head_404_range_304() {
    let t = tmp();
    let top = build_fixtures_with("serve-http", 1);
    let cache = t.path().join("cache");
    push_to(&cache, "none", &top);
    let server = Server::start(&[OsStr::new("--dest"), cache.as_os_str()]);
    let a = server.addr;
    let bulk = requisites(&top).into_iter().find(|p| p.contains("bulk")).expect("a bulk path");
    let ni = narinfo(&cache, &bulk);
    let nar = format!("/{}", ni.url);
    let file = std::fs::read(cache.join(&ni.url)).unwrap();
    assert!(file.len() > 1 << 20);

    let info = get(a, "/nix-cache-info");
    assert_eq!((info.status, info.header("content-type")), (200, Some("text/x-nix-cache-info")));
    assert_eq!(info.body, std::fs::read(cache.join("nix-cache-info")).unwrap());
    let n = get(a, &format!("/{}.narinfo", hash_part(&bulk)));
    assert_eq!(n.status, 200);
    assert_eq!(n.header("content-type"), Some("text/x-nix-narinfo"));
    assert_eq!(n.header("cache-control"), Some("public, max-age=300"));
    assert_eq!(n.body, std::fs::read(cache.join(format!("{}.narinfo", hash_part(&bulk)))).unwrap());

    let whole = get(a, &nar);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.header("content-type"), Some("application/x-nix-nar"));
    assert_eq!(whole.header("content-encoding"), None);
    assert_eq!(whole.header("cache-control"), Some("public, max-age=31536000, immutable"));
    assert_eq!(whole.header("accept-ranges"), Some("bytes"));
    assert_eq!(whole.body, file);

    let head = raw(a, &format!("HEAD {nar} HTTP/1.1\r\nHost: x\r\n\r\n"));
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some(&*file.len().to_string()));
    assert!(head.body.is_empty());

    // Missing, and not a cache file: 404, never 403 or 410.
    for p in
        ["/00000000000000000000000000000000.narinfo", "/nar/missing.nar.xz", "/.nixcache.lock", "/index.html"]
    {
        assert_eq!(get(a, p).status, 404, "{p}");
    }
    // The root: the lines a client needs, as plain text.
    let root = get(a, "/");
    assert_eq!(root.status, 200);
    assert_eq!(root.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(String::from_utf8_lossy(&root.body).contains("substituters = http://"));
    assert_eq!(raw(a, "POST /nix-cache-info HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").status, 405);
    let huge = format!("GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(40_000));
    assert_eq!(raw(a, &huge).status, 431);

    // A client cut off mid-NAR resumes with Range and gets identical bytes.
    let cut = 300_000;
    let mut s = TcpStream::connect(a).unwrap();
    s.write_all(format!("GET {nar} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut got = vec![0; cut + 4096];
    s.read_exact(&mut got).unwrap();
    drop(s);
    let body_start = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let first = &got[body_start..];
    let rest = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nRange: bytes={}-\r\n\r\n", first.len()));
    assert_eq!(rest.status, 206);
    assert_eq!(
        rest.header("content-range"),
        Some(&*format!("bytes {}-{}/{}", first.len(), file.len() - 1, file.len()))
    );
    assert_eq!([first, &rest.body[..]].concat(), file);
    let mid = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nRange: bytes=10-19\r\n\r\n"));
    assert_eq!((mid.status, &mid.body[..]), (206, &file[10..20]));
    let tail = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nRange: bytes=-5\r\n\r\n"));
    assert_eq!(&tail.body[..], &file[file.len() - 5..]);
    let beyond = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nRange: bytes={}-\r\n\r\n", file.len()));
    assert_eq!(
        (beyond.status, beyond.header("content-range")),
        (416, Some(&*format!("bytes */{}", file.len())))
    );

    // Validators: 304 when the client has it, the whole file when If-Range no longer holds.
    let etag = whole.header("etag").unwrap().to_owned();
    let modified = whole.header("last-modified").unwrap().to_owned();
    let r = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nIf-None-Match: {etag}\r\n\r\n"));
    assert_eq!((r.status, r.body.len()), (304, 0));
    let r = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nIf-Modified-Since: {modified}\r\n\r\n"));
    assert_eq!(r.status, 304);
    let r = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"other\"\r\n\r\n"));
    assert_eq!(r.status, 200);
    let r =
        raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\nIf-Range: \"other\"\r\n\r\n"));
    assert_eq!((r.status, r.body.len()), (200, file.len()));
    let r = raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\nIf-Range: {etag}\r\n\r\n"));
    assert_eq!((r.status, r.body.len()), (206, 10));

    // One access line per request: method, path, status, bytes, time.
    assert!(
        server.wait_for(5, |l| l.contains(&format!("GET {nar} 206 10 ")) && l.ends_with("ms")),
        "{:?}",
        server.lines()
    );
}

#[test]
fn nothing_outside_the_cache_is_ever_sent() {
    use std::os::unix::fs::symlink;
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    push_to(&cache, "zstd", &f.top);
    let secret = t.path().join("secret");
    std::fs::write(&secret, "TOP-SECRET-CONTENTS").unwrap();
    let outside = t.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("x.nar.zst"), "TOP-SECRET-CONTENTS").unwrap();
    // Links to outside where cache files belong, a FIFO, a device, and a subdirectory that
    // is a link.
    let fake = "0".repeat(32);
    symlink(&secret, cache.join(format!("{fake}.narinfo"))).unwrap();
    symlink(&secret, cache.join("nar/link.nar.zst")).unwrap();
    symlink("/etc/passwd", cache.join("nar/passwd.nar.zst")).unwrap();
    ok(Command::new("mkfifo").arg(cache.join("nar/fifo.nar.zst")));
    ok(Command::new("mknod").arg(cache.join("nar/null.nar.zst")).args(["c", "1", "3"]));
    std::fs::remove_dir(cache.join("log")).unwrap();
    symlink(&outside, cache.join("log")).unwrap();
    std::fs::write(cache.join(".nixcache-tmp-x.narinfo"), "TOP-SECRET-CONTENTS").unwrap();
    let server = Server::start(&[OsStr::new("-q"), OsStr::new("--dest"), cache.as_os_str()]);
    // Replaced by a link after the server opened the cache: still never followed.
    let realisations = cache.join("realisations");
    std::fs::remove_dir(&realisations).ok();
    symlink(&outside, &realisations).unwrap();
    let secret_s = secret.to_str().unwrap();
    let targets = [
        format!("/{fake}.narinfo"),
        "/nar/link.nar.zst".into(),
        "/nar/passwd.nar.zst".into(),
        "/nar/fifo.nar.zst".into(),
        "/nar/null.nar.zst".into(),
        "/log/x.nar.zst".into(),
        "/realisations/x.nar.zst".into(),
        "/.nixcache-tmp-x.narinfo".into(),
        "/../secret".into(),
        "/nar/../../secret".into(),
        "/%2e%2e/secret".into(),
        "/nar/%2e%2e/%2e%2e/secret".into(),
        "/nar%2f..%2f..%2fsecret".into(),
        "/nar/..%2f..%2fsecret".into(),
        "//etc/passwd".into(),
        "/nar//passwd.nar.zst".into(),
        format!("/{secret_s}"),
        format!("/{}", "/etc/passwd"),
        "/nar/x%00.nar.zst".into(),
        "/%00".into(),
        "/nar/..\\..\\secret".into(),
        "http://x/../secret".into(),
        "/log".into(),
        "/nar".into(),
        "/nar/".into(),
    ];
    for p in &targets {
        let a = raw(server.addr, &format!("GET {p} HTTP/1.1\r\nHost: x\r\n\r\n"));
        let body = String::from_utf8_lossy(&a.body);
        assert!(!body.contains("TOP-SECRET") && !body.contains("root:"), "{p} leaked: {body}");
        assert!(a.status == 404 || a.status == 400, "{p}: {}", a.status);
    }
    // The cache itself is still served.
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(&f.top))).status, 200);
}

#[test]
fn lazy_fill_restores_a_closure_never_pushed_and_only_within_the_roots() {
    let t = tmp();
    let top = build_fixtures("serve-lazy");
    let closure = requisites(&top);
    let other = build_fixtures("serve-lazy-other");
    // A directory of GC-root links as Nix keeps them: per-user links into the store, auto
    // links to ./result-style links elsewhere.
    let gcroots = t.path().join("gcroots");
    std::fs::create_dir_all(gcroots.join("per-user/ci")).unwrap();
    std::fs::create_dir_all(gcroots.join("auto")).unwrap();
    let link = gcroots.join("per-user/ci/result");
    std::os::unix::fs::symlink(&top, &link).unwrap();
    let cache = t.path().join("cache");
    let server = Server::start(&[
        OsStr::new("--dest"),
        cache.as_os_str(),
        OsStr::new("--from-store"),
        OsStr::new("-k"),
        OsStr::new(SECRET),
        OsStr::new("--roots"),
        gcroots.as_os_str(),
    ]);
    let lines = server.lines();
    let i = lines.iter().position(|l| l.starts_with("substituters = ")).unwrap();
    assert_eq!(lines[i + 1], format!("trusted-public-keys = {PUBLIC}"), "{lines:?}");
    let start = lines.iter().find(|l| l.starts_with("serving ")).unwrap();
    assert!(start.contains(&format!("{} paths", closure.len())), "{start}");

    // Outside the roots: 404, and nothing written.
    let a = get(server.addr, &format!("/{}.narinfo", hash_part(&other)));
    assert_eq!(a.status, 404);
    let narinfos = || {
        std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("narinfo".as_ref()))
            .count()
    };
    assert_eq!(narinfos(), 0);
    assert_eq!(std::fs::read_dir(cache.join("nar")).unwrap().count(), 0);
    // Not in the store at all: 404.
    assert_eq!(get(server.addr, &format!("/{}.narinfo", "1".repeat(32))).status, 404);

    let root = t.path().join("root");
    restore(&server.url, &root, &[&top]);
    assert_restored_identical(&root, &closure);
    assert_eq!(narinfos(), closure.len());
    // Filled with zstd, signed, and verify finds an ordinary clean cache.
    assert_eq!(narinfo(&cache, &top).compression, "zstd");
    ok(nixcache().args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));

    // A root added later counts at once: an auto root, a link to a result link.
    let result = t.path().join("result");
    std::os::unix::fs::symlink(&other, &result).unwrap();
    std::os::unix::fs::symlink(&result, gcroots.join("auto/0123")).unwrap();
    let root2 = t.path().join("root2");
    restore(&server.url, &root2, &[&other]);
}

#[test]
fn a_fill_that_fails_answers_500_and_publishes_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let t = tmp();
    let top = build_fixtures("serve-corrupt");
    let closure = requisites(&top);
    // Corrupt one path in the store: its NAR no longer matches the database's NarHash.
    let victim = closure.iter().find(|p| p.ends_with("edge-single-file")).unwrap().clone();
    let meta = std::fs::metadata(&victim).unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::OpenOptions::new().append(true).open(&victim).unwrap().write_all(b"corrupt").unwrap();
    std::fs::set_permissions(&victim, meta.permissions()).unwrap();
    let cache = t.path().join("cache");
    let server = Server::start(&[
        OsStr::new("-q"),
        OsStr::new("--dest"),
        cache.as_os_str(),
        OsStr::new("--from-store"),
        OsStr::new("--whole-store"),
    ]);
    let a = get(server.addr, &format!("/{}.narinfo", hash_part(&top)));
    // Repaired before any assertion can fail, so other tests never see a corrupt store.
    ok(nix_cmd("nix-store").args(["--repair-path", &victim]));
    assert_eq!(a.status, 500, "{}", String::from_utf8_lossy(&a.body));
    assert!(String::from_utf8_lossy(&a.body).contains("corrupt"), "{}", String::from_utf8_lossy(&a.body));
    assert!(!cache.join(format!("{}.narinfo", hash_part(&top))).exists());
    assert!(!cache.join(format!("{}.narinfo", hash_part(&victim))).exists());
    assert!(server.wait_for(5, |l| l.starts_with("error: cannot fill")), "{:?}", server.lines());
    // What the failed path does not depend on was published whole; the rest follows once the
    // store is repaired, at the next request.
    let a = get(server.addr, &format!("/{}.narinfo", hash_part(&top)));
    assert_eq!(a.status, 200);
}

#[test]
fn serve_from_store_needs_roots_or_whole_store() {
    let t = tmp();
    let out = fails(nixcache().args(["serve", "--from-store", "--dest"]).arg(t.path().join("c")));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("--roots PATH") && stderr(&out).contains("--whole-store"),
        "{}",
        stderr(&out)
    );
    let out = fails(nixcache().args(["serve", "--roots", "/nix/store", "--dest"]).arg(t.path().join("c")));
    assert_eq!(out.status.code(), Some(2));
    // A directory that is not a cache: a sentence, not an empty server.
    let out = fails(nixcache().args(["serve", "--listen", "127.0.0.1:0", "--dest"]).arg(t.path()));
    assert!(stderr(&out).contains("no nix-cache-info"), "{}", stderr(&out));
}

#[test]
fn twenty_clients_of_one_closure_make_every_nar_once() {
    let t = tmp();
    let top = build_fixtures_with("serve-twenty", 2);
    let closure = requisites(&top);
    let cache = t.path().join("cache");
    let server = Server::start(&[
        OsStr::new("-q"),
        OsStr::new("--dest"),
        cache.as_os_str(),
        OsStr::new("--from-store"),
        OsStr::new("--whole-store"),
        OsStr::new("-k"),
        OsStr::new(SECRET),
    ]);
    let clients: Vec<_> = (0..20)
        .map(|i| {
            let root = t.path().join(format!("root-{i}"));
            let child = restore_cmd(&server.url, &root, PUBLIC, &[&top])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (root, child)
        })
        .collect();
    for (root, child) in clients {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert_restored_identical(&root, &closure);
    }
    // Each fill line says how many paths it pushed: together, the closure, once.
    let pushed: usize = server
        .lines()
        .iter()
        .filter_map(|l| {
            l.strip_prefix("filled ")?.split(": ").nth(1)?.split(' ').next()?.parse::<usize>().ok()
        })
        .sum();
    assert_eq!(pushed, closure.len(), "{:?}", server.lines());
    assert_eq!(std::fs::read_dir(cache.join("nar")).unwrap().count(), closure.len());
}

#[test]
fn a_server_killed_mid_fill_leaves_a_clean_cache_and_a_restart_completes_it() {
    let t = tmp();
    let big = build_big("serve-kill");
    let cache = t.path().join("cache");
    let args = |c: &Path| {
        [
            "--dest".into(),
            c.as_os_str().to_owned(),
            "--from-store".into(),
            "--whole-store".into(),
            "-c".into(),
            "xz".into(),
            "-j".into(),
            "1".into(),
            "-k".into(),
            SECRET.into(),
        ]
    };
    let mut server = Server::start(&args(&cache));
    let addr = server.addr;
    let hash = hash_part(&big).to_owned();
    let asking = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(format!("GET /{hash}.narinfo HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
    });
    // Killed once the fill is writing its NAR.
    let started = Instant::now();
    let writing = || {
        std::fs::read_dir(cache.join("nar"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.file_name().to_string_lossy().starts_with(".nixcache-tmp-"))
            })
            .unwrap_or(false)
    };
    while !writing() {
        assert!(started.elapsed() < Duration::from_secs(60), "the fill never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    signal(&server.child, rustix::process::Signal::KILL);
    server.kill();
    asking.join().unwrap();
    assert!(!cache.join(format!("{}.narinfo", hash_part(&big))).exists(), "published before the kill?");
    let out = nixcache()
        .args(["verify", "--json", "--trusted-public-key", PUBLIC, "--dest"])
        .arg(&cache)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = v["problems"].as_array().unwrap();
    assert!(!problems.is_empty(), "the kill came after the fill: nothing was tested");
    assert!(
        problems.iter().all(|p| p["kind"] == "temporary-file"),
        "verify found more than temporary files: {v:#}"
    );
    let server = Server::start(&args(&cache));
    let root = t.path().join("root");
    restore(&server.url, &root, &[&big]);
    assert_restored_identical(&root, std::slice::from_ref(&big));
    assert!(server.lines().iter().any(|l| l.contains("left by an interrupted run")), "{:?}", server.lines());
}

#[test]
fn a_thousand_connections_and_idle_ones_time_out() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    push_to(&cache, "zstd", &f.top);
    let server = Server::start(&[
        OsStr::new("-q"),
        OsStr::new("--timeout"),
        OsStr::new("3"),
        OsStr::new("--dest"),
        cache.as_os_str(),
    ]);
    // All open at once, then each asks and is answered.
    let mut conns: Vec<TcpStream> = (0..1000).map(|_| TcpStream::connect(server.addr).unwrap()).collect();
    let expected = std::fs::read(cache.join("nix-cache-info")).unwrap();
    for c in &mut conns {
        c.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    }
    for c in &mut conns {
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        let a = parse_answer(&all);
        assert_eq!((a.status, &a.body), (200, &expected));
    }
    drop(conns);
    // An idle connection, one that stopped halfway through its request head (slowloris),
    // and a keep-alive connection idle after its first answer are all closed after the timeout.
    let idle = TcpStream::connect(server.addr).unwrap();
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut kept = TcpStream::connect(server.addr).unwrap();
    kept.write_all(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let started = Instant::now();
    for mut c in [idle, slow, kept] {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut all = Vec::new();
        let r = c.read_to_end(&mut all);
        assert!(r.is_ok(), "not closed: {r:?}");
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(15), "{waited:?}");
    // Still serving.
    assert_eq!(get(server.addr, "/nix-cache-info").status, 200);
}

#[test]
fn sigterm_finishes_the_responses_under_way() {
    let t = tmp();
    let top = build_fixtures_with("serve-term", 2);
    let cache = t.path().join("cache");
    push_to(&cache, "none", &top);
    let bulk = requisites(&top).into_iter().find(|p| p.contains("bulk")).unwrap();
    let ni = narinfo(&cache, &bulk);
    let size = std::fs::metadata(cache.join(&ni.url)).unwrap().len() as usize;
    let mut server = Server::start(&[OsStr::new("--dest"), cache.as_os_str()]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.write_all(format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", ni.url).as_bytes()).unwrap();
    let mut first = vec![0; 4096];
    s.read_exact(&mut first).unwrap();
    let status = std::thread::scope(|sc| {
        let term = sc.spawn(|| server.term());
        // Read slowly while the server is asked to stop.
        std::thread::sleep(Duration::from_millis(500));
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).unwrap();
        let all = [first, rest].concat();
        let a = parse_answer(&all);
        assert_eq!(a.body.len(), size, "the response was cut off");
        term.join().unwrap()
    });
    assert!(status.success(), "{status}");
    assert!(TcpStream::connect(server.addr).is_err(), "still listening");
}

#[test]
fn socket_activation_and_readiness() {
    use std::os::unix::net::UnixDatagram;
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    push_to(&cache, "zstd", &f.top);
    let notify = t.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args([
        "-E",
        "NOTIFY_SOCKET",
        "-l",
        &format!("127.0.0.1:{port}"),
        env!("CARGO_BIN_EXE_nixcache"),
        "serve",
        "--dest",
    ])
    .arg(&cache)
    .env("NOTIFY_SOCKET", &notify);
    // systemd-socket-activate starts the server at the first connection, as a .socket unit does.
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let hash = hash_part(&f.top).to_owned();
    let first = std::thread::spawn(move || {
        let started = Instant::now();
        while TcpStream::connect(addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "systemd-socket-activate never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        get(addr, &format!("/{hash}.narinfo")).status
    });
    let server = Server::spawn(cmd);
    assert_eq!(server.url, format!("http://127.0.0.1:{port}"));
    let mut buf = [0; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(&f.top))).status, 200);
}
