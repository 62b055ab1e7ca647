//! Shared helpers: the binary, Nix commands, fixtures and restores.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nixcache::compression::Compression;
use nixcache::narinfo::NarInfo;

pub const SECRET: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/test-1.secret");
pub const PUBLIC: &str = "test-1:Fc8Yn1bFNVbmKCO0IZp2PQHah/AV6MrB0hAzmo5+Pys=";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures.nix");
const BIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/big.nix");
/// One path of random bytes: a full xz block that is stored uncompressed.
pub const RANDOM: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/random.nix");

/// Settings for every Nix command here: no network substituters, the nix command enabled.
const NIX_CONFIG: &str = "substituters =\nexperimental-features = nix-command\n";

pub fn with_env(mut c: Command) -> Command {
    c.env("NIX_CONFIG", NIX_CONFIG);
    c
}

/// Runs `cmd`, failing the test if it does not end within `secs` (a hang on a FIFO). Its
/// output is read while it runs, so a child that says much never waits on a full pipe.
pub fn run_within(cmd: &mut Command, secs: u64) -> Output {
    use std::io::Read;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            r.read_to_end(&mut buf).unwrap();
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// Runs `program` as the units' unprivileged user (nobody), with no capabilities.
pub fn as_nobody(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--"]).arg(program);
    c.env("NIX_CONFIG", "substituters =");
    c
}

/// Held by the tests that load the machine hard (3,000 connections, xz -9 on purpose) and by
/// those that kill a server and time its recovery, so that none of them runs beside another:
/// a server restarted under that load was seen to lose an acknowledged write.
pub fn heavy() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// The built binary.
pub fn nixcache() -> Command {
    with_env(Command::new(env!("CARGO_BIN_EXE_nixcache")))
}

/// A Nix command (`nix`, `nix-store`, `nix-build`…). Panics when Nix is missing: the tests
/// must not pass without it.
pub fn nix_cmd(program: &str) -> Command {
    static CHECK: OnceLock<()> = OnceLock::new();
    CHECK.get_or_init(|| {
        let ok = Command::new("nix-store").arg("--version").output().is_ok_and(|o| o.status.success());
        assert!(ok, "Nix is required for the integration tests: apt-get install -y nix-bin");
    });
    with_env(Command::new(program))
}

/// Runs a command, panicking with its stderr unless it succeeds; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command expected to fail; returns its output.
pub fn fails(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} should have failed:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Builds `tests/fixtures.nix` with `salt`; returns the top path.
pub fn build_fixtures(salt: &str) -> String {
    build_fixtures_with(salt, 0)
}

/// Builds the fixtures with `extra` bulk paths of 4 MB random bytes each.
pub fn build_fixtures_with(salt: &str, extra: u32) -> String {
    let extra = extra.to_string();
    ok(nix_cmd("nix-build").args([
        FIXTURES,
        "--no-out-link",
        "--argstr",
        "salt",
        salt,
        "--arg",
        "extra",
        &extra,
    ]))
    .trim()
    .to_owned()
}

pub struct Fixtures {
    pub top: String,
    pub closure: Vec<String>,
}

impl Fixtures {
    pub fn path(&self, name: &str) -> &str {
        self.closure.iter().find(|p| p.ends_with(name)).unwrap_or_else(|| panic!("no fixture {name}"))
    }
}

/// The shared fixture closure, built once.
pub fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let top = build_fixtures("shared");
        let closure = requisites(&top);
        Fixtures { top, closure }
    })
}

/// `n` store paths of text (`builtins.toFile`, no references), made unique by `salt`, each of
/// `lines` lines.
pub fn text_paths(salt: &str, n: usize, lines: usize) -> Vec<String> {
    let expr = format!(
        r#"builtins.genList (i: builtins.toFile "text-${{toString i}}" (builtins.concatStringsSep "" (builtins.genList (j: "{salt} line ${{toString j}} of ${{toString i}}\n") {lines}))) {n}"#
    );
    let out =
        ok(nix_cmd("nix-instantiate").args(["--eval", "--strict", "--read-write-mode", "--expr", &expr]));
    let paths: Vec<String> =
        out.split('"').filter(|s| s.starts_with("/nix/store/")).map(str::to_owned).collect();
    assert_eq!(paths.len(), n, "{out}");
    paths
}

pub fn requisites(path: &str) -> Vec<String> {
    ok(nix_cmd("nix-store").args(["--query", "--requisites", path])).lines().map(str::to_owned).collect()
}

pub fn hash_part(path: &str) -> &str {
    &path.rsplit('/').next().unwrap()[..32]
}

pub fn narinfo(cache: &Path, path: &str) -> NarInfo {
    let f = cache.join(format!("{}.narinfo", hash_part(path)));
    std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display())).parse().unwrap()
}

/// The uncompressed NAR the cache holds for `path`.
pub fn cached_nar(cache: &Path, path: &str) -> Vec<u8> {
    let ni = narinfo(cache, path);
    let c: Compression = ni.compression.parse().unwrap();
    let f = std::fs::File::open(cache.join(&ni.url)).unwrap();
    let mut out = Vec::new();
    c.decoder(std::io::BufReader::new(f)).unwrap().read_to_end(&mut out).unwrap();
    out
}

pub fn dump(path: &str) -> Vec<u8> {
    let out = nix_cmd("nix-store").args(["--dump", path]).output().unwrap();
    assert!(out.status.success());
    out.stdout
}

/// Restores `paths` from `url` into a fresh chroot store at `root`, requiring signatures by
/// `PUBLIC` (or `key`).
/// `nix copy` from `url` into the chroot store `root`, with a Nix cache of its own beside
/// `root` (`XDG_CACHE_HOME`): nothing remembered from another restore (a narinfo Nix once
/// missed), and no shared cache database for parallel tests to collide in.
pub fn restore_cmd(url: &str, root: &Path, key: &str, paths: &[&str]) -> Command {
    let mut c = nix_cmd("nix");
    let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    c.env("XDG_CACHE_HOME", root.with_file_name(format!("{name}.nix-cache")));
    c.args(["copy", "--from", url, "--to"])
        .arg(root)
        .args(["--option", "trusted-public-keys", key, "--option", "require-sigs", "true"])
        .args(paths);
    c
}

pub fn restore(url: &str, root: &Path, paths: &[&str]) {
    ok(&mut restore_cmd(url, root, PUBLIC, paths));
}

/// Checks that every path restored into `root` has the original's NAR.
pub fn assert_restored_identical(root: &Path, paths: &[String]) {
    for p in paths {
        let restored = root.join(p.trim_start_matches('/'));
        assert_eq!(dump(restored.to_str().unwrap()), dump(p), "restored {p} differs from the original");
    }
}

pub fn file_url(dir: &Path) -> String {
    format!("file://{}", dir.display())
}

pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

/// All files under `dir` (relative), sorted, for comparing caches.
pub fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push((p.strip_prefix(base).unwrap().to_owned(), std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Builds `tests/big.nix`: one path whose NAR is three xz blocks.
pub fn build_big(salt: &str) -> String {
    ok(nix_cmd("nix-build").args([BIG, "--no-out-link", "--argstr", "salt", salt])).trim().to_owned()
}

/// One system call in an strace log: its name, the paths it names (`-y` shows an fd's path),
/// and the log lines where it started and where it returned.
pub struct Call {
    pub name: String,
    pub paths: Vec<String>,
    pub start: usize,
    pub end: usize,
}

/// Runs `cmd` (which must succeed) under strace, tracing writes, renames, unlinks and syncs with the
/// paths of their fds; returns its system calls in order.
pub fn strace(cmd: &mut Command, log: &Path) -> Vec<Call> {
    let mut traced = Command::new("strace");
    traced
        .args(["-f", "-y", "-s", "0", "-o"])
        .arg(log)
        .args([
            "-e",
            "trace=write,writev,pwrite64,rename,renameat,renameat2,unlink,unlinkat,fsync,fdatasync,syncfs",
            "--",
        ])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .envs(cmd.get_envs().filter_map(|(k, v)| Some((k, v?))));
    ok(&mut traced);
    syscalls(&std::fs::read_to_string(log).unwrap())
}

/// Parses `strace -f -y -s 0` output, joining `<unfinished ...>` / `<... resumed>` halves.
fn syscalls(log: &str) -> Vec<Call> {
    // Paths appear as "/..." (arguments) or </...> (fds, with -y).
    let paths = |mut rest: &str| -> Vec<String> {
        let mut out = Vec::new();
        while let Some(i) = rest.find(['"', '<']) {
            let close = if rest.as_bytes()[i] == b'"' { '"' } else { '>' };
            rest = &rest[i + 1..];
            let Some(j) = rest.find(close) else { break };
            if rest.starts_with('/') {
                out.push(rest[..j].to_owned());
            }
            rest = &rest[j + 1..];
        }
        out
    };
    let mut pending: std::collections::HashMap<String, usize> = Default::default();
    let mut calls: Vec<Call> = Vec::new();
    for (n, line) in log.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else { continue };
        let rest = rest.trim_start();
        if rest.starts_with("<...") {
            if let Some(k) = pending.remove(pid) {
                calls[k].end = n;
            }
            continue;
        }
        let Some(paren) = rest.find('(') else { continue };
        let name = rest[..paren].to_owned();
        calls.push(Call { name, paths: paths(&rest[paren..]), start: n, end: n });
        if rest.ends_with("<unfinished ...>") {
            pending.insert(pid.to_owned(), calls.len() - 1);
        }
    }
    calls
}

/// Whether a sync of `file` (an fsync of it, or a syncfs of any filesystem) returned between
/// the two log lines.
pub fn synced(calls: &[Call], after: usize, before: usize, file: &str) -> bool {
    calls.iter().any(|c| {
        c.end > after
            && c.end < before
            && (c.name == "syncfs" || (c.name.starts_with('f') && c.paths.iter().any(|p| p == file)))
    })
}

/// Asserts that every file renamed into place was flushed after its last write and before
/// the rename, and that its new name was flushed before the process ended. Returns the
/// renames by destination.
pub fn assert_renames_durable(calls: &[Call]) -> std::collections::HashMap<String, &Call> {
    let mut renamed_at = std::collections::HashMap::new();
    for r in calls.iter().filter(|c| c.name.starts_with("rename") && c.paths.len() == 2) {
        let (src, dest) = (&r.paths[0], &r.paths[1]);
        let last_write =
            calls.iter().filter(|c| c.name.contains("write") && c.paths.contains(src)).map(|c| c.end).max();
        let last_write = last_write.unwrap_or_else(|| panic!("no write to {src}"));
        assert!(
            synced(calls, last_write, r.start, src),
            "{dest} renamed into place before its contents were flushed"
        );
        let dir = dest.rsplit_once('/').unwrap().0;
        assert!(synced(calls, r.end, usize::MAX, dir), "{dest}: its name was never flushed");
        renamed_at.insert(dest.clone(), r);
    }
    renamed_at
}

#[test]
fn run_within_reads_a_child_that_says_more_than_a_pipe_holds() {
    let out = run_within(
        Command::new("sh").args(["-c", "head -c 300000 /dev/zero; head -c 200000 /dev/zero >&2"]),
        30,
    );
    assert!(out.status.success());
    assert_eq!((out.stdout.len(), out.stderr.len()), (300000, 200000));
}
