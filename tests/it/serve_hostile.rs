//! `nixcache serve` under hostile and unlucky clients: thousands of readers that stop
//! reading, a stderr nobody reads, a lock someone else holds. Loopback only, bounded in count
//! and time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;
use crate::serve::{Server, get};

/// The resident memory of `pid`, in KiB (`VmRSS` in /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// One path of `mib` MiB of random bytes (a NAR that compresses to itself).
fn random_path(salt: &str, mib: u32) -> String {
    let expr = format!(
        r#"derivation {{ name = "random-{mib}m"; salt = "{salt}"; system = builtins.currentSystem; builder = "/bin/sh"; PATH = "/usr/bin:/bin"; args = [ "-c" "head -c {} /dev/urandom > $out" ]; }}"#,
        u64::from(mib) << 20
    );
    ok(nix_cmd("nix-build").args(["--no-out-link", "--expr", &expr])).trim().to_owned()
}

/// A client that asks for `path` and never reads: a socket with a 4 KiB receive buffer.
fn stalled_client(addr: SocketAddr, path: &str) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, connect, socket, sockopt};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    sockopt::set_socket_recv_buffer_size(&fd, 4096).unwrap();
    connect(&fd, &addr).unwrap();
    let mut s = TcpStream::from(fd);
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s
}

/// Opens as many files as the hard limit allows (3,000 clients need 3,000 sockets here).
fn raise_open_files() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    setrlimit(Resource::Nofile, l).unwrap();
}

#[test]
fn three_thousand_stalled_readers_cost_little_memory_and_it_is_given_back() {
    let _alone = heavy();
    raise_open_files();
    let t = tmp();
    let cache = t.path().join("cache");
    let nar_path = random_path("stalled", 14);
    ok(nixcache().args(["push", "-q", "-c", "none", "--dest"]).arg(&cache).arg(&nar_path));
    let nar = format!("/{}", narinfo(&cache, &nar_path).url);
    let mut server = Server::start(&[std::ffi::OsStr::new("-q"), "--dest".as_ref(), cache.as_os_str()]);
    let pid = server.pid();
    // A well-behaved client first, so idle counts what serving costs.
    assert_eq!(get(server.addr, &nar).body.len() as u64, narinfo(&cache, &nar_path).nar_size);
    std::thread::sleep(Duration::from_secs(3));
    let idle = rss_kib(pid);
    let clients: Vec<TcpStream> = (0..3000).map(|_| stalled_client(server.addr, &nar)).collect();
    // Every one of them answered and stalled: the server holds what it holds for them now.
    std::thread::sleep(Duration::from_secs(5));
    let during = rss_kib(pid);
    // Still serving others meanwhile.
    assert_eq!(get(server.addr, "/nix-cache-info").status, 200);
    drop(clients);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut after = rss_kib(pid);
    while after > 2 * idle && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        after = rss_kib(pid);
    }
    eprintln!("RSS idle {idle} KiB, 3,000 stalled readers {during} KiB, after {after} KiB");
    // What each stalled reader costs, over what the idle server holds (its code and TLS
    // library included): at most 18 KiB (measured: 17.4 KiB, 64 MiB in all).
    assert!(
        during <= idle + 3000 * 18,
        "3,000 stalled readers took RSS to {during} KiB (idle {idle}): {} KiB each",
        (during - idle) / 3000
    );
    assert!(after <= 2 * idle, "RSS {after} KiB after the readers were cut off, idle {idle}");
    server.term();
}

/// `nixcache serve` whose stderr is a pipe this test holds and does not read.
struct Muted {
    child: Child,
    addr: SocketAddr,
    stderr: Option<std::process::ChildStderr>,
}

impl Muted {
    fn start(args: &[&std::ffi::OsStr]) -> Muted {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = nixcache()
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "serve did not start");
            assert!(child.try_wait().unwrap().is_none(), "serve exited");
            std::thread::sleep(Duration::from_millis(50));
        }
        let stderr = child.stderr.take();
        Muted { child, addr, stderr }
    }

    /// `n` requests for `path` on one kept-alive connection.
    fn flood(&self, path: &str, n: usize) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut reader = BufReader::new(s.try_clone().unwrap());
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            s.write_all(request.repeat(chunk.len()).as_bytes()).unwrap();
            for _ in chunk {
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; len];
                reader.read_exact(&mut body).unwrap();
            }
        }
    }

    /// SIGTERM; the exit status once it came, and how long it took.
    fn term(&mut self) -> (std::process::ExitStatus, Duration) {
        let started = Instant::now();
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("serve did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Muted {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_stderr_nobody_reads_holds_up_neither_a_fill_nor_shutdown_and_its_queue_is_bounded() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("lazy");
    let mut server = Muted::start(&[
        "--dest".as_ref(),
        cache.as_os_str(),
        "--from-store".as_ref(),
        "--roots".as_ref(),
        f.top.as_ref(),
        "-k".as_ref(),
        SECRET.as_ref(),
    ]);
    // Enough access lines to fill the pipe many times over (64 KiB holds about 800).
    server.flood("/nix-cache-info", 5000);
    let idle = rss_kib(server.child.id());
    // A fill's client is answered, although the fill's log line cannot be written.
    let started = Instant::now();
    let a = get(server.addr, &format!("/{}.narinfo", hash_part(&f.top)));
    assert_eq!(a.status, 200, "{a:?}");
    assert!(started.elapsed() < Duration::from_secs(60));
    // The queue of lines is bounded: many more requests cost no more memory.
    server.flood("/nix-cache-info", 50_000);
    let more = rss_kib(server.child.id());
    assert!(more < idle + (8 << 10), "RSS went from {idle} to {more} KiB with stderr blocked");
    // SIGTERM stops it, stderr still blocked.
    let (status, took) = server.term();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    // What the pipe held: the first lines; then a second server says what it dropped once
    // stderr moves.
    let mut server = Muted::start(&["--dest".as_ref(), cache.as_os_str()]);
    server.flood("/nix-cache-info", 20_000);
    let stderr = server.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = lines.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            kept.lock().unwrap().push(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let said = || lines.lock().unwrap().iter().find(|l| l.contains("log lines dropped")).cloned();
    while said().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = said()
        .unwrap_or_else(|| panic!("no count of dropped lines in {} lines", lines.lock().unwrap().len()));
    assert!(said.starts_with("warning: ") && said.contains("stderr was not read"), "{said}");
    let (status, took) = server.term();
    assert!(status.success() && took < Duration::from_secs(10), "{status} after {took:?}");
}

#[test]
fn a_lock_held_by_anyone_makes_fills_answer_503_and_writers_give_up_when_told() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("lazy");
    let mut server = Server::start(&[
        "--dest".as_ref(),
        cache.as_os_str(),
        std::ffi::OsStr::new("--from-store"),
        "--roots".as_ref(),
        f.top.as_ref(),
        "-k".as_ref(),
        SECRET.as_ref(),
        "--lock-timeout".as_ref(),
        "2s".as_ref(),
    ]);
    // Any local user can hold the lock file shared (it is world-readable by design).
    // -o: the lock is flock's own, not inherited by sleep, so killing flock lets it go.
    let mut holder = std::process::Command::new("flock")
        .args(["-s", "-o"])
        .arg(cache.join(".nixcache.lock"))
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let a = get(server.addr, &format!("/{}.narinfo", hash_part(&f.top)));
    let waited = started.elapsed();
    assert_eq!(a.status, 503, "{a:?}");
    assert_eq!(a.header("retry-after"), Some("10"));
    assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(10), "{waited:?}");
    assert!(
        server.wait_for(10, |l| l.contains(&format!("held by pid {}", holder.id())) && l.contains("flock")),
        "{:?}",
        server.lines()
    );
    // push, gc and sign say they wait, and whom for; --lock-timeout makes them give up.
    for args in [
        vec!["push", "--lock-timeout", "1s", "--dest", cache.to_str().unwrap(), f.top.as_str()],
        vec!["gc", "--lock-timeout", "1s", "--older-than", "1d", "--dest", cache.to_str().unwrap()],
        vec!["sign", "--lock-timeout", "1s", "-k", SECRET, "--dest", cache.to_str().unwrap()],
    ] {
        let out = run_within(nixcache().args(&args), 30);
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {e}");
        assert!(
            e.contains("waiting for the lock of") && e.contains(&format!("held by pid {}", holder.id())),
            "{e}"
        );
        assert!(e.contains("for more than 1s"), "{e}");
    }
    // Once it is let go, the same request fills.
    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(&f.top))).status, 200);
    server.term();
}

/// Threads of process `pid` (`Threads:` in /proc/PID/status).
fn threads(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("Threads:")).unwrap().trim().parse().unwrap()
}

#[test]
fn a_thousand_misses_at_once_start_no_threads_and_each_is_a_plain_404() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("lazy");
    let server = Server::start(&[
        "--dest".as_ref(),
        cache.as_os_str(),
        std::ffi::OsStr::new("--from-store"),
        "--roots".as_ref(),
        f.top.as_ref(),
        "-q".as_ref(),
        "-j".as_ref(),
        "2".as_ref(),
    ]);
    let pid = server.pid();
    let before = threads(pid);
    // 1,000 narinfos of paths the store does not have, asked at once.
    let mut clients: Vec<TcpStream> = (0..1000)
        .map(|i| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            let hash: String = format!("{i:032}").chars().map(|c| if c == '0' { 'a' } else { c }).collect();
            write!(s, "GET /{hash}.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
            s
        })
        .collect();
    let during = threads(pid);
    for s in &mut clients {
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    }
    let after = threads(pid);
    // 2 workers, the log, the trimmer, main: no thread per miss (782 before).
    assert!(during.max(after) <= 2 + 6, "threads: {before} idle, {during} during, {after} after");
    // A path of the roots' closure is still filled.
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(&f.top))).status, 200);
    assert!(!cache.join(format!("{}.narinfo", "a".repeat(32))).exists());
}

#[test]
fn sigterm_during_a_long_fill_answers_its_client_503_and_stops_within_ten_seconds() {
    let _alone = heavy();
    // 27 MB of random bytes: minutes of xz -9 on one thread.
    let big = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "sigterm-fill"]))
        .trim()
        .to_owned();
    let t = tmp();
    let cache = t.path().join("lazy");
    let mut server = Server::start(&[
        "--dest".as_ref(),
        cache.as_os_str(),
        std::ffi::OsStr::new("--from-store"),
        "--roots".as_ref(),
        big.as_ref(),
        "-c".as_ref(),
        "xz".as_ref(),
        "--compression-level".as_ref(),
        "9".as_ref(),
        "-j".as_ref(),
        "1".as_ref(),
    ]);
    let addr = server.addr;
    let path = format!("/{}.narinfo", hash_part(&big));
    let client = std::thread::spawn(move || get(addr, &path));
    // The fill is under way once its first temporary file is there.
    let deadline = Instant::now() + Duration::from_secs(60);
    let writing = || {
        std::fs::read_dir(cache.join("nar"))
            .into_iter()
            .flatten()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".nixcache-tmp-"))
    };
    while !writing() {
        assert!(Instant::now() < deadline, "the fill did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let status = server.term();
    let took = started.elapsed();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(10), "SIGTERM during a fill took {took:?}");
    let answer = client.join().unwrap();
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(answer.header("retry-after").is_some());
    // Nothing half-made is left: no temporary file, no narinfo of the abandoned path.
    assert!(!writing(), "temporary files left");
    assert!(!cache.join(format!("{}.narinfo", hash_part(&big))).exists());
    ok(nixcache().args(["verify", "--dest"]).arg(&cache));
}

#[test]
fn what_serve_sends_is_kept_by_gc_and_ranges_are_answered_as_nginx_does() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "-c", "none", "--dest"]).arg(&cache).arg(&f.top));
    // Pushed two days ago, as far as gc can tell.
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 86400);
    for e in std::fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            std::fs::File::options().write(true).open(&p).unwrap().set_modified(old).unwrap();
        }
    }
    let mut server = Server::start(&[std::ffi::OsStr::new("-q"), "--dest".as_ref(), cache.as_os_str()]);
    // A client fetches the top path's narinfo (it is restoring it right now).
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(&f.top))).status, 200);
    // Ranges as nginx answers them, on the largest NAR.
    let nar = f
        .closure
        .iter()
        .map(|p| narinfo(&cache, p))
        .max_by_key(|ni| ni.file_size)
        .map(|ni| format!("/{}", ni.url))
        .unwrap();
    let ng = t.path().join("nginx");
    std::fs::create_dir(&ng).unwrap();
    let (_nginx, port) = crate::examples::nginx_example(&ng, &cache);
    let nginx = SocketAddr::from(([127, 0, 0, 1], port));
    for range in [
        "bytes=0-99",
        "bytes=-100",
        "bytes=100-",
        "bytes=5-2",
        "bytes=abc",
        "bytes=",
        "bytes=99999999-",
        "bytes=-0",
        "items=0-5",
        "bytes=-99999999",
        "bytes=1-2-3",
        "bytes=0-99,abc",
        "bytes=-",
        "bytes=0-5,",
        "bytes=5-2,0-5",
        "bytes=0-18446744073709551616",
    ] {
        let ask =
            |a| crate::serve::raw(a, &format!("GET {nar} HTTP/1.1\r\nHost: x\r\nRange: {range}\r\n\r\n"));
        let (ours, theirs) = (ask(server.addr), ask(nginx));
        assert_eq!(ours.status, theirs.status, "{range}");
        assert_eq!(ours.header("content-range"), theirs.header("content-range"), "{range}");
        if ours.status != 416 {
            assert_eq!(ours.body, theirs.body, "{range}");
        }
    }
    server.term();
    // gc keeps the closure of what was served within its window, and only that.
    let out = ok(nixcache().args(["gc", "--older-than", "1d", "--dest"]).arg(&cache));
    for p in &f.closure {
        assert!(
            cache.join(format!("{}.narinfo", hash_part(p))).exists(),
            "gc removed {p}, served an instant ago:\n{out}"
        );
    }
}

#[test]
fn a_linked_nix_cache_info_is_said_once() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(f.path("edge-dep")));
    std::fs::rename(cache.join("nix-cache-info"), t.path().join("info")).unwrap();
    std::os::unix::fs::symlink(t.path().join("info"), cache.join("nix-cache-info")).unwrap();
    let out = run_within(nixcache().args(["serve", "--listen", "127.0.0.1:0", "--dest"]).arg(&cache), 30);
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert_eq!(e.matches("is a symbolic link").count(), 1, "{e}");
}

#[test]
fn a_path_whose_root_was_removed_is_no_longer_filled_and_what_was_filled_stays() {
    let f = fixtures();
    let t = tmp();
    let roots = t.path().join("gcroots");
    std::fs::create_dir(&roots).unwrap();
    let dep = f.path("edge-dep");
    let tree = f.path("edge-tree");
    std::os::unix::fs::symlink(dep, roots.join("dep")).unwrap();
    std::os::unix::fs::symlink(tree, roots.join("tree")).unwrap();
    let cache = t.path().join("lazy");
    let server = Server::start(&[
        std::ffi::OsStr::new("-q"),
        "--dest".as_ref(),
        cache.as_os_str(),
        "--from-store".as_ref(),
        "--roots".as_ref(),
        roots.as_os_str(),
    ]);
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(dep))).status, 200);
    // The tree's root goes away (a result link deleted): at once, it is not filled any more.
    std::fs::remove_file(roots.join("tree")).unwrap();
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(tree))).status, 404);
    assert!(!cache.join(format!("{}.narinfo", hash_part(tree))).exists());
    // What was filled stays served.
    std::fs::remove_file(roots.join("dep")).unwrap();
    assert_eq!(get(server.addr, &format!("/{}.narinfo", hash_part(dep))).status, 200);
}
