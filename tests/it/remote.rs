//! Pushing to a cache on another machine: over SSH (a throwaway sshd on loopback, with its
//! own host and user keys, running `nixcache receive` on the far side) and over HTTP into
//! `serve --upload-token-file`; Nix restores from what was received, with require-sigs.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::serve::Server;

const TOKEN: &str = "push-token-abcdef0123456789";

/// An sshd on a free loopback port, with host and user keys made for the test; root logs in
/// with the user key. Stopped when dropped.
pub struct Sshd {
    child: Child,
    pub port: u16,
    /// What NIX_SSHOPTS must say to reach it (the user key, the host key as known).
    pub opts: String,
    _dir: tempfile::TempDir,
}

impl Sshd {
    pub fn start() -> Sshd {
        let dir = tmp();
        let d = dir.path();
        for key in ["host_key", "user_key"] {
            ok(Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(d.join(key)));
        }
        std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
            d = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).unwrap();
        let log = std::fs::File::create(d.join("sshd.log")).unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stderr(log)
            .spawn()
            .expect("sshd (Debian's openssh-server; scripts/setup installs it)");
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < end,
                "sshd did not start: {}",
                std::fs::read_to_string(d.join("sshd.log")).unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let host_key = std::fs::read_to_string(d.join("host_key.pub")).unwrap();
        std::fs::write(d.join("known_hosts"), format!("[127.0.0.1]:{port} {host_key}")).unwrap();
        let opts = format!(
            "-F /dev/null -i {d}/user_key -o UserKnownHostsFile={d}/known_hosts -o BatchMode=yes -o LogLevel=ERROR",
            d = d.display()
        );
        Sshd { child, port, opts, _dir: dir }
    }

    /// `ssh://root@127.0.0.1:PORT/DIR`
    pub fn url(&self, dir: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, dir.display())
    }

    /// `nixcache push` reaching this sshd, the receiver being this build of nixcache.
    pub fn push(&self) -> Command {
        let mut c = nixcache();
        c.env("NIX_SSHOPTS", &self.opts)
            .arg("push")
            .args(["--remote-program", env!("CARGO_BIN_EXE_nixcache")]);
        c
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn narinfos(cache: &Path) -> usize {
    std::fs::read_dir(cache)
        .map(|d| d.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".narinfo")).count())
        .unwrap_or(0)
}

/// What receivers left under `.nixcache/incoming`: nothing once they have ended.
fn incoming(cache: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(cache.join(".nixcache/incoming")) {
        Ok(d) => d.flatten().map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn push_over_ssh_then_nix_restores_and_a_rerun_sends_nothing() {
    let f = fixtures();
    let sshd = Sshd::start();
    let t = tmp();
    let cache = t.path().join("cache");
    let dest = sshd.url(&cache);
    let out = ok(sshd.push().args(["-k", SECRET, "--json", "--dest", &dest, &f.top]));
    let v = json(&out);
    assert_eq!(v["pushed"], f.closure.len(), "{v}");
    assert_eq!(v["dest"], dest.as_str());
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
    assert_eq!(incoming(&cache), Vec::<PathBuf>::new(), "the receiver left files behind");
    // Again: the receiver says in one answer it has everything; nothing is sent.
    let before = tree(&cache);
    let mut c = sshd.push();
    c.args(["-k", SECRET, "--dest", &dest, &f.top]);
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains(&format!("0 pushed, {} skipped", f.closure.len())), "{e}");
    assert!(
        e.contains("1 have") && !e.contains(" put") && !e.contains(" head"),
        "a no-op push sent files, or asked path by path: {e}"
    );
    let after: Vec<_> = tree(&cache).into_iter().filter(|(p, _)| !p.starts_with(".nixcache")).collect();
    let before: Vec<_> = before.into_iter().filter(|(p, _)| !p.starts_with(".nixcache")).collect();
    assert_eq!(after, before);
    // The dry run asks the same question and names what it would do.
    let out = ok(sshd.push().args(["--dry-run", "--dest", &dest, &f.top]));
    assert_eq!(out.lines().filter(|l| l.starts_with("already there ")).count(), f.closure.len(), "{out}");
}

#[test]
fn the_scp_form_with_a_port_from_nix_sshopts() {
    let f = fixtures();
    let sshd = Sshd::start();
    let t = tmp();
    let cache = t.path().join("scp cache");
    let mut c = sshd.push();
    c.env("NIX_SSHOPTS", format!("{} -p {}", sshd.opts, sshd.port));
    ok(c.args(["-q", "-k", SECRET, "--dest", &format!("root@127.0.0.1:{}", cache.display()), &f.top]));
    assert_eq!(narinfos(&cache), f.closure.len());
    // (Nix 2.8 cannot open a file:// URL with a space: verify stands in for the restore.)
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
}

#[test]
fn a_remote_without_nixcache_is_told_what_to_install() {
    let f = fixtures();
    let sshd = Sshd::start();
    let t = tmp();
    let mut c = nixcache();
    c.env("NIX_SSHOPTS", &sshd.opts).args(["push", "--remote-program", "/nonexistent/nixcache", "--dest"]);
    let out = fails(c.arg(sshd.url(&t.path().join("c"))).arg(&f.top));
    assert_eq!(out.status.code(), Some(1));
    let e = stderr(&out);
    assert!(e.contains("has no `/nonexistent/nixcache`") && e.contains("install nixcache there"), "{e}");
    // An unreachable host: ssh's own message, and what to check.
    let mut c = nixcache();
    c.env("NIX_SSHOPTS", "-F /dev/null -o BatchMode=yes -o ConnectTimeout=5").args(["push", "--dest"]);
    let out = fails(c.arg("ssh://root@127.0.0.1:1/c").arg(&f.top));
    assert!(stderr(&out).contains("ssh to root@127.0.0.1 failed (exit 255"), "{}", stderr(&out));
}

#[test]
fn commands_that_run_where_the_cache_is_refuse_a_remote_dest() {
    for (cmd, extra) in [
        ("verify", vec![]),
        ("gc", vec!["--older-than", "30d"]),
        ("sign", vec!["-k", SECRET]),
        ("serve", vec![]),
    ] {
        let out = nixcache().arg(cmd).args(&extra).args(["--dest", "root@pi:/var/cache"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!("ssh root@pi nixcache {cmd} --dest /var/cache")),
            "{cmd}: {}",
            stderr(&out)
        );
    }
}

/// A receiving server on `cache` taking [`TOKEN`], trusting the test key.
fn receiving_server(cache: &Path, dir: &Path, extra: &[&str]) -> Server {
    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let mut args: Vec<String> = vec!["--dest".into(), cache.display().to_string()];
    args.extend(["--upload-token-file".into(), tokens.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    Server::start(&args)
}

#[test]
fn push_over_http_into_serve_with_a_token_file_or_netrc() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let server = receiving_server(&cache, t.path(), &["--trusted-public-key", PUBLIC]);
    let token = t.path().join("ci.token");
    std::fs::write(&token, format!("# the CI's token\n{TOKEN}\n")).unwrap();
    let out = nixcache()
        .args(["push", "-k", SECRET, "--upload-token-file"])
        .arg(&token)
        .args(["--dest", &server.url, &f.top])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("1 have"), "{}", stderr(&out));
    let root = t.path().join("root");
    restore(&server.url, &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));

    // The token from a netrc file, as Nix reads it; none: 401 said as what to do.
    let cache2 = t.path().join("cache2");
    let server2 = receiving_server(&cache2, t.path(), &["--trusted-public-key", PUBLIC]);
    let netrc = t.path().join("netrc");
    std::fs::write(&netrc, format!("machine 127.0.0.1\n  login ci\n  password {TOKEN}\n")).unwrap();
    let home = t.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let push = |netrc: &Path| {
        nixcache()
            .env("NETRC", netrc)
            .env("HOME", &home)
            .env("NIX_CONF_DIR", &home)
            .args(["push", "-q", "-k", SECRET, "--dest", &server2.url, &f.top])
            .output()
            .unwrap()
    };
    let out = push(Path::new("/dev/null"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("wants a token to take uploads (401)"), "{}", stderr(&out));
    assert_eq!(narinfos(&cache2), 0);
    let out = push(&netrc);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(narinfos(&cache2), f.closure.len());
}

#[test]
fn what_the_receiver_refuses_fails_the_push_and_leaves_nothing() {
    let f = fixtures();
    let t = tmp();
    // Over HTTP: a receiver that trusts another key.
    let cache = t.path().join("cache");
    let other = "other-1:Fc8Yn1bFNVbmKCO0IZp2PQHah/AV6MrB0hAzmo5+Pys=";
    let server = receiving_server(&cache, t.path(), &["--trusted-public-key", other]);
    let token = t.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut c = nixcache();
    c.args(["push", "-k", SECRET, "--upload-token-file"]).arg(&token).args(["--dest", &server.url, &f.top]);
    let out = fails(&mut c);
    let e = stderr(&out);
    assert!(e.contains("not signed by a key this cache trusts (other-1)"), "{e}");
    assert!(
        e.contains(&format!("{} of {} paths were not published", f.closure.len(), f.closure.len())),
        "{e}"
    );
    assert_eq!(narinfos(&cache), 0);
    // Over ssh: a forced command on the far side that trusts another key.
    let sshd = Sshd::start();
    let cache2 = t.path().join("cache2");
    let keys = sshd.opts.split_whitespace().find(|w| w.ends_with("/user_key")).unwrap().to_owned();
    let authorized = Path::new(&keys).with_file_name("authorized_keys");
    let line = std::fs::read_to_string(&authorized).unwrap();
    std::fs::write(
        &authorized,
        format!(
            "command=\"{} receive --dest {} --trusted-public-key {other}\" {line}",
            env!("CARGO_BIN_EXE_nixcache"),
            cache2.display()
        ),
    )
    .unwrap();
    let out = fails(sshd.push().args(["-k", SECRET, "--dest", &sshd.url(Path::new("/ignored")), &f.top]));
    assert!(stderr(&out).contains("not signed by a key this cache trusts (other-1)"), "{}", stderr(&out));
    assert_eq!(narinfos(&cache2), 0);
    assert!(!Path::new("/ignored").exists());
    assert_eq!(incoming(&cache2), Vec::<PathBuf>::new());
}

/// Starts a push of a large path over ssh and returns once the receiver has begun taking it.
fn push_started(sshd: &Sshd, dest: &str, path: &str) -> Child {
    let mut c = sshd.push();
    c.args(["-c", "none", "--dest", dest, path]).stdout(Stdio::null()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

#[test]
fn a_killed_sender_or_receiver_leaves_a_cache_a_rerun_completes() {
    let _heavy = heavy();
    let f = fixtures();
    let big = build_big("remote-kill");
    let sshd = Sshd::start();
    let t = tmp();
    let cache = t.path().join("cache");
    let dest = sshd.url(&cache);
    ok(sshd.push().args(["-q", "-k", SECRET, "--dest", &dest, &f.top]));
    for kill_receiver in [false, true] {
        let mut child = push_started(&sshd, &dest, &big);
        // Wait until the NAR is arriving (a file grows in the receiver's incoming directory).
        let end = Instant::now() + Duration::from_secs(60);
        let arriving = || {
            incoming(&cache)
                .iter()
                .filter(|p| p.is_dir())
                .any(|d| std::fs::read_dir(d).unwrap().next().is_some())
        };
        while !arriving() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(5));
        }
        if kill_receiver {
            ok(Command::new("pkill").args(["-KILL", "-f", &format!("receive --dest {}", cache.display())]));
        } else {
            child.kill().unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "the push survived");
        if kill_receiver {
            let e = stderr(&out);
            assert!(e.contains("the receiver on root@127.0.0.1 ended"), "{e}");
        }
        // Nothing of the big path is visible; what was there before is whole.
        assert!(!cache.join(format!("{}.narinfo", hash_part(&big))).exists());
        ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    }
    // The next push completes, and its receiver removed what the killed ones left.
    ok(sshd.push().args(["-q", "-k", SECRET, "-c", "none", "--dest", &dest, &big]));
    assert_eq!(incoming(&cache), Vec::<PathBuf>::new());
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&big, &f.top]);
}

#[test]
fn two_pushers_at_once_and_a_writer_holding_the_lock() {
    let f = fixtures();
    let sshd = Sshd::start();
    let t = tmp();
    let cache = t.path().join("cache");
    let dest = sshd.url(&cache);
    // Another writer (a gc, a local push) holds the cache's lock for a while: the receivers'
    // publishes wait for it, then both pushes complete.
    std::fs::create_dir_all(&cache).unwrap();
    let mut holder =
        Command::new("flock").arg(cache.join(".nixcache.lock")).args(["sleep", "2"]).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let pushers: Vec<Child> = (0..2)
        .map(|_| {
            let mut c = sshd.push();
            c.args(["-k", SECRET, "--dest", &dest, &f.top]).stderr(Stdio::piped()).stdout(Stdio::null());
            c.spawn().unwrap()
        })
        .collect();
    holder.wait().unwrap();
    for p in pushers {
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    assert_eq!(narinfos(&cache), f.closure.len());
    assert_eq!(incoming(&cache), Vec::<PathBuf>::new());
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&f.top]);
}

#[test]
fn receive_speaks_the_framed_protocol_and_refuses_what_is_not_an_upload() {
    // The wire, by hand: greeting, a request outside the layout, a HEAD of nix-cache-info.
    let t = tmp();
    let cache = t.path().join("cache");
    let mut child = nixcache()
        .args(["receive", "--dest"])
        .arg(&cache)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let mut stdin = child.stdin.take().unwrap();
    let question = br#"{"hashes":["0123456789abcdfghijklmnpqrsvwxyz"],"record":false}"#;
    stdin.write_all(b"PUT ../../etc/passwd 3\nabcHEAD nix-cache-info 0\nGET nar/x.nar 0\n").unwrap();
    stdin.write_all(format!("HAVE - {}\n", question.len()).as_bytes()).unwrap();
    stdin.write_all(question).unwrap();
    drop(stdin);
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut next = |out: &mut BufReader<_>| {
        line.clear();
        out.read_line(&mut line).unwrap();
        line.trim_end().to_owned()
    };
    assert_eq!(next(&mut out), "nixcache-receive 1");
    let refused = next(&mut out);
    assert!(refused.starts_with("403 "), "{refused}");
    let len: usize = refused.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = vec![0; len];
    std::io::Read::read_exact(&mut out, &mut body).unwrap();
    assert!(String::from_utf8_lossy(&body).contains("is not a file a cache takes uploads of"));
    assert_eq!(next(&mut out), "404 0", "a new cache has no nix-cache-info until a push sends it");
    let nar = next(&mut out);
    assert!(nar.starts_with("403 "), "{nar}");
    let len: usize = nar.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = vec![0; len];
    std::io::Read::read_exact(&mut out, &mut body).unwrap();
    let have = next(&mut out);
    assert!(have.starts_with("200 "), "{have}");
    let len: usize = have.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = vec![0; len];
    std::io::Read::read_exact(&mut out, &mut body).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v, serde_json::json!({"version": 1, "present": {}}));
    assert!(child.wait().unwrap().success());
    assert_eq!(narinfos(&cache), 0);
}

/// A certificate authority and a certificate it signed for 127.0.0.1: (ca.pem, cert.pem,
/// key.pem).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    let p = |n: &str| dir.join(n);
    ok(Command::new("openssl")
        .args(["req", "-x509"])
        .args(ec)
        .arg("-keyout")
        .arg(p("ca.key"))
        .arg("-out")
        .arg(p("ca.pem"))
        .args(["-days", "2", "-subj", "/CN=nixcache test CA"]));
    ok(Command::new("openssl")
        .arg("req")
        .args(ec)
        .arg("-keyout")
        .arg(p("key.pem"))
        .arg("-out")
        .arg(p("leaf.csr"))
        .args(["-subj", "/CN=127.0.0.1"]));
    std::fs::write(p("ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    ok(Command::new("openssl")
        .args(["x509", "-req", "-in"])
        .arg(p("leaf.csr"))
        .arg("-CA")
        .arg(p("ca.pem"))
        .arg("-CAkey")
        .arg(p("ca.key"))
        .args(["-CAcreateserial", "-days", "2", "-out"])
        .arg(p("cert.pem"))
        .arg("-extfile")
        .arg(p("ext")));
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

#[test]
fn https_with_tokens_for_uploads_and_reads() {
    let f = fixtures();
    let t = tmp();
    let (ca, cert, key) = certificates(t.path());
    let cache = t.path().join("cache");
    let readers = t.path().join("readers");
    std::fs::write(&readers, "reader-token-42\n").unwrap();
    let (c, k, r) = (cert.display().to_string(), key.display().to_string(), readers.display().to_string());
    let server = receiving_server(
        &cache,
        t.path(),
        &["--trusted-public-key", PUBLIC, "--tls-cert", &c, "--tls-key", &k, "--read-token-file", &r],
    );
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);
    let token = t.path().join("ci.token");
    std::fs::write(&token, TOKEN).unwrap();
    let push = |ca: Option<&Path>| {
        let mut c = nixcache();
        c.env_remove("SSL_CERT_FILE").env_remove("NIX_SSL_CERT_FILE");
        if let Some(ca) = ca {
            c.env("NIX_SSL_CERT_FILE", ca);
        }
        c.args(["push", "-q", "-k", SECRET, "--upload-token-file"])
            .arg(&token)
            .args(["--dest", &server.url, &f.top])
            .output()
            .unwrap()
    };
    // A certificate no authority this side trusts signed: refused, nothing sent.
    let out = push(None);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
    assert_eq!(narinfos(&cache), 0);
    let out = push(Some(&ca));
    assert!(out.status.success(), "{}", stderr(&out));
    // Reads need a token: none is 401; Nix with a netrc file restores.
    let curl = |auth: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"]).arg(&ca);
        if let Some(a) = auth {
            c.args(["-H", &format!("Authorization: Bearer {a}")]);
        }
        ok(c.arg(format!("{}/nix-cache-info", server.url)))
    };
    assert_eq!(curl(None), "401");
    assert_eq!(curl(Some("wrong")), "401");
    assert_eq!(curl(Some("reader-token-42")), "200");
    let netrc = t.path().join("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login nix password reader-token-42\n").unwrap();
    let root = t.path().join("root");
    let mut c = restore_cmd(&server.url, &root, PUBLIC, &[&f.top]);
    ok(c.env("NIX_SSL_CERT_FILE", &ca).arg("--option").arg("netrc-file").arg(&netrc));
    assert_restored_identical(&root, &f.closure);
}

#[test]
fn push_over_http_to_a_server_that_only_takes_puts() {
    // Not nixcache: no "have" request (404), so the push asks path by path, and still sends
    // each NAR before its narinfo and references first. Nix restores from it.
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let mut server = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/put_server.py"))
        .arg(&cache)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut port = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut port).unwrap();
    let url = format!("http://127.0.0.1:{}", port.trim());
    let out = nixcache()
        .env("NETRC", "/dev/null")
        .args(["push", "-k", SECRET, "--dest", &url, &f.top])
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("1 have") && e.contains(" head"), "no fallback to lookups path by path: {e}");
    let root = t.path().join("root");
    restore(&url, &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
    // Again: every path found there, nothing sent.
    let out = nixcache()
        .env("NETRC", "/dev/null")
        .args(["push", "-k", SECRET, "--dest", &url, &f.top])
        .output()
        .unwrap();
    assert!(stderr(&out).contains(&format!("0 pushed, {} skipped", f.closure.len())), "{}", stderr(&out));
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn a_full_disk_on_the_receiver_fails_the_push_and_leaves_the_cache_whole() {
    let f = fixtures();
    let sshd = Sshd::start();
    let t = tmp();
    let cache = t.path().join("small");
    std::fs::create_dir(&cache).unwrap();
    // 256 KiB: the fixtures' 1.3 MB of NARs cannot fit uncompressed.
    let _u = crate::errors::small_disk(&cache, "256k");
    let out = fails(sshd.push().args(["-c", "none", "-k", SECRET, "--dest", &sshd.url(&cache), &f.top]));
    let e = stderr(&out);
    assert!(e.contains("(507): the cache's filesystem is full"), "{e}");
    assert!(e.contains("paths were not published; the cache is consistent"), "{e}");
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    assert_eq!(incoming(&cache), Vec::<PathBuf>::new());
}

#[test]
fn a_partial_push_over_ssh_records_its_policy_on_the_receiver() {
    let u = crate::partial::upstream();
    let sshd = Sshd::start();
    let t = tmp();
    let cache = t.path().join("cache");
    let dest = sshd.url(&cache);
    let out = sshd
        .push()
        .args(["-c", "zstd", "-k", SECRET, "--exclude", "^secret-", "--allow-incomplete", "--dest", &dest])
        .arg(&u.with_secret)
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("left out: they match --exclude '^secret-'"), "{e}");
    let has = |p: &str| cache.join(format!("{}.narinfo", hash_part(p))).exists();
    assert!(!has(&u.secret) && has(&u.with_secret) && has(&u.app));
    // The receiver took the record before the narinfo that relies on it: verify counts the
    // hole as deliberate.
    let v = ok(nixcache().args(["verify", "--json", "--dest"]).arg(&cache));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["leftToUpstreams"]["excluded by --exclude '^secret-'"], 1, "{v:#}");
    // A later push over the link reads the policy back from the receiver and keeps to it.
    let out = sshd
        .push()
        .args(["-c", "zstd", "--allow-incomplete", "--dest", &dest])
        .arg(&u.with_secret)
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(e.contains("is a partial cache: as recorded in it"), "{e}");
    assert!(!has(&u.secret));
}

#[test]
fn a_gc_on_the_receiver_racing_pushes_never_leaves_a_broken_cache() {
    // gc removes everything (--older-than 0s) while pushes over ssh put it back: whatever
    // each round ends with, every narinfo there has its NAR and its references, and a push
    // with no gc running completes.
    let f = fixtures();
    let sshd = Sshd::start();
    let t = tmp();
    let cache = t.path().join("cache");
    let dest = sshd.url(&cache);
    ok(sshd.push().args(["-q", "-c", "zstd", "-k", SECRET, "--dest", &dest, &f.top]));
    for round in 0..4 {
        let mut push = sshd.push();
        push.args(["-q", "-c", "zstd", "--force", "-k", SECRET, "--dest", &dest, &f.top]);
        let push = push.stderr(Stdio::piped()).spawn().unwrap();
        let gc = nixcache().args(["gc", "-q", "--older-than", "0s", "--dest"]).arg(&cache).output().unwrap();
        assert!(gc.status.success(), "round {round}: {}", stderr(&gc));
        let out = push.wait_with_output().unwrap();
        if !out.status.success() {
            // Refused for a reference gc had just removed: said, and nothing half-published.
            assert!(
                stderr(&out).contains("is not in the cache: upload it first"),
                "round {round}: {}",
                stderr(&out)
            );
        }
        ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    }
    ok(sshd.push().args(["-q", "-c", "zstd", "-k", SECRET, "--dest", &dest, &f.top]));
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&f.top]);
}

#[test]
fn a_cache_pushed_over_the_link_is_byte_for_byte_a_local_push() {
    // Listings and debug-info links included: the receiver's files are the ones a local push
    // writes, over ssh and over http alike.
    let f = fixtures();
    let sshd = Sshd::start();
    let t = tmp();
    let flags = ["-q", "-c", "zstd", "--nar-listing", "--index-debug-info", "-k", SECRET];
    let local = t.path().join("local");
    ok(nixcache().arg("push").args(flags).arg("--dest").arg(&local).arg(&f.top));
    let over_ssh = t.path().join("over-ssh");
    ok(sshd.push().args(flags).args(["--dest", &sshd.url(&over_ssh), &f.top]));
    let over_http = t.path().join("over-http");
    let server = receiving_server(&over_http, t.path(), &["--trusted-public-key", PUBLIC]);
    let token = t.path().join("token");
    std::fs::write(&token, TOKEN).unwrap();
    ok(nixcache().arg("push").args(flags).arg("--upload-token-file").arg(&token).args([
        "--dest",
        &server.url,
        &f.top,
    ]));
    let visible = |d: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        tree(d)
            .into_iter()
            .filter(|(p, _)| !p.starts_with(".nixcache") && !p.starts_with(".nixcache.lock"))
            .collect()
    };
    let want = visible(&local);
    assert!(want.iter().any(|(p, _)| p.starts_with("debuginfo")), "no debug info in the fixtures' push");
    assert_eq!(visible(&over_ssh), want);
    assert_eq!(visible(&over_http), want);
}
