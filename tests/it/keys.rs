//! keygen's keys are Nix's keys: Nix signs and verifies with them, and restores need them.

use std::os::unix::fs::PermissionsExt;

use crate::helpers::*;

fn keygen(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let (sk, pk) = (dir.join(format!("{name}.sec")), dir.join(format!("{name}.pub")));
    ok(nixcache().args(["keygen", name]).arg(&sk).arg(&pk));
    (sk, std::fs::read_to_string(&pk).unwrap())
}

#[test]
fn keygen_writes_nix_format_and_refuses_to_overwrite() {
    let t = tmp();
    let (sk, pk) = keygen(t.path(), "cache.example.org-1");
    let secret = std::fs::read_to_string(&sk).unwrap();
    assert_eq!(std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(secret.starts_with("cache.example.org-1:") && !secret.ends_with('\n'));
    assert!(pk.starts_with("cache.example.org-1:") && !pk.ends_with('\n'));
    let parsed: nixcache::signing::SecretKey = secret.parse().unwrap();
    assert_eq!(parsed.public_key().to_string(), pk);
    let out = fails(nixcache().args(["keygen", "other"]).arg(&sk).arg(t.path().join("new.pub")));
    assert!(stderr(&out).contains("already exists"));
    assert_eq!(std::fs::read_to_string(&sk).unwrap(), secret, "not overwritten");
    assert!(!t.path().join("new.pub").exists(), "no half key pair");
}

#[test]
fn nix_signs_and_verifies_with_keygen_keys() {
    let f = fixtures();
    let t = tmp();
    let (sk, pk) = keygen(t.path(), "ours-1");
    let store = t.path().join("store");
    let path = f.path("edge-single-file");
    ok(nix_cmd("nix").args(["copy", "--no-check-sigs", "--to"]).arg(&store).arg(path));
    let store_s = store.to_str().unwrap();
    ok(nix_cmd("nix").args(["store", "sign", "--store", store_s, "--key-file"]).arg(&sk).arg(path));
    let verify = |key: &str| {
        nix_cmd("nix")
            .args([
                "store",
                "verify",
                "--store",
                store_s,
                "--sigs-needed",
                "1",
                "--trusted-public-keys",
                key,
                path,
            ])
            .output()
            .unwrap()
    };
    assert!(verify(&pk).status.success(), "{}", stderr(&verify(&pk)));
    let wrong = verify(PUBLIC);
    assert!(!wrong.status.success());
}

#[test]
fn restores_need_the_right_key() {
    let f = fixtures();
    let t = tmp();
    let (sk, pk) = keygen(t.path(), "ours-2");
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "--key-file"]).arg(&sk).arg("--dest").arg(&cache).arg(&f.top));
    ok(&mut restore_cmd(&file_url(&cache), &t.path().join("good"), &pk, &[&f.top]));
    assert_restored_identical(&t.path().join("good"), &f.closure);
    let out = fails(&mut restore_cmd(&file_url(&cache), &t.path().join("bad"), PUBLIC, &[&f.top]));
    assert!(stderr(&out).contains("signature"), "{}", stderr(&out));
    // Two keys: both signatures present, either one is enough.
    let both = t.path().join("both");
    ok(nixcache().args(["push", "-q", "-k", SECRET, "-k"]).arg(&sk).arg("--dest").arg(&both).arg(&f.top));
    let ni = narinfo(&both, &f.top);
    assert!(ni.signed_by("test-1") && ni.signed_by("ours-2"));
    ok(&mut restore_cmd(&file_url(&both), &t.path().join("r2"), PUBLIC, &[&f.top]));
}
