//! Uploads into `serve --upload-token-file`: Nix's own `nix copy --to http://` with a token in
//! its netrc file, restored by Nix with require-sigs; without a token, 401 and nothing written;
//! every kind of bad upload refused with the cache left as it was and `verify` clean.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::*;
use crate::serve::Server;

const TOKEN: &str = "upload-token-0123456789";

/// A receiver on `cache` taking uploads with [`TOKEN`] signed by the test key, and a netrc
/// file for Nix that sends the token.
fn receiver(cache: &Path, dir: &Path, extra: &[&str]) -> (Server, PathBuf) {
    let tokens = dir.join("upload.tokens");
    std::fs::write(&tokens, format!("# who may push here\n\n{TOKEN}\n")).unwrap();
    let netrc = dir.join("netrc");
    std::fs::write(&netrc, format!("machine 127.0.0.1 login nix password {TOKEN}\n")).unwrap();
    let mut args: Vec<String> = vec!["--dest".into(), cache.display().to_string()];
    args.extend(["--upload-token-file".into(), tokens.display().to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    (Server::start(&args), netrc)
}

/// `nix copy --to` the receiver (signing with the test key), with `netrc` if given.
fn nix_copy_to(server: &Server, netrc: Option<&Path>, paths: &[&str]) -> std::process::Output {
    let mut c = nix_cmd("nix");
    c.args(["--extra-experimental-features", "nix-command", "copy", "--to"])
        .arg(format!("{}?secret-key={SECRET}", server.url));
    if let Some(n) = netrc {
        c.arg("--option").arg("netrc-file").arg(n);
    }
    c.args(paths).output().unwrap()
}

/// A PUT with curl: (status, body).
fn put(server: &Server, path: &str, body: &Path, auth: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-s", "-g", "--path-as-is", "-w", "\n%{http_code}", "-X", "PUT", "--data-binary"])
        .arg(format!("@{}", body.display()));
    if let Some(a) = auth {
        c.args(["-H", &format!("Authorization: {a}")]);
    }
    let out = c.arg(format!("{}{path}", server.url)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_owned())
}

fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// The cache's files a client can see: everything but nixcache's own state.
fn visible(cache: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    tree(cache).into_iter().filter(|(p, _)| !p.to_string_lossy().starts_with(".nixcache")).collect()
}

/// The files a receiver holds in `.nixcache/incoming/` (in its own directory there, beside
/// the lock file it holds while it runs).
fn received(cache: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(cache.join(".nixcache/incoming")).unwrap().flatten() {
        if e.path().is_dir() {
            found.extend(std::fs::read_dir(e.path()).unwrap().flatten().map(|e| e.path()));
        } else if !e.file_name().to_string_lossy().ends_with(".lock") {
            found.push(e.path());
        }
    }
    found
}

#[test]
fn nix_copy_uploads_through_serve_with_a_token_and_nix_restores_it() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let (server, netrc) = receiver(&cache, t.path(), &["--trusted-public-key", PUBLIC]);
    let out = nix_copy_to(&server, Some(&netrc), &[&f.top]);
    assert!(out.status.success(), "nix copy --to: {}", stderr(&out));
    for p in &f.closure {
        assert!(server.wait_for(10, |l| l == format!("received {p}")), "{p}: {:?}", server.lines());
    }
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    let root = t.path().join("root");
    restore(&server.url, &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
    // Again: Nix finds everything there and sends nothing.
    let before = visible(&cache);
    let out = nix_copy_to(&server, Some(&netrc), &[&f.top]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(visible(&cache), before);
}

#[test]
fn without_the_token_nothing_is_written() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    let src = t.path().join("src");
    ok(nixcache().args(["push", "-q", "-k", SECRET, "--dest"]).arg(&src).arg(&f.top));
    // A cache to push into, with what a client needs first.
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::copy(src.join("nix-cache-info"), cache.join("nix-cache-info")).unwrap();
    let (server, _) = receiver(&cache, t.path(), &["--trusted-public-key", PUBLIC]);
    let before = visible(&cache);
    let out = nix_copy_to(&server, None, &[&f.top]);
    assert!(!out.status.success(), "nix copy without a token succeeded");
    let leaf = f.path("edge-dep");
    let ni = narinfo(&src, leaf);
    for auth in [None, Some("Bearer wrong-token".to_owned()), Some("Basic bml4Ondyb25n".to_owned())] {
        let (code, said) = put(&server, &format!("/{}", ni.url), &src.join(&ni.url), auth.as_deref());
        assert_eq!(code, 401, "{auth:?}: {said}");
        let file = src.join(format!("{}.narinfo", hash_part(leaf)));
        let (code, _) = put(&server, &format!("/{}.narinfo", hash_part(leaf)), &file, auth.as_deref());
        assert_eq!(code, 401);
    }
    assert_eq!(visible(&cache), before);
    assert_eq!(received(&cache), Vec::<PathBuf>::new());
}

#[test]
fn bad_uploads_are_refused_and_leave_the_cache_as_it_was() {
    let f = fixtures();
    let t = tmp();
    let (cache, src) = (t.path().join("cache"), t.path().join("src"));
    ok(nixcache().args(["push", "-q", "-c", "none", "-k", SECRET, "--dest"]).arg(&src).arg(&f.top));
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::copy(src.join("nix-cache-info"), cache.join("nix-cache-info")).unwrap();
    let (server, netrc) =
        receiver(&cache, t.path(), &["--trusted-public-key", PUBLIC, "--max-upload-size", "1000000"]);
    let top = &f.top;
    let top_ni = narinfo(&src, top);
    let top_file = src.join(format!("{}.narinfo", hash_part(top)));
    let refused = |path: &str, body: &Path, want: u16, says: &str| {
        let before = visible(&cache);
        let (code, said) = put(&server, path, body, Some(&bearer()));
        assert_eq!(code, want, "{path}: {said}");
        assert!(said.contains(says), "{path}: {said:?} does not say {says:?}");
        assert_eq!(visible(&cache), before, "{path} changed the cache");
    };

    // The top's NAR is taken (it waits, unseen), but not its narinfo: its references are not
    // in the cache yet.
    let (code, said) = put(&server, &format!("/{}", top_ni.url), &src.join(&top_ni.url), Some(&bearer()));
    assert_eq!(code, 201, "{said}");
    refused(&format!("/{}.narinfo", hash_part(top)), &top_file, 400, "is not in the cache: upload it first");

    // The references go up with Nix's own client.
    let refs: Vec<String> =
        top_ni.references.iter().map(|r| top_ni.store_dir.display(r)).filter(|p| p != top).collect();
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    assert!(!refs.is_empty(), "the fixture's top has references");
    let out = nix_copy_to(&server, Some(&netrc), &refs);
    assert!(out.status.success(), "{}", stderr(&out));

    // A NAR whose bytes are not what its name says.
    let other = src.join(&narinfo(&src, refs[0]).url);
    refused(&format!("/{}", top_ni.url), &other, 400, "not to the hash its name says");
    // A narinfo sent under another path's name.
    refused(&format!("/{}.narinfo", hash_part(refs[0])), &top_file, 400, "StorePath's hash part");
    // Outside the cache's layout, encoded or not; and a name no kind of upload has.
    for path in [
        "/nar/..%2Fx.narinfo",
        "/../x.narinfo",
        "/%2e%2e/nix-cache-info",
        "/.nixcache/incoming/x",
        "/realisations/x.json",
    ] {
        refused(path, &top_file, 403, "is not a file a cache takes uploads of");
    }
    // Over the size limit.
    let big = t.path().join("big");
    std::fs::write(&big, vec![b'x'; 1_000_001]).unwrap();
    refused(&format!("/nar/{}.nar", "1".repeat(52)), &big, 413, "--max-upload-size");
    // Signed by a key this cache does not trust.
    let other_key = t.path().join("other.secret");
    ok(nixcache().args(["keygen", "other-1"]).arg(&other_key).arg(t.path().join("other.public")));
    let src2 = t.path().join("src2");
    ok(nixcache().args(["push", "-q", "-c", "none", "-k"]).arg(&other_key).arg("--dest").arg(&src2).arg(top));
    refused(
        &format!("/{}.narinfo", hash_part(top)),
        &src2.join(format!("{}.narinfo", hash_part(top))),
        403,
        "not signed by a key this cache trusts",
    );
    // A narinfo whose NarHash is not its NAR's: the signature no longer holds either, so a
    // receiver that takes unsigned uploads is asked.
    let lie = t.path().join("lie.narinfo");
    let text = std::fs::read_to_string(&top_file).unwrap();
    let other_hash = narinfo(&src, refs[0]).nar_hash.to_string();
    let lying: String = text
        .lines()
        .filter(|l| !l.starts_with("Sig:"))
        .map(
            |l| if l.starts_with("NarHash:") { format!("NarHash: {other_hash}\n") } else { format!("{l}\n") },
        )
        .collect();
    std::fs::write(&lie, lying).unwrap();
    refused(&format!("/{}.narinfo", hash_part(top)), &lie, 403, "not signed");
    let t2 = tmp();
    let (lax, _) = receiver(&cache, t2.path(), &["--allow-unsigned-uploads"]);
    let (code, _) = put(&lax, &format!("/{}", top_ni.url), &src.join(&top_ni.url), Some(&bearer()));
    assert_eq!(code, 201);
    let before = visible(&cache);
    let (code, said) = put(&lax, &format!("/{}.narinfo", hash_part(top)), &lie, Some(&bearer()));
    assert_eq!(code, 400, "{said}");
    assert!(said.contains("the narinfo says"), "{said}");
    assert_eq!(visible(&cache), before);
    drop(lax);

    // A body cut short: the connection closes before Content-Length bytes came.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(server.addr).unwrap();
        let head = format!(
            "PUT /{} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n",
            top_ni.url
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&[b'x'; 1000]).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    assert!(!cache.join(format!("{}.narinfo", hash_part(top))).exists());

    // And the real thing still goes through.
    let out = nix_copy_to(&server, Some(&netrc), &[top]);
    assert!(out.status.success(), "{}", stderr(&out));
    ok(nixcache().args(["verify", "--trusted-public-key", PUBLIC, "--dest"]).arg(&cache));
    restore(&server.url, &t.path().join("root"), &[top]);
}

#[test]
fn build_logs_go_up_with_nix_store_copy_log_and_nix_reads_them_back() {
    let t = tmp();
    let salt = format!("{:?}", std::time::SystemTime::now());
    let expr = format!(
        r#"derivation {{ name = "logged"; system = builtins.currentSystem; builder = "/bin/sh"; args = ["-c" "echo 'a line of the build log {salt}'; echo done > $out"]; }}"#
    );
    let path = ok(nix_cmd("nix-build").args(["--no-out-link", "--expr", &expr])).trim().to_owned();
    let cache = t.path().join("cache");
    let (server, netrc) = receiver(&cache, t.path(), &["--trusted-public-key", PUBLIC]);
    let out = nix_copy_to(&server, Some(&netrc), &[&path]);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut c = nix_cmd("nix");
    c.args(["store", "copy-log", "--to", &server.url, "--option", "netrc-file"]).arg(&netrc).arg(&path);
    ok(&mut c);
    let logs: Vec<_> = std::fs::read_dir(cache.join("log")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert!(std::fs::read_to_string(&logs[0]).unwrap().contains(&salt));
    let mut c = nix_cmd("nix");
    c.env("XDG_CACHE_HOME", t.path().join("xdg")).args(["log", "--store", &server.url, &path]);
    assert!(ok(&mut c).contains(&format!("a line of the build log {salt}")));
    // Without the token: 401, and no log written.
    let (code, _) = put(&server, "/log/x-other.drv", &logs[0], None);
    assert_eq!(code, 401);
    let (code, _) = put(&server, "/log/x-other.drv", &logs[0], Some(&bearer()));
    assert_eq!(code, 201);
    let (code, _) = put(&server, "/log/..%2Fx.drv", &logs[0], Some(&bearer()));
    assert_eq!(code, 403);
    let (code, said) = put(&server, "/realisations/sha256:00!out.doi", &logs[0], Some(&bearer()));
    assert_eq!(code, 400, "{said}");
    assert!(said.contains("is not a JSON object"), "{said}");
}
