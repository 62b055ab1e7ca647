//! verify, sign and gc on a bucket: what goes, what is spared, and nothing on doubt.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use super::faults::*;
use super::harness::*;
use crate::helpers::*;

#[test]
fn bucket_verify_sign_gc_and_repair() {
    let s = Server::start();
    let f = fixtures();
    let t = tmp();
    let url = s.url("life");
    ok(nc(&s, t.path()).args(["push", "-q", "--dest", &url]).arg(&f.top));
    // Unsigned: sign adds the key's signature, and verify then trusts it.
    let v = fails(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    assert!(String::from_utf8_lossy(&v.stdout).contains("untrusted"));
    ok(nc(&s, t.path()).args(["sign", "-q", "-k", SECRET, "--dest", &url]));
    let out =
        nc(&s, t.path()).args(["verify", "--trusted-public-key", PUBLIC, "--dest", &url]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(" get") && !stderr(&out).contains(" head"), "{}", stderr(&out));
    // Listed once each, the top level before nar/ (so every NAR a listed narinfo names is in
    // the listing): the check on open, the top level, nar/, .nixcache/ and debuginfo/.
    assert_eq!(requests_of(&stderr(&out), "list"), 5, "{}", stderr(&out));

    // A NAR deleted from the bucket: verify names it, push repairs it, Nix restores.
    let leaf = f.path("edge-dep");
    let ni_text =
        String::from_utf8(get(&format!("{}/{}.narinfo", s.http("life"), hash_part(leaf))).1).unwrap();
    let ni: nixcache::narinfo::NarInfo = ni_text.parse().unwrap();
    s.delete(&format!("life/{}", ni.url));
    assert_eq!(get(&format!("{}/{}", s.http("life"), ni.url)).0, 404);
    let v = fails(nc(&s, t.path()).args(["verify", "--dest", &url]));
    let report = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(report.contains(leaf) && report.contains("missing-nar"), "{report}");
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
    ok(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    restore(&s.http("life"), &t.path().join("root"), &[&f.top]);

    // gc: with --keep the closure stays; a path nothing keeps and no push named goes, NAR and all.
    let other = build_fixtures("s3-gc");
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&other));
    std::thread::sleep(Duration::from_secs(2));
    let out = nc(&s, t.path())
        .args(["gc", "--older-than", "1s", "--keep", &f.top, "--dest", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let gc = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(gc.contains(&other), "{gc}");
    // One listing answers for the NARs: no request per path to look at them.
    let said = stderr(&out);
    assert!(said.contains(" delete") && !said.contains(" head"), "{said}");
    assert!(!gc.contains(&f.top), "{gc}");
    ok(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    assert_eq!(get(&format!("{}/{}.narinfo", s.http("life"), hash_part(&other))).0, 404);
    restore(&s.http("life"), &t.path().join("root2"), &[&f.top]);

    // A push names its closure in a record: gc with a long window keeps it, though sign
    // never touched it and its narinfo is older than a second.
    let third = build_fixtures("s3-record");
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&third));
    let gc = ok(nc(&s, t.path()).args(["gc", "--older-than", "1h", "--dest", &url]));
    assert!(!gc.contains(&third), "{gc}");
    assert_eq!(get(&format!("{}/{}.narinfo", s.http("life"), hash_part(&third))).0, 200);
}

#[test]
fn gc_aborts_the_uploads_of_killed_runs_once_stale() {
    use std::time::SystemTime;
    let s = Server::start();
    let t = tmp();
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3-stale"]))
        .trim()
        .to_owned();
    let url = s.url("stale");
    // Killed while its parts go up: the upload stays behind.
    let mut push =
        nc_parts(&s, t.path()).args(["push", "-q", "-j", "1", "--dest", &url]).arg(&random).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.uploads().is_empty() {
        assert!(Instant::now() < deadline, "no multipart upload started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = push.kill();
    let _ = push.wait();
    assert_eq!(s.uploads().len(), 1);
    // A gc now keeps it: another push may be uploading.
    let gc = ok(nc(&s, t.path()).args(["gc", "--older-than", "1s", "--dest", &url]));
    assert!(!gc.contains("incomplete upload"), "{gc}");
    assert_eq!(s.uploads().len(), 1);
    // Two hours on (gc's clock, in-process), past the one-hour grace: aborted.
    let bucket: nixcache::storage::s3::BucketUrl = url.parse().unwrap();
    let backend = nixcache::storage::s3::S3Backend::connect_with(&bucket, &s.key, &s.secret).unwrap();
    let cache = nixcache::cache::Cache::on(Box::new(backend));
    let later = SystemTime::now() + Duration::from_secs(2 * 3600);
    let report = nixcache::gc::gc(&cache, Duration::from_secs(1), &[], later, false).unwrap();
    assert!(report.removals.iter().any(|r| r.file.ends_with("(incomplete upload)")), "{:?}", report.removals);
    assert!(s.uploads().is_empty(), "{:?}", s.uploads());
}

#[test]
fn gc_removes_nothing_on_a_failed_read_or_a_listing_that_lies() {
    let s = Server::start();
    let f = fixtures();
    let t = tmp();
    let url = s.url("gcfault");
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
    // Enough narinfos that gc reads them several at a time.
    let texts = text_paths(&format!("gcfault {}-{:?}", std::process::id(), SystemTime::now()), 20, 10);
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).args(&texts));
    let all = narinfo_count(&s, t.path(), &url);
    assert!(all >= 5 + texts.len() as u64, "{all}");
    static LEAF: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    LEAF.set(format!("{}.narinfo", hash_part(f.path("edge-dep")))).unwrap();
    let leaf = || LEAF.get().unwrap().as_str();
    let nar_listing = |h: &str| is_get_of(h, "list-type=2") && h.lines().next().unwrap().contains("nar%2F");
    type Rule = Box<dyn Fn(&str, usize) -> Fault + Send + Sync>;
    let cases: Vec<(&str, Rule)> = vec![
        (
            "a narinfo whose body is cut short on every try",
            Box::new(move |h, _| if is_get_of(h, leaf()) { Fault::Cut } else { Fault::Forward }),
        ),
        (
            "a narinfo answered 503 SlowDown on every try",
            Box::new(
                move |h, _| {
                    if is_get_of(h, leaf()) { Fault::Status("503 Slow Down") } else { Fault::Forward }
                },
            ),
        ),
        (
            "a narinfo whose body stalls",
            Box::new(move |h, _| if is_get_of(h, leaf()) { Fault::Stall } else { Fault::Forward }),
        ),
        (
            "a NAR listing without <Size>",
            Box::new(move |h, _| {
                if nar_listing(h) {
                    Fault::Rewrite(|b| {
                        b.split("<Size>").map(|p| p.split_once("</Size>").map_or(p, |(_, r)| r)).collect()
                    })
                } else {
                    Fault::Forward
                }
            }),
        ),
        (
            "a NAR listing with odd times",
            Box::new(move |h, _| {
                if nar_listing(h) {
                    Fault::Rewrite(|b| b.replace("<LastModified>", "<LastModified>x"))
                } else {
                    Fault::Forward
                }
            }),
        ),
        (
            "a NAR listing cut short",
            Box::new(move |h, _| if nar_listing(h) { Fault::Cut } else { Fault::Forward }),
        ),
        (
            "an empty NAR listing",
            Box::new(move |h, _| {
                if nar_listing(h) {
                    Fault::Rewrite(|b| {
                        let kept: String =
                            b.split("<Contents>")
                                .enumerate()
                                .map(|(i, p)| {
                                    if i == 0 {
                                        p
                                    } else {
                                        p.split_once("</Contents>").map_or("", |(_, r)| r)
                                    }
                                })
                                .collect();
                        let count = kept
                            .split("<KeyCount>")
                            .nth(1)
                            .and_then(|r| r.split_once("</KeyCount>"))
                            .map(|(n, _)| n.to_owned());
                        match count {
                            Some(n) => {
                                kept.replace(&format!("<KeyCount>{n}</KeyCount>"), "<KeyCount>0</KeyCount>")
                            }
                            None => kept,
                        }
                    })
                } else {
                    Fault::Forward
                }
            }),
        ),
    ];
    for (case, rule) in cases {
        let p = faulty(s.port, rule);
        let started = Instant::now();
        let out = nc(&s, t.path())
            .env("NIXCACHE_S3_READ_TIMEOUT", "1")
            .args(["gc", "--older-than", "14d", "--dest", &s.url_via("gcfault", p.port)])
            .output()
            .unwrap();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(!out.status.success(), "{case}: gc succeeded: {said}");
        assert!(!said.contains("removed /nix/store"), "{case}: {said}");
        assert!(p.failed.load(std::sync::atomic::Ordering::SeqCst) > 0, "{case}: no fault injected");
        assert!(started.elapsed() < Duration::from_secs(90), "{case}: took {:?}", started.elapsed());
        assert_eq!(narinfo_count(&s, t.path(), &url), all, "{case}: {said}");
    }
    // One fault, then a whole answer: retried, and gc goes on, removing nothing it must keep.
    let p =
        faulty(s.port, move |h, n| if n == 0 && is_get_of(h, leaf()) { Fault::Cut } else { Fault::Forward });
    let out =
        ok(nc(&s, t.path()).args(["gc", "--older-than", "14d", "--dest", &s.url_via("gcfault", p.port)]));
    assert!(!out.contains("removed"), "{out}");
    assert_eq!(p.failed.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A push record that cannot be read stops gc: here the only thing keeping the closure.
    std::thread::sleep(Duration::from_secs(3));
    ok(nc(&s, t.path()).args(["push", "-q", "--dest", &url]).arg(&f.top));
    let p = faulty(s.port, |h, _| if is_get_of(h, "pushes") { Fault::Cut } else { Fault::Forward });
    let out = nc(&s, t.path())
        .args(["gc", "--older-than", "2s", "--dest", &s.url_via("gcfault", p.port)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(stderr(&out).contains("pushes"), "{}", stderr(&out));
    assert_eq!(narinfo_count(&s, t.path(), &url), all);
    ok(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    restore(&s.http("gcfault"), &t.path().join("root"), &[&f.top]);
}

#[test]
fn gc_aborts_only_its_own_uploads_and_removes_foreign_records_and_odd_keys() {
    use std::time::SystemTime;
    let s = Server::start();
    let t = tmp();
    let f = fixtures();
    let url = s.url("a");
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
    // Ours, stale; another cache's under a longer prefix; another program's.
    start_upload(&s, "a/nar/.nixcache-tmp-00112233445566778899aabbccddeeff.nar.xz");
    start_upload(&s, "a/b/nar/.nixcache-tmp-1-0.nar.xz");
    start_upload(&s, "a/b/backup.tar");
    start_upload(&s, "a/backup.tar");
    // Records nixcache never writes: misplaced, oversized, not hash parts.
    let junk = t.path().join("junk");
    std::fs::write(&junk, "x".repeat(nixcache::storage::s3::RECORD_LIMIT as usize + 1)).unwrap();
    put_object(&s, "a/.nixcache/pushes/1764660000000-big", &junk);
    std::fs::write(&junk, "not a hash\n").unwrap();
    put_object(&s, "a/.nixcache/pushes/1764660000000-bad", &junk);
    put_object(&s, "a/.nixcache/pushes/sub/1764660000000-deep", &junk);
    // A key with a control character, which only a url-encoded listing names right.
    put_object(&s, "a/ctl%01x.narinfo", &junk);
    let v = fails(nc(&s, t.path()).args(["verify", "--json", "--dest", &url]));
    let report = String::from_utf8_lossy(&v.stdout).into_owned();
    assert!(report.contains("ctl\\u0001x.narinfo"), "{report}");

    let out = nc(&s, t.path()).args(["gc", "--older-than", "1h", "--dest", &url]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for name in ["1764660000000-big", "1764660000000-bad", "sub/1764660000000-deep"] {
        assert!(stderr(&out).contains(name), "{name}: {}", stderr(&out));
    }
    // The odd narinfo serves nothing: gone, by its real name.
    let gc = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(gc.contains("removed ctl\u{1}x.narinfo (not a usable narinfo)"), "{gc}");
    // Two hours on (gc's clock), past the grace: only ours is aborted; the odd records and
    // the odd narinfo go, the closure (kept) stays.
    let bucket: nixcache::storage::s3::BucketUrl = url.parse().unwrap();
    let backend = nixcache::storage::s3::S3Backend::connect_with(&bucket, &s.key, &s.secret).unwrap();
    let cache = nixcache::cache::Cache::on(Box::new(backend));
    let later = SystemTime::now() + Duration::from_secs(2 * 3600);
    let report =
        nixcache::gc::gc(&cache, Duration::from_secs(1), std::slice::from_ref(&f.top), later, false).unwrap();
    let removed: Vec<&str> = report.removals.iter().map(|r| r.file.as_str()).collect();
    let mut left = s.uploads();
    left.sort();
    let prefixed = |k: &str| format!("{}{k}", s.run);
    assert_eq!(
        left,
        [prefixed("a/b/backup.tar"), prefixed("a/b/nar/.nixcache-tmp-1-0.nar.xz"), prefixed("a/backup.tar")],
        "{removed:?}"
    );
    for gone in [
        ".nixcache/pushes/1764660000000-big",
        ".nixcache/pushes/1764660000000-bad",
        ".nixcache/pushes/sub/1764660000000-deep",
    ] {
        assert!(removed.contains(&gone), "{gone}: {removed:?}");
    }
    assert!(!removed.iter().any(|r| r.ends_with(".narinfo")), "{removed:?}");
    ok(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
}

#[test]
fn a_push_racing_gc_leaves_every_narinfo_whole() {
    let s = Server::start();
    let t = tmp();
    let f = fixtures();
    let url = s.url("racegc");
    for round in 0..3 {
        ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
        std::thread::sleep(Duration::from_millis(2500));
        // gc finds everything old; its narinfo deletes are slowed, and a push of the same
        // closure starts as the first goes out.
        let p = faulty(s.port, |h, _| {
            let line = h.lines().next().unwrap_or_default();
            if line.starts_with("DELETE") && line.contains(".narinfo") {
                Fault::Delay(Duration::from_millis(400))
            } else {
                Fault::Forward
            }
        });
        let gc = nc(&s, t.path())
            .args(["gc", "--older-than", "1s", "--dest", &s.url_via("racegc", p.port)])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.seen.lock().unwrap().iter().any(|l| l.starts_with("DELETE")) {
            assert!(Instant::now() < deadline, "gc deleted nothing");
            std::thread::sleep(Duration::from_millis(20));
        }
        let push =
            nc(&s, t.path()).args(["push", "-k", SECRET, "--dest", &url]).arg(&f.top).output().unwrap();
        let gc = gc.wait_with_output().unwrap();
        assert!(gc.status.success(), "round {round}: {}", String::from_utf8_lossy(&gc.stderr));
        assert!(push.status.success(), "round {round}: {}", stderr(&push));
        let broken = inconsistencies(&s, t.path(), &url, Some(PUBLIC));
        assert!(
            broken.is_empty(),
            "round {round}: push: {}\ngc: {}{}\n{broken:#?}",
            stderr(&push),
            String::from_utf8_lossy(&gc.stdout),
            String::from_utf8_lossy(&gc.stderr)
        );
    }
    ok(nc(&s, t.path()).args(["push", "-q", "-k", SECRET, "--dest", &url]).arg(&f.top));
    restore(&s.http("racegc"), &t.path().join("root"), &[&f.top]);
}
