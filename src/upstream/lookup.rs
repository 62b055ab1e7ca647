//! Asking upstream caches whether they have a store path: `GET <url>/<hash>.narinfo` over
//! HTTP(S), or the file under a `file://` cache.
//!
//! An upstream has a path when it answers its narinfo, for that store path. It lacks it on 404
//! (or 403/410, as Nix reads them). Anything else, after the retries a bucket request gets
//! ([`crate::retry`]), is a failed lookup, and a failed lookup means "push it", never "skip
//! it": a cache must not trust that a path is elsewhere because a server was down.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use thiserror::Error;

use crate::cache_info::CacheInfo;
use crate::narinfo::NarInfo;
use crate::retry;
use crate::store_path::{StoreDir, StorePath};

/// Lookups in flight at once, over all upstreams.
pub const IN_FLIGHT: usize = 16;

/// Transport failures (after retries) in a row after which an upstream counts as gone and is
/// asked nothing more in this run.
const GONE_AFTER: usize = 3;

/// The largest narinfo read from an upstream.
const NARINFO_LIMIT: u64 = 4 << 20;

#[derive(Debug, Error)]
pub enum UpstreamError {
    #[error("--skip-upstream {0:?}: give an http://, https:// or file:// URL of a binary cache")]
    Url(String),
    #[error("upstream {url} cannot be reached ({reason}); its paths will be pushed")]
    Unreachable { url: String, reason: String },
    #[error("upstream {url} has no usable nix-cache-info ({reason}); is it a binary cache?")]
    NotACache { url: String, reason: String },
    #[error(
        "upstream {url} holds paths of the store {theirs}, not {ours}: it cannot serve these paths; drop --skip-upstream {url}"
    )]
    StoreDir { url: String, theirs: String, ours: String },
}

impl UpstreamError {
    /// Whether the push may go on without this upstream (pushing what it would have skipped).
    pub fn recoverable(&self) -> bool {
        matches!(self, UpstreamError::Unreachable { .. })
    }
}

enum Access {
    Http(ureq::Agent),
    File(PathBuf),
}

/// One upstream cache.
pub struct Upstream {
    /// As given (and as recorded), without a trailing slash.
    url: String,
    access: Access,
    requests: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    /// Transport failures in a row.
    in_a_row: AtomicUsize,
    gone: AtomicBool,
    first_error: Mutex<Option<String>>,
}

/// What an upstream said about one path.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Has,
    Lacks,
    Failed(String),
}

/// What a lookup failed on: the server said something we cannot use, or never answered.
enum Trouble {
    Answer(String),
    Transport(String),
}

impl Upstream {
    /// Connects to `url` and checks its `nix-cache-info` names `store_dir`.
    pub fn open(url: &str, store_dir: &StoreDir) -> Result<Upstream, UpstreamError> {
        let url = url.trim_end_matches('/').to_owned();
        let access = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(UpstreamError::Url(url));
            }
            Access::File(PathBuf::from(dir))
        } else if url.starts_with("http://") || url.starts_with("https://") {
            Access::Http(ureq::Agent::new_with_config(
                ureq::config::Config::builder()
                    .http_status_as_error(false)
                    .timeout_connect(Some(Duration::from_secs(10)))
                    .timeout_global(Some(Duration::from_secs(60)))
                    .max_idle_connections_per_host(IN_FLIGHT)
                    .user_agent(concat!("nixcache/", env!("CARGO_PKG_VERSION")))
                    .build(),
            ))
        } else {
            return Err(UpstreamError::Url(url));
        };
        let up = Upstream {
            url,
            access,
            requests: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            in_a_row: AtomicUsize::new(0),
            gone: AtomicBool::new(false),
            first_error: Mutex::new(None),
        };
        let text = match up.get("nix-cache-info") {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(UpstreamError::NotACache { url: up.url, reason: "it answers 404 for it".into() });
            }
            Err(Trouble::Answer(reason)) => return Err(UpstreamError::NotACache { url: up.url, reason }),
            Err(Trouble::Transport(reason)) => {
                return Err(UpstreamError::Unreachable { url: up.url, reason });
            }
        };
        let info: CacheInfo = String::from_utf8_lossy(&text)
            .parse()
            .map_err(|reason| UpstreamError::NotACache { url: up.url.clone(), reason })?;
        if info.store_dir != *store_dir {
            return Err(UpstreamError::StoreDir {
                url: up.url,
                theirs: info.store_dir.to_string(),
                ours: store_dir.to_string(),
            });
        }
        Ok(up)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bytes of `rel` under the upstream; `None` when it does not have it.
    fn get(&self, rel: &str) -> Result<Option<Vec<u8>>, Trouble> {
        match &self.access {
            Access::File(dir) => {
                self.requests.fetch_add(1, Ordering::Relaxed);
                let path = dir.join(rel);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(Trouble::Answer(format!("cannot read {}: {e}", path.display()))),
                }
            }
            Access::Http(agent) => {
                let uri = format!("{}/{rel}", self.url);
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    self.requests.fetch_add(1, Ordering::Relaxed);
                    let last = attempt >= retry::ATTEMPTS;
                    let trouble = match agent.get(&uri).call() {
                        Ok(mut r) => match r.status().as_u16() {
                            200 => match r.body_mut().with_config().limit(NARINFO_LIMIT).read_to_vec() {
                                Ok(b) => return Ok(Some(b)),
                                Err(e) => Trouble::Transport(format!("the answer was cut short: {e}")),
                            },
                            404 | 403 | 410 => return Ok(None),
                            s if retry::retryable(s) => Trouble::Answer(format!("it answers {s}")),
                            s => return Err(Trouble::Answer(format!("it answers {s}"))),
                        },
                        Err(e) => Trouble::Transport(e.to_string()),
                    };
                    if last {
                        return Err(trouble);
                    }
                    self.retried.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(retry::pause(attempt));
                }
            }
        }
    }

    fn has(&self, store_dir: &StoreDir, p: &StorePath) -> Answer {
        if self.gone.load(Ordering::Relaxed) {
            return Answer::Failed("it stopped answering earlier in this run".into());
        }
        let answer = match self.get(&crate::layout::narinfo_name(p.hash_part())) {
            Ok(None) => Answer::Lacks,
            Ok(Some(b)) => match String::from_utf8_lossy(&b).parse::<NarInfo>() {
                Ok(ni) if ni.store_path == *p && ni.store_dir == *store_dir => Answer::Has,
                Ok(ni) => Answer::Failed(format!(
                    "its narinfo for {} is for {}",
                    store_dir.display(p),
                    ni.store_dir.display(&ni.store_path)
                )),
                Err(e) => Answer::Failed(format!("its narinfo does not parse: {e}")),
            },
            Err(Trouble::Answer(r)) => Answer::Failed(r),
            Err(Trouble::Transport(r)) => {
                if self.in_a_row.fetch_add(1, Ordering::Relaxed) + 1 >= GONE_AFTER {
                    self.gone.store(true, Ordering::Relaxed);
                }
                Answer::Failed(r)
            }
        };
        match &answer {
            Answer::Failed(r) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert_with(|| r.clone());
            }
            _ => self.in_a_row.store(0, Ordering::Relaxed),
        }
        answer
    }

    /// For the summary: `asked https://x about 12 paths: 14 requests (2 retries), 1 failed
    /// (pushed): it answers 500`.
    pub fn summary(&self, asked: usize) -> String {
        let (requests, retried, failed) = (
            self.requests.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        );
        let mut s = format!(
            "asked {} about {}: {} ({} retried)",
            self.url,
            crate::progress::plural(asked, "path"),
            crate::progress::plural(requests as usize, "request"),
            retried
        );
        if failed > 0 {
            let why = self.first_error.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
            s.push_str(&format!(", {failed} lookups failed, so those paths are pushed (first: {why})"));
        }
        s
    }
}

/// For each path, the index of the first upstream that has it, asking at most [`IN_FLIGHT`]
/// at a time; `None` when none has it or every lookup for it failed. Returns also how many
/// paths each upstream was asked about.
pub fn find(
    upstreams: &[Upstream],
    store_dir: &StoreDir,
    paths: &[&StorePath],
) -> (Vec<Option<usize>>, Vec<usize>) {
    let found: Vec<Mutex<Option<usize>>> = paths.iter().map(|_| Mutex::new(None)).collect();
    let asked: Vec<AtomicUsize> = upstreams.iter().map(|_| AtomicUsize::new(0)).collect();
    let next = AtomicUsize::new(0);
    let workers = IN_FLIGHT.min(paths.len());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(p) = paths.get(i) else { break };
                    for (u, up) in upstreams.iter().enumerate() {
                        asked[u].fetch_add(1, Ordering::Relaxed);
                        if up.has(store_dir, p) == Answer::Has {
                            *found[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(u);
                            break;
                        }
                    }
                }
            });
        }
    });
    (
        found.into_iter().map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner())).collect(),
        asked.into_iter().map(AtomicUsize::into_inner).collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_upstream_answers_from_its_directory() {
        let d = tempfile::tempdir().unwrap();
        let sd = StoreDir::default();
        assert!(matches!(
            Upstream::open(&format!("file://{}", d.path().display()), &sd),
            Err(UpstreamError::NotACache { .. })
        ));
        std::fs::write(d.path().join("nix-cache-info"), "StoreDir: /other/store\n").unwrap();
        assert!(matches!(
            Upstream::open(&format!("file://{}/", d.path().display()), &sd),
            Err(UpstreamError::StoreDir { .. })
        ));
        std::fs::write(d.path().join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
        let up = Upstream::open(&format!("file://{}/", d.path().display()), &sd).unwrap();
        assert_eq!(up.url(), format!("file://{}", d.path().display()));
        let has: StorePath = "7rjj86a15146cq1d3qy068lml7n8ykzm-glibc".parse().unwrap();
        let lacks: StorePath = "0c9y2jngqmmn3v7r9dmyk6qbi4i2sn5w-hello".parse().unwrap();
        let wrong: StorePath = "11m8q1hd1w1r4ij7jg2nqhqm9k1n7vkw-secret".parse().unwrap();
        let ni = |p: &StorePath| {
            format!(
                "StorePath: /nix/store/{p}\nURL: nar/x.nar\nCompression: none\nNarHash: sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s\nNarSize: 1\nReferences: \n"
            )
        };
        std::fs::write(d.path().join(format!("{}.narinfo", has.hash_part())), ni(&has)).unwrap();
        // A narinfo under the wrong name is not the path's: a failed lookup, pushed.
        std::fs::write(d.path().join(format!("{}.narinfo", wrong.hash_part())), ni(&has)).unwrap();
        let (found, asked) = find(std::slice::from_ref(&up), &sd, &[&has, &lacks, &wrong]);
        assert_eq!(found, vec![Some(0), None, None]);
        assert_eq!(asked, vec![3]);
        assert!(up.summary(3).contains("1 lookups failed"), "{}", up.summary(3));
        assert!(matches!(Upstream::open("ftp://x", &sd), Err(UpstreamError::Url(_))));
        assert!(matches!(Upstream::open("file://relative", &sd), Err(UpstreamError::Url(_))));
    }
}
