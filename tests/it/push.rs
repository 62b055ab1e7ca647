//! push against real Nix: restores, NAR bytes, metadata, incremental runs, crashes.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use crate::helpers::*;
use nixcache::store_path::StorePath;

#[test]
fn every_compression_restores_with_nix_and_matches_dump() {
    let f = fixtures();
    for c in ["xz", "bzip2", "zstd", "none"] {
        let t = tmp();
        let cache = t.path().join("cache");
        ok(nixcache()
            .args(["push", "--quiet", "--compression", c, "--secret-key", SECRET, "--dest"])
            .arg(&cache)
            .arg(&f.top));
        for p in &f.closure {
            let ni = narinfo(&cache, p);
            assert_eq!(ni.compression, c);
            let ext =
                nixcache::compression::Compression::ALL.iter().find(|x| x.name() == c).unwrap().extension();
            assert!(ni.url.ends_with(ext), "{}", ni.url);
            assert_eq!(cached_nar(&cache, p), dump(p), "{c}: NAR of {p} differs from nix-store --dump");
        }
        let root = t.path().join("root");
        restore(&file_url(&cache), &root, &[&f.top]);
        assert_restored_identical(&root, &f.closure);
    }
}

#[test]
fn narinfo_metadata_equals_nix_path_info() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top));
    let json: serde_json::Value =
        serde_json::from_str(&ok(nix_cmd("nix").args(["path-info", "--json", "--recursive", &f.top])))
            .unwrap();
    let infos = json.as_array().unwrap();
    assert_eq!(infos.len(), f.closure.len());
    for info in infos {
        let path = info["path"].as_str().unwrap();
        let ni = narinfo(&cache, path);
        assert_eq!(ni.store_dir.display(&ni.store_path), path);
        // Nix 2.8 prints nix32 for most paths and SRI for content-addressed ones.
        let want: nixcache::hash::NixHash = info["narHash"].as_str().unwrap().parse().unwrap();
        assert_eq!(ni.nar_hash, want, "{path}");
        assert_eq!(ni.nar_size, info["narSize"].as_u64().unwrap(), "{path}");
        let want: BTreeSet<String> = info["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().rsplit('/').next().unwrap().to_owned())
            .collect();
        let got: Vec<String> = ni.references.iter().map(StorePath::to_string).collect();
        assert_eq!(got, want.into_iter().collect::<Vec<_>>(), "{path}: references sorted and complete");
        match info.get("deriver").and_then(|d| d.as_str()) {
            Some(d) => assert_eq!(ni.deriver.as_ref().unwrap().to_string(), d.rsplit('/').next().unwrap()),
            None => assert!(ni.deriver.is_none()),
        }
        assert_eq!(ni.ca.as_deref(), info.get("ca").and_then(|c| c.as_str()), "{path}");
        assert!(ni.signed_by("test-1"));
    }
    // The text file made by builtins.toFile is content-addressed and has no deriver.
    let text = narinfo(&cache, f.path("edge-text-ca"));
    assert!(text.ca.as_deref().unwrap().starts_with("text:sha256:"));
    // A path that references itself lists itself.
    let tree = narinfo(&cache, f.path("edge-tree"));
    assert!(tree.references.contains(&tree.store_path));
    let cache_info = std::fs::read_to_string(cache.join("nix-cache-info")).unwrap();
    assert_eq!(cache_info, "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n");
    for d in ["nar", "log", "realisations"] {
        assert!(cache.join(d).is_dir(), "{d}/ is pre-created");
    }
}

#[test]
fn db_and_path_info_sources_write_identical_caches() {
    let f = fixtures();
    let t = tmp();
    let (a, b) = (t.path().join("db"), t.path().join("nix"));
    ok(nixcache()
        .args(["push", "-q", "-c", "zstd", "-k", SECRET, "--metadata", "db", "--dest"])
        .arg(&a)
        .arg(&f.top));
    ok(nixcache()
        .args(["push", "-q", "-c", "zstd", "-k", SECRET, "--metadata", "nix", "--dest"])
        .arg(&b)
        .arg(&f.top));
    let strip_lock = |v: Vec<(std::path::PathBuf, Vec<u8>)>| {
        v.into_iter().filter(|(p, _)| !p.ends_with(".nixcache.lock")).collect::<Vec<_>>()
    };
    assert_eq!(strip_lock(tree(&a)), strip_lock(tree(&b)));
}

#[test]
fn output_does_not_depend_on_jobs() {
    let f = fixtures();
    let t = tmp();
    for c in ["xz", "zstd"] {
        let (a, b) = (t.path().join(format!("{c}1")), t.path().join(format!("{c}2")));
        ok(nixcache().args(["push", "-q", "-j", "1", "-c", c, "-k", SECRET, "--dest"]).arg(&a).arg(&f.top));
        ok(nixcache().args(["push", "-q", "-j", "3", "-c", c, "-k", SECRET, "--dest"]).arg(&b).arg(&f.top));
        assert_eq!(tree(&a), tree(&b), "{c}: bytes depend on --jobs");
    }
}

#[test]
fn xz_blocks_equal_nix_parallel_compression() {
    // One path of three xz blocks, cut as the NAR is read and compressed on any thread: the
    // stream must be what Nix's multithreaded xz writes.
    let big = build_big("blocks");
    let t = tmp();
    let (a, b, n) = (t.path().join("j2"), t.path().join("j1"), t.path().join("nix"));
    ok(nixcache().args(["push", "-q", "-j", "2", "-k", SECRET, "--dest"]).arg(&a).arg(&big));
    ok(nixcache().args(["push", "-q", "-j", "1", "-k", SECRET, "--dest"]).arg(&b).arg(&big));
    assert_eq!(tree(&a), tree(&b), "bytes depend on --jobs");
    let ours = narinfo(&a, &big);
    assert!(ours.nar_size > 2 * (24 << 20), "the fixture must span three blocks: {}", ours.nar_size);
    assert_eq!(cached_nar(&a, &big), dump(&big));
    let to = format!("file://{}?compression=xz&parallel-compression=true", n.display());
    ok(nix_cmd("nix").args(["copy", "--to", &to, &big]));
    let theirs = narinfo(&n, &big);
    assert_eq!(
        (&ours.url, ours.file_hash, ours.file_size),
        (&theirs.url, theirs.file_hash, theirs.file_size)
    );
    assert!(std::fs::read(a.join(&ours.url)).unwrap() == std::fs::read(n.join(&theirs.url)).unwrap());
    let root = t.path().join("root");
    restore(&file_url(&a), &root, &[&big]);
    assert_restored_identical(&root, std::slice::from_ref(&big));
}

#[test]
fn a_large_zstd_path_is_the_same_bytes_for_any_jobs_and_nix_restores_it() {
    // Above 256 MiB of NAR, zstd runs its multithreaded mode with --jobs - 1 workers (at
    // least one): -j 1, 2 and 8 must write the same file.
    let sparse = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sparse.nix");
    let big = ok(nix_cmd("nix-build").args([sparse, "--no-out-link", "--argstr", "salt", "zstd-mt"]))
        .trim()
        .to_owned();
    let t = tmp();
    let caches: Vec<_> = ["1", "2", "8"].iter().map(|j| (j, t.path().join(format!("j{j}")))).collect();
    for (j, d) in &caches {
        ok(nixcache().args(["push", "-q", "-c", "zstd", "-j", j, "-k", SECRET, "--dest"]).arg(d).arg(&big));
    }
    let ni = narinfo(&caches[0].1, &big);
    assert!(ni.nar_size > 256 << 20, "the fixture must be above the threshold: {}", ni.nar_size);
    for (j, d) in &caches[1..] {
        assert_eq!(tree(d), tree(&caches[0].1), "-j {j}: zstd bytes depend on --jobs");
    }
    assert_eq!(cached_nar(&caches[0].1, &big), dump(&big));
    let root = t.path().join("root");
    restore(&file_url(&caches[2].1), &root, &[&big]);
    assert_restored_identical(&root, std::slice::from_ref(&big));
}

#[test]
fn incompressible_xz_blocks_equal_nix_parallel_compression() {
    // Random bytes: liblzma's multithreaded encoder stores the full block uncompressed.
    let random = ok(nix_cmd("nix-build").args([RANDOM, "--no-out-link", "--argstr", "salt", "stored"]))
        .trim()
        .to_owned();
    let t = tmp();
    let (ours_dir, nix_dir) = (t.path().join("ours"), t.path().join("nix"));
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&ours_dir).arg(&random));
    let to = format!("file://{}?compression=xz&parallel-compression=true", nix_dir.display());
    ok(nix_cmd("nix").args(["copy", "--to", &to, &random]));
    let (ours, theirs) = (narinfo(&ours_dir, &random), narinfo(&nix_dir, &random));
    assert_eq!((&ours.url, ours.file_size), (&theirs.url, theirs.file_size));
    assert!(
        std::fs::read(ours_dir.join(&ours.url)).unwrap() == std::fs::read(nix_dir.join(&theirs.url)).unwrap()
    );
    let root = t.path().join("root");
    restore(&file_url(&ours_dir), &root, &[&random]);
    assert_restored_identical(&root, std::slice::from_ref(&random));
}

#[test]
fn symlinks_stdin_and_paths_inside_store_paths_resolve() {
    let f = fixtures();
    let t = tmp();
    let link = t.path().join("result");
    std::os::unix::fs::symlink(f.path("edge-tree"), &link).unwrap();
    let link2 = t.path().join("result2");
    std::os::unix::fs::symlink(&link, &link2).unwrap();
    let cache = t.path().join("cache");
    let mut child = nixcache()
        .args(["push", "-q", "--stdin", "--dest"])
        .arg(&cache)
        .arg(&link2)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    let single = f.path("edge-single-file").to_owned();
    let sym = format!("{}\n", f.path("edge-symlink"));
    child.stdin.take().unwrap().write_all(format!("{single}/\n\n{sym}").as_bytes()).unwrap();
    assert!(child.wait().unwrap().success());
    for p in ["edge-tree", "edge-dep", "edge-single-file", "edge-symlink"] {
        assert!(cache.join(format!("{}.narinfo", hash_part(f.path(p)))).exists(), "{p}");
    }
    assert!(!cache.join(format!("{}.narinfo", hash_part(&f.top))).exists());
    // A store path that is itself a symlink is pushed as the symlink, not its target.
    assert_eq!(cached_nar(&cache, f.path("edge-symlink")), dump(f.path("edge-symlink")));
}

#[test]
fn include_outputs_pushes_derivations_and_their_outputs() {
    let f = fixtures();
    let drv = ok(nix_cmd("nix-store").args(["--query", "--deriver", &f.top])).trim().to_owned();
    let t = tmp();
    let (plain, with) = (t.path().join("plain"), t.path().join("with"));
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&plain).arg(&drv));
    assert!(plain.join(format!("{}.narinfo", hash_part(&drv))).exists());
    assert!(!plain.join(format!("{}.narinfo", hash_part(&f.top))).exists(), "outputs only on request");
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--include-outputs", "--dest"]).arg(&with).arg(&drv));
    for p in &f.closure {
        assert!(with.join(format!("{}.narinfo", hash_part(p))).exists(), "{p}");
    }
    let root = t.path().join("root");
    restore(&file_url(&with), &root, &[&f.top, &drv]);
}

#[test]
fn rerun_skips_repairs_and_adds_signatures() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    // Unsigned first.
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(&f.top));
    let before = tree(&cache);
    let out = nixcache().args(["push", "--dest"]).arg(&cache).arg(&f.top).output().unwrap();
    assert!(out.status.success());
    let n = f.closure.len();
    assert!(stderr(&out).contains(&format!("{n} paths: 0 pushed, {n} skipped")), "{}", stderr(&out));
    assert_eq!(tree(&cache), before, "a re-run changes no bytes");

    // Signing an unsigned cache adds Sig lines without recompressing.
    let nar_files = |c: &std::path::Path| std::fs::read_dir(c.join("nar")).unwrap().count();
    let nars = nar_files(&cache);
    let out = nixcache().args(["push", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top).output().unwrap();
    assert!(
        stderr(&out).contains(&format!("0 pushed, 0 skipped, 0 repaired, {n} signed")),
        "{}",
        stderr(&out)
    );
    assert_eq!(nar_files(&cache), nars);
    restore(&file_url(&cache), &t.path().join("root"), &[&f.top]);

    // A deleted NAR and a truncated one are repaired.
    let tree_ni = narinfo(&cache, f.path("edge-tree"));
    std::fs::remove_file(cache.join(&tree_ni.url)).unwrap();
    let dep_ni = narinfo(&cache, f.path("edge-dep"));
    std::fs::write(cache.join(&dep_ni.url), b"short").unwrap();
    let out = nixcache().args(["push", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top).output().unwrap();
    assert!(stderr(&out).contains("2 repaired"), "{}", stderr(&out));
    assert_eq!(cached_nar(&cache, f.path("edge-tree")), dump(f.path("edge-tree")));
    restore(&file_url(&cache), &t.path().join("root2"), &[&f.top]);

    // --force rewrites everything, to the same bytes.
    let before = tree(&cache);
    let out = nixcache()
        .args(["push", "--force", "-k", SECRET, "--dest"])
        .arg(&cache)
        .arg(&f.top)
        .output()
        .unwrap();
    assert!(stderr(&out).contains(&format!("{n} paths: {n} pushed")), "{}", stderr(&out));
    assert_eq!(tree(&cache), before);
}

#[test]
fn concurrent_pushes_both_succeed() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let spawn = |c: &str| {
        nixcache()
            .args(["push", "-q", "-c", c, "-k", SECRET, "--dest"])
            .arg(&cache)
            .arg(&f.top)
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn("xz"), spawn("xz"));
    assert!(a.wait().unwrap().success());
    assert!(b.wait().unwrap().success());
    restore(&file_url(&cache), &t.path().join("root"), &[&f.top]);
    assert_restored_identical(&t.path().join("root"), &f.closure);
}

#[test]
fn killed_push_leaves_a_usable_cache_and_rerun_completes() {
    let top = build_fixtures_with("kill", 6);
    let closure = requisites(&top);
    let t = tmp();
    let cache = t.path().join("cache");
    let published = |cache: &std::path::Path| -> Vec<String> {
        closure.iter().filter(|p| cache.join(format!("{}.narinfo", hash_part(p))).exists()).cloned().collect()
    };
    let mut child = nixcache()
        .args(["push", "-q", "-j", "1", "-c", "xz", "--compression-level", "9", "-k", SECRET, "--dest"])
        .arg(&cache)
        .arg(&top)
        .spawn()
        .unwrap();
    // Kill it as soon as the first narinfo is published, while the rest are in flight.
    while published(&cache).is_empty() && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success(), "the push finished before it could be killed");
    let seen = published(&cache);
    assert!(
        !seen.is_empty() && seen.len() < closure.len(),
        "killed mid-run: {} of {}",
        seen.len(),
        closure.len()
    );
    // Every narinfo a client can see restores, with its whole closure.
    let paths: Vec<&str> = seen.iter().map(String::as_str).collect();
    restore(&file_url(&cache), &t.path().join("partial"), &paths);

    let out = nixcache().args(["push", "-k", SECRET, "--dest"]).arg(&cache).arg(&top).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let leftovers: Vec<_> = tree(&cache)
        .into_iter()
        .filter(|(p, _)| p.to_string_lossy().contains(".nixcache-tmp-"))
        .map(|(p, _)| p)
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&top]);
    assert_restored_identical(&root, &closure);
}

/// The crash-safety protocol, checked on the system calls of a real push: every file is
/// flushed after its last write and before it is renamed into place, and every name is
/// flushed before push exits ([`assert_renames_durable`]); a narinfo is renamed only after
/// its NAR's name is flushed (syncfs, or fsync of nar/), and only after the narinfos of its
/// references are flushed (syncfs, or fsync of the top directory). A power cut at any moment
/// then leaves no narinfo that names a missing or partial file.
#[test]
fn every_file_is_durable_before_a_narinfo_names_it() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let calls = strace(
        nixcache()
            .args(["push", "-q", "-j", "2", "--nar-listing", "-k", SECRET, "--dest"])
            .arg(&cache)
            .arg(&f.top),
        &t.path().join("strace.log"),
    );
    let cache = cache.canonicalize().unwrap();
    let top = cache.to_str().unwrap().to_owned();
    let renamed_at = assert_renames_durable(&calls);
    assert!(
        renamed_at.len() >= 2 * f.closure.len(),
        "{} renames for {} paths",
        renamed_at.len(),
        f.closure.len()
    );
    for p in &f.closure {
        let ni = narinfo(&cache, p);
        let ni_rename = renamed_at[&format!("{top}/{}.narinfo", hash_part(p))];
        let nar =
            renamed_at.get(&format!("{top}/{}", ni.url)).unwrap_or_else(|| panic!("{} not renamed", ni.url));
        assert!(nar.end < ni_rename.start, "{p}: narinfo before its NAR");
        assert!(
            synced(&calls, nar.end, ni_rename.start, &format!("{top}/nar")),
            "{p}: narinfo renamed before nar/ was flushed"
        );
        for r in ni.references.iter().filter(|r| !p.ends_with(r.to_string().as_str())) {
            let r_ni = renamed_at[&format!("{top}/{}.narinfo", &r.to_string()[..32])];
            assert!(
                synced(&calls, r_ni.end, ni_rename.start, &top),
                "{p} published before its reference {r} was flushed"
            );
        }
    }
}

#[test]
fn cache_info_settings_and_database_fallback() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    // An unreadable database falls back to `nix path-info` in the default (auto) mode.
    let out = nixcache()
        .args([
            "push",
            "--db",
            "/nonexistent/db.sqlite",
            "--priority",
            "10",
            "--no-want-mass-query",
            "--dest",
        ])
        .arg(&cache)
        .arg(f.path("edge-single-file"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let info = |c: &std::path::Path| std::fs::read_to_string(c.join("nix-cache-info")).unwrap();
    assert_eq!(info(&cache), "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n");
    // Later pushes keep the settings unless told otherwise.
    ok(nixcache().args(["push", "-q", "--dest"]).arg(&cache).arg(f.path("edge-single-file")));
    assert_eq!(info(&cache), "StoreDir: /nix/store\nWantMassQuery: 0\nPriority: 10\n");
    ok(nixcache()
        .args(["push", "-q", "--want-mass-query", "--dest"])
        .arg(&cache)
        .arg(f.path("edge-single-file")));
    assert_eq!(info(&cache), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 10\n");
    // With --metadata db there is no fallback.
    let out = fails(
        nixcache()
            .args(["push", "--metadata", "db", "--db", "/nonexistent/db.sqlite", "--dest"])
            .arg(&cache)
            .arg(&f.top),
    );
    assert!(stderr(&out).contains("/nonexistent/db.sqlite"), "{}", stderr(&out));
    // A cache made for another store directory is refused.
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /gnu/store\n").unwrap();
    let out = fails(nixcache().args(["push", "--dest"]).arg(&cache).arg(&f.top));
    assert!(stderr(&out).contains("is for store /gnu/store"), "{}", stderr(&out));
}
