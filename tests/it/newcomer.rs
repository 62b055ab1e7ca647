//! What a new user trips on: a `--dest` in the wrong place, a quiet run that hides a warning,
//! an unsigned push into a signed cache, Ctrl-C, the habits of other tools (a pipe of paths,
//! environment variables, JSON), and the exit status of every bad value.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

/// Nothing of a cache is in `dir` (the store, or a directory the refused run named).
fn no_cache_files_in(dir: &Path) {
    for f in ["nix-cache-info", ".nixcache.lock", "nar", ".nixcache"] {
        assert!(!dir.join(f).exists(), "{} was written", dir.join(f).display());
    }
}

#[test]
fn a_dest_in_or_around_the_store_is_refused_and_nothing_is_written() {
    let f = fixtures();
    let t = tmp();
    let some_path = f.path("edge-dep");
    for dest in
        ["/nix/store", "/nix/store/", "file:///nix/store", "/nix", "/", "/nix/store/../store/sub", some_path]
    {
        let out = nixcache().args(["push", "--dest", dest, &f.top]).output().unwrap();
        assert_eq!(code(&out), Some(2), "{dest}: {}", stderr(&out));
        assert!(stderr(&out).contains("the Nix store /nix/store"), "{dest}: {}", stderr(&out));
    }
    no_cache_files_in(Path::new("/nix/store"));
    no_cache_files_in(Path::new(some_path));
    // Every command that takes --dest.
    for args in [
        vec!["verify"],
        vec!["sign", "-k", SECRET],
        vec!["gc", "--older-than", "1d"],
        vec!["serve"],
        vec!["serve", "--from-store", "--whole-store"],
    ] {
        let out = run_within(nixcache().args(&args).args(["--dest", "/nix/store"]), 30);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("is the Nix store"), "{args:?}: {}", stderr(&out));
    }
    no_cache_files_in(Path::new("/nix/store"));
    // The real store of a chroot store (--root), and a link to it.
    let root = t.path().join("root");
    let store = root.join("nix/store");
    std::fs::create_dir_all(&store).unwrap();
    std::os::unix::fs::symlink(&store, t.path().join("link")).unwrap();
    for dest in [store.clone(), t.path().join("link/cache"), root.clone()] {
        let out = nixcache()
            .args(["push", "--root"])
            .arg(&root)
            .arg("--dest")
            .arg(&dest)
            .arg(&f.top)
            .output()
            .unwrap();
        assert_eq!(code(&out), Some(2), "{}: {}", dest.display(), stderr(&out));
        assert!(stderr(&out).contains(&format!("the Nix store {}", store.display())), "{}", stderr(&out));
    }
    assert_eq!(std::fs::read_dir(&store).unwrap().count(), 0, "written into the chroot store");
}

#[test]
fn a_file_url_with_a_host_is_refused_with_what_was_meant() {
    let f = fixtures();
    let t = tmp();
    let run = |dest: &str| {
        nixcache().current_dir(t.path()).args(["push", "--dest", dest, &f.top]).output().unwrap()
    };
    // (The scp form `root@pi:/dir` is a push over ssh: tests/it/remote.rs.)
    let out = run("file://tmp/x");
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("file:///tmp/x"), "{}", stderr(&out));
    let out = run("");
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--dest is empty"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0, "a directory was made for a refused --dest");
    // A local directory with a colon in its name is still one, written as such; so is
    // file://localhost/DIR.
    ok(nixcache().current_dir(t.path()).args(["push", "-q", "--dest", "./a:b", &f.top]));
    assert!(t.path().join("a:b/nix-cache-info").exists());
    let local = format!("file://localhost{}", t.path().join("c").display());
    ok(nixcache().args(["push", "-q", "--dest", &local, &f.top]));
    assert!(t.path().join("c/nix-cache-info").exists());
}

#[test]
fn quiet_keeps_warnings_and_an_unreachable_upstream_is_still_recorded() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    // Nothing listens on port 1 of loopback.
    let out = nixcache()
        .args(["push", "-q", "--skip-upstream", "http://127.0.0.1:1", "--dest"])
        .arg(&cache)
        .arg(&f.top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("warning:") && e.contains("127.0.0.1:1"), "-q hid the warning: {e:?}");
    assert_eq!(e.lines().count(), 1, "-q printed more than the warning: {e}");
    // The policy is recorded: the next push without the flag still asks that upstream.
    let out = nixcache().arg("push").arg("--dest").arg(&cache).arg(&f.top).output().unwrap();
    assert!(
        stderr(&out).contains("is a partial cache") && stderr(&out).contains("on http://127.0.0.1:1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unsigned_push_into_a_signed_cache_warns_naming_its_keys_and_nix_conf_s_key() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&cache).arg(f.path("edge-dep")));
    let conf = t.path().join("nix-conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("nix.conf"), format!("secret-key-files = {SECRET}\n")).unwrap();
    let out = nixcache()
        .args(["push", "-q", "--dest"])
        .arg(&cache)
        .arg(&f.top)
        .env("NIX_CONF_DIR", &conf)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("warning: no --secret-key, but this cache's narinfos are signed by test-1"), "{e}");
    assert!(e.contains(&format!("nix.conf has secret-key-files = {SECRET}")), "{e}");
    // Not signed with it silently.
    assert!(narinfo(&cache, &f.top).sigs.is_empty());
    // With a key, no warning.
    let out =
        nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top).output().unwrap();
    assert!(!stderr(&out).contains("no --secret-key"), "{}", stderr(&out));
}

#[test]
fn gc_and_sign_on_a_directory_without_nix_cache_info_fail_and_create_nothing() {
    let t = tmp();
    let typo = t.path().join("not-a-cache");
    std::fs::create_dir(&typo).unwrap();
    for args in [vec!["gc", "--older-than", "1d"], vec!["sign", "-k", SECRET]] {
        let out = nixcache().args(&args).arg("--dest").arg(&typo).output().unwrap();
        assert_eq!(code(&out), Some(1), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains("has no nix-cache-info"), "{args:?}: {}", stderr(&out));
        assert_eq!(std::fs::read_dir(&typo).unwrap().count(), 0, "{args:?} created something");
    }
}

/// Starts a push of a large path with xz at its slowest, and waits until its first
/// temporary file exists.
fn slow_push(cache: &Path, big: &str) -> std::process::Child {
    let mut child = nixcache()
        .args(["push", "-c", "xz", "--compression-level", "9", "-j", "1", "--dest"])
        .arg(cache)
        .arg(big)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        let temp = std::fs::read_dir(cache.join("nar"))
            .into_iter()
            .flatten()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with(".nixcache-tmp-"));
        if temp {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the push made no temporary file");
}

#[test]
fn an_interrupted_push_says_so_removes_its_temporary_files_and_the_gc_unit_stays_green() {
    let _alone = heavy();
    let big = build_big("interrupt");
    for (signal, status) in [("INT", 130), ("TERM", 143)] {
        let t = tmp();
        let cache = t.path().join("cache");
        let child = slow_push(&cache, &big);
        ok(Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]));
        let out = child.wait_with_output().unwrap();
        assert_eq!(code(&out), Some(status), "SIG{signal}: {}", stderr(&out));
        assert!(stderr(&out).contains(&format!("interrupted (SIG{signal})")), "{}", stderr(&out));
        let left: Vec<_> = tree(&cache)
            .into_iter()
            .filter(|(p, _)| p.to_string_lossy().contains(".nixcache-tmp-"))
            .map(|(p, _)| p)
            .collect();
        assert!(left.is_empty(), "SIG{signal} left {left:?}");
        // The example gc unit: gc, then verify, before any other push.
        ok(nixcache().args(["gc", "-q", "--older-than", "30d", "--dest"]).arg(&cache));
        ok(nixcache().args(["verify", "--quiet", "--dest"]).arg(&cache));
    }
}

#[test]
fn paths_come_from_a_pipe_and_stdin_skips_blank_lines_and_comments() {
    let f = fixtures();
    let t = tmp();
    let listed = format!("# tonight's build\n\n{}\n   \n", f.top);
    for (name, flag) in [("piped", None), ("flagged", Some("--stdin"))] {
        let cache = t.path().join(name);
        let mut c = nixcache();
        c.args(["push", "-q", "--dest"]).arg(&cache).args(flag);
        let mut child = c.stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(listed.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        for p in &f.closure {
            assert!(cache.join(format!("{}.narinfo", hash_part(p))).exists(), "{name}: {p} missing");
        }
    }
    // No paths and nothing piped is a usage error.
    let out = run_within(nixcache().args(["push", "--dest"]).arg(t.path().join("none")), 30);
    assert_eq!(code(&out), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("no store paths given"), "{}", stderr(&out));
}

#[test]
fn options_a_unit_repeats_come_from_the_environment() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let out = nixcache()
        .args(["push", "-q", &f.top])
        .env("NIXCACHE_DEST", &cache)
        .env("NIXCACHE_SECRET_KEY_FILE", SECRET)
        .env("NIXCACHE_COMPRESSION", "zstd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let ni = narinfo(&cache, &f.top);
    assert_eq!(ni.compression, "zstd");
    assert!(ni.verified_by(&[PUBLIC.parse().unwrap()]), "not signed with NIXCACHE_SECRET_KEY_FILE");
    // A flag wins over the environment.
    let other = t.path().join("other");
    ok(nixcache()
        .args(["push", "-q", "-c", "none", "--dest"])
        .arg(&other)
        .arg(&f.top)
        .env("NIXCACHE_COMPRESSION", "zstd"));
    assert_eq!(narinfo(&other, &f.top).compression, "none");
    // --help and the man pages name them.
    let help = ok(nixcache().args(["push", "--help"]));
    for var in ["NIXCACHE_DEST", "NIXCACHE_SECRET_KEY_FILE", "NIXCACHE_COMPRESSION", "NIXCACHE_SKIP_UPSTREAM"]
    {
        assert!(help.contains(var), "{var} not in --help");
    }
    let man = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/man/nixcache-serve.1")).unwrap();
    assert!(man.contains("NIXCACHE_LISTEN"), "NIXCACHE_LISTEN not in nixcache-serve(1)");
}

#[test]
fn push_gc_and_sign_say_what_they_did_as_json() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let json = |c: &mut Command| -> serde_json::Value {
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    };
    let v = json(
        nixcache().args(["push", "--json", "--json-paths", "-c", "zstd", "--dest"]).arg(&cache).arg(&f.top),
    );
    let n = f.closure.len() as u64;
    assert_eq!(v["pushed"], n, "{v}");
    assert_eq!(v["skipped"], 0, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["nar_bytes"].as_u64().unwrap() > 0 && v["file_bytes"].as_u64().unwrap() > 0, "{v}");
    let each = v["path_outcomes"].as_array().unwrap();
    assert_eq!(each.len() as u64, n, "{v}");
    assert!(each.iter().any(|p| p["path"] == f.top.as_str() && p["outcome"] == "pushed"), "{v}");
    // Again: all skipped.
    let v = json(nixcache().args(["push", "--json", "-c", "zstd", "--dest"]).arg(&cache).arg(&f.top));
    assert_eq!((v["pushed"].as_u64(), v["skipped"].as_u64()), (Some(0), Some(n)), "{v}");
    assert!(v.get("path_outcomes").is_none(), "{v}");
    // sign: every narinfo signed, listed on request.
    let v = json(nixcache().args(["sign", "--json", "--json-paths", "-k", SECRET, "--dest"]).arg(&cache));
    assert_eq!((v["signed"].as_u64(), v["key"].as_str()), (Some(n), Some("test-1")), "{v}");
    assert_eq!(v["signed_paths"].as_array().unwrap().len() as u64, n, "{v}");
    // gc: with nothing old, everything kept; with a window of 0s and --dry-run, the list.
    let v = json(nixcache().args(["gc", "--json", "--older-than", "30d", "--dest"]).arg(&cache));
    assert_eq!((v["kept"].as_u64(), v["removed_paths"].as_u64()), (Some(n), Some(0)), "{v}");
    std::thread::sleep(Duration::from_millis(1100));
    let v = json(
        nixcache()
            .args(["gc", "--json", "--json-paths", "--dry-run", "--older-than", "1s", "--dest"])
            .arg(&cache),
    );
    assert_eq!(v["removed_paths"].as_u64(), Some(n), "{v}");
    assert!(
        v["removals"].as_array().unwrap().iter().any(|r| r["path"] == f.top.as_str() && r["reason"] == "old"),
        "{v}"
    );
    assert!(cache.join(format!("{}.narinfo", hash_part(&f.top))).exists(), "--dry-run removed");
}

#[test]
fn the_first_line_of_a_push_says_how_many_paths_are_new() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let n = f.closure.len();
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(f.path("edge-dep")));
    let first = |out: &std::process::Output| stderr(out).lines().next().unwrap_or_default().to_owned();
    let out = nixcache().args(["push", "--dest"]).arg(&cache).arg(&f.top).output().unwrap();
    let dep_closure = requisites(f.path("edge-dep")).len();
    assert!(
        first(&out).starts_with(&format!("pushing {n} paths ({} not in the cache yet), ", n - dep_closure)),
        "{}",
        stderr(&out)
    );
    let out = nixcache().args(["push", "--dest"]).arg(&cache).arg(&f.top).output().unwrap();
    assert!(
        first(&out).starts_with(&format!("pushing {n} paths (0 not in the cache yet), ")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_bad_value_is_a_usage_error() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let dest = cache.to_str().unwrap();
    for args in [
        vec!["push", "--compression-level", "99", "--dest", dest, &f.top],
        vec!["push", "-c", "zstd", "--compression-level", "20", "--dest", dest, &f.top],
        vec!["push", "--skip-upstream", "cache.nixos.org", "--dest", dest, &f.top],
        vec!["push", "--skip-signed-by", "not-a-key", "--dest", dest, &f.top],
        vec!["push", "-c", "gzip", "--dest", dest, &f.top],
        vec!["serve", "--from-store", "--whole-store", "--compression-level", "99", "--dest", dest],
        vec!["keygen", "bad name", "/nonexistent/s", "/nonexistent/p"],
        vec!["keygen", "", "/nonexistent/s", "/nonexistent/p"],
    ] {
        let out = run_within(nixcache().args(&args), 30);
        assert_eq!(code(&out), Some(2), "{args:?}: {}", stderr(&out));
    }
    assert!(!cache.exists(), "a usage error wrote the cache");
    // gzip is named, not answered with a similar-looking bzip2.
    let out = nixcache().args(["push", "-c", "gzip", "--dest", dest, &f.top]).output().unwrap();
    assert!(!stderr(&out).contains("similar"), "{}", stderr(&out));
    // --skip-signed-by takes a key file, as verify --trusted-public-key does.
    let public = t.path().join("cache.pub");
    std::fs::write(&public, format!("{PUBLIC}\n")).unwrap();
    ok(nixcache()
        .args(["push", "-q", "--dry-run", "--skip-signed-by"])
        .arg(&public)
        .args(["--dest", dest, &f.top]));
}

#[test]
fn messages_a_newcomer_meets_are_plain() {
    let f = fixtures();
    let t = tmp();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(&f.top));
    // A cache this user cannot write: said so, once, without "(os error 13)".
    for args in [
        vec!["push", "--dest", cache.to_str().unwrap(), &f.top],
        vec!["gc", "--older-than", "1d", "--dest", cache.to_str().unwrap()],
    ] {
        let out = as_nobody(env!("CARGO_BIN_EXE_nixcache")).args(&args).output().unwrap();
        let e = stderr(&out);
        assert_eq!(code(&out), Some(1), "{e}");
        assert!(e.contains("cannot be opened for writing"), "{e}");
        assert!(!e.contains("cannot be read") && !e.contains("os error"), "{e}");
    }
    // Common failures carry no errno tails.
    for args in [
        vec!["push", "--dest", "/proc/nixcache-test", &f.top],
        vec!["push", "--dest", cache.to_str().unwrap(), "/nonexistent"],
    ] {
        let out = nixcache().args(&args).output().unwrap();
        assert!(!out.status.success());
        assert!(!stderr(&out).contains("os error"), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn serve_prints_the_client_lines_answers_them_at_the_root_and_signs_what_it_filled_before() {
    use crate::serve::{Server, get};
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("lazy");
    let roots = ["--from-store", "--roots", f.top.as_str()];
    // Without a key: a warning, and what is filled is unsigned.
    let mut server = Server::start(&[&["--dest", cache.to_str().unwrap()][..], &roots[..]].concat());
    assert!(server.lines().iter().any(|l| l.starts_with("warning: no --secret-key")), "{:?}", server.lines());
    let a = get(server.addr, &format!("/{}.narinfo", hash_part(&f.top)));
    assert_eq!(a.status, 200);
    assert!(!String::from_utf8_lossy(&a.body).contains("Sig:"));
    server.term();
    // Restarted with -k: the narinfo filled before is served signed.
    let mut server =
        Server::start(&[&["--dest", cache.to_str().unwrap(), "-k", SECRET][..], &roots[..]].concat());
    let all = server.lines();
    // Only a warning about the key file's mode may come before the two lines.
    let lines = &all[all.iter().position(|l| l.starts_with("substituters = ")).unwrap()..];
    assert_eq!(lines[0], format!("substituters = {}", server.url), "{all:?}");
    assert_eq!(lines[1], format!("trusted-public-keys = {PUBLIC}"), "{all:?}");
    assert!(lines[2].starts_with("serving "), "{all:?}");
    let a = get(server.addr, &format!("/{}.narinfo", hash_part(&f.top)));
    assert!(
        String::from_utf8_lossy(&a.body).contains("Sig: test-1:"),
        "{}",
        String::from_utf8_lossy(&a.body)
    );
    let page = get(server.addr, "/");
    assert_eq!(page.status, 200);
    let text = String::from_utf8_lossy(&page.body).into_owned();
    assert!(text.contains(&lines[0]) && text.contains(&lines[1]), "{text}");
    // The access log carries a timestamp when stderr is not the journal.
    assert!(server.wait_for(10, |l| l.starts_with("20") && l.contains(" GET / 200")), "{:?}", server.lines());
    server.term();
    // A static cache served without -k: the key found by its name in nix.conf.
    let conf = t.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        format!("trusted-public-keys = other-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {PUBLIC}\n"),
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = nixcache();
    cmd.args(["serve", "--dest"])
        .arg(&cache)
        .args(["--listen", &port.to_string()])
        .env("NIX_CONF_DIR", &conf);
    let mut server = Server::spawn(cmd);
    assert_eq!(server.url, format!("http://127.0.0.1:{port}"));
    assert_eq!(
        server.lines()[..2],
        [format!("substituters = {}", server.url), format!("trusted-public-keys = {PUBLIC}")],
        "{:?}",
        server.lines()
    );
    server.term();
    // localhost:PORT and :PORT are addresses too.
    for listen in [format!("localhost:{port}"), format!(":{port}")] {
        let mut cmd = nixcache();
        cmd.args(["serve", "--dest"]).arg(&cache).args(["--listen", &listen]);
        let mut server = Server::spawn(cmd);
        assert_eq!(get(server.addr, "/nix-cache-info").status, 200, "{listen}");
        server.term();
    }
}

/// The README's first-ten-minutes commands, as printed there.
fn readme_command(starts: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    readme
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(starts))
        .unwrap_or_else(|| panic!("the README has no command starting {starts:?}"))
        .to_owned()
}

#[test]
fn the_readme_s_first_ten_minutes_work_on_nix_2_8_as_written() {
    use crate::serve::Server;
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("static-nix-cache");
    // keygen, then the push as a pipe from nix-build.
    let keygen = readme_command("nixcache keygen ");
    let push = readme_command("nix-build '<nixpkgs>' -A hello | nixcache push ");
    let sh = |line: &str| {
        let bin = Path::new(env!("CARGO_BIN_EXE_nixcache")).parent().unwrap().to_owned();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
        ok(with_env(Command::new("sh")).arg("-c").arg(line).current_dir(t.path()).env("PATH", path))
    };
    sh(&keygen);
    let public = std::fs::read_to_string(t.path().join("cache.pub")).unwrap();
    sh(&push
        .replace("nix-build '<nixpkgs>' -A hello", &format!("echo {}", f.top))
        .replace("/var/lib/static-nix-cache", cache.to_str().unwrap()));
    // serve, and the restore check exactly as printed, into a throwaway store.
    let serve = readme_command("nixcache serve --dest /var/lib/static-nix-cache --listen");
    assert!(serve.ends_with("--listen :5000"), "{serve}");
    let mut cmd = nixcache();
    cmd.args(["serve", "--dest"]).arg(&cache).args(["--listen", "127.0.0.1:0"]);
    let mut server = Server::spawn(cmd);
    let restore = readme_command("nix-store --store /tmp/check -r ");
    let check = t.path().join("check");
    sh(&restore
        .replace("/tmp/check", check.to_str().unwrap())
        .replace("/nix/store/...-hello-2.12.1", &f.top)
        .replace("http://build-host:5000", &server.url));
    server.term();
    assert!(check.join(f.top.trim_start_matches('/')).exists(), "not restored");
    assert!(public.starts_with("cache.example.org-1:"));
}
