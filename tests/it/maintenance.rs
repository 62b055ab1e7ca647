//! verify, sign, gc and NAR listings against real Nix.

use std::path::Path;
use std::time::Duration;

use crate::helpers::*;

fn verify(cache: &Path, trusted: &[&str]) -> (i32, serde_json::Value) {
    let mut c = nixcache();
    c.args(["verify", "--json", "--dest"]).arg(cache);
    for k in trusted {
        c.args(["--trusted-public-key", k]);
    }
    let out = c.output().unwrap();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(&out)));
    (out.status.code().unwrap(), json)
}

/// (path, kind) of every problem.
fn problems(v: &serde_json::Value) -> Vec<(String, String)> {
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_owned(), p["kind"].as_str().unwrap().to_owned()))
        .collect()
}

fn push(cache: &Path, extra: &[&str], paths: &[&str]) {
    ok(nixcache().args(["push", "-q", "--dest"]).arg(cache).args(extra).args(paths));
}

#[test]
fn verify_finds_each_kind_of_damage() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-c", "none", "-k", SECRET], &[&f.top]);
    let (code, v) = verify(&cache, &[PUBLIC]);
    assert_eq!((code, problems(&v)), (0, vec![]), "a fresh cache verifies clean");
    assert_eq!(v["narinfos"].as_u64().unwrap() as usize, f.closure.len());

    // A flipped byte in a NAR.
    let tree = f.path("edge-tree");
    let nar = cache.join(narinfo(&cache, tree).url);
    let mut bytes = std::fs::read(&nar).unwrap();
    bytes[4000] ^= 0x20;
    std::fs::write(&nar, &bytes).unwrap();
    // A deleted NAR.
    let single = f.path("edge-single-file");
    std::fs::remove_file(cache.join(narinfo(&cache, single).url)).unwrap();
    // A deleted dependency narinfo: edge-dep, which edge-tree and edge-symlink reference.
    let dep = f.path("edge-dep");
    std::fs::remove_file(cache.join(format!("{}.narinfo", hash_part(dep)))).unwrap();
    // An unused NAR and a temporary file.
    std::fs::write(cache.join("nar/stray.nar"), b"x").unwrap();
    std::fs::write(cache.join(".nixcache-tmp-1-1.part"), b"x").unwrap();

    let (code, v) = verify(&cache, &[PUBLIC]);
    assert_eq!(code, 1);
    let got = problems(&v);
    for want in [
        (tree, "file-hash"),
        (tree, "nar-hash"),
        (tree, "missing-reference"),
        (single, "missing-nar"),
        (f.path("edge-symlink"), "missing-reference"),
        ("nar/stray.nar", "unused-nar"),
        (".nixcache-tmp-1-1.part", "temporary-file"),
    ] {
        assert!(got.contains(&(want.0.to_owned(), want.1.to_owned())), "{want:?} not in {got:?}");
    }
    // The plain form: one line per problem naming the path, on stdout.
    let out = nixcache().args(["verify", "--dest"]).arg(&cache).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().any(|l| l.starts_with(tree) && l.contains("nar-hash")), "{text}");
    // verify itself cannot run: exit 2.
    let out = nixcache().args(["verify", "--dest"]).arg(t.path().join("missing")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn verify_checks_signatures_and_self_certifying_paths() {
    let f = fixtures();
    let t = tmp();
    let (cache, unsigned) = (t.path().join("cache"), t.path().join("unsigned"));
    push(&cache, &["-k", SECRET], &[&f.top]);
    push(&unsigned, &[], &[&f.top]);
    // A key that did not sign.
    let other = t.path().join("other");
    ok(nixcache().args(["keygen", "other-1"]).arg(&other).arg(t.path().join("other.pub")));
    let other_pub = std::fs::read_to_string(t.path().join("other.pub")).unwrap();
    let (code, v) = verify(&cache, &[&other_pub]);
    assert_eq!(code, 1);
    let untrusted: Vec<String> =
        problems(&v).into_iter().filter(|(_, k)| k == "untrusted").map(|(p, _)| p).collect();
    // Content-addressed paths certify themselves; every other path is reported.
    let mut want: Vec<String> = f.closure.iter().filter(|p| !p.ends_with("-ca")).cloned().collect();
    want.sort();
    assert_eq!(untrusted, want);
    // The key file works as well as the key.
    let (code, _) = verify(&cache, &[t.path().join("other.pub").to_str().unwrap(), PUBLIC]);
    assert_eq!(code, 0);
    assert_eq!(verify(&unsigned, &[]).0, 0, "without trusted keys signatures are not required");
    assert_eq!(verify(&unsigned, &[PUBLIC]).0, 1);
}

#[test]
fn sign_makes_an_unsigned_cache_restorable() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &[], &[&f.top]);
    let out = fails(&mut restore_cmd(&file_url(&cache), &t.path().join("r0"), PUBLIC, &[&f.top]));
    assert!(stderr(&out).contains("signature"), "{}", stderr(&out));
    let nars = tree(&cache.join("nar"));
    let time = |p: &str| {
        std::fs::metadata(cache.join(format!("{}.narinfo", hash_part(p)))).unwrap().modified().unwrap()
    };
    let before = time(&f.top);

    // Only the closure of one path first.
    ok(nixcache().args(["sign", "-q", "-k", SECRET, "--dest"]).arg(&cache).arg(f.path("edge-tree")));
    assert!(narinfo(&cache, f.path("edge-dep")).signed_by("test-1"));
    assert!(!narinfo(&cache, &f.top).signed_by("test-1"));
    ok(nixcache().args(["sign", "-q", "-k", SECRET, "--dest"]).arg(&cache));
    assert_eq!(tree(&cache.join("nar")), nars, "NARs untouched");
    assert_eq!(time(&f.top), before, "signing keeps gc's record of the last push");
    let signed = tree(&cache);
    assert!(!signed.iter().any(|(p, _)| p.to_string_lossy().contains(".nixcache-tmp-")));
    ok(nixcache().args(["sign", "-q", "-k", SECRET, "--dest"]).arg(&cache));
    assert_eq!(tree(&cache), signed, "signing twice changes nothing");
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
    assert_eq!(verify(&cache, &[PUBLIC]).0, 0);
    let out = fails(
        nixcache()
            .args(["sign", "-k", SECRET, "--dest"])
            .arg(&cache)
            .arg("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x"),
    );
    assert!(stderr(&out).contains("is not in the cache"));
}

/// Signing rewrites narinfos in place: each new version is flushed before it replaces the
/// old, and all are flushed before sign exits. They equal what `nix store sign` writes.
#[test]
fn sign_is_durable_and_equals_nix_store_sign() {
    let f = fixtures();
    let t = tmp();
    let (ours, nix) = (t.path().join("ours"), t.path().join("nix"));
    push(&ours, &[], &[&f.top]);
    push(&nix, &[], &[&f.top]);
    let calls =
        strace(nixcache().args(["sign", "-q", "-k", SECRET, "--dest"]).arg(&ours), &t.path().join("log"));
    let renamed = assert_renames_durable(&calls);
    assert_eq!(renamed.len(), f.closure.len());
    ok(nix_cmd("nix").args([
        "store",
        "sign",
        "--store",
        &file_url(&nix),
        "--key-file",
        SECRET,
        "-r",
        &f.top,
    ]));
    let narinfos = |d: &std::path::Path| -> Vec<_> {
        tree(d).into_iter().filter(|(p, _)| p.extension().is_some_and(|e| e == "narinfo")).collect()
    };
    let (a, b) = (narinfos(&ours), narinfos(&nix));
    assert_eq!(a.len(), f.closure.len());
    for ((pa, ca), (pb, cb)) in a.iter().zip(&b) {
        assert_eq!(pa.file_name(), pb.file_name());
        assert_eq!(String::from_utf8_lossy(ca), String::from_utf8_lossy(cb), "{}", pa.display());
    }
}

/// gc's order holds on disk too: a narinfo's removal is flushed (syncfs, or fsync of the top
/// directory) before the narinfos of its references go, and all narinfo removals before any
/// NAR goes. A power cut mid-gc leaves no narinfo whose reference or NAR is gone.
#[test]
fn gc_removals_are_flushed_in_order() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["--nar-listing"], &[&f.top]);
    std::thread::sleep(Duration::from_millis(50));
    let narinfos: Vec<_> = f.closure.iter().map(|p| (p, narinfo(&cache, p))).collect();
    let calls = strace(
        nixcache().args(["gc", "-q", "--older-than", "0s", "--dest"]).arg(&cache),
        &t.path().join("log"),
    );
    let top = cache.canonicalize().unwrap().to_str().unwrap().to_owned();
    let unlinked = |rel: &str| {
        let path = format!("{top}/{rel}");
        calls
            .iter()
            .find(|c| c.name.starts_with("unlink") && c.paths.contains(&path))
            .unwrap_or_else(|| panic!("{rel} not removed"))
    };
    let mut last_narinfo = 0;
    for (p, ni) in &narinfos {
        let gone = unlinked(&format!("{}.narinfo", hash_part(p)));
        last_narinfo = last_narinfo.max(gone.end);
        for r in ni.references.iter().filter(|r| !p.ends_with(r.to_string().as_str())) {
            let r_gone = unlinked(&format!("{}.narinfo", &r.to_string()[..32]));
            assert!(
                gone.end < r_gone.start && synced(&calls, gone.end, r_gone.start, &top),
                "{p}: its reference {r} was removed before its own removal was flushed"
            );
        }
    }
    for (p, ni) in &narinfos {
        let nar = unlinked(&ni.url);
        assert!(
            synced(&calls, last_narinfo, nar.start, &top),
            "{p}: NAR removed before all narinfo removals were flushed"
        );
    }
    assert!(
        tree(&cache)
            .iter()
            .all(|(p, _)| !p.starts_with("nar/") && p.extension().is_none_or(|e| e != "narinfo"))
    );
}

#[test]
fn gc_keeps_exactly_the_recent_closure_and_kept_paths() {
    let old = build_fixtures("gc-old");
    let new = build_fixtures("gc-new");
    let (old_closure, new_closure) = (requisites(&old), requisites(&new));
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-k", SECRET, "--nar-listing"], &[&old]);
    std::thread::sleep(Duration::from_secs(3));
    push(&cache, &["-k", SECRET, "--nar-listing"], &[&new]);
    let present = |p: &str| cache.join(format!("{}.narinfo", hash_part(p))).exists();
    let all_before = tree(&cache);

    // Dry run: lists, frees nothing.
    let out =
        nixcache().args(["gc", "--older-than", "2s", "--dry-run", "--dest"]).arg(&cache).output().unwrap();
    assert!(out.status.success());
    let listed = String::from_utf8(out.stdout.clone()).unwrap();
    assert!(listed.contains(&format!("would remove {old}")), "{listed}");
    assert!(stderr(&out).contains("would be freed"));
    assert_eq!(tree(&cache), all_before, "dry run deletes nothing");

    // --keep the old top: nothing goes.
    ok(nixcache().args(["gc", "-q", "--older-than", "2s", "--keep", &old, "--dest"]).arg(&cache));
    assert!(old_closure.iter().chain(&new_closure).all(|p| present(p)));

    ok(nixcache().args(["gc", "-q", "--older-than", "2s", "--dest"]).arg(&cache));
    for p in &new_closure {
        assert!(present(p), "{p} of the recent push was removed");
    }
    for p in old_closure.iter().filter(|p| !new_closure.contains(p)) {
        assert!(!present(p), "{p} of the old push was kept");
        assert!(!cache.join(format!("{}.ls", hash_part(p))).exists());
    }
    // The shared text file (the same path in both closures) stays.
    assert!(old_closure.iter().any(|p| new_closure.contains(p)));
    assert_eq!(verify(&cache, &[PUBLIC]).0, 0, "verifies clean");
    assert_eq!(problems(&verify(&cache, &[PUBLIC]).1), vec![]);
    let root = t.path().join("root");
    restore(&file_url(&cache), &root, &[&new]);
    assert_restored_identical(&root, &new_closure);
}

#[test]
fn gc_removes_incomplete_closures_and_leftovers() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-k", SECRET], &[&f.top]);
    // Break edge-dep: its NAR goes. edge-tree, edge-symlink and the top then reference an
    // incomplete path; gc must remove them to keep its invariant.
    std::fs::remove_file(cache.join(narinfo(&cache, f.path("edge-dep")).url)).unwrap();
    // Left by a run killed two days ago (a younger one may belong to a writer at work).
    let partial = cache.join("nar/.nixcache-tmp-9-9.nar.xz");
    std::fs::write(&partial, b"partial").unwrap();
    let two_days_ago = std::time::SystemTime::now() - Duration::from_secs(2 * 86400);
    std::fs::File::options().write(true).open(&partial).unwrap().set_modified(two_days_ago).unwrap();
    let out = nixcache().args(["gc", "--older-than", "1d", "--dest"]).arg(&cache).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    for gone in ["edge-dep", "edge-tree", "edge-symlink", "edge-top"] {
        assert!(!cache.join(format!("{}.narinfo", hash_part(f.path(gone)))).exists(), "{gone}");
    }
    for kept in ["edge-single-file", "edge-text-ca", "edge-source-ca", "edge-debug"] {
        assert!(cache.join(format!("{}.narinfo", hash_part(f.path(kept)))).exists(), "{kept}");
    }
    assert_eq!(problems(&verify(&cache, &[PUBLIC]).1), vec![]);
}

#[test]
fn push_and_gc_race_without_loss() {
    let f = fixtures();
    let other = build_fixtures("race");
    let t = tmp();
    let cache = t.path().join("cache");
    push(&cache, &["-k", SECRET], &[&other]);
    std::thread::sleep(Duration::from_secs(2));
    let mut p =
        nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top).spawn().unwrap();
    let mut g = nixcache().args(["gc", "-q", "--older-than", "1s", "--dest"]).arg(&cache).spawn().unwrap();
    assert!(p.wait().unwrap().success());
    assert!(g.wait().unwrap().success());
    // Whichever ran first, the fresh push is whole.
    assert_eq!(problems(&verify(&cache, &[PUBLIC]).1), vec![]);
    restore(&file_url(&cache), &t.path().join("root"), &[&f.top]);
}

#[test]
fn listings_and_debug_info_match_nix() {
    let f = fixtures();
    let t = tmp();
    let (ours, nix) = (t.path().join("ours"), t.path().join("nix"));
    push(&ours, &["--nar-listing", "--index-debug-info"], &[&f.top]);
    let url =
        format!("file://{}?write-nar-listing=true&index-debug-info=true&compression=none", nix.display());
    ok(nix_cmd("nix").args(["copy", "--to", &url, &f.top]));
    for p in &f.closure {
        let name = format!("{}.ls", hash_part(p));
        let (a, b) = (std::fs::read(ours.join(&name)).unwrap(), std::fs::read(nix.join(&name)).unwrap());
        assert_eq!(String::from_utf8_lossy(&a), String::from_utf8_lossy(&b), "{name}");
    }
    // The same debug files are indexed; each link points at our NAR and the right member.
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d.join("debuginfo"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&ours), names(&nix));
    assert_eq!(names(&ours).len(), 2);
    let debug_url = narinfo(&ours, f.path("edge-debug")).url;
    for n in names(&ours) {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(ours.join("debuginfo").join(&n)).unwrap()).unwrap();
        assert_eq!(v["archive"], format!("../{debug_url}"));
        let member = v["member"].as_str().unwrap();
        assert_eq!(format!("{}{}", &member[20..22], &member[23..]), n, "{member}");
        assert!(ours.join(&debug_url).exists());
    }
    // A re-run without the listing present writes it back from the store.
    std::fs::remove_file(ours.join(format!("{}.ls", hash_part(f.path("edge-tree"))))).unwrap();
    push(&ours, &["--nar-listing"], &[&f.top]);
    assert!(ours.join(format!("{}.ls", hash_part(f.path("edge-tree")))).exists());
}

#[test]
fn gc_never_deletes_what_a_writer_without_our_lock_is_writing() {
    // nix copy takes no lock: it writes a NAR (under a temporary name, then renamed), then
    // the narinfo that names it. gc running all the while must leave both alone.
    let t = tmp();
    let cache = t.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    // A cache already (gc refuses a directory without nix-cache-info), as nix copy writes it.
    std::fs::write(cache.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let salt = format!("race {}-{:?}", std::process::id(), std::time::SystemTime::now());
    let paths = text_paths(&salt, 20, 40000);
    let url = format!("file://{}?compression=zstd", cache.display());
    let mut gcs = 0;
    for (round, p) in paths.iter().enumerate() {
        let mut copy = nix_cmd("nix")
            .args(["copy", "--to", &url, p])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        while copy.try_wait().unwrap().is_none() {
            ok(nixcache().args(["gc", "-q", "--older-than", "1h", "--dest"]).arg(&cache));
            gcs += 1;
        }
        let copied = copy.wait_with_output().unwrap();
        assert!(copied.status.success(), "round {round}: nix copy failed: {}", stderr(&copied));
        assert_eq!(problems(&verify(&cache, &[]).1), vec![], "round {round}");
        let ni = cache.join(format!("{}.narinfo", hash_part(p)));
        assert!(
            ni.exists(),
            "round {round}: gc removed the NAR nix copy had just written, so its narinfo went too"
        );
    }
    assert!(gcs >= 20, "gc ran {gcs} times: the rounds did not overlap");
    // Every path restores from what the race left.
    let root = t.path().join("root");
    ok(nix_cmd("nix").args(["copy", "--from", &url, "--to"]).arg(&root).args(&paths));
}
