//! Pushes to a bucket: what Nix restores, re-pushes, records, races, partial caches.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::faults::*;
use super::harness::*;
use crate::helpers::*;

#[test]
fn bucket_push_is_the_directory_push_and_nix_restores_it() {
    let s = Server::start();
    let f = fixtures();
    let random =
        ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3"])).trim().to_owned();
    let t = tmp();
    for compression in ["xz", "zstd", "bzip2", "none"] {
        let dir = t.path().join(compression);
        let prefix = format!("{compression}/cache");
        // The random NAR (26 MiB uncompressed) is larger than a part. Within the spool limit
        // it goes up in one PUT under its name; with the spool off, as for a NAR beyond it, it
        // goes up in parts to a temporary key and is copied, here a part at a time (copies
        // above 6 MiB are made so, as above 5 GiB).
        let spooled = compression != "none";
        let push = |dest: &str| {
            let mut c = nc(&s, t.path());
            c.args(["push", "-c", compression, "-k", SECRET, "--nar-listing", "--dest", dest])
                .args([&f.top, &random]);
            c.env("NIXCACHE_S3_COPY_LIMIT", (6 << 20).to_string());
            if !spooled {
                c.env("NIXCACHE_S3_SPOOL_LIMIT", "0");
            }
            let out = c.output().unwrap();
            let err = stderr(&out);
            assert!(out.status.success(), "{err}");
            err
        };
        push(dir.to_str().unwrap());
        let err = push(&s.url(&prefix));
        let requests = err.lines().find(|l| l.contains(" requests (")).unwrap_or_else(|| panic!("{err}"));
        if spooled {
            assert!(!requests.contains("upload") && !requests.contains("copy"), "{requests}");
        } else {
            assert!(requests.contains("upload-part") && requests.contains("copy-part"), "{requests}");
        }
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
        let root = t.path().join(format!("root-{compression}"));
        restore(&s.http(&prefix), &root, &[&f.top, &random]);
        let mut all = f.closure.clone();
        all.push(random.clone());
        assert_restored_identical(&root, &all);
        ok(nix_cmd("nix")
            .args(["store", "verify", "--store", &s.http(&prefix), "--trusted-public-keys", PUBLIC])
            .arg(&f.top));
        // Nothing left over: no temporary objects, no incomplete uploads.
        let v = ok(nc(&s, t.path()).args([
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
        let out = nc(&s, t.path())
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
fn a_re_push_reads_unchanged_narinfos_from_copies_kept_here() {
    let s = Server::start();
    let f = fixtures();
    let t = tmp();
    let url = s.url("kept");
    let n = f.closure.len();
    let push_as = |home: &Path, extra: &[&str]| {
        let out = nc(&s, home)
            .args(["push", "-c", "zstd", "-k", SECRET, "--dest", &url])
            .args(extra)
            .arg(&f.top)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let push = |extra: &[&str]| push_as(t.path(), extra);
    let kept = t.path().join(".cache/nixcache/buckets");
    push(&[]);
    // All there and unchanged: no narinfo is downloaded (the one GET is nix-cache-info).
    let said = push(&[]);
    assert!(said.contains(&format!("0 pushed, {n} skipped")), "{said}");
    assert!(
        said.contains(&format!("{n} narinfos read from the copies kept in {}", kept.display())),
        "{said}"
    );
    assert_eq!(requests_of(&said, "get"), 1, "{said}");
    // Without them, every narinfo is.
    let said = push(&["--no-local-copies"]);
    assert_eq!(requests_of(&said, "get"), 1 + n as u64, "{said}");
    assert!(!said.contains("read from the copies"), "{said}");

    // A narinfo changed behind nixcache's back (here to one that lies about its NAR) has
    // another ETag: it is downloaded, found wrong and written again, though the copy kept
    // here says what it said before.
    let rel = format!("{}.narinfo", hash_part(f.path("edge-dep")));
    let good = get(&format!("{}/{rel}", s.http("kept"))).1;
    let lying: String = String::from_utf8(good.clone())
        .unwrap()
        .lines()
        .map(|l| {
            if l.starts_with("NarHash: ") {
                format!("NarHash: sha256:{}\n", "0".repeat(52))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    let file = t.path().join("lying.narinfo");
    std::fs::write(&file, &lying).unwrap();
    put_object(&s, &format!("kept/{rel}"), &file);
    let said = push(&[]);
    assert!(said.contains("disagrees with the store (NarHash)"), "{said}");
    assert_eq!(requests_of(&said, "get"), 2, "{said}");
    assert!(said.contains(&format!("{} narinfos read from the copies", n - 1)), "{said}");
    assert_eq!(get(&format!("{}/{rel}", s.http("kept"))).1, good);
    restore(&s.http("kept"), &t.path().join("root"), &[&f.top]);

    // sign rewrites every narinfo (new ETags) and keeps what it wrote: the next push
    // downloads none of them.
    let other = t.path().join("other.secret");
    ok(nixcache().args(["keygen", "other-1"]).arg(&other).arg(t.path().join("other.pub")));
    ok(nc(&s, t.path()).args(["sign", "-q", "-k"]).arg(&other).args(["--dest", &url]));
    let said = push(&[]);
    assert_eq!(requests_of(&said, "get"), 1, "{said}");
    assert!(said.contains(&format!("{n} narinfos read from the copies")), "{said}");
    assert!(get(&format!("{}/{rel}", s.http("kept"))).1.windows(8).any(|w| w == b"other-1:"));

    // sign and gc read the narinfos, as their listing shows them, from the copies too.
    let run = |args: &[&str]| {
        let out = nc(&s, t.path()).args(args).args(["--dest", &url]).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    let other_key = other.to_str().unwrap();
    let said = run(&["sign", "-k", other_key]);
    assert!(said.contains(&format!("{n} narinfos read from the copies")), "{said}");
    let signing_gets = requests_of(&said, "get");
    let said = run(&["sign", "--no-local-copies", "-k", other_key]);
    assert_eq!(requests_of(&said, "get"), signing_gets + n as u64, "{said}");
    let said = run(&["gc", "--older-than", "1h"]);
    assert!(said.contains(&format!("{n} narinfos read from the copies")), "{said}");
    // Its listings: the check on open, the push records, the top level (the narinfos, and
    // the lookups' listing's top level too), nar/ (which then answers for the NARs and
    // leftovers there: 4 listings fewer than before), .nixcache/, and debuginfo/ for its
    // links and for leftovers.
    assert_eq!(requests_of(&said, "list"), 7, "{said}");
    assert!(said.contains(&format!("{n} paths kept, 0 paths removed")), "{said}");
    let gc_gets = requests_of(&said, "get");
    let said = run(&["gc", "--older-than", "1h", "--no-local-copies"]);
    assert_eq!(requests_of(&said, "get"), gc_gets + n as u64, "{said}");
    assert!(!said.contains("read from the copies"), "{said}");

    // Copies in a file that is not a database: it is started afresh, and filled again.
    let files: Vec<_> = std::fs::read_dir(&kept).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    std::fs::write(&files[0], vec![b'x'; 4096]).unwrap();
    let said = push(&[]);
    assert_eq!(requests_of(&said, "get"), 1 + n as u64, "{said}");
    assert!(!said.contains("not kept"), "{said}");
    assert_eq!(requests_of(&push(&[]), "get"), 1);

    // Nowhere to keep them: a warning that says so, and the push goes on.
    let home = tmp();
    std::fs::write(home.path().join(".cache"), "").unwrap();
    let said = push_as(home.path(), &[]);
    assert!(said.contains("warning: the bucket's narinfos are not kept on this machine"), "{said}");
    assert!(said.contains(&format!("0 pushed, {n} skipped")), "{said}");
}

#[test]
fn a_push_that_writes_nothing_checks_its_closure_only_while_a_gc_deletes() {
    let s = Server::start();
    let f = fixtures();
    let t = tmp();
    let url = s.url("marker");
    let push = |dest: &str| {
        let out = nc(&s, t.path())
            .args(["push", "--no-local-copies", "-k", SECRET, "--dest", dest])
            .arg(&f.top)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stderr(&out)
    };
    push(&url);
    // Everything there, no gc deleting: nothing was written, so nothing is checked at the end.
    let lists = requests_of(&push(&url), "list");
    // With the marker of a gc (here one killed while it deleted), the end check lists again.
    let marker = t.path().join("marker");
    std::fs::write(&marker, "").unwrap();
    put_object(&s, "marker/.nixcache/gc/0000000000000-killed", &marker);
    assert_eq!(requests_of(&push(&url), "list"), lists + 2);

    // And finds what went while the push looked: a NAR deleted behind its back once the
    // listing (which still had it) is taken, as a gc deletes.
    let leaf = f.path("edge-dep");
    let ni: nixcache::narinfo::NarInfo =
        String::from_utf8(get(&format!("{}/{}.narinfo", s.http("marker"), hash_part(leaf))).1)
            .unwrap()
            .parse()
            .unwrap();
    let nar_url = format!("{}/{}/{}marker/{}", s.endpoint, s.bucket, s.run, ni.url);
    let (key, secret, region) = (s.key.clone(), s.secret.clone(), s.region.clone());
    let deleted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let once = deleted.clone();
    let p = faulty(s.port, move |h, _| {
        let line = h.lines().next().unwrap_or_default();
        if line.starts_with("GET")
            && line.contains(".narinfo")
            && !once.swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let out = Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE"])
                .args(["--aws-sigv4", &format!("aws:amz:{region}:s3"), "-H", EMPTY_SHA256])
                .args(["--user", &format!("{key}:{secret}")])
                .arg(&nar_url)
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "204", "delete {nar_url}");
        }
        Fault::Forward
    });
    let said = push(&s.url_via("marker", p.port));
    assert!(deleted.load(std::sync::atomic::Ordering::SeqCst), "{said}");
    assert!(said.contains("1 path of this push were missing from"), "{said}");
    let broken = inconsistencies(&s, t.path(), &url, Some(PUBLIC));
    assert!(broken.is_empty(), "{broken:#?}");

    // A gc that deletes writes its own marker and removes it when done; the killed one's stays
    // until it is a day old.
    let other = build_fixtures("s3-marker");
    ok(nc(&s, t.path()).args(["push", "-q", "--dest", &url]).arg(&other));
    std::thread::sleep(Duration::from_secs(2));
    let gc = ok(nc(&s, t.path()).args(["gc", "--older-than", "1s", "--keep", &f.top, "--dest", &url]));
    assert!(gc.contains(&other), "{gc}");
    assert_eq!(gc_markers(&s, "marker"), [format!("{}marker/.nixcache/gc/0000000000000-killed", s.run)]);
    s.delete("marker/.nixcache/gc/0000000000000-killed");
    assert_eq!(requests_of(&push(&url), "list"), lists);
    restore(&s.http("marker"), &t.path().join("root"), &[&f.top]);
}

#[test]
fn racing_pushes_are_harmless_and_a_push_record_keeps_its_closure() {
    let s = Server::start();
    let t = tmp();
    let f = fixtures();
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "s3-race"]))
        .trim()
        .to_owned();
    let url = s.url("race");
    // Two pushes of the same closure at once, no lock: the same NARs, the same narinfos.
    let pushes: Vec<_> = (0..2)
        .map(|_| {
            nc(&s, t.path())
                .args(["push", "-q", "-k", SECRET, "--dest", &url])
                .args([&random, &f.top])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for p in pushes {
        let out = p.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    ok(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    restore(&s.http("race"), &t.path().join("root"), &[&random, &f.top]);
    // The narinfos are now older than a one-second window; a push that finds everything
    // there writes only its record, and that record keeps the whole closure from gc.
    std::thread::sleep(Duration::from_secs(3));
    ok(nc(&s, t.path()).args(["push", "-q", "--dest", &url]).arg(&f.top));
    let gc = ok(nc(&s, t.path()).args(["gc", "--older-than", "2s", "--dest", &url]));
    assert!(gc.contains(&random), "{gc}");
    for p in &f.closure {
        assert!(!gc.contains(p.as_str()), "gc removed {p}, which the last push named: {gc}");
    }
    ok(nc(&s, t.path()).args(["verify", "-q", "--trusted-public-key", PUBLIC, "--dest", &url]));
    // Once its record is older than the window too, the closure goes.
    std::thread::sleep(Duration::from_secs(3));
    let gc = ok(nc(&s, t.path()).args(["gc", "--older-than", "2s", "--dest", &url]));
    assert!(gc.contains(&f.top) && gc.contains(".nixcache/pushes/"), "{gc}");
}

#[test]
fn temporary_keys_are_unique_across_machines_and_copies_are_checked() {
    let s = Server::start();
    let t = tmp();
    let randoms: Vec<String> = ["pid-a", "pid-b"]
        .iter()
        .map(|salt| {
            ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", salt]))
                .trim()
                .to_owned()
        })
        .collect();
    // Two pushes of different large paths at once, each as pid 1 of its own namespace (two
    // containers), their server-side copies slowed so that both are uploading at once.
    let p = faulty(s.port, |h, _| {
        if h.to_ascii_lowercase().contains("x-amz-copy-source") {
            Fault::Delay(Duration::from_millis(1500))
        } else {
            Fault::Forward
        }
    });
    let url = s.url_via("pids", p.port);
    let pushes: Vec<_> = randoms
        .iter()
        .map(|r| {
            let mut c = nc_parts(&s, t.path());
            let program = c.get_program().to_owned();
            let args: Vec<_> = ["push", "-q", "-j", "1", "-k", SECRET, "--dest", &url, r]
                .iter()
                .map(|a| a.to_string())
                .collect();
            let mut u = Command::new("unshare");
            u.args(["--pid", "--fork"]).arg(program).args(args);
            for (k, v) in c.get_envs() {
                match v {
                    Some(v) => u.env(k, v),
                    None => u.env_remove(k),
                };
            }
            c = u;
            c.stderr(Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for push in pushes {
        let out = push.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let copies = p
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("PUT") && l.contains("/nar/") && !l.contains("partNumber"))
        .count();
    assert!(copies >= 2, "{copies}");
    restore(&s.http("pids"), &t.path().join("root"), &[&randoms[0], &randoms[1]]);

    // Acknowledged is not done: a copy answered 200 without its result, and a NAR PUT and the
    // nix-cache-info PUT the server lost, are found and done again; the push exits 0 with its
    // closure whole and a cache clients open.
    let f = fixtures();
    let fresh = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "lost"]))
        .trim()
        .to_owned();
    let p = faulty(s.port, |h, n| {
        let line = h.lines().next().unwrap_or_default();
        let copy = h.to_ascii_lowercase().contains("x-amz-copy-source");
        let nar_put = line.starts_with("PUT")
            && line.contains("/nar/")
            && !line.contains("partNumber")
            && !line.contains("nixcache-tmp");
        let info_put = line.starts_with("PUT") && line.contains("/nix-cache-info");
        if n == 0 && (copy || nar_put || info_put) { Fault::Lose } else { Fault::Forward }
    });
    let out = nc_parts(&s, t.path())
        .args(["push", "-k", SECRET, "--dest", &s.url_via("lost", p.port)])
        .args([&f.top, &fresh])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(p.failed.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    assert!(stderr(&out).contains("nix-cache-info was missing"), "{}", stderr(&out));
    let broken = inconsistencies(&s, t.path(), &s.url("lost"), Some(PUBLIC));
    assert!(broken.is_empty(), "{}: {broken:#?}", stderr(&out));
    restore(&s.http("lost"), &t.path().join("root-lost"), &[&f.top, &fresh]);
}

#[test]
fn partial_bucket_skip_signed_by() {
    let s = Server::start();
    let t = tmp();
    crate::partial::skip_signed_by(&partial_dest(&s, t.path(), "signed"), t.path());
}

#[test]
fn partial_bucket_skip_upstream() {
    let s = Server::start();
    let t = tmp();
    let home = t.path().to_owned();
    let fresh = |n: &str| partial_dest(&s, &home, n);
    crate::partial::skip_upstream(&partial_dest(&s, t.path(), "upstream"), &fresh, t.path());
}

#[test]
fn partial_bucket_exclude() {
    let s = Server::start();
    let t = tmp();
    crate::partial::exclude(&partial_dest(&s, t.path(), "exclude"), t.path());
}
