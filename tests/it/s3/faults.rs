//! A fault-injecting proxy in front of the server: statuses, delays, answers cut off or
//! stalled, rewritten or lost, by request and try.

use std::net::TcpListener;
use std::time::Duration;

/// What the fault-injecting proxy does with one try of a request.
#[derive(Clone, Copy)]
pub(crate) enum Fault {
    Forward,
    /// Answer with this status and an S3 error body, without forwarding.
    Status(&'static str),
    /// Forward after this long.
    Delay(Duration),
    /// Forward, then send the head and half the body and close the connection.
    Cut,
    /// Forward, then send the head and half the body and stop sending, connection open.
    Stall,
    /// Forward, and rewrite the answer's body.
    Rewrite(fn(&str) -> String),
    /// Answer 200 with an ETag and an empty body, without forwarding: a write the server lost.
    Lose,
}

/// A proxy on loopback in front of the server, one request per connection: the `n`th try
/// (from 0) of each request (method, path and body size; the signature changes per try) gets
/// `rule(head, n)`, the head being the request line and headers as sent.
pub(crate) struct Flaky {
    pub(crate) port: u16,
    pub(crate) failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub(crate) forwarded: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Every request line seen, in order.
    pub(crate) seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

pub(crate) fn flaky(upstream: u16, status: &'static str, fail: fn(&str, usize) -> bool) -> Flaky {
    faulty(upstream, move |head, n| {
        if fail(head.lines().next().unwrap_or_default(), n) { Fault::Status(status) } else { Fault::Forward }
    })
}

/// Splits an HTTP answer into its head (without the blank line) and its body, decoding a
/// chunked body.
pub(crate) fn split_answer(raw: &[u8]) -> (String, Vec<u8>) {
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n").map_or(raw.len(), |i| i + 4);
    let head = String::from_utf8_lossy(&raw[..at]).trim_end().to_owned();
    let mut body = raw[at.min(raw.len())..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 4 + size..];
        }
        body = out;
    }
    (head, body)
}

/// `head` with its body framing replaced by a Content-Length of `len`.
pub(crate) fn reframe(head: &str, len: usize) -> String {
    let mut out: Vec<&str> = head
        .lines()
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            !l.starts_with("content-length:")
                && !l.starts_with("transfer-encoding:")
                && !l.starts_with("connection:")
        })
        .collect();
    let length = format!("Content-Length: {len}");
    out.push(&length);
    out.push("Connection: close");
    out.join("\r\n") + "\r\n\r\n"
}

pub(crate) fn faulty(upstream: u16, rule: impl Fn(&str, usize) -> Fault + Send + Sync + 'static) -> Flaky {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (failed, forwarded) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (f2, w2, s2) = (failed.clone(), forwarded.clone(), seen.clone());
    let tries = Arc::new(Mutex::new(std::collections::HashMap::<String, usize>::new()));
    let rule = Arc::new(rule);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut client) = stream else { continue };
            let (f2, w2, s2, tries, rule) = (f2.clone(), w2.clone(), s2.clone(), tries.clone(), rule.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().unwrap());
                let mut head = Vec::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                    if !lower.starts_with("connection:") {
                        head.extend_from_slice(line.as_bytes());
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).is_err() {
                    return;
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let request = text.lines().next().unwrap_or_default().to_owned();
                s2.lock().unwrap().push(request.clone());
                let id = format!("{} {length}", request.split('?').next().unwrap_or_default());
                let n = {
                    let mut t = tries.lock().unwrap();
                    let n = t.entry(id).or_default();
                    *n += 1;
                    *n - 1
                };
                let fault = rule(&text, n);
                match fault {
                    Fault::Status(status) => {
                        f2.fetch_add(1, Ordering::SeqCst);
                        let code = status.split_whitespace().next().unwrap();
                        let xml = format!(
                            "<?xml version=\"1.0\"?><Error><Code>{}</Code><Message>injected</Message></Error>",
                            if code == "503" { "SlowDown" } else { "InternalError" }
                        );
                        let _ = write!(
                            client,
                            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
                            xml.len()
                        );
                        return;
                    }
                    Fault::Lose => {
                        f2.fetch_add(1, Ordering::SeqCst);
                        let _ = write!(
                            client,
                            "HTTP/1.1 200 OK\r\nETag: \"d41d8cd98f00b204e9800998ecf8427e\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                        return;
                    }
                    Fault::Delay(d) => std::thread::sleep(d),
                    _ => {}
                }
                w2.fetch_add(1, Ordering::SeqCst);
                let mut up = std::net::TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                head.extend_from_slice(b"Connection: close\r\n\r\n");
                up.write_all(&head).unwrap();
                up.write_all(&body).unwrap();
                if matches!(fault, Fault::Forward | Fault::Delay(_)) {
                    let _ = std::io::copy(&mut up, &mut client);
                    return;
                }
                let mut raw = Vec::new();
                let _ = up.read_to_end(&mut raw);
                let (head, body) = split_answer(&raw);
                f2.fetch_add(1, Ordering::SeqCst);
                match fault {
                    Fault::Rewrite(f) => {
                        let body = f(&String::from_utf8_lossy(&body));
                        let _ = client.write_all(reframe(&head, body.len()).as_bytes());
                        let _ = client.write_all(body.as_bytes());
                    }
                    // Cut or stall: half the body of a declared length.
                    _ => {
                        let _ = client.write_all(reframe(&head, body.len()).as_bytes());
                        let _ = client.write_all(&body[..body.len() / 2]);
                        let _ = client.flush();
                        if matches!(fault, Fault::Stall) {
                            std::thread::sleep(Duration::from_secs(600));
                        }
                    }
                }
            });
        }
    });
    Flaky { port, failed, forwarded, seen }
}
