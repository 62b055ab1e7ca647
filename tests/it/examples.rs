//! The files in examples/ work as shipped: nginx serves a cache Nix restores from, the
//! systemd units verify, and the rsync script orders its transfers safely.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use std::os::unix::fs::PermissionsExt;

use crate::helpers::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

pub struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// GET `path`; returns the status line and the headers, lower-cased.
fn get(port: u16, path: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out);
    text.split("\r\n\r\n").next().unwrap().to_lowercase()
}

/// nginx with the example server block, serving `cache` on a free loopback port, its
/// configuration and state in `dir`; stopped when the guard is dropped.
pub fn nginx_example(dir: &Path, cache: &Path) -> (Killed, u16) {
    let port = free_port();
    let server = std::fs::read_to_string(format!("{EXAMPLES}/nginx/nixcache.conf"))
        .unwrap()
        .replace("listen 80;", &format!("listen 127.0.0.1:{port};"))
        .replace("listen [::]:80;", "")
        .replace("root /var/lib/static-nix-cache;", &format!("root {};", cache.display()));
    std::fs::write(dir.join("server.conf"), server).unwrap();
    let main = format!(
        "user root;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n\
         access_log off;\nclient_body_temp_path {d}/body;\nproxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\nuwsgi_temp_path {d}/uwsgi;\nscgi_temp_path {d}/scgi;\n\
         include /etc/nginx/mime.types;\ninclude {d}/server.conf;\n}}\n",
        d = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let conf = dir.join("nginx.conf");
    ok(Command::new("nginx").arg("-t").arg("-p").arg(dir).arg("-c").arg(&conf));
    // One process (master_process off), so killing it leaves no worker holding our pipes.
    let nginx = Killed(
        Command::new("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (nginx, port)
}

#[test]
fn nginx_example_serves_a_cache_nix_restores() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--nar-listing", "--dest"]).arg(&cache).arg(&f.top));
    let (_nginx, port) = nginx_example(t.path(), &cache);
    let ni = narinfo(&cache, &f.top);
    let h = get(port, &format!("/{}.narinfo", hash_part(&f.top)));
    assert!(h.contains("200 ok") && h.contains("content-type: text/x-nix-narinfo"), "{h}");
    assert!(h.contains("cache-control: public, max-age=300"), "{h}");
    let h = get(port, &format!("/{}", ni.url));
    assert!(h.contains("content-type: application/x-nix-nar") && h.contains("immutable"), "{h}");
    let h = get(port, "/nix-cache-info");
    assert!(h.contains("content-type: text/x-nix-cache-info"), "{h}");
    let h = get(port, &format!("/{}.ls", hash_part(&f.top)));
    assert!(h.contains("content-type: application/json"), "{h}");
    assert!(get(port, "/.nixcache.lock").contains("404"), "the lock file is hidden");
    let root = t.path().join("root");
    restore(&format!("http://127.0.0.1:{port}"), &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
}

#[test]
fn install_puts_nixcache_where_the_hardened_units_run_it() {
    let t = tmp();
    let staged = t.path().join("pkg");
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/install"))
        .env("DESTDIR", &staged)
        .env("NIXCACHE_BIN", env!("CARGO_BIN_EXE_nixcache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let prefix = staged.join("usr/local");
    ok(Command::new(prefix.join("bin/nixcache")).arg("--version"));
    let pages = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/man")).unwrap().count();
    assert_eq!(std::fs::read_dir(prefix.join("share/man/man1")).unwrap().count(), pages);
    // The pages point to the guide installed beside them, not to a source tree's README.
    let page = std::fs::read_to_string(prefix.join("share/man/man1/nixcache-push.1")).unwrap();
    assert!(page.contains("share/doc/nixcache") && page.contains(".SH ENVIRONMENT"), "{page}");
    assert!(!page.contains("(see README)"), "{page}");
    for c in [
        "share/doc/nixcache/README.md",
        "share/doc/nixcache/examples/systemd/nixcache-spool.service",
        "share/doc/nixcache/examples/push-spool.sh",
        "share/bash-completion/completions/nixcache",
        "share/zsh/site-functions/_nixcache",
        "share/fish/vendor_completions.d/nixcache.fish",
    ] {
        assert!(std::fs::metadata(prefix.join(c)).unwrap().len() > 100, "{c}");
    }
    // The units run /usr/local/bin/nixcache: under DESTDIR, that is what install put there.
    let units = [
        "nixcache-push.service",
        "nixcache-push.timer",
        "nixcache-gc.service",
        "nixcache-gc.timer",
        "nixcache-serve.socket",
        "nixcache-serve.service",
        "nixcache-receive.socket",
        "nixcache-receive.service",
        "nixcache-spool.service",
        "nixcache-spool.path",
        "nixcache-spool.timer",
    ];
    for name in units {
        let text = std::fs::read_to_string(format!("{EXAMPLES}/systemd/{name}"))
            .unwrap()
            .replace("/usr/local/", &format!("{}/", prefix.display()));
        std::fs::write(t.path().join(name), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(units.map(|n| t.path().join(n)))
        .output()
        .expect("systemd-analyze is required (Debian: systemd)");
    let err = stderr(&out);
    assert!(out.status.success() && !err.contains("nixcache"), "systemd-analyze verify:\n{err}");
    // Hardened: systemd's own review rates each service at most 3.0 ("OK"), the server at
    // most 2.0.
    for (name, most) in [
        ("nixcache-push.service", 3.0),
        ("nixcache-gc.service", 3.0),
        ("nixcache-spool.service", 3.0),
        ("nixcache-serve.service", 2.0),
        ("nixcache-receive.service", 2.0),
    ] {
        let out = ok(Command::new("systemd-analyze")
            .args(["security", "--offline=yes"])
            .arg(format!("{EXAMPLES}/systemd/{name}"))
            .current_dir(t.path()));
        let level: f64 = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|l| l.split(": ").nth(1))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"));
        assert!(level <= most, "{name}: exposure {level}\n{out}");
    }
}

#[test]
fn an_unprivileged_user_that_can_write_only_the_cache_pushes() {
    // As the units run it: its own account, the Nix database and store read-only, the cache
    // its only writable place, the key a private copy.
    let f = fixtures();
    let t = tmp();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = t.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    let key = t.path().join("cache.sec");
    std::fs::copy(SECRET, &key).unwrap();
    for p in [&cache, &key] {
        ok(Command::new("chown").args(["65534:65534"]).arg(p));
    }
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = as_nobody(env!("CARGO_BIN_EXE_nixcache"))
        .args(["push", "--metadata", "db", "-k"])
        .arg(&key)
        .arg("--dest")
        .arg(&cache)
        .arg(&f.top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
}

/// Runs the rsync script; returns rsync's `%o %n` lines in order.
fn mirror(src: &Path, dest: &Path) -> Vec<(String, String)> {
    // After every rsync step: the source's lock is held (a writer would have to wait) and the
    // mirror verifies, but for NARs not yet or no longer used.
    let real = ok(Command::new("sh").args(["-c", "command -v rsync"])).trim().to_owned();
    let dir = dest.with_extension("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let wrapper = dir.join("rsync");
    std::fs::write(
        &wrapper,
        format!(
            r#"#!/bin/sh
{real} "$@" || exit $?
case " $* " in *" --dry-run "*) exit 0 ;; esac
if flock -n -x {src}/.nixcache.lock true; then echo "the source lock was not held" >&2; exit 1; fi
out=$({bin} verify --json --dest {dest}) || true
bad=$(printf '%s\n' "$out" | grep '"kind"' | grep -v 'unused-nar\|temporary-file') || true
if [ -n "$bad" ]; then echo "mirror broken after rsync $*: $bad" >&2; exit 1; fi
"#,
            src = src.display(),
            dest = dest.display(),
            real = real,
            bin = env!("CARGO_BIN_EXE_nixcache")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = ok(Command::new(format!("{EXAMPLES}/rsync-cache.sh"))
        .arg(src)
        .arg(dest)
        .env("PATH", format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()))
        .env("RSYNC_OPTS", "--out-format=%o:%n"));
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(o, n)| (o.to_owned(), n.to_owned()))
        .filter(|(_, n)| !n.ends_with('/'))
        .collect()
}

fn position(ops: &[(String, String)], pred: impl Fn(&(String, String)) -> bool) -> Vec<usize> {
    ops.iter().enumerate().filter(|(_, o)| pred(o)).map(|(i, _)| i).collect()
}

#[test]
fn rsync_example_orders_transfers_safely() {
    let old = build_fixtures("rsync-old");
    let new = build_fixtures("rsync-new");
    let t = tmp();
    let (src, dest) = (t.path().join("src"), t.path().join("dest"));
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&src).arg(&old));
    let ops = mirror(&src, &dest);
    let narinfos = position(&ops, |(o, n)| o == "send" && n.ends_with(".narinfo"));
    let nars = position(&ops, |(o, n)| o == "send" && n.starts_with("nar/"));
    assert!(!narinfos.is_empty() && !nars.is_empty(), "{ops:?}");
    assert!(nars.iter().max() < narinfos.iter().min(), "NARs before narinfos: {ops:?}");
    assert!(!ops.iter().any(|(_, n)| n.contains(".nixcache")), "lock and temp files stay home");
    assert_eq!(problems_of(&dest), 0);

    // A second push and a gc: the mirror must delete narinfos before NARs, after all sends.
    std::thread::sleep(Duration::from_secs(2));
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&src).arg(&new));
    ok(nixcache().args(["gc", "-q", "--older-than", "1s", "--dest"]).arg(&src));
    // What each narinfo on the mirror references, before it is mirrored again.
    let refs: std::collections::HashMap<String, Vec<String>> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".narinfo"))
        .map(|n| {
            let ni: nixcache::narinfo::NarInfo =
                std::fs::read_to_string(dest.join(&n)).unwrap().parse().unwrap();
            let r = ni
                .references
                .iter()
                .map(|r| format!("{}.narinfo", r.hash_part()))
                .filter(|r| *r != n)
                .collect();
            (n, r)
        })
        .collect();
    let ops = mirror(&src, &dest);
    let sends = position(&ops, |(o, _)| o == "send");
    let del_narinfos = position(&ops, |(o, n)| o == "del." && n.ends_with(".narinfo"));
    let del_nars = position(&ops, |(o, n)| o == "del." && n.starts_with("nar/"));
    assert!(!del_narinfos.is_empty() && !del_nars.is_empty(), "{ops:?}");
    assert!(sends.iter().max() < del_narinfos.iter().min(), "deletions last: {ops:?}");
    assert!(del_narinfos.iter().max() < del_nars.iter().min(), "narinfos deleted before NARs: {ops:?}");
    // Referrers before their references, as gc removes them: never a narinfo whose reference
    // is gone, even between two deletions.
    let deleted: Vec<&str> = del_narinfos.iter().map(|&i| ops[i].1.as_str()).collect();
    assert!(deleted.len() >= 3, "the test needs a chain of stale narinfos: {deleted:?}");
    for (i, x) in deleted.iter().enumerate() {
        for r in &refs[*x] {
            if let Some(j) = deleted.iter().position(|d| d == r) {
                assert!(j > i, "{r} deleted before its referrer {x}: {deleted:?}");
            }
        }
    }
    assert_eq!(problems_of(&dest), 0);
    restore(&file_url(&dest), &t.path().join("root"), &[&new]);
}

fn problems_of(cache: &Path) -> usize {
    let out = nixcache()
        .args(["verify", "--json", "--trusted-public-key", PUBLIC, "--dest"])
        .arg(cache)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let n = v["problems"].as_array().unwrap().len();
    assert_eq!(n == 0, out.status.success());
    n
}

#[test]
fn completions_load_in_bash() {
    let script = ok(nixcache().args(["completions", "bash"]));
    assert!(script.contains("push") && script.contains("--secret-key"));
    let t = tmp();
    std::fs::write(t.path().join("c.bash"), &script).unwrap();
    let out = ok(Command::new("bash")
        .arg("-c")
        .arg(format!("source {}/c.bash && complete -p nixcache", t.path().display())));
    assert!(out.contains("nixcache"), "{out}");
    for shell in ["zsh", "fish"] {
        assert!(ok(nixcache().args(["completions", shell])).contains("push"), "{shell}");
    }
    assert!(ok(nixcache().arg("--version")).starts_with(concat!("nixcache ", env!("CARGO_PKG_VERSION"))));
}

#[test]
fn post_build_hook_queues_builds_and_the_drain_pushes_them_as_the_units_user_losing_nothing() {
    let t = tmp();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let spool = t.path().join("spool");
    let cache = t.path().join("cache");
    let key = t.path().join("cache.sec");
    std::fs::create_dir(&spool).unwrap();
    std::fs::create_dir(&cache).unwrap();
    std::fs::copy(SECRET, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    for p in [&spool, &cache, &key] {
        ok(Command::new("chown").args(["65534:65534"]).arg(p));
    }
    let hook = format!("{EXAMPLES}/post-build-hook.sh");
    let config = format!("substituters =\nexperimental-features = nix-command\npost-build-hook = {hook}\n");
    let salt = format!("hook-{}-{:?}", std::process::id(), std::time::SystemTime::now());
    let build = |salt: &str, spool: &Path| {
        nix_cmd("nix-build")
            .args([concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures.nix"), "--no-out-link"])
            .args(["--argstr", "salt", salt])
            .env("NIX_CONFIG", &config)
            .env("NIXCACHE_SPOOL", spool)
            .output()
            .unwrap()
    };
    let out = build(&salt, &spool);
    assert!(out.status.success(), "the build failed: {}", stderr(&out));
    let top = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // Every build is queued (Nix 2.8 gives the derivation, not OUT_PATHS); and a path that
    // was garbage-collected since.
    let gone = "/nix/store/00000000000000000000000000000000-collected-since";
    std::fs::OpenOptions::new()
        .append(true)
        .open(spool.join("queue"))
        .unwrap()
        .write_all(format!("{gone}\n").as_bytes())
        .unwrap();
    let queued = std::fs::read_to_string(spool.join("queue")).unwrap();
    assert!(queued.lines().filter(|l| l.ends_with(".drv")).count() >= 6, "{queued}");

    // A push that fails in the middle (after writing some of the batch; a build queues
    // another path meanwhile): nothing queued is lost, and the drain says it failed.
    let wrapper = t.path().join("failing-nixcache");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n{} \"$@\"\necho /nix/store/11111111111111111111111111111111-built-meanwhile >> {}/queue\necho 'error: the disk went away' >&2\nexit 1\n",
            env!("CARGO_BIN_EXE_nixcache"),
            spool.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let drain = |nixcache: &Path| {
        as_nobody(format!("{EXAMPLES}/push-spool.sh"))
            .arg(&cache)
            .args(["-q", "--secret-key"])
            .arg(&key)
            .env("NIXCACHE_SPOOL", &spool)
            .env("NIXCACHE", nixcache)
            .output()
            .unwrap()
    };
    let out = drain(&wrapper);
    assert!(!out.status.success(), "a failed push was taken for success: {}", stderr(&out));
    assert!(stderr(&out).contains("the push failed"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no longer in the store (garbage-collected since they were built): 1 of"),
        "{}",
        stderr(&out)
    );
    let kept = std::fs::read_to_string(spool.join("batch")).unwrap();
    for line in queued.lines() {
        assert!(kept.lines().any(|l| l == line), "{line} was dropped from the batch:\n{kept}");
    }
    assert!(std::fs::read_to_string(spool.join("queue")).unwrap().contains("built-meanwhile"));

    // The next drain pushes the batch and what was queued meanwhile, as that user.
    let out = drain(Path::new(env!("CARGO_BIN_EXE_nixcache")));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no longer in the store (garbage-collected since they were built): 2 of"),
        "{}",
        stderr(&out)
    );
    let mut left: Vec<_> = std::fs::read_dir(&spool).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.retain(|n| n != ".lock");
    assert!(left.is_empty(), "left in the spool: {left:?}");
    assert!(cache.join(format!("{}.narinfo", hash_part(&top))).exists(), "the top output was not pushed");
    restore(&file_url(&cache), &t.path().join("root"), &[&top]);

    // A hook that cannot write its spool never fails the build, and says so in its log.
    let out = build(&format!("{salt}-again"), Path::new("/proc/no-such-spool"));
    assert!(out.status.success(), "a failing spool failed the build: {}", stderr(&out));
    assert!(stderr(&out).contains("this build will not be pushed"), "{}", stderr(&out));
    // A drain whose spool is missing fails, saying so.
    let out = as_nobody(format!("{EXAMPLES}/push-spool.sh"))
        .arg(&cache)
        .env("NIXCACHE_SPOOL", t.path().join("no-spool"))
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn demo_leaves_a_usable_cache_and_keys_and_nothing_else() {
    let t = tmp();
    let dest = t.path().join("demo");
    let scratch = t.path().join("tmp");
    std::fs::create_dir(&scratch).unwrap();
    let run = || {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo"))
            .arg(&dest)
            .env("NIXCACHE_BIN", env!("CARGO_BIN_EXE_nixcache"))
            .env("TMPDIR", &scratch)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    let public = std::fs::read_to_string(t.path().join("demo-keys/public")).unwrap();
    for line in [
        format!("the cache        {}", dest.display()),
        format!("substituters = file://{}", dest.display()),
        format!("trusted-public-keys = {}", public.trim()),
        format!("serve --dest {} --listen :5000", dest.display()),
    ] {
        assert!(first.contains(&line), "{line}\n{first}");
    }
    // Again: the same key, and no temporary store or directory left behind.
    let second = run();
    assert_eq!(std::fs::read_to_string(t.path().join("demo-keys/public")).unwrap(), public);
    assert!(second.contains(public.trim()));
    assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0, "left in TMPDIR");
    ok(nixcache().args(["verify", "--trusted-public-key", public.trim(), "--dest"]).arg(&dest));
}
