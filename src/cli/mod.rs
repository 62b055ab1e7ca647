//! The command line, as clap derive types. Each subcommand has its own Args struct;
//! commands turn them into the library's option types.

use std::num::NonZeroUsize;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

use crate::compression::Compression;
use crate::storage::Dest;
use crate::store::{Source, StoreConfig};
use crate::store_path::StoreDir;

/// Turn Nix store paths into a static binary cache that Nix can substitute from.
#[derive(Debug, Parser)]
#[command(name = "nixcache", version, about, propagate_version = true, max_term_width = 100)]
#[command(after_help = "Exit status: 0 on success, 1 when the command failed, 2 on a usage error \
    (verify: 1 when problems were found, 2 when it could not run).")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Push the closures of store paths into a cache directory.
    Push(PushArgs),
    /// Generate a signing key pair in Nix's format.
    Keygen(KeygenArgs),
    /// Check every narinfo, NAR and signature in a cache, without changing it.
    Verify(VerifyArgs),
    /// Add a signature to narinfos that lack one, without touching NARs.
    Sign(SignArgs),
    /// Remove paths no recent push included, keeping every remaining closure whole.
    Gc(GcArgs),
    /// Serve a cache directory over HTTP, optionally filling it from the local store on demand.
    Serve(ServeArgs),
    /// Take a push over standard input and output: what `push --dest ssh://HOST/DIR` runs on HOST.
    Receive(ReceiveArgs),
    /// Print a shell completion script: nixcache completions bash > /etc/bash_completion.d/nixcache
    Completions(CompletionsArgs),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// A usage error of the subcommand `sub`, with its own usage line.
fn usage_error(sub: &str, kind: clap::error::ErrorKind, message: impl std::fmt::Display) -> clap::Error {
    let mut cli = Cli::command();
    cli.build();
    match cli.find_subcommand_mut(sub) {
        Some(c) => c.clone().bin_name(format!("nixcache {sub}")).error(kind, message),
        None => cli.error(kind, message),
    }
}

/// Writes the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    clap_complete::generate(shell, &mut Cli::command(), "nixcache", out);
}

mod man;
mod values;

pub use man::man_pages;
use values::{CompressionParser, parse_jobs, parse_public_key, parse_upstream};
pub use values::{parse_dest, parse_listen};

/// Where store paths and their metadata come from.
#[derive(Debug, Args)]
pub struct StoreArgs {
    /// The logical Nix store directory, as written into narinfos.
    #[arg(long, value_name = "DIR", default_value = "/nix/store", value_parser = clap::value_parser!(StoreDir))]
    pub store_dir: StoreDir,
    /// The root the store lives under, for a chroot store (as made by `nix copy --to /root`).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// The Nix database (db.sqlite) or state directory [default: ROOT/nix/var/nix/db/db.sqlite].
    #[arg(long, value_name = "PATH", alias = "state-dir")]
    pub db: Option<PathBuf>,
    /// Where path metadata comes from: the database, `nix path-info`, or the database when it
    /// can be opened and `nix path-info` otherwise.
    #[arg(long, value_enum, default_value_t = Source::Auto, value_name = "SOURCE")]
    pub metadata: Source,
}

impl StoreArgs {
    /// Where the store's files are on this machine: the store directory under `--root`.
    pub fn real_store_dir(&self) -> PathBuf {
        self.root.join(self.store_dir.as_str().trim_start_matches('/'))
    }

    pub fn config(&self) -> StoreConfig {
        StoreConfig {
            store_dir: self.store_dir.clone(),
            root: self.root.clone(),
            db: self.db.clone(),
            source: self.metadata,
        }
    }
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The cache: a directory (or file:///DIR), created if missing; an S3 bucket,
    /// s3://BUCKET/PREFIX?endpoint=URL&region=REGION&profile=NAME (see BUCKETS in
    /// nixcache-push(1)); or a cache on another machine: ssh://[USER@]HOST[:PORT]/DIR or
    /// [USER@]HOST:DIR (runs `nixcache receive` there over ssh), or http(s)://HOST[:PORT] (a
    /// `nixcache serve --upload-token-file`, or any server that takes Nix's uploads).
    #[arg(long, short = 'd', value_name = "DIR|URL", value_parser = parse_dest, required = false, required_unless_present = "to", default_value_if("to", clap::builder::ArgPredicate::IsPresent, "/"), env = "NIXCACHE_DEST")]
    pub dest: Dest,
    /// Store paths, or symlinks into the store such as ./result. Their closures are pushed.
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// Also read store paths from standard input, one per line.
    #[arg(long)]
    pub stdin: bool,
    /// Also push the built outputs of the derivations (.drv) in the closure.
    #[arg(long)]
    pub include_outputs: bool,
    /// How to compress NARs.
    #[arg(long, short = 'c', value_parser = CompressionParser, default_value = "xz", value_name = "xz|bzip2|zstd|none", env = "NIXCACHE_COMPRESSION")]
    pub compression: Compression,
    /// nix-push's --bzip2: the same as -c bzip2.
    #[arg(long, hide = true, conflicts_with_all = ["compression", "none"])]
    pub bzip2: bool,
    /// nix-push's --none: the same as -c none.
    #[arg(long, hide = true, conflicts_with = "compression")]
    pub none: bool,
    /// nix-push options nixcache has no use for: each gets a sentence (see PushArgs::check).
    #[arg(long, hide = true)]
    pub link: bool,
    #[arg(long, hide = true)]
    pub manifest: bool,
    #[arg(long, hide = true, value_name = "URL")]
    pub url_prefix: Option<String>,
    /// `nix copy --to` habit: see PushArgs::check.
    #[arg(long, hide = true, value_name = "DEST")]
    pub to: Option<String>,
    /// Compression level [default: xz 6, bzip2 9, zstd 3].
    #[arg(long, value_name = "N", allow_negative_numbers = false)]
    pub compression_level: Option<i32>,
    /// Sign narinfos with this secret key file (Nix's format); repeatable. Also spelled
    /// --key-file, as nix-push named it.
    #[arg(
        long = "secret-key",
        visible_alias = "key-file",
        short = 'k',
        value_name = "FILE",
        env = "NIXCACHE_SECRET_KEY_FILE"
    )]
    pub secret_keys: Vec<PathBuf>,
    /// Threads, each compressing one path or one xz block at a time [default: all cores].
    #[arg(long, short = 'j', value_name = "N", value_parser = parse_jobs)]
    pub jobs: Option<NonZeroUsize>,
    /// With an s3:// --dest: parts uploaded at once, across all NARs (each part is up to 8
    /// MiB at first, held in memory while it goes up).
    #[arg(long, value_name = "N", default_value = "8", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub uploads: u16,
    /// With an http(s):// --dest: the token to send (the file's first line, as a Bearer
    /// token) [default: the password for the host in the netrc file Nix reads: NETRC,
    /// netrc-file in nix.conf, /etc/nix/netrc, ~/.netrc].
    #[arg(long, value_name = "FILE", env = "NIXCACHE_UPLOAD_TOKEN_FILE")]
    pub upload_token_file: Option<PathBuf>,
    /// With an ssh:// or HOST:DIR --dest: the command that runs nixcache on the remote
    /// machine, as rsync's --rsync-path (a path, or a command line such as `sudo -u cache
    /// nixcache`).
    #[arg(long, value_name = "PROGRAM", default_value = "nixcache", env = "NIXCACHE_REMOTE_PROGRAM")]
    pub remote_program: String,
    /// With an s3:// --dest: do not keep copies of the bucket's narinfos on this machine
    /// ($XDG_CACHE_HOME/nixcache/buckets), so every narinfo is downloaded on each push. A
    /// copy is used only while the bucket lists the object with the same ETag and size.
    #[arg(long)]
    pub no_local_copies: bool,
    /// Rewrite narinfos and NARs that already exist.
    #[arg(long)]
    pub force: bool,
    /// Check the NAR of every path already in the cache (decompress it, compare NarSize and
    /// NarHash, FileSize and FileHash) and rewrite those that are wrong: what `verify` names.
    #[arg(long, conflicts_with = "force")]
    pub repair: bool,
    /// Print what a push would do (the closure, what is already there, what would be written
    /// and its NAR bytes) without creating or changing anything.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Write <hashpart>.ls NAR listings, as Nix's write-nar-listing=true.
    #[arg(long)]
    pub nar_listing: bool,
    /// Index debug files under lib/debug/.build-id/ in debuginfo/, as Nix's
    /// index-debug-info=true (for NARs written in this run; --force indexes existing ones).
    #[arg(long)]
    pub index_debug_info: bool,
    /// The cache's priority in nix-cache-info (lower is preferred; cache.nixos.org is 40)
    /// [default: keep, or 30 for a new cache].
    #[arg(long, value_name = "N")]
    pub priority: Option<u32>,
    /// Let clients query many paths at once (WantMassQuery: 1) [default: keep, or on].
    #[arg(long, overrides_with = "no_want_mass_query")]
    pub want_mass_query: bool,
    /// Set WantMassQuery: 0.
    #[arg(long, overrides_with = "want_mass_query")]
    pub no_want_mass_query: bool,
    /// Leave out paths whose signatures in the Nix database include a valid one by this
    /// public key (as trusted-public-keys spells it): an upstream that signs with it serves
    /// them. Repeatable; no network needed. Recorded in the cache, like the others below.
    #[arg(long, value_name = "KEY", value_parser = parse_public_key, help_heading = "Partial caches", env = "NIXCACHE_SKIP_SIGNED_BY", value_delimiter = ' ')]
    pub skip_signed_by: Vec<crate::signing::PublicKey>,
    /// Leave out paths this binary cache (http://, https:// or file://) has a narinfo for.
    /// Repeatable; up to 16 lookups at once; a lookup that fails means the path is pushed.
    #[arg(long, value_name = "URL", value_parser = parse_upstream, help_heading = "Partial caches", env = "NIXCACHE_SKIP_UPSTREAM", value_delimiter = ' ')]
    pub skip_upstream: Vec<String>,
    /// Never push a path whose name (after the hash) matches this regular expression.
    /// Repeatable. A path that references one is pushed only with --allow-incomplete.
    #[arg(long, value_name = "REGEX", help_heading = "Partial caches", env = "NIXCACHE_EXCLUDE")]
    pub exclude: Vec<String>,
    /// Push paths that reference an --exclude'd path (clients cannot restore their closure
    /// from the caches alone).
    #[arg(long, help_heading = "Partial caches")]
    pub allow_incomplete: bool,
    /// Push the whole closure, ignoring the upstreams and exclusions this cache recorded.
    #[arg(long, conflicts_with_all = ["skip_signed_by", "skip_upstream", "exclude"], help_heading = "Partial caches")]
    pub no_skip: bool,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Give up when another writer has held the cache's lock this long (90s, 30m) [default:
    /// wait as long as it takes, saying so]. A directory's only: a bucket has no lock.
    #[arg(long, value_name = "DURATION", value_parser = crate::gc::parse_duration)]
    pub lock_timeout: Option<std::time::Duration>,
    /// Print one JSON object on standard output at the end: what was done (see JSON OUTPUT
    /// in nixcache-push(1)); progress is not shown, warnings and errors still are.
    #[arg(long, conflicts_with = "dry_run")]
    pub json: bool,
    /// With --json: list every path of the closure and what happened to it.
    #[arg(long, requires = "json")]
    pub json_paths: bool,
    /// No progress and no summary; warnings and errors are still printed.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl PushArgs {
    /// The compression, nix-push's --bzip2 and --none included.
    pub fn compression(&self) -> Compression {
        if self.bzip2 {
            Compression::Bzip2
        } else if self.none {
            Compression::None
        } else {
            self.compression
        }
    }

    /// Options from nix-push and nix copy that nixcache does not take: a usage error with
    /// a sentence saying what replaces them.
    pub fn check(&self) -> Result<(), clap::Error> {
        let why = if self.link {
            "--link is nix-push's: nixcache copies NARs into the cache and never links store files; leave it out"
        } else if self.manifest {
            "--manifest is nix-push's: binary caches use narinfo files, not manifests, since Nix 1.x; leave it out"
        } else if self.url_prefix.is_some() {
            "--url-prefix is nix-push's: NAR URLs are relative (nar/...), so the cache can be served from any URL; leave it out"
        } else if self.to.is_some() {
            "the cache is --dest DIR (or --dest file:///DIR), not --to"
        } else if let Err(e) = self.compression().level(self.compression_level) {
            return Err(usage_error("push", clap::error::ErrorKind::ValueValidation, e));
        } else {
            return Ok(());
        };
        Err(usage_error("push", clap::error::ErrorKind::ArgumentConflict, why))
    }

    /// `--dest`, with `--uploads` applied to a bucket and `--remote-program` to a remote.
    pub fn dest_with_uploads(&self) -> Dest {
        match &self.dest {
            Dest::Bucket(b) => Dest::Bucket(crate::storage::s3::BucketUrl {
                uploads: usize::from(self.uploads),
                ..b.clone()
            }),
            Dest::Remote(r) => Dest::Remote(crate::storage::remote::RemoteDest {
                program: self.remote_program.clone(),
                ..r.clone()
            }),
            d => d.clone(),
        }
    }

    /// The WantMassQuery the user asked for, if any.
    pub fn want_mass_query(&self) -> Option<bool> {
        match (self.want_mass_query, self.no_want_mass_query) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        }
    }
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The cache directory to serve, as push writes it; with --from-store, created if missing.
    #[arg(long, short = 'd', value_name = "DIR", value_parser = parse_dest, env = "NIXCACHE_DEST")]
    pub dest: Dest,
    /// Listen on this address; repeatable [default: 127.0.0.1:5000, or the sockets systemd
    /// passes by socket activation].
    #[arg(long, short = 'l', value_name = "ADDR:PORT", value_parser = parse_listen, env = "NIXCACHE_LISTEN", value_delimiter = ' ')]
    pub listen: Vec<Vec<std::net::SocketAddr>>,
    /// Fill the cache from the local store when a client asks for a path it lacks (needs
    /// --roots or --whole-store).
    #[arg(long)]
    pub from_store: bool,
    /// With --from-store: serve only the closures of these roots: store paths, links such as
    /// ./result, or directories of GC-root links such as /nix/var/nix/gcroots (read again as
    /// they change); repeatable.
    #[arg(long, value_name = "PATH", requires = "from_store")]
    pub roots: Vec<PathBuf>,
    /// With --from-store: serve every valid path in the store, as nix-serve does.
    #[arg(long, requires = "from_store", conflicts_with = "roots")]
    pub whole_store: bool,
    /// With --from-store or --upload-token-file: sign what is filled or uploaded with this
    /// secret key file; repeatable.
    #[arg(
        long = "secret-key",
        visible_alias = "key-file",
        short = 'k',
        value_name = "FILE",
        env = "NIXCACHE_SECRET_KEY_FILE"
    )]
    pub secret_keys: Vec<PathBuf>,
    /// Take uploads (PUTs, as `nix copy --to http://HOST` sends them) from clients that send
    /// one of the tokens in this file (one a line) as the password of HTTP Basic
    /// authentication (Nix's netrc-file) or as a Bearer token; each is checked before it is
    /// published.
    #[arg(long, value_name = "FILE")]
    pub upload_token_file: Option<PathBuf>,
    /// Answer reads (GET, HEAD) only to clients that send one of the tokens in this file (or
    /// an upload token), as the password of HTTP Basic authentication (Nix's netrc-file) or
    /// as a Bearer token: a private cache.
    #[arg(long, value_name = "FILE")]
    pub read_token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM), so tokens never cross a network in
    /// clear; with --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// With --upload-token-file: publish a narinfo only with a valid signature by this key
    /// (NAME:BASE64, as in trusted-public-keys; or a file holding one); repeatable.
    #[arg(long = "trusted-public-key", value_name = "KEY", requires = "upload_token_file")]
    pub trusted_public_keys: Vec<String>,
    /// With --upload-token-file: publish narinfos without a trusted signature too.
    #[arg(long, requires = "upload_token_file")]
    pub allow_unsigned_uploads: bool,
    /// With --upload-token-file: refuse an upload larger than this many bytes [default:
    /// 64 GiB].
    #[arg(long, value_name = "BYTES", requires = "upload_token_file")]
    pub max_upload_size: Option<u64>,
    /// With --from-store: how to compress what is filled (zstd keeps a first client's wait short).
    #[arg(long, short = 'c', value_parser = CompressionParser, default_value = "zstd", value_name = "xz|bzip2|zstd|none")]
    pub compression: Compression,
    /// With --from-store: the compression level [default: xz 6, bzip2 9, zstd 3].
    #[arg(long, value_name = "N", allow_negative_numbers = false)]
    pub compression_level: Option<i32>,
    /// Threads serving requests, and compressing each fill [default: all cores].
    #[arg(long, short = 'j', value_name = "N", value_parser = parse_jobs)]
    pub jobs: Option<NonZeroUsize>,
    /// With --from-store: how long a fill waits for another writer's lock on the cache
    /// before its clients are answered 503 with Retry-After (90s, 2m).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::gc::parse_duration)]
    pub lock_timeout: std::time::Duration,
    /// Close idle connections, slow request heads and clients that stop reading after this
    /// many seconds.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = clap::value_parser!(u64).range(1..=86400))]
    pub timeout: u64,
    #[command(flatten)]
    pub store: StoreArgs,
    /// No access log: print only the startup line, fills and errors.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl ServeArgs {
    /// What clap cannot say in a sentence.
    pub fn check(&self) -> Result<(), clap::Error> {
        let why = if matches!(self.dest, Dest::Bucket(_)) {
            "serve serves a directory; a bucket is served by its own HTTP endpoint (clients use http://ENDPOINT/BUCKET/PREFIX as the substituter)"
        } else if !self.secret_keys.is_empty() && !self.from_store && self.upload_token_file.is_none() {
            "--secret-key signs what --from-store fills or what --upload-token-file takes; a cache's files are served as they are (sign them with `nixcache sign`)"
        } else if self.upload_token_file.is_some()
            && self.trusted_public_keys.is_empty()
            && !self.allow_unsigned_uploads
        {
            "--upload-token-file needs --trusted-public-key NAME:KEY (the key the pushers sign with), or --allow-unsigned-uploads"
        } else if self.from_store && self.roots.is_empty() && !self.whole_store {
            "--from-store needs --roots PATH (serve only those closures) or --whole-store (serve every valid path): a store can hold paths not meant to leave the machine"
        } else if !self.from_store
            && (self.compression_level.is_some() || self.compression != Compression::Zstd)
        {
            "--compression and --compression-level are for what --from-store fills; a cache's files are served as they are"
        } else if let Err(e) = self.compression.level(self.compression_level) {
            return Err(usage_error("serve", clap::error::ErrorKind::ValueValidation, e));
        } else {
            return Ok(());
        };
        Err(usage_error("serve", clap::error::ErrorKind::MissingRequiredArgument, why))
    }
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// The cache directory to receive into, created if missing. In a forced command
    /// (authorized_keys `command="..."`), this one is used whatever the pusher asked for.
    #[arg(long, short = 'd', value_name = "DIR", value_parser = parse_dest)]
    pub dest: Dest,
    /// Publish a narinfo only with a valid signature by this key (NAME:BASE64, or a file
    /// holding one); repeatable. Without it, what the SSH login sends is taken, each upload
    /// still checked against its hashes and references.
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Sign what is received with this secret key file too; repeatable.
    #[arg(long = "secret-key", visible_alias = "key-file", short = 'k', value_name = "FILE")]
    pub secret_keys: Vec<PathBuf>,
    /// Refuse an upload larger than this many bytes [default: 64 GiB].
    #[arg(long, value_name = "BYTES")]
    pub max_upload_size: Option<u64>,
    /// How long a publish waits for another writer's lock (a gc, a local push) before it is
    /// refused, and the pusher fails that path (90s, 30m).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = crate::gc::parse_duration)]
    pub lock_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The key's name, conventionally the cache's host name and a number: cache.example.org-1.
    pub name: String,
    /// Where to write the secret key (mode 0600). Refuses to overwrite.
    pub secret_file: PathBuf,
    /// Where to write the public key. Refuses to overwrite.
    pub public_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The cache: a directory, or an s3://BUCKET/PREFIX?endpoint=URL URL (read anonymously
    /// when no credentials are found).
    #[arg(long, short = 'd', value_name = "DIR|URL", value_parser = parse_dest, env = "NIXCACHE_DEST")]
    pub dest: Dest,
    /// Require a valid signature by one of these keys (NAME:BASE64, as in
    /// trusted-public-keys; or a file holding one); repeatable.
    #[arg(long = "trusted-public-key", value_name = "KEY")]
    pub trusted_public_keys: Vec<String>,
    /// Print the report as JSON on standard output.
    #[arg(long)]
    pub json: bool,
    /// Threads [default: all cores].
    #[arg(long, short = 'j', value_name = "N", value_parser = parse_jobs)]
    pub jobs: Option<NonZeroUsize>,
    /// Print nothing but problems.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct SignArgs {
    /// The cache: a directory, or an s3://BUCKET/PREFIX?endpoint=URL URL.
    #[arg(long, short = 'd', value_name = "DIR|URL", value_parser = parse_dest, env = "NIXCACHE_DEST")]
    pub dest: Dest,
    /// The secret key file to sign with. Also spelled --key-file.
    #[arg(
        long = "secret-key",
        visible_alias = "key-file",
        short = 'k',
        value_name = "FILE",
        env = "NIXCACHE_SECRET_KEY_FILE"
    )]
    pub secret_key: PathBuf,
    /// Sign only the closures of these store paths (as found in the cache) [default: all].
    #[arg(value_name = "PATH")]
    pub paths: Vec<String>,
    /// Check only each NAR's FileSize and FileHash before signing, without decompressing it
    /// to check NarSize and NarHash (faster; the signature still covers only what was checked
    /// if the cache's writers are trusted).
    #[arg(long)]
    pub no_check_contents: bool,
    /// With an s3:// --dest: read every narinfo from the bucket, not from the copies kept on
    /// this machine, and keep no copies of those read and signed (which spare the next push
    /// from downloading them again; see push).
    #[arg(long)]
    pub no_local_copies: bool,
    /// Give up when another writer has held the cache's lock this long (90s, 30m) [default:
    /// wait as long as it takes, saying so]. A directory's only: a bucket has no lock.
    #[arg(long, value_name = "DURATION", value_parser = crate::gc::parse_duration)]
    pub lock_timeout: Option<std::time::Duration>,
    /// Print one JSON object on standard output at the end: what was done (see JSON OUTPUT
    /// in nixcache-sign(1)).
    #[arg(long)]
    pub json: bool,
    /// With --json: list every narinfo signed.
    #[arg(long, requires = "json")]
    pub json_paths: bool,
    /// No progress and no summary; warnings and errors are still printed.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// The cache: a directory, or an s3://BUCKET/PREFIX?endpoint=URL URL.
    #[arg(long, short = 'd', value_name = "DIR|URL", value_parser = parse_dest, env = "NIXCACHE_DEST")]
    pub dest: Dest,
    /// Keep paths a push named or walked within this long: 90s, 30m, 36h, 14d, 2w.
    #[arg(long, value_name = "DURATION", value_parser = crate::gc::parse_duration)]
    pub older_than: std::time::Duration,
    /// Also keep the closure of this store path; repeatable.
    #[arg(long, value_name = "PATH")]
    pub keep: Vec<String>,
    /// List what would be removed and the bytes it would free; remove nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// With an s3:// --dest: read every narinfo from the bucket, not from the copies kept on
    /// this machine (see push), and keep none.
    #[arg(long)]
    pub no_local_copies: bool,
    /// Give up when another writer has held the cache's lock this long (90s, 30m) [default:
    /// wait as long as it takes, saying so]. A directory's only: a bucket has no lock.
    #[arg(long, value_name = "DURATION", value_parser = crate::gc::parse_duration)]
    pub lock_timeout: Option<std::time::Duration>,
    /// Print one JSON object on standard output at the end: what was done (see JSON OUTPUT
    /// in nixcache-gc(1)).
    #[arg(long)]
    pub json: bool,
    /// With --json: list every path and file removed (or, with --dry-run, that would be).
    #[arg(long, requires = "json")]
    pub json_paths: bool,
    /// No progress and no summary; warnings and errors are still printed.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }
}
