//! The command line a Nix user already knows, and a cache a web server can read.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use crate::helpers::*;

#[test]
fn file_urls_and_nix_push_flags() {
    let f = fixtures();
    let tree = f.path("edge-tree");
    let t = tmp();
    let dir = t.path().join("cache");
    let url = format!("file://{}", dir.display());
    // --dest file:///dir is the directory, for every command.
    ok(nixcache().current_dir(t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url, tree]));
    assert!(dir.join("nix-cache-info").exists());
    assert!(!t.path().join("file:").exists(), "made ./file: instead of using the URL's directory");
    ok(nixcache().args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    ok(nixcache().args(["sign", "-q", "-k", SECRET, "--dest", &url]));
    ok(nixcache().args(["gc", "-q", "--older-than", "1d", "--dest", &url]));
    restore(&url, &t.path().join("root"), &[tree]);
    // Other schemes and URL settings: one sentence, exit 2, nothing made.
    for (dest, says) in [
        ("gs://bucket/prefix", "gs:// is not supported"),
        ("s3://bucket/prefix?compression=zstd", "`compression` is a Nix store setting"),
        ("https://cache.example.org/?compression=xz", "reads no settings from the URL"),
        ("file:///tmp/x?compression=zstd", "reads no settings from the URL"),
    ] {
        let out = fails(nixcache().args(["push", "--dest", dest, tree]));
        assert_eq!(out.status.code(), Some(2), "{dest}");
        assert!(stderr(&out).contains(says), "{dest}: {}", stderr(&out));
    }
    // nix-push's --bzip2 and --none are -c bzip2 and -c none.
    for (flag, compression) in [("--bzip2", "bzip2"), ("--none", "none")] {
        let d = t.path().join(flag.trim_start_matches('-'));
        ok(nixcache().args(["push", "-q", flag, "-k", SECRET, "--dest"]).arg(&d).arg(tree));
        assert_eq!(narinfo(&d, tree).compression, compression);
        restore(&file_url(&d), &t.path().join(format!("root-{compression}")), &[tree]);
    }
    // nix-push options with no use here, and nix copy's --to: a sentence each, exit 2.
    let gone = t.path().join("gone");
    for (args, says) in [
        (vec!["--link"], "--link is nix-push's"),
        (vec!["--manifest"], "--manifest is nix-push's"),
        (vec!["--url-prefix", "http://x/"], "--url-prefix is nix-push's"),
        (vec!["--to", "/tmp/elsewhere"], "the cache is --dest DIR"),
    ] {
        let out = fails(nixcache().arg("push").args(&args).arg("--dest").arg(&gone).arg(tree));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
        assert!(!gone.exists(), "{args:?} made the cache");
    }
    // nix copy's --to alone: the same sentence, not clap's "--dest is required".
    let out = fails(nixcache().args(["push", "--to", "/tmp/elsewhere", tree]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("the cache is --dest DIR"), "{}", stderr(&out));
    let out = fails(nixcache().args(["push", tree]));
    assert!(stderr(&out).contains("--dest <DIR|URL>"), "{}", stderr(&out));
}

#[test]
fn a_cache_pushed_under_umask_077_is_readable_by_the_web_server() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let bin = env!("CARGO_BIN_EXE_nixcache");
    let script = format!(
        "umask 077 && exec {bin} push -q --nar-listing --index-debug-info -k {SECRET} --dest {} {}",
        cache.display(),
        f.top
    );
    ok(Command::new("sh").args(["-c", &script]).env("NIX_CONFIG", "experimental-features = nix-command"));
    let script = format!("umask 077 && exec {bin} sign -q -k {SECRET} --dest {}", cache.display());
    ok(Command::new("sh").args(["-c", &script]));
    let mut seen = (0, 0);
    let mut walk = vec![cache.clone()];
    while let Some(d) = walk.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "{}", d.display());
        seen.0 += 1;
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                walk.push(p);
            } else {
                assert_eq!(m.permissions().mode() & 0o777, 0o644, "{}", p.display());
                seen.1 += 1;
            }
        }
    }
    assert!(seen.0 >= 5 && seen.1 > 15, "{seen:?}");
}

#[test]
fn verify_says_when_signatures_were_not_checked() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(f.path("edge-dep")));
    let out = nixcache().args(["verify", "--dest"]).arg(&cache).output().unwrap();
    assert!(out.status.success());
    assert!(stderr(&out).contains("signatures were not checked"), "{}", stderr(&out));
    let out =
        nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache).output().unwrap();
    assert!(!stderr(&out).contains("signatures were not checked"), "{}", stderr(&out));
    let json = ok(nixcache().args(["verify", "--json", "--dest"]).arg(&cache));
    assert!(json.contains("\"signaturesChecked\": false"), "{json}");
}

#[test]
fn push_repair_rewrites_exactly_the_nars_verify_names() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "-c", "xz", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top));
    // One byte of one NAR flipped, its size unchanged: only reading it finds it.
    let bad = f.path("edge-tree");
    let nar = cache.join(narinfo(&cache, bad).url);
    let mut bytes = std::fs::read(&nar).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&nar, bytes).unwrap();
    let out = nixcache().args(["verify", "--dest"]).arg(&cache).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(listed.contains(bad) && listed.contains("`nixcache push --repair PATH`"), "{listed}");
    // A plain push trusts what is there (size and narinfo agree) and does not read it.
    let out = nixcache().args(["push", "--dest"]).arg(&cache).arg(&f.top).output().unwrap();
    assert!(stderr(&out).contains(" 0 repaired"), "{}", stderr(&out));
    // The dry run decides as the push does: with --repair it reads the NARs and names the
    // one that would be rewritten; without, that one is "already there" like the rest.
    let dry = |repair: bool| {
        let mut c = nixcache();
        c.args(["push", "--dry-run", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top);
        if repair {
            c.arg("--repair");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (plain, repair) = (dry(false), dry(true));
    assert!(plain.lines().all(|l| l.starts_with("already there ")), "{plain}");
    let would: Vec<&str> = repair.lines().filter(|l| !l.starts_with("already there ")).collect();
    assert_eq!(would.len(), 1, "{repair}");
    assert!(would[0].starts_with(&format!("would repair {bad} (")), "{repair}");
    // --repair reads every NAR and rewrites the one that is wrong, nothing else.
    let others: Vec<_> = f.closure.iter().filter(|p| p.as_str() != bad).map(|p| narinfo(&cache, p)).collect();
    let out = nixcache()
        .args(["push", "--repair", "-k", SECRET, "--dest"])
        .arg(&cache)
        .arg(&f.top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains(" 1 repaired") && e.contains(&format!("warning: {bad}")), "{e}");
    for (p, before) in f.closure.iter().filter(|p| p.as_str() != bad).zip(others) {
        assert_eq!(narinfo(&cache, p), before, "{p} was rewritten");
    }
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
}

#[test]
fn push_dry_run_says_what_would_happen_and_changes_nothing() {
    let f = fixtures();
    let (tree, dep) = (f.path("edge-tree"), f.path("edge-dep"));
    let t = tmp();
    let cache = t.path().join("cache");
    let dry = |extra: &[&str]| {
        let out = nixcache()
            .args(["push", "--dry-run", "--dest"])
            .arg(&cache)
            .args(extra)
            .arg(tree)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        (String::from_utf8_lossy(&out.stdout).into_owned(), stderr(&out))
    };
    let (lines, summary) = dry(&[]);
    assert!(!cache.exists(), "a dry run made the cache");
    assert!(
        lines.contains(&format!("would push {tree}")) && lines.contains(&format!("would push {dep}")),
        "{lines}"
    );
    assert!(summary.contains("2 paths of closure; 0 already there, 0 to sign, 2 to write"), "{summary}");
    // The dependency pushed unsigned: there, but to sign with a key; the tree to write.
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(dep));
    let before = tree_with_times(&cache);
    let (lines, summary) = dry(&["-k", SECRET]);
    assert!(
        lines.contains(&format!("would sign {dep}")) && lines.contains(&format!("would push {tree}")),
        "{lines}"
    );
    assert!(summary.contains("0 already there, 1 to sign, 1 to write"), "{summary}");
    let (lines, _) = dry(&[]);
    assert!(lines.contains(&format!("already there {dep}")), "{lines}");
    assert_eq!(tree_with_times(&cache), before, "a dry run changed the cache");
}

/// Every file under `dir` with its bytes and modification time.
fn tree_with_times(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>, std::time::SystemTime)> {
    tree(dir)
        .into_iter()
        .map(|(p, bytes)| {
            let time = std::fs::metadata(dir.join(&p)).unwrap().modified().unwrap();
            (p, bytes, time)
        })
        .collect()
}

#[test]
fn summaries_count_what_was_signed_and_speak_plainly() {
    let f = fixtures();
    let single = f.path("edge-single-file");
    let t = tmp();
    let cache = t.path().join("cache");
    let out = nixcache().args(["push", "-k", SECRET, "--dest"]).arg(&cache).arg(single).output().unwrap();
    let e = stderr(&out);
    assert!(e.contains("1 path: 1 pushed, 0 skipped, 0 repaired, 1 signed, 0 failed"), "{e}");
    let out = nixcache().args(["verify", "--dest"]).arg(&cache).output().unwrap();
    assert!(stderr(&out).contains("1 narinfo, "), "{}", stderr(&out));
    let out = nixcache().args(["gc", "--older-than", "1d", "--dest"]).arg(&cache).output().unwrap();
    assert!(stderr(&out).contains("1 path kept, 0 paths removed"), "{}", stderr(&out));
    // -q is the same everywhere: nothing but errors (and warnings: the key is private here).
    let key = t.path().join("key.sec");
    std::fs::copy(SECRET, &key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = key.to_str().unwrap();
    for args in [
        vec!["push", "-q", "-k", key, single],
        vec!["sign", "-q", "-k", key],
        vec!["verify", "-q"],
        vec!["gc", "-q", "--older-than", "1d"],
    ] {
        let out = nixcache().args(&args[..1]).arg("--dest").arg(&cache).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!((stderr(&out), out.stdout.len()), (String::new(), 0), "{args:?}");
    }
}

#[test]
fn setup_names_the_rust_it_needs_before_installing_anything() {
    let t = tmp();
    let fake = t.path();
    for (name, body) in [("rustc", "echo 'rustc 1.63.0 (Debian)'"), ("cargo", "exit 0")] {
        let p = fake.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/setup");
    let old = format!("{}:/usr/bin:/bin", fake.display());
    for (path, found) in [("/usr/bin:/bin", "found: none"), (old.as_str(), "found: 1.63.0")] {
        let out = Command::new("bash").arg(setup).env("PATH", path).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{path}");
        let e = stderr(&out);
        assert!(e.contains("nixcache needs Rust 1.89 or newer") && e.contains(found), "{e}");
    }
}

#[test]
fn journal_output_first_line_then_each_path_as_it_is_published() {
    use std::io::BufRead;
    let f = fixtures();
    let big = build_big("journal");
    let t = tmp();
    let cache = t.path().join("cache");
    // Not a terminal, as under systemd; a progress line every second instead of every 30.
    let mut child = nixcache()
        .args(["push", "-j", "1", "--dest"])
        .arg(&cache)
        .args([&f.top, &big])
        .env("NIXCACHE_PROGRESS_SECONDS", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines: Vec<String> = std::io::BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map(|l| {
            let l = l.unwrap();
            // Said only once a client can fetch it.
            if let Some(rest) = l.strip_prefix("pushed ") {
                let path = rest.split(' ').next().unwrap();
                assert!(
                    cache.join(format!("{}.narinfo", hash_part(path))).exists(),
                    "said before published: {l}"
                );
            }
            l
        })
        .collect();
    assert!(child.wait().unwrap().success(), "{lines:?}");
    let n = f.closure.len() + 1;
    assert!(lines[0].starts_with(&format!("pushing {n} paths ({n} not in the cache yet), ")), "{lines:?}");
    assert!(lines[0].ends_with(&format!("to {}, xz, 1 thread", cache.display())), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.starts_with("pushed ")).count(), n, "{lines:?}");
    assert!(lines.iter().any(|l| l.starts_with(&format!("still reading {}", &big[11..]))), "{lines:?}");
}

#[test]
fn gc_keep_and_sign_take_paths_as_push_does() {
    let f = fixtures();
    let (tree, dep, single) = (f.path("edge-tree"), f.path("edge-dep"), f.path("edge-single-file"));
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(&f.top));
    std::os::unix::fs::symlink(tree, t.path().join("result")).unwrap();
    // sign ./result: the tree's closure, nothing else.
    ok(nixcache()
        .current_dir(t.path())
        .args(["sign", "-q", "-k", SECRET, "--dest"])
        .arg(&cache)
        .arg("./result"));
    let public = [PUBLIC.parse().unwrap()];
    assert!(narinfo(&cache, tree).verified_by(&public) && narinfo(&cache, dep).verified_by(&public));
    assert!(!narinfo(&cache, single).verified_by(&public));
    // Everything last pushed long ago; keep ./result and a path inside the dependency.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(30 * 86400);
    for p in &f.closure {
        let file = cache.join(format!("{}.narinfo", hash_part(p)));
        std::fs::File::options().write(true).open(file).unwrap().set_modified(old).unwrap();
    }
    let inside = format!("{dep}/bin/dep");
    ok(nixcache()
        .current_dir(t.path())
        .args(["gc", "-q", "--older-than", "1d", "--keep", "./result", "--keep", &inside, "--dest"])
        .arg(&cache));
    for p in &f.closure {
        let kept = cache.join(format!("{}.narinfo", hash_part(p))).exists();
        assert_eq!(kept, p == tree || p == dep, "{p}");
    }
}
