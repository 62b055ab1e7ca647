//! `nixcache serve`: sockets (given, or passed by systemd), the cache made ready, the startup
//! line, then the server until SIGTERM.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::cache::Cache;
use crate::cli::ServeArgs;
use crate::push::PushOptions;
use crate::serve::fill::{FillConfig, Filler, Policy};
use crate::serve::{ServeConfig, run as serve};
use crate::storage::Dest;
use crate::store::Store;

/// nix-serve's address.
const DEFAULT_LISTEN: &str = "127.0.0.1:5000";

pub fn run(args: &ServeArgs) -> anyhow::Result<bool> {
    super::remote::refuse(&args.dest, "serve")?;
    let Dest::Dir(dir) = &args.dest else { bail!("serve serves a directory") };
    super::check_dest(&args.dest, &[args.store.real_store_dir(), args.store.store_dir.as_str().into()])?;
    let jobs = args
        .jobs
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let listen: Vec<SocketAddr> = args.listen.iter().flatten().copied().collect();
    let listeners = listeners(&listen)?;
    raise_open_files_limit();

    let mut public = Vec::new();
    let filler = if args.from_store {
        let keys =
            args.secret_keys.iter().map(|p| super::read_secret_key(p)).collect::<anyhow::Result<Vec<_>>>()?;
        public = keys.iter().map(|k| k.public_key().to_string()).collect();
        let level = args.compression.level(args.compression_level)?;
        let store = Store::open(&args.store.config()).context("cannot open the Nix store")?;
        prepare(dir, &store, args.quiet, args.lock_timeout)?;
        if !keys.is_empty() {
            sign_filled(dir, &args.secret_keys)?;
        }
        let policy = if args.whole_store { Policy::WholeStore } else { Policy::Roots(args.roots.clone()) };
        let push = PushOptions {
            compression: args.compression,
            level,
            jobs,
            force: false,
            repair: false,
            keys,
            nar_listing: false,
            index_debug_info: false,
        };
        let config = FillConfig {
            dest: dir.clone(),
            store: args.store.config(),
            policy,
            push,
            lock_wait: args.lock_timeout,
        };
        Some(Filler::new(config).context("cannot read the roots' closures from the Nix store")?)
    } else if args.upload_token_file.is_some() {
        // Pushers may start an empty cache: Nix sends nix-cache-info first.
        Cache::create(dir.as_path())?;
        None
    } else {
        let cache = Cache::inspect(dir.as_path())?;
        if cache.cache_info()?.is_none() {
            bail!(
                "{} is not a cache: it has no nix-cache-info (push to it first, or serve it with --from-store to fill it from the store)",
                dir.display()
            );
        }
        None
    };

    let https = args.tls_cert.is_some();
    let urls: Vec<String> =
        listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| url(a, https)).collect();
    let what = match &filler {
        None => String::new(),
        Some(f) => match f.allowed_paths() {
            None => format!(", filled from {} (the whole store)", args.store.store_dir),
            Some(n) => format!(
                ", filled from {} (the closures of {}: {})",
                args.store.store_dir,
                crate::progress::plural(args.roots.len(), "root"),
                crate::progress::plural(n, "path")
            ),
        },
    };
    let uploads = match &args.upload_token_file {
        Some(file) => Some(uploads(args, dir, file)?),
        None => None,
    };
    if let Some(u) = &uploads {
        // What clients trust: the keys uploads are signed with, and the receiver's own.
        let config = u.receiver.config();
        public.extend(config.keys.iter().map(|k| k.public_key().to_string()));
        public.extend(config.trusted.iter().map(ToString::to_string));
        public.dedup();
    }
    // The two lines a client pastes into nix.conf come first, each on its own line.
    let substituters = format!("substituters = {}", urls.first().map_or("", String::as_str));
    let keys_line = if public.is_empty() {
        trusted_keys_line(dir)
    } else {
        format!("trusted-public-keys = {}", public.join(" "))
    };
    crate::elog!("{substituters}");
    crate::elog!("{keys_line}");
    crate::elog!(
        "serving {}{what} on {} (clients: the two lines above, in nix.conf)",
        dir.display(),
        urls.join(" ")
    );
    if let Some(file) = &args.upload_token_file {
        crate::elog!(
            "taking uploads from clients with a token in {} (nix copy --to {} --option netrc-file FILE)",
            file.display(),
            urls.first().map_or("http://HOST:PORT", String::as_str)
        );
        let exposed = listeners.iter().filter_map(|l| l.local_addr().ok()).filter(|a| !a.ip().is_loopback());
        for l in exposed.filter(|_| !https) {
            crate::elog!(
                "warning: uploads on {l} come over plain HTTP: the token crosses the network in clear; give --tls-cert and --tls-key, or push over a tunnel (WireGuard, ssh -L), or over ssh (push --dest ssh://HOST/DIR)"
            );
        }
    }
    if args.from_store && args.secret_keys.is_empty() {
        crate::elog!(
            "warning: no --secret-key: what is filled is not signed, and clients with require-sigs (Nix's default) will not use it; make a key with `nixcache keygen` and pass -k"
        );
    }
    let index = format!(
        "nixcache {} serving a Nix binary cache. To use it, put in nix.conf:\n\n{substituters}\n{keys_line}\n",
        env!("CARGO_PKG_VERSION")
    );

    let readers = match &args.read_token_file {
        Some(file) => Some(crate::serve::upload::Tokens(read_token_file(file)?)),
        None => None,
    };
    // From here on no thread but the log's waits for stderr: a log reader that is stuck
    // holds up neither a client nor shutdown.
    crate::progress::write_in_background();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(crate::serve::tls::acceptor(cert, key)?),
        _ => None,
    };
    let config = ServeConfig {
        dest: dir.clone(),
        listeners,
        timeout: Duration::from_secs(args.timeout),
        access_log: !args.quiet,
        filler,
        threads: jobs,
        index,
        uploads,
        tls,
        readers,
    };
    serve(config, || {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    })?;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if !args.quiet {
        crate::elog!("stopped: the responses under way were finished");
    }
    Ok(true)
}

/// What `--upload-token-file` turns on: the tokens, and a receiver that checks uploads against
/// the trusted keys.
fn uploads(args: &ServeArgs, dir: &Path, file: &Path) -> anyhow::Result<crate::serve::upload::Uploads> {
    let tokens = read_token_file(file)?;
    let config = super::receive_config(
        &args.trusted_public_keys,
        &args.secret_keys,
        args.allow_unsigned_uploads,
        args.max_upload_size,
        args.lock_timeout,
    )?;
    let receiver = crate::receive::Receiver::open(dir, config)
        .with_context(|| format!("cannot prepare {} for uploads", dir.display()))?;
    Ok(crate::serve::upload::Uploads { tokens: crate::serve::upload::Tokens(tokens), receiver })
}

/// The tokens of a token file: one a line, at least one.
fn read_token_file(file: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the tokens in {}", file.display()))?;
    let tokens = crate::serve::upload::read_tokens(&text);
    if tokens.is_empty() {
        bail!(
            "{} holds no token: one a line (make one with `head -c 32 /dev/urandom | base64`)",
            file.display()
        );
    }
    Ok(tokens)
}

/// The `trusted-public-keys` line for a cache served without `-k`: the keys that sign its
/// narinfos, found by name in Nix's own configuration; a comment where one is not found.
fn trusted_keys_line(dir: &Path) -> String {
    let names = Cache::inspect(dir).map(|c| super::signing_key_names(&c, &[])).unwrap_or_default();
    if names.is_empty() {
        return "# trusted-public-keys: none, the narinfos are not signed (sign them: nixcache sign -k KEY)"
            .into();
    }
    let conf = super::NixConfKeys::read();
    let found: Vec<String> = names.iter().filter_map(|n| conf.public_key(n)).map(|k| k.to_string()).collect();
    if found.len() == names.len() {
        format!("trusted-public-keys = {}", found.join(" "))
    } else {
        format!(
            "# trusted-public-keys = the public key of {} (the .pub file nixcache keygen wrote; not found in nix.conf here)",
            names.join(", ")
        )
    }
}

/// Signs with `keys` the narinfos filled before without them (serve restarted with `-k`),
/// before any client is answered: a server that has a key never serves a narinfo without
/// its signature.
fn sign_filled(dir: &Path, keys: &[std::path::PathBuf]) -> anyhow::Result<()> {
    for key in keys {
        let args = crate::cli::SignArgs {
            dest: Dest::Dir(dir.to_owned()),
            secret_key: key.clone(),
            paths: Vec::new(),
            no_check_contents: true,
            no_local_copies: true,
            json: false,
            json_paths: false,
            lock_timeout: None,
            quiet: true,
        };
        if !super::sign::run(&args)? {
            crate::elog!(
                "warning: some narinfos in {} could not be signed (said above): they are served unsigned",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The sockets systemd passed (`LISTEN_FDS`), else the `--listen` addresses bound here.
fn listeners(listen: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut fds = listenfd::ListenFd::from_env();
    if fds.len() > 0 && listen.is_empty() {
        let mut out = Vec::new();
        for i in 0..fds.len() {
            match fds.take_tcp_listener(i) {
                Ok(Some(l)) => out.push(l),
                _ => bail!(
                    "socket {i} passed by systemd (LISTEN_FDS) is not a TCP stream socket: use ListenStream= in the .socket unit"
                ),
            }
        }
        return Ok(out);
    }
    let default = [DEFAULT_LISTEN.parse().expect("a valid address")];
    let addrs = if listen.is_empty() { &default[..] } else { listen };
    addrs
        .iter()
        .map(|a| {
            bind(a).with_context(|| {
                format!("cannot listen on {a} (in use by another server? give another with --listen)")
            })
        })
        .collect()
}

/// Connections the kernel queues before they are accepted. std's 128 is too few for a burst
/// of clients (a CI fleet starting at once): beyond it, Linux drops connections it
/// acknowledged. The kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// A listening socket on `addr`, with `SO_REUSEADDR` (a restart does not wait for the old
/// connections' TIME_WAIT) and a [`BACKLOG`] of its own.
fn bind(addr: &SocketAddr) -> std::io::Result<TcpListener> {
    use rustix::net::{AddressFamily, SocketType, bind, listen, socket, sockopt};
    let family = if addr.is_ipv4() { AddressFamily::INET } else { AddressFamily::INET6 };
    let fd = socket(family, SocketType::STREAM, None)?;
    sockopt::set_socket_reuseaddr(&fd, true)?;
    bind(&fd, addr)?;
    listen(&fd, BACKLOG)?;
    Ok(TcpListener::from(fd))
}

/// How a client reaches `addr`: by this host's name when it listens on every address.
fn url(addr: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if addr.ip().is_unspecified() {
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        format!("{scheme}://{host}:{}", addr.port())
    } else {
        format!("{scheme}://{addr}")
    }
}

/// Every connection is a file descriptor: take the hard limit, as nginx's
/// worker_rlimit_nofile would (systemd gives services a soft limit of 1024).
fn raise_open_files_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// Makes `dir` a cache for this store: created, cleared of what a killed fill left,
/// `nix-cache-info` written.
fn prepare(dir: &Path, store: &Store, quiet: bool, lock_timeout: Duration) -> anyhow::Result<()> {
    let mut cache = Cache::create(dir)?;
    cache.lock_within(Some(lock_timeout), |who| {
        if !quiet {
            super::say_waiting(&Dest::Dir(dir.to_owned()), who, Some(lock_timeout));
        }
    })?;
    for p in cache.clean_temp_files()? {
        if !quiet {
            crate::elog!("removed {p} left by an interrupted run");
        }
    }
    cache.ensure_cache_info(store.store_dir(), None, None, super::push::DEFAULT_PRIORITY)?;
    Ok(())
}
