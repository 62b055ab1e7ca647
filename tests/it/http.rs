//! The cache served over HTTP on loopback restores with `nix copy --from http://…`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;

use crate::helpers::*;

/// A minimal static file server for one directory, on 127.0.0.1, for the test's lifetime.
pub fn serve(dir: PathBuf) -> u16 {
    serve_failing(dir, |_| false)
}

/// The same, answering 500 to every request for a path `fail` picks.
pub fn serve_failing(dir: PathBuf, fail: fn(&str) -> bool) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let mut parts = request.split_whitespace();
                let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("/"));
                let rel = path.trim_start_matches('/');
                if fail(rel) {
                    let _ = stream.write_all(
                        b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    return;
                }
                let body = (!rel.contains("..")).then(|| std::fs::read(dir.join(rel)).ok()).flatten();
                let _ = match body {
                    Some(b) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        );
                        stream
                            .write_all(head.as_bytes())
                            .and_then(|()| if method == "HEAD" { Ok(()) } else { stream.write_all(&b) })
                    }
                    None => stream.write_all(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    ),
                };
            });
        }
    });
    port
}

#[test]
fn restores_over_http() {
    let f = fixtures();
    let t = tmp();
    let cache = t.path().join("cache");
    ok(nixcache().args(["push", "-q", "-c", "zstd", "-k", SECRET, "--dest"]).arg(&cache).arg(&f.top));
    let port = serve(cache);
    let root = t.path().join("root");
    restore(&format!("http://127.0.0.1:{port}"), &root, &[&f.top]);
    assert_restored_identical(&root, &f.closure);
}
