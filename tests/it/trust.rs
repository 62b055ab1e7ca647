//! The trust boundary: a cache directory others can write to must never make nixcache
//! delete, read or write outside it, hang, or sign or publish what the store does not say.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use crate::helpers::*;

fn push(cache: &Path, extra: &[&str], paths: &[&str]) {
    ok(nixcache().args(["push", "-q", "--dest"]).arg(cache).args(extra).args(paths));
}

/// `nixcache verify --json`: exit code and (path, kind) of every problem.
fn verify(cache: &Path) -> (i32, Vec<(String, String)>) {
    let out = run_within(nixcache().args(["verify", "--json", "--dest"]).arg(cache), 60);
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    let problems = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_owned(), p["kind"].as_str().unwrap().to_owned()))
        .collect();
    (out.status.code().unwrap(), problems)
}

/// The tree fixture and its dependency: a referrer and a reference.
fn tree_closure() -> (&'static str, &'static str) {
    let f = fixtures();
    (f.path("edge-tree"), f.path("edge-dep"))
}

fn narinfo_file(cache: &Path, path: &str) -> std::path::PathBuf {
    cache.join(format!("{}.narinfo", hash_part(path)))
}

/// A narinfo's text with its References line emptied, everything else as it was.
fn without_references(narinfo: &str) -> String {
    narinfo
        .lines()
        .map(|l| if l.starts_with("References: ") { "References: " } else { l })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn set_old(path: &Path) {
    let old = SystemTime::now() - Duration::from_secs(30 * 86400);
    fs::File::options().write(true).open(path).unwrap().set_modified(old).unwrap();
}

#[test]
fn a_linked_subdirectory_is_refused_and_nothing_outside_is_deleted() {
    let (tree, _) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none"], &[tree]);
    for sub in ["nar", "debuginfo"] {
        // Outside the cache: files gc would take for unused NARs or stale links.
        let outside = t.path().join(format!("outside-{sub}"));
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim.nar"), "not yours").unwrap();
        fs::write(outside.join(".nixcache-tmp-victim"), "not yours either").unwrap();
        let real = t.path().join(format!("real-{sub}"));
        if cache.join(sub).exists() {
            fs::rename(cache.join(sub), &real).unwrap();
        }
        symlink(&outside, cache.join(sub)).unwrap();
        for args in
            [vec!["gc", "--older-than", "0s"], vec!["sign", "-k", SECRET], vec!["push", "-c", "none", tree]]
        {
            let out = fails(nixcache().args(&args[..1]).arg("--dest").arg(&cache).args(&args[1..]));
            let e = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {e}");
            assert!(e.contains(&format!("{sub} is a symbolic link")) && e.contains("real directory"), "{e}");
        }
        // verify reports it and reads nothing through it.
        let (code, problems) = verify(&cache);
        assert_eq!(code, 1);
        assert!(problems.contains(&(format!("{sub}/"), "not-a-directory".into())), "{problems:?}");
        if sub == "nar" {
            assert!(problems.iter().any(|(_, k)| k == "missing-nar"), "{problems:?}");
            assert!(!problems.iter().any(|(_, k)| k == "unused-nar"), "read through the link: {problems:?}");
        }
        assert_eq!(fs::read_to_string(outside.join("victim.nar")).unwrap(), "not yours");
        assert!(outside.join(".nixcache-tmp-victim").exists());
        fs::remove_file(cache.join(sub)).unwrap();
        if real.exists() {
            fs::rename(&real, cache.join(sub)).unwrap();
        }
    }
    assert_eq!(verify(&cache), (0, vec![]));
}

#[test]
fn the_lock_is_never_created_or_opened_through_a_link() {
    let (_, dep) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none"], &[dep]);
    let lock = cache.join(".nixcache.lock");
    fs::remove_file(&lock).unwrap();
    let target = t.path().join("created-outside");
    symlink(&target, &lock).unwrap();
    for args in
        [vec!["push", "-c", "none", dep], vec!["gc", "--older-than", "1d"], vec!["sign", "-k", SECRET]]
    {
        let out = fails(nixcache().args(&args[..1]).arg("--dest").arg(&cache).args(&args[1..]));
        assert!(stderr(&out).contains(".nixcache.lock is a symbolic link"), "{args:?}: {}", stderr(&out));
        assert!(!target.exists(), "{args:?} created a file through the lock link");
    }
}

#[test]
fn linked_and_special_files_are_reported_replaced_and_never_followed() {
    let (tree, dep) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none"], &[tree]);
    // The dep's narinfo becomes a link to an outside copy, which an attacker controls.
    let outside = t.path().join("outside.narinfo");
    fs::rename(narinfo_file(&cache, dep), &outside).unwrap();
    set_old(&outside);
    let outside_time = fs::metadata(&outside).unwrap().modified().unwrap();
    symlink(&outside, narinfo_file(&cache, dep)).unwrap();
    // The tree's narinfo a link to a device that never ends.
    fs::remove_file(narinfo_file(&cache, tree)).unwrap();
    symlink("/dev/zero", narinfo_file(&cache, tree)).unwrap();
    let (code, problems) = verify(&cache);
    assert_eq!(code, 1);
    for p in [dep, tree] {
        let file = format!("{}.narinfo", hash_part(p));
        assert!(problems.contains(&(file, "not-regular-file".into())), "{problems:?}");
    }
    // push replaces both links with narinfos from the store, touching nothing outside.
    let out = run_within(nixcache().args(["push", "-c", "none", "--dest"]).arg(&cache).arg(tree), 120);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("2 repaired"), "{}", stderr(&out));
    assert_eq!(fs::metadata(&outside).unwrap().modified().unwrap(), outside_time, "touched through a link");
    for p in [dep, tree] {
        assert!(fs::symlink_metadata(narinfo_file(&cache, p)).unwrap().is_file());
    }
    assert_eq!(verify(&cache), (0, vec![]));

    // gc removes a link narinfo itself (not its target), and what depended on it.
    fs::remove_file(narinfo_file(&cache, dep)).unwrap();
    symlink(&outside, narinfo_file(&cache, dep)).unwrap();
    ok(nixcache().args(["gc", "--older-than", "1d", "--dest"]).arg(&cache));
    assert!(outside.exists(), "gc deleted a link's target");
    assert!(fs::symlink_metadata(narinfo_file(&cache, dep)).is_err());
    assert!(!narinfo_file(&cache, tree).exists(), "its referrer lost a reference and must go");
    // Nothing trusted names the dep's NAR, and it is young: kept through the grace period.
    let dep_nar = format!(
        "nar/{}",
        fs::read_to_string(&outside).unwrap().split("URL: nar/").nth(1).unwrap().lines().next().unwrap()
    );
    assert_eq!(verify(&cache), (1, vec![(dep_nar.clone(), "unused-nar".into())]));
    set_old(&cache.join(&dep_nar));
    ok(nixcache().args(["gc", "--older-than", "1d", "--dest"]).arg(&cache));
    assert_eq!(verify(&cache), (0, vec![]));

    // A FIFO as nix-cache-info or as a narinfo hangs nothing.
    push(&cache, &["-c", "none"], &[tree]);
    fs::remove_file(narinfo_file(&cache, dep)).unwrap();
    ok(Command::new("mkfifo").arg(narinfo_file(&cache, dep)));
    let (code, problems) = verify(&cache);
    assert_eq!(code, 1);
    assert!(problems.contains(&(format!("{}.narinfo", hash_part(dep)), "not-regular-file".into())));
    let out = run_within(nixcache().args(["push", "-c", "none", "--dest"]).arg(&cache).arg(tree), 120);
    assert!(out.status.success(), "{}", stderr(&out));
    fs::remove_file(cache.join("nix-cache-info")).unwrap();
    ok(Command::new("mkfifo").arg(cache.join("nix-cache-info")));
    let (code, problems) = verify(&cache);
    assert_eq!(code, 1);
    assert!(problems.contains(&("nix-cache-info".into(), "cache-info".into())), "{problems:?}");
    let out = run_within(nixcache().args(["push", "-c", "none", "--dest"]).arg(&cache).arg(tree), 120);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nix-cache-info is a FIFO, not a regular file"), "{}", stderr(&out));
}

#[test]
fn unreadable_narinfos_are_reported_and_skipped_by_gc_and_sign() {
    let (tree, dep) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none"], &[tree]);
    let bad_utf8 = cache.join(format!("{}.narinfo", "0".repeat(32)));
    fs::write(&bad_utf8, b"StorePath: /nix/store/\xff\xfe\n").unwrap();
    // A 5 GiB narinfo that takes no space.
    let huge = cache.join(format!("{}.narinfo", "1".repeat(32)));
    fs::File::create(&huge).unwrap().set_len(5 << 30).unwrap();
    let (code, problems) = verify(&cache);
    assert_eq!(code, 1);
    assert!(problems.contains(&(format!("{}.narinfo", "0".repeat(32)), "unreadable".into())), "{problems:?}");
    assert!(problems.contains(&(format!("{}.narinfo", "1".repeat(32)), "too-large".into())), "{problems:?}");
    // sign signs the good ones and says which it could not.
    let out = fails(nixcache().args(["sign", "-k", SECRET, "--dest"]).arg(&cache));
    assert!(stderr(&out).contains("2 signed") && stderr(&out).contains("2 unusable"), "{}", stderr(&out));
    for p in [tree, dep] {
        assert!(narinfo(&cache, p).verified_by(&[PUBLIC.parse().unwrap()]));
    }
    // gc removes them (they serve nothing) and keeps the rest.
    let out = ok(nixcache().args(["gc", "--older-than", "1d", "--dest"]).arg(&cache));
    assert!(out.contains("not a usable narinfo"), "{out}");
    assert!(!bad_utf8.exists() && !huge.exists());
    assert_eq!(verify(&cache), (0, vec![]));
}

#[test]
fn push_rewrites_a_narinfo_that_disagrees_with_the_store_instead_of_signing_it() {
    let (tree, dep) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none"], &[tree]);
    let file = narinfo_file(&cache, tree);
    let good = fs::read_to_string(&file).unwrap();
    // References emptied, everything else intact and unsigned.
    let tampered = without_references(&good);
    assert_ne!(tampered, good);
    fs::write(&file, &tampered).unwrap();
    let out = nixcache()
        .args(["push", "-c", "none", "-k", SECRET, "--dest"])
        .arg(&cache)
        .arg(tree)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("disagrees with the store (References)"), "{}", stderr(&out));
    let ni = narinfo(&cache, tree);
    let refs: Vec<&str> = ni.references.iter().map(|r| r.as_str()).collect();
    assert!(refs.contains(&&dep[11..]), "References not restored from the store: {refs:?}");
    assert!(ni.verified_by(&[PUBLIC.parse().unwrap()]));
    // Nix installs the path with its real references.
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[tree]);
    let refs = ok(nix_cmd("nix-store").args(["--query", "--references", "--store"]).arg(&root).arg(tree));
    assert!(refs.contains(dep), "{refs}");
}

#[test]
fn sign_signs_only_what_the_cache_proves() {
    let (tree, dep) = tree_closure();
    let f = fixtures();
    let single = f.path("edge-single-file");
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none"], &[tree, single]);
    // A NAR with one byte flipped, its size unchanged.
    let nar = cache.join(narinfo(&cache, single).url);
    let mut bytes = fs::read(&nar).unwrap();
    let last = bytes.len() - 20;
    bytes[last] ^= 1;
    fs::write(&nar, bytes).unwrap();
    // A misnamed narinfo holding the tree's narinfo with its References emptied.
    let misnamed = cache.join(format!("{}.narinfo", "2".repeat(32)));
    let tree_good = fs::read_to_string(narinfo_file(&cache, tree)).unwrap();
    let tree_bad = without_references(&tree_good);
    assert_ne!(tree_bad, tree_good);
    fs::write(&misnamed, &tree_bad).unwrap();
    let out = fails(nixcache().args(["sign", "-k", SECRET, "--dest"]).arg(&cache));
    let e = stderr(&out);
    assert!(e.contains(single) && e.contains("not signed"), "{e}");
    assert!(e.contains("1 refused") && e.contains("1 unusable"), "{e}");
    let public = [PUBLIC.parse().unwrap()];
    assert!(!narinfo(&cache, single).verified_by(&public), "signed a NAR that does not match");
    assert!(narinfo(&cache, dep).verified_by(&public));
    let tree_now = narinfo(&cache, tree);
    assert!(tree_now.verified_by(&public));
    assert_eq!(tree_now.references.len(), 2, "the misnamed narinfo replaced the right one");
    assert_eq!(fs::read_to_string(&misnamed).unwrap(), tree_bad, "a misnamed narinfo was rewritten");
    // --no-check-contents still checks FileHash.
    let out = fails(nixcache().args(["sign", "--no-check-contents", "-k", SECRET, "--dest"]).arg(&cache));
    assert!(stderr(&out).contains("hashes to"), "{}", stderr(&out));
}

#[test]
fn verify_is_as_strict_as_nix_and_gc_resolves_urls_as_nix_does() {
    let (_, dep) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none", "-k", SECRET], &[dep]);
    let good = fs::read_to_string(narinfo_file(&cache, dep)).unwrap();
    let url = narinfo(&cache, dep).url;
    let variants: Vec<(&str, String)> = vec![
        ("crlf", good.replace('\n', "\r\n")),
        ("no final newline", good.trim_end().to_owned()),
        ("bad CA", format!("{good}CA: fixed:r:sha256:0123\n")),
        ("./nar URL", good.replace(&format!("URL: {url}"), &format!("URL: ./{url}"))),
        ("nar// URL", good.replace(&format!("URL: {url}"), &format!("URL: {}", url.replace('/', "//")))),
    ];
    for (name, text) in variants {
        let copy = t.path().join(name.replace(['/', ' '], "-"));
        ok(Command::new("cp").arg("-a").arg(&cache).arg(&copy));
        fs::write(narinfo_file(&copy, dep), &text).unwrap();
        let root = t.path().join(format!("root-{}", name.replace(['/', ' '], "-")));
        let nix = restore_cmd(&file_url(&copy), &root, PUBLIC, &[dep])
            .env("XDG_CACHE_HOME", t.path().join("xdg"))
            .output()
            .unwrap();
        let (code, problems) = verify(&copy);
        assert_eq!(
            nix.status.success(),
            code == 0,
            "{name}: Nix {} it, verify found {problems:?}; Nix said {}",
            if nix.status.success() { "accepts" } else { "rejects" },
            String::from_utf8_lossy(&nix.stderr)
        );
        if nix.status.success() {
            // gc must see the NAR as used.
            ok(nixcache().args(["gc", "--older-than", "1d", "--dest"]).arg(&copy));
            assert!(copy.join(&url).exists(), "{name}: gc removed a NAR a live narinfo uses");
            assert_eq!(verify(&copy), (0, vec![]), "{name}");
        } else {
            assert!(problems.iter().any(|(_, k)| k == "unparsable"), "{name}: {problems:?}");
            // push repairs what verify flags.
            push(&copy, &["-c", "none", "-k", SECRET], &[dep]);
            assert_eq!(verify(&copy), (0, vec![]), "{name}");
        }
    }
}

#[test]
fn input_checks() {
    let (_, dep) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    for j in ["100000", "0"] {
        let out = fails(nixcache().args(["push", "-j", j, "--dest"]).arg(&cache).arg(dep));
        let e = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{e}");
        assert!(e.contains("leave --jobs out to use every core") || e.contains("at least 1"), "{e}");
    }
    // A key with stray whitespace is refused; Nix would reject its signatures.
    let key = fs::read_to_string(SECRET).unwrap();
    for (name, bad) in [("space", format!(" {}", key.trim())), ("inner", key.trim().replacen(':', ": ", 1))] {
        let file = t.path().join(name);
        fs::write(&file, bad).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o600)).unwrap();
        let out = fails(nixcache().args(["push", "-k"]).arg(&file).arg("--dest").arg(&cache).arg(dep));
        assert!(stderr(&out).contains("a key is exactly NAME:BASE64"), "{}", stderr(&out));
    }
    assert!(!cache.exists());
    // A key every user can read works, with a warning.
    let open = t.path().join("open.sec");
    fs::write(&open, &key).unwrap();
    fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
    let out = nixcache().args(["push", "-k"]).arg(&open).arg("--dest").arg(&cache).arg(dep).output().unwrap();
    assert!(out.status.success());
    assert!(stderr(&out).contains("is readable by every user"), "{}", stderr(&out));
}

#[test]
fn a_cache_written_by_nix_keeps_its_nix_cache_info() {
    let (_, dep) = tree_closure();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nix_cmd("nix")
        .args(["copy", "--to"])
        .arg(format!("file://{}?compression=none", cache.display()))
        .arg(dep));
    let before = fs::read(cache.join("nix-cache-info")).unwrap();
    push(&cache, &["-c", "none", "-k", SECRET], &[dep]);
    assert_eq!(
        fs::read(cache.join("nix-cache-info")).unwrap(),
        before,
        "nix-cache-info changed without a flag"
    );
    push(&cache, &["-c", "none", "--priority", "50"], &[dep]);
    // Only the field the flag names is added; WantMassQuery stays absent.
    let after = fs::read_to_string(cache.join("nix-cache-info")).unwrap();
    assert_eq!(after, "StoreDir: /nix/store\nPriority: 50\n");
}

#[test]
fn a_path_that_changes_while_pushed_is_not_published() {
    // A fresh path, damaged during the push and deleted afterwards.
    let salt = format!("changing-{}-{:?}", std::process::id(), SystemTime::now());
    let big = build_big(&salt);
    struct Delete<'a>(&'a str);
    impl Drop for Delete<'_> {
        fn drop(&mut self) {
            let _ = Command::new("chmod").args(["-R", "u+rw", self.0]).status();
            let _ = nix_cmd("nix-store").arg("--delete").arg(self.0).output();
        }
    }
    let _d = Delete(&big);
    let t = tmp();
    let cache = t.path().join("cache");
    // The push reads the NAR once and cuts its xz blocks as it goes, and the other thread
    // compresses the first; strace holds the read's open of e-xs (the last large file, in
    // the second block) for 6 s, and the file changes meanwhile: what is read no longer
    // hashes to the NarHash, after a block of it was compressed.
    let file = Path::new(&big).join("e-xs");
    let child = with_env(Command::new("strace"))
        .args(["--seccomp-bpf", "-f", "-qq", "-o", "/dev/null", "-e", "trace=openat"])
        .args(["-e", "inject=openat:delay_enter=6s", "-P"])
        .arg(&file)
        .arg(env!("CARGO_BIN_EXE_nixcache"))
        .args(["push", "-j", "2", "--dest"])
        .arg(&cache)
        .arg(&big)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The read has begun once the NAR's temporary file is there.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fs::read_dir(cache.join("nar")).map_or(true, |mut d| d.next().is_none()) {
        assert!(Instant::now() < deadline, "the push never began writing the NAR");
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(Duration::from_secs(1));
    // Same size, other bytes.
    fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
    let f = fs::File::options().write(true).open(&file).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"changed!", 19_000_000).unwrap();
    drop(f);
    let out = child.wait_with_output().unwrap();
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{e}");
    assert!(e.contains("is corrupt in the store (or changed while it was read)"), "{e}");
    assert!(!narinfo_file(&cache, &big).exists(), "published a NAR whose bytes were not the ones hashed");
    assert!(fs::read_dir(cache.join("nar")).unwrap().next().is_none(), "a NAR was left behind");
}
