//! Bad input: one clear error line, a non-zero exit, no panic, nothing half-written.

use std::path::Path;
use std::process::Command;

use crate::helpers::*;

/// A cache directory is untouched or holds only complete, restorable narinfos.
fn assert_consistent(cache: &Path) {
    for (p, _) in tree(cache) {
        let s = p.to_string_lossy();
        assert!(!s.contains(".nixcache-tmp-"), "temporary file left: {s}");
        if s.ends_with(".narinfo") {
            let ni: nixcache::narinfo::NarInfo =
                std::fs::read_to_string(cache.join(&p)).unwrap().parse().unwrap();
            let size = std::fs::metadata(cache.join(&ni.url)).map(|m| m.len()).ok();
            assert_eq!(size, ni.file_size, "{s} points at a missing or partial NAR");
        }
    }
}

fn failed_cleanly(out: &std::process::Output) -> String {
    let e = stderr(out);
    assert!(!e.contains("panicked"), "{e}");
    assert_eq!(out.status.code(), Some(1), "{e}");
    e
}

/// A fresh copy of the fixtures that a test may damage, deleted afterwards.
struct Scratch {
    top: String,
    closure: Vec<String>,
}

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let salt = format!("{tag}-{}-{:?}", std::process::id(), std::time::SystemTime::now());
        let top = build_fixtures(&salt);
        let closure = requisites(&top);
        Scratch { top, closure }
    }

    fn path(&self, name: &str) -> &str {
        self.closure.iter().find(|p| p.ends_with(name)).unwrap()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.closure {
            let _ = Command::new("chmod").args(["-R", "u+rw", p]).status();
        }
        let _ = nix_cmd("nix-store").arg("--delete").args(&self.closure).output();
    }
}

#[test]
fn missing_and_outside_paths() {
    let t = tmp();
    let cache = t.path().join("cache");
    let missing = "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-missing";
    let out = fails(nixcache().args(["push", "--dest"]).arg(&cache).arg(missing));
    assert!(failed_cleanly(&out).contains(missing), "{}", stderr(&out));
    let outside = t.path().join("file");
    std::fs::write(&outside, "x").unwrap();
    let out = fails(nixcache().args(["push", "--dest"]).arg(&cache).arg(&outside));
    assert!(failed_cleanly(&out).contains("is not in the Nix store"), "{}", stderr(&out));
    let out = fails(nixcache().args(["push", "--dest"]).arg(&cache).arg(t.path().join("nope")));
    assert!(failed_cleanly(&out).contains("No such file or directory"), "{}", stderr(&out));
    let out = fails(nixcache().args(["push", "--dest"]).arg(&cache).stdin(std::process::Stdio::null()));
    assert_eq!(out.status.code(), Some(2), "no paths is a usage error: {}", stderr(&out));
    assert!(stderr(&out).contains("no store paths given"));
    assert!(!cache.exists(), "bad input must not create the cache");
}

#[test]
fn bad_keys_and_options() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let garbage = t.path().join("garbage.key");
    std::fs::write(&garbage, "this is not a key\n").unwrap();
    let out = fails(nixcache().args(["push", "-k"]).arg(&garbage).arg("--dest").arg(&cache).arg(&f.top));
    let e = failed_cleanly(&out);
    assert!(e.contains("is not a Nix secret key") && e.contains("garbage.key"), "{e}");
    let out = fails(nixcache().args(["push", "-k", "/nonexistent/key", "--dest"]).arg(&cache).arg(&f.top));
    assert!(failed_cleanly(&out).contains("cannot read secret key file /nonexistent/key"));
    // A public key where the secret one belongs.
    let public = t.path().join("pub.key");
    std::fs::write(&public, PUBLIC).unwrap();
    let out = fails(nixcache().args(["push", "-k"]).arg(&public).arg("--dest").arg(&cache).arg(&f.top));
    assert!(failed_cleanly(&out).contains("64"), "{}", stderr(&out));
    let out = fails(nixcache().args(["push", "--compression-level", "12", "--dest"]).arg(&cache).arg(&f.top));
    assert_eq!(out.status.code(), Some(2), "a level out of range is a usage error: {}", stderr(&out));
    assert!(stderr(&out).contains("out of range"));
    let out = fails(nixcache().args(["push", "-c", "lz4", "--dest"]).arg(&cache).arg(&f.top));
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(!cache.exists());
}

#[test]
fn dest_that_is_a_file() {
    let f = fixtures();
    let t = tmp();
    let file = t.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let out = fails(nixcache().args(["push", "--dest"]).arg(&file).arg(&f.top));
    assert!(failed_cleanly(&out).contains("is not a directory"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
}

#[test]
fn corrupt_store_path_is_refused_with_its_dependents() {
    let s = Scratch::new("corrupt");
    let dep = s.path("edge-dep").to_owned();
    let file = format!("{dep}/bin/dep");
    ok(Command::new("chmod").args(["u+w", &file]));
    std::fs::write(&file, "#!/bin/sh\necho tampered\n").unwrap();
    let t = tmp();
    let cache = t.path().join("cache");
    let out = fails(nixcache().args(["push", "-k", SECRET, "--dest"]).arg(&cache).arg(&s.top));
    let e = failed_cleanly(&out);
    assert!(e.contains(&dep) && e.contains("corrupt"), "{e}");
    assert!(e.contains("nix-store --verify --check-contents --repair"), "{e}");
    // Nothing that depends on it is published; what doesn't is.
    for name in ["edge-dep", "edge-tree", "edge-symlink", "edge-top"] {
        assert!(!cache.join(format!("{}.narinfo", hash_part(s.path(name)))).exists(), "{name} published");
        if name != "edge-dep" {
            assert!(e.contains(s.path(name)), "{name} not reported: {e}");
        }
    }
    for name in ["edge-single-file", "edge-text-ca"] {
        assert!(cache.join(format!("{}.narinfo", hash_part(s.path(name)))).exists(), "{name} missing");
    }
    assert_consistent(&cache);
}

#[test]
fn unreadable_file_is_named() {
    let s = Scratch::new("unreadable");
    let file = format!("{}/exe", s.path("edge-tree"));
    ok(Command::new("chmod").args(["000", &file]));
    let t = tmp();
    let cache = t.path().join("cache");
    // Root reads anything; drop the capabilities that let it.
    let out = fails(
        Command::new("setpriv")
            .args([
                "--bounding-set=-dac_override,-dac_read_search",
                env!("CARGO_BIN_EXE_nixcache"),
                "push",
                "--dest",
            ])
            .arg(&cache)
            .arg(&s.top)
            .env("NIX_CONFIG", "substituters =\nexperimental-features = nix-command\n"),
    );
    let e = failed_cleanly(&out);
    assert!(e.contains(&file) && e.contains("Permission denied"), "{e}");
    assert_consistent(&cache);
}

/// Unmounts on drop.
pub struct Unmount<'a>(&'a Path);

impl Drop for Unmount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

/// Mounts a tmpfs of `size` on the directory `dir` until the guard is dropped.
pub fn small_disk<'a>(dir: &'a Path, size: &str) -> Unmount<'a> {
    ok(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(dir));
    Unmount(dir)
}

#[test]
fn full_disk_fails_cleanly() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("small");
    std::fs::create_dir(&cache).unwrap();
    // A 256 KiB filesystem: the fixtures' 1.3 MB of NARs cannot fit uncompressed.
    let _u = small_disk(&cache, "256k");
    let out = fails(nixcache().args(["push", "-c", "none", "--dest"]).arg(&cache).arg(&f.top));
    let e = failed_cleanly(&out);
    assert!(e.contains("No space left on device"), "{e}");
    // The cache is full, not the store broken.
    assert!(e.contains("the cache's filesystem is full"), "{e}");
    assert!(!e.contains("cannot archive"), "a full cache blamed on the store: {e}");
    assert_consistent(&cache);
}

#[test]
fn a_failed_xz_block_leaves_nothing_published() {
    // One path of three xz blocks into 512 KiB: block 1 (random bytes and numbers, more than
    // 1 MiB compressed) outgrows memory into the cache's filesystem and fails there while
    // the read and the other blocks go on. The path fails whole, with nothing of it left,
    // and the threads waiting on it do not hang.
    let big = build_big("blocks");
    for j in ["1", "2"] {
        let t = tmp();
        let cache = t.path().join("small");
        std::fs::create_dir(&cache).unwrap();
        let _u = small_disk(&cache, "512k");
        let out = run_within(nixcache().args(["push", "-j", j, "--dest"]).arg(&cache).arg(&big), 120);
        let e = failed_cleanly(&out);
        assert!(e.contains("the cache's filesystem is full"), "-j {j}: {e}");
        assert!(!e.contains("cannot archive"), "-j {j}: a full cache blamed on the store: {e}");
        assert_consistent(&cache);
        let left: Vec<_> = tree(&cache)
            .into_iter()
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .filter(|p| p.ends_with(".narinfo") || p.starts_with("nar/"))
            .collect();
        assert!(left.is_empty(), "-j {j}: left of the failed path: {left:?}");
    }
}

#[test]
fn failed_output_never_panics() {
    use std::process::Stdio;
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let full = || Stdio::from(std::fs::File::options().write(true).open("/dev/full").unwrap());
    let dest = cache.to_str().unwrap();
    let runs: Vec<Vec<&str>> = vec![
        vec!["push", "-c", "zstd", "-k", SECRET, "--dest", dest, &f.top],
        vec!["push", "-c", "zstd", "--dest", dest, &f.top],
        vec!["sign", "-k", SECRET, "--dest", dest],
        vec!["verify", "--dest", dest],
        vec!["verify", "--json", "--dest", dest],
        vec!["gc", "--older-than", "0s", "--dry-run", "--dest", dest],
        vec!["completions", "bash"],
        vec!["push", "--dest", dest, "/nonexistent/path"],
    ];
    for args in &runs {
        // stderr full, stdout full, stdout a closed pipe.
        for target in ["stderr", "stdout", "pipe"] {
            let mut c = nixcache();
            c.args(args);
            match target {
                "stderr" => c.stderr(full()).stdout(Stdio::null()),
                "stdout" => c.stdout(full()).stderr(Stdio::piped()),
                _ => c.stdout(Stdio::piped()).stderr(Stdio::piped()),
            };
            let mut child = c.spawn().unwrap();
            drop(child.stdout.take());
            let out = child.wait_with_output().unwrap();
            assert_ne!(
                out.status.code(),
                Some(101),
                "{args:?} with {target} failing panicked: {}",
                stderr(&out)
            );
            assert!(!stderr(&out).contains("panicked"), "{args:?}: {}", stderr(&out));
        }
    }
    // The cache stayed whole: verify with working output is clean, and Nix restores it.
    assert_consistent(&cache);
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    restore(&file_url(&cache), &t.path().join("root"), &[&f.top]);
}

#[test]
fn a_full_cache_disk_is_said_once_with_the_space_needed() {
    // Three 4 MB paths and the fixtures into 512 KiB: several paths fail on the full disk.
    let top = build_fixtures_with("full-disk", 3);
    let t = tmp();
    let cache = t.path().join("small");
    std::fs::create_dir(&cache).unwrap();
    let _u = small_disk(&cache, "512k");
    let out = fails(nixcache().args(["push", "-c", "none", "-j", "1", "--dest"]).arg(&cache).arg(&top));
    let e = failed_cleanly(&out);
    let per_path = e.lines().filter(|l| l.contains("No space left on device")).count();
    assert_eq!(per_path, 1, "one line for the full disk, not one per path:\n{e}");
    let summary =
        e.lines().find(|l| l.contains("more free space is needed")).unwrap_or_else(|| panic!("{e}"));
    // The three 4 MB paths and edge-tree did not fit; at least 12 MB (uncompressed) is left.
    assert!(summary.contains("4 paths could not be written"), "{summary}");
    let needed: f64 = summary.split("about ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(summary.contains(" MiB more free space is needed") && needed >= 11.4, "{summary}");
    assert_consistent(&cache);
}

#[test]
fn fault_sweep_sampled() {
    // scripts/faults, sampled and time-bounded: ENOSPC and EIO at calls of write, pwrite64,
    // fsync, rename, openat, mkdir and flock of push (empty and half-full cache), sign and gc.
    // Nix must be there: this panics when it is not.
    let _ = nix_cmd("nix-store");
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/faults"))
        .args([
            "--sample",
            "3",
            "--seconds",
            "150",
            "--restore-every",
            "5",
            "--nixcache",
            env!("CARGO_BIN_EXE_nixcache"),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    let total = text.lines().find(|l| l.starts_with("TOTAL: ")).unwrap_or_else(|| panic!("{text}"));
    let points: usize = total["TOTAL: ".len()..].split(' ').next().unwrap().parse().unwrap();
    assert!(points >= 50, "too few points ran: {total}");
    assert!(total.ends_with(" 0 broken, 0 panics"), "{text}");
}

#[test]
fn the_full_disk_estimate_is_the_same_when_the_push_is_run_again() {
    // zstd, so what was written compresses well and what is left (random bytes) does not: an
    // estimate from "this run's ratio" changed once the first run had written the text paths.
    let top = build_fixtures_with("full-disk-again", 3);
    let t = tmp();
    let cache = t.path().join("small");
    std::fs::create_dir(&cache).unwrap();
    let _u = small_disk(&cache, "512k");
    let needed = || {
        let out = fails(nixcache().args(["push", "-c", "zstd", "-j", "1", "--dest"]).arg(&cache).arg(&top));
        let e = failed_cleanly(&out);
        e.lines()
            .find(|l| l.contains("more free space is needed"))
            .unwrap_or_else(|| panic!("{e}"))
            .to_owned()
    };
    let first = needed();
    assert_eq!(needed(), first, "the estimate changed on a re-run");
    assert!(!first.contains("os error"), "{first}");
}
