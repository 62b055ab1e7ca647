//! Partial caches: push leaves out what an upstream serves (`--skip-signed-by`,
//! `--skip-upstream`) or what must not leave the machine (`--exclude`); a client with both
//! caches restores the closure; verify and gc know the holes are deliberate. On a directory
//! and on a SeaweedFS bucket.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::helpers::*;
use crate::http::{serve, serve_failing};

const PARTIAL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/partial.nix");

/// An upstream cache made here: `upstream` (up-tool, up-libc) pushed to it signed by
/// `upstream-1`, deleted from the store and substituted back from it (so the Nix database
/// holds upstream-1's signatures), then `app` and `app-with-secret` built on top locally.
pub struct Upstream {
    _dir: tempfile::TempDir,
    pub cache: PathBuf,
    pub public: String,
    /// up-tool, up-libc.
    pub upstream: Vec<String>,
    pub app: String,
    pub with_secret: String,
    pub local: String,
    pub secret: String,
}

pub fn upstream() -> &'static Upstream {
    static U: OnceLock<Upstream> = OnceLock::new();
    U.get_or_init(|| {
        let dir = tmp();
        // A salt of this run's own: paths an earlier run built on top of the upstream's would
        // keep them from being deleted.
        let salt = format!("partial-{}-{:?}", std::process::id(), std::time::SystemTime::now());
        let build = |attr: &str| {
            ok(nix_cmd("nix-build").args([PARTIAL, "-A", attr, "--no-out-link", "--argstr", "salt", &salt]))
                .trim()
                .to_owned()
        };
        let tool = build("upstream");
        let upstream = requisites(&tool);
        assert_eq!(upstream.len(), 2, "{upstream:?}");
        let (sec, public) = (dir.path().join("up.sec"), dir.path().join("up.pub"));
        ok(nixcache().args(["keygen", "upstream-1"]).arg(&sec).arg(&public));
        let public = std::fs::read_to_string(&public).unwrap().trim().to_owned();
        let cache = dir.path().join("upstream");
        ok(nixcache()
            .args(["push", "-q", "-c", "zstd", "-k"])
            .arg(&sec)
            .arg("--dest")
            .arg(&cache)
            .arg(&tool));
        ok(nix_cmd("nix-store").arg("--delete").args(&upstream));
        ok(nix_cmd("nix").args([
            "copy",
            "--from",
            &file_url(&cache),
            "--option",
            "trusted-public-keys",
            &public,
            &tool,
        ]));
        let info = ok(nix_cmd("nix").args(["path-info", "--json", "--sigs", &tool]));
        assert!(info.contains("upstream-1:"), "not substituted with upstream-1's signature: {info}");
        let app = build("app");
        let with_secret = build("withSecret");
        let closure = requisites(&with_secret);
        let find = |n: &str| closure.iter().find(|p| p.ends_with(n)).unwrap().clone();
        Upstream {
            local: find("-local-dep"),
            secret: find("-secret-token"),
            _dir: dir,
            cache,
            public,
            upstream,
            app,
            with_secret,
        }
    })
}

/// Where a test's partial cache lives: a directory, or a prefix of a bucket.
pub struct Dest<'a> {
    /// --dest.
    pub dest: String,
    /// Where Nix reads it over HTTP.
    pub http: String,
    /// nixcache, with the credentials the bucket needs.
    pub nc: Box<dyn Fn() -> Command + 'a>,
    /// Whether the cache has the narinfo of `path`.
    pub has: Box<dyn Fn(&str) -> bool + 'a>,
}

/// Restores `paths` into a fresh chroot store substituting from `substituters` (a URL list),
/// trusting the test key and upstream-1.
fn substitute(root: &Path, substituters: &str, u: &Upstream, paths: &[&str]) -> std::process::Output {
    let mut c = nix_cmd("nix-store");
    c.env("XDG_CACHE_HOME", root.with_extension("nix-cache"))
        .arg("--store")
        .arg(root)
        .arg("-r")
        .args(paths)
        .args(["--option", "substituters", substituters])
        .args(["--option", "trusted-public-keys", &format!("{PUBLIC} {}", u.public)])
        .args(["--option", "require-sigs", "true"]);
    c.output().unwrap()
}

/// push --skip-signed-by writes only what was built here; both caches restore the closure;
/// verify is clean and counts what it left to the upstream; gc keeps it, or removes it whole.
pub fn skip_signed_by(d: &Dest, work: &Path) {
    let u = upstream();
    let up_http = format!("http://127.0.0.1:{}", serve(u.cache.clone()));
    let out = (d.nc)()
        .args(["push", "-c", "zstd", "-k", SECRET, "--skip-signed-by", &u.public, "--dest", &d.dest, &u.app])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 paths (") && err.contains(" skipped: signed by upstream-1"), "{err}");
    assert!((d.has)(&u.app) && (d.has)(&u.local), "{err}");
    for p in &u.upstream {
        assert!(!(d.has)(p), "{p} was pushed though upstream-1 signed it");
    }
    // The narinfo still lists every reference, as Nix requires.
    let app_refs = ok(nix_cmd("nix-store").args(["--query", "--references", &u.app]));
    assert_eq!(app_refs.lines().count(), 3);

    let root = work.join("both");
    let o = substitute(&root, &format!("{} {up_http}", d.http), u, &[&u.app]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_restored_identical(&root, &requisites(&u.app));
    // From the partial cache alone the closure cannot be restored.
    let o = substitute(&work.join("alone"), &d.http, u, &[&u.app]);
    assert!(!o.status.success());

    // verify: clean, and it says what it left to the upstream.
    let out = (d.nc)().args(["verify", "--trusted-public-key", PUBLIC, "--dest", &d.dest]).output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{}{err}", String::from_utf8_lossy(&out.stdout));
    assert!(
        err.contains("2 referenced paths left to upstreams or excluded")
            && err.contains("2 signed by upstream-1"),
        "{err}"
    );
    let v = ok((d.nc)().args(["verify", "--json", "--dest", &d.dest]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["leftToUpstreams"]["signed by upstream-1"], 2, "{v:#}");

    // A push without the flags keeps the recorded policy, and says so first.
    let out =
        (d.nc)().args(["push", "-c", "zstd", "-k", SECRET, "--dest", &d.dest, &u.app]).output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let first = err.lines().find(|l| !l.starts_with("warning:")).unwrap();
    assert!(first.contains("is a partial cache") && first.contains("signed by upstream-1"), "{err}");
    assert!(err.contains("0 pushed") && err.contains("skipped: signed by upstream-1"), "{err}");
    for p in &u.upstream {
        assert!(!(d.has)(p));
    }

    // gc with a window that covers the push keeps all of it; with everything expired, it goes whole.
    let out = (d.nc)().args(["gc", "--older-than", "1h", "--dest", &d.dest]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        (d.has)(&u.app) && (d.has)(&u.local),
        "gc removed a closure the upstream completes: {}",
        stderr(&out)
    );
    let out = (d.nc)().args(["gc", "--older-than", "0s", "--dest", &d.dest]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!(d.has)(&u.app) && !(d.has)(&u.local), "{}", stderr(&out));
    let v = ok((d.nc)().args(["verify", "--json", "--dest", &d.dest]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(
        (v["ok"].clone(), v["narinfos"].clone()),
        (serde_json::json!(true), serde_json::json!(0)),
        "{v:#}"
    );

    // --no-skip fills the closure in.
    ok((d.nc)().args(["push", "-q", "-c", "zstd", "-k", SECRET, "--no-skip", "--dest", &d.dest, &u.app]));
    for p in requisites(&u.app) {
        assert!((d.has)(&p), "{p}");
    }
}

/// Paths the upstream served over HTTP with 500 for up-libc's narinfo.
fn libc_fails(rel: &str) -> bool {
    LIBC_HASH.get().is_some_and(|h| rel == format!("{h}.narinfo"))
}
static LIBC_HASH: OnceLock<String> = OnceLock::new();

/// push --skip-upstream: asks the upstream over HTTP; a lookup that fails means the path is
/// pushed; an upstream that is gone means everything is.
pub fn skip_upstream<'a>(d: &Dest<'a>, fresh: &dyn Fn(&str) -> Dest<'a>, work: &Path) {
    let u = upstream();
    let libc = u.upstream.iter().find(|p| p.ends_with("-up-libc")).unwrap();
    let tool = u.upstream.iter().find(|p| p.ends_with("-up-tool")).unwrap();
    LIBC_HASH.get_or_init(|| hash_part(libc).to_owned());
    let up_http = format!("http://127.0.0.1:{}", serve_failing(u.cache.clone(), libc_fails));
    let out = (d.nc)()
        .args(["push", "-c", "zstd", "-k", SECRET, "--skip-upstream", &up_http, "--dest", &d.dest, &u.app])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // up-tool is there; up-libc's lookups failed (500, after the retries), so it was pushed.
    assert!(!(d.has)(tool), "{err}");
    assert!((d.has)(libc) && (d.has)(&u.app) && (d.has)(&u.local), "{err}");
    assert!(err.contains("1 path (") && err.contains(&format!("skipped: on {up_http}")), "{err}");
    assert!(err.contains(&format!("asked {up_http} about 4 paths")), "{err}");
    assert!(err.contains("1 lookups failed, so those paths are pushed") && err.contains("500"), "{err}");
    let root = work.join("upstream-both");
    let o = substitute(&root, &format!("{} {up_http}", d.http), u, &[&u.app]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_restored_identical(&root, &requisites(&u.app));
    let v = ok((d.nc)().args(["verify", "--json", "--dest", &d.dest]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["leftToUpstreams"][format!("on {up_http}")], 1, "{v:#}");

    // The upstream gone: a warning, and the whole closure is pushed.
    let gone = fresh("gone");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = (gone.nc)()
        .args([
            "push",
            "-c",
            "zstd",
            "--skip-upstream",
            &format!("http://127.0.0.1:{port}"),
            "--dest",
            &gone.dest,
            &u.app,
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("cannot be reached") && err.contains("its paths will be pushed"), "{err}");
    for p in requisites(&u.app) {
        assert!((gone.has)(&p), "{p}: {err}");
    }
}

/// --exclude: a path that references an excluded one fails the push before anything is
/// written, unless --allow-incomplete; then only the excluded path cannot be restored.
pub fn exclude(d: &Dest, work: &Path) {
    let u = upstream();
    let out = (d.nc)()
        .args([
            "push",
            "-c",
            "zstd",
            "-k",
            SECRET,
            "--exclude",
            "^secret-",
            "--dest",
            &d.dest,
            &u.with_secret,
        ])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&format!("{} references {}", u.with_secret, u.secret)), "{err}");
    assert!(err.contains("nothing was written") && err.contains("--allow-incomplete"), "{err}");
    assert!(!(d.has)(&u.app) && !(d.has)(&u.with_secret));

    let out = (d.nc)()
        .args(["push", "-c", "zstd", "-k", SECRET, "--exclude", "^secret-", "--allow-incomplete"])
        .args(["--dest", &d.dest, &u.with_secret])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 path (") && err.contains("left out: they match --exclude '^secret-'"), "{err}");
    assert!(!(d.has)(&u.secret) && (d.has)(&u.with_secret) && (d.has)(&u.app));
    let v = ok((d.nc)().args(["verify", "--json", "--dest", &d.dest]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["leftToUpstreams"]["excluded by --exclude '^secret-'"], 1, "{v:#}");
    // A client restores what does not need the secret, and fails on what does, naming it.
    let o = substitute(&work.join("excl-app"), &d.http, u, &[&u.app]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = substitute(&work.join("excl-secret"), &d.http, u, &[&u.with_secret]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&u.secret), "{}", stderr(&o));
    // A later push keeps it out, and gc keeps the closure with its hole.
    let out = (d.nc)()
        .args(["push", "-c", "zstd", "--allow-incomplete", "--dest", &d.dest, &u.with_secret])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!(d.has)(&u.secret));
    ok((d.nc)().args(["gc", "-q", "--older-than", "1h", "--dest", &d.dest]));
    assert!((d.has)(&u.with_secret));
}

fn dir_dest<'a>(dir: PathBuf) -> Dest<'a> {
    let http = format!("http://127.0.0.1:{}", serve(dir.clone()));
    let d2 = dir.clone();
    Dest {
        dest: dir.to_str().unwrap().to_owned(),
        http,
        nc: Box::new(nixcache),
        has: Box::new(move |p: &str| d2.join(format!("{}.narinfo", hash_part(p))).exists()),
    }
}

#[test]
fn partial_directory_skip_signed_by() {
    let t = tmp();
    skip_signed_by(&dir_dest(t.path().join("cache")), t.path());
}

#[test]
fn partial_directory_skip_upstream() {
    let t = tmp();
    let base = t.path().to_owned();
    skip_upstream(&dir_dest(t.path().join("cache")), &|n| dir_dest(base.join(n)), t.path());
}

#[test]
fn partial_directory_exclude() {
    let t = tmp();
    exclude(&dir_dest(t.path().join("cache")), t.path());
    assert_eq!(std::fs::read_dir(t.path().join("cache/.nixcache")).unwrap().count(), 1);
    // The rsync example takes the record along: verify and gc on the mirror know the hole.
    let mirror = t.path().join("mirror");
    ok(Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/rsync-cache.sh"))
        .arg(t.path().join("cache"))
        .arg(&mirror));
    let v = ok(nixcache().args(["verify", "--json", "--dest"]).arg(&mirror));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["ok"], true, "{v:#}");
    assert_eq!(v["leftToUpstreams"]["excluded by --exclude '^secret-'"], 1, "{v:#}");
    // A .nixcache that links elsewhere: nothing is written through it.
    let u = upstream();
    let (hostile, outside) = (t.path().join("hostile"), t.path().join("outside"));
    std::fs::create_dir_all(&hostile).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, hostile.join(".nixcache")).unwrap();
    let out = fails(
        nixcache()
            .args(["push", "-q", "-c", "zstd", "--exclude", "^secret-", "--allow-incomplete", "--dest"])
            .arg(&hostile)
            .arg(&u.with_secret),
    );
    assert!(stderr(&out).contains("must be a real directory"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
}

#[test]
fn partial_dry_run_says_per_path_and_writes_nothing() {
    let u = upstream();
    let t = tmp();
    let cache = t.path().join("cache");
    let out = nixcache()
        .args([
            "push",
            "-n",
            "--skip-signed-by",
            &u.public,
            "--exclude",
            "^secret-",
            "--allow-incomplete",
            "--dest",
        ])
        .arg(&cache)
        .arg(&u.with_secret)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for p in &u.upstream {
        assert!(
            stdout.contains(&format!("would skip {p} (")) && stdout.contains("): signed by upstream-1"),
            "{stdout}"
        );
    }
    assert!(stdout.contains(&format!("would leave out {} (", u.secret)), "{stdout}");
    assert!(stdout.contains(&format!("would push {} (", u.app)), "{stdout}");
    assert!(stderr(&out).contains("dry run: 2 paths ("), "{}", stderr(&out));
    assert!(!cache.exists());
    // A key that is not one is a usage error with a sentence.
    let out =
        fails(nixcache().args(["push", "--skip-signed-by", "upstream-1", "--dest"]).arg(&cache).arg(&u.app));
    assert!(stderr(&out).contains("trusted-public-keys"), "{}", stderr(&out));
}
