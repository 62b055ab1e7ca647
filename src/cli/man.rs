//! The man pages, rendered from the clap definitions: clap_mangen's title, name, description
//! and options, with a synopsis that shows each option's argument and sections of our own
//! (EXAMPLES, EXIT STATUS, JSON OUTPUT, ENVIRONMENT, SEE ALSO).

use clap::CommandFactory;

use super::Cli;

/// The man pages, `nixcache.1` and `nixcache-<subcommand>.1`, rendered from these
/// definitions with an EXAMPLES and an EXIT STATUS section each. `man/` holds them; a unit
/// test fails when they are stale.
pub fn man_pages() -> Vec<(String, Vec<u8>)> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let source = format!("nixcache {}", env!("CARGO_PKG_VERSION"));
    let mut pages = Vec::new();
    let mut render = |c: clap::Command, sub: Option<&str>| {
        let title = sub.map_or_else(|| "nixcache".to_owned(), |s| format!("nixcache-{s}"));
        let man = clap_mangen::Man::new(c.clone()).title(title.to_uppercase()).source(source.clone());
        let page = |b: &mut Vec<u8>| -> std::io::Result<()> {
            man.render_title(b)?;
            man.render_name_section(b)?;
            b.extend(synopsis(&c, sub).as_bytes());
            man.render_description_section(b)?;
            man.render_options_section(b)?;
            if c.get_subcommands().next().is_some() {
                man.render_subcommands_section(b)?;
            }
            b.extend(man_extra(sub).as_bytes());
            b.extend(environment(&c).as_bytes());
            b.extend(see_also(sub).as_bytes());
            man.render_version_section(b)
        };
        let mut buf = Vec::new();
        page(&mut buf).expect("rendering into memory");
        pages.push((man.get_filename(), buf));
    };
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
        let name = sub.get_name().to_owned();
        render(sub, Some(&name));
    }
    render(cmd, None);
    pages
}

/// The SYNOPSIS with each option's argument (`--dest DIR|URL`), the required ones first and
/// unbracketed; clap_mangen's leaves the arguments out.
fn synopsis(c: &clap::Command, sub: Option<&str>) -> String {
    let name = sub.map_or_else(|| "nixcache".to_owned(), |s| format!("nixcache {s}"));
    let mut parts = vec![format!("\\fB{}\\fR", roff(&name))];
    if c.get_subcommands().next().is_some() {
        parts.push("\\fICOMMAND\\fR [\\fIOPTIONS\\fR]".into());
    }
    let args: Vec<&clap::Arg> = c.get_arguments().filter(|a| !a.is_hide_set()).collect();
    let mut required = Vec::new();
    let mut optional = Vec::new();
    let mut positional = Vec::new();
    for a in args {
        let value = a
            .get_value_names()
            .and_then(|v| v.first())
            .map(|v| format!(" \\fI{}\\fR", roff(v.as_str())))
            .filter(|_| a.get_action().takes_values());
        if a.is_positional() {
            let v = a.get_value_names().and_then(|v| v.first()).map_or("ARG".to_owned(), |v| v.to_string());
            let many = if matches!(a.get_action(), clap::ArgAction::Append) { "..." } else { "" };
            positional.push(if a.is_required_set() {
                format!("\\fI{}\\fR{many}", roff(&v))
            } else {
                format!("[\\fI{}\\fR]{many}", roff(&v))
            });
            continue;
        }
        let flag = match (a.get_short(), a.get_long()) {
            (Some(s), Some(l)) => format!("\\fB\\-{s}\\fR|\\fB\\-\\-{}\\fR", roff(l)),
            (None, Some(l)) => format!("\\fB\\-\\-{}\\fR", roff(l)),
            (Some(s), None) => format!("\\fB\\-{s}\\fR"),
            (None, None) => continue,
        };
        let text = format!("{flag}{}", value.unwrap_or_default());
        // --dest is required unless an old spelling (push's hidden --to) is given.
        if a.is_required_set() || a.get_id() == "dest" {
            required.push(text);
        } else {
            optional.push(format!("[{text}]"));
        }
    }
    parts.extend(required);
    parts.extend(optional);
    parts.extend(positional);
    format!(".SH SYNOPSIS\n{}\n", parts.join(" "))
}

/// The EXAMPLES, EXIT STATUS and other sections of a page, as roff.
fn man_extra(sub: Option<&str>) -> String {
    let examples: &[(&str, &str)] = match sub {
        Some("push") => &[
            (
                "nixcache push --dest /var/lib/static-nix-cache --secret-key /etc/nixcache/cache.sec ./result",
                "Push the closure of ./result, signed, compressed with xz.",
            ),
            (
                "nixcache push -c zstd --dest file:///media/usb/nix-cache $(nix-build)",
                "Push to a USB disk, fast.",
            ),
            (
                "nixcache push --dry-run --dest /var/lib/static-nix-cache ./result",
                "Show what a push would write.",
            ),
            (
                "nixcache push --repair --dest /var/lib/static-nix-cache ./result",
                "Rewrite the NARs verify found wrong.",
            ),
            (
                "nixcache push --dest /var/lib/static-nix-cache --skip-signed-by cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= ./result",
                "Push only what cache.nixos.org does not serve (clients list both caches as substituters).",
            ),
            (
                "nixcache push --dest /var/lib/static-nix-cache --exclude '-secrets$' --allow-incomplete ./result",
                "Never push paths named *-secrets, and push what references them anyway.",
            ),
            (
                "nixcache push --dest ssh://root@pi/var/lib/static-nix-cache -k ci.sec ./result",
                "Push to a cache on another machine over ssh (root@pi:/var/lib/static-nix-cache is the same): nixcache receive runs there, checks every upload and publishes it; nothing listens on the Pi. NIX_SSHOPTS adds ssh options; --remote-program names nixcache there. verify, gc and sign run where the cache is: ssh pi nixcache gc ...",
            ),
            (
                "nixcache push --dest http://pi:5000 --upload-token-file ci.token -k ci.sec ./result",
                "Push into a nixcache serve --upload-token-file (or any server that takes Nix's uploads); without --upload-token-file, the password for the host in Nix's netrc file is sent.",
            ),
        ],
        Some("receive") => &[
            (
                "nixcache receive --dest /var/lib/static-nix-cache",
                "What push --dest ssh://HOST/var/lib/static-nix-cache runs on HOST: takes the push on standard input and output. Each upload is checked (NAR hashes, references) and published under the cache's lock, as serve --upload-token-file does.",
            ),
            (
                "command=\"nixcache receive --dest /var/lib/static-nix-cache --trusted-public-key ci-1:BASE64\",restrict ssh-ed25519 AAAA... ci",
                "A line of the cache owner's ~/.ssh/authorized_keys: this key may only push, only into that cache, and only narinfos signed by ci-1.",
            ),
        ],
        Some("verify") => &[
            (
                "nixcache verify --dest /var/lib/static-nix-cache --trusted-public-key \"$(cat cache.pub)\"",
                "Check every narinfo, NAR and signature.",
            ),
            ("nixcache verify --json --dest /var/lib/static-nix-cache", "The same, as JSON."),
        ],
        Some("sign") => &[
            (
                "nixcache sign --dest /var/lib/static-nix-cache --secret-key cache-2.sec",
                "Add a new key's signature.",
            ),
            ("nixcache sign --dest /var/lib/static-nix-cache -k cache.sec ./result", "Sign one closure."),
        ],
        Some("gc") => &[
            (
                "nixcache gc --dest /var/lib/static-nix-cache --older-than 30d",
                "Remove what no push included for 30 days.",
            ),
            (
                "nixcache gc --dest /var/lib/static-nix-cache --older-than 14d --keep ./result --dry-run",
                "Show what would go, keeping ./result's closure.",
            ),
        ],
        Some("serve") => &[
            ("nixcache serve --dest /var/lib/static-nix-cache", "Serve what push wrote, on 127.0.0.1:5000."),
            (
                "nixcache serve --dest /var/cache/nixcache --from-store --secret-key cache.sec --roots /nix/var/nix/gcroots/per-user/ci --listen [::]:5000",
                "Fill the cache from the local store as clients ask, only with the closures of CI's GC roots.",
            ),
            (
                "nixcache serve --dest /var/cache/nixcache --from-store --whole-store -k cache.sec",
                "Serve every valid store path, as nix-serve does, compressing each once.",
            ),
            (
                "nixcache serve --dest /var/lib/static-nix-cache --upload-token-file /etc/nixcache/upload.tokens --trusted-public-key ci-1:BASE64",
                "Take pushes from another machine: nix copy --to 'http://HOST:5000?secret-key=ci.sec' --option netrc-file FILE, the token as the netrc password. Each upload is checked (NAR hashes, signature, references) before it is published; a bad one is a 4xx and leaves nothing.",
            ),
        ],
        Some("keygen") => &[(
            "nixcache keygen cache.example.org-1 /etc/nixcache/cache.sec /etc/nixcache/cache.pub",
            "Make a key pair; the .pub line goes into clients' trusted-public-keys.",
        )],
        Some("completions") => {
            &[("nixcache completions bash > /etc/bash_completion.d/nixcache", "Bash completion.")]
        }
        _ => &[(
            "nixcache push --dest /var/lib/static-nix-cache -k cache.sec ./result",
            "See nixcache-push(1).",
        )],
    };
    let mut out = String::from(".SH EXAMPLES\n");
    for (command, what) in examples {
        out.push_str(&format!(".TP\n.B {}\n{}\n", roff(command), roff(what)));
    }
    out.push_str(".SH \"EXIT STATUS\"\n");
    let status = match sub {
        Some("verify") => {
            "0 when the cache is clean, 1 when problems were found, 2 when verify could not run or was used wrongly."
        }
        _ => {
            "0 on success; 1 when the command failed (some path was not published, signed or removed; the cache stays consistent); 2 on a usage error."
        }
    };
    out.push_str(&format!("{}\n", roff(status)));
    let json: &[(&str, &str)] = match sub {
        Some("push") => &[
            ("dest, compression", "the cache and the compression, as given"),
            (
                "closure, left_out, paths",
                "paths in the closure, those left to upstreams or excluded, and those pushed or found",
            ),
            (
                "pushed, skipped, repaired, signed, failed",
                "how many paths were written, already there, rewritten, given a signature, not published",
            ),
            (
                "nar_bytes, file_bytes, seconds",
                "NAR bytes read and file bytes written for what was written; the run's wall time",
            ),
            ("ok, errors", "whether every path was published; [{path, error}] for those that were not"),
            (
                "path_outcomes",
                "with --json-paths: [{path, outcome, nar_bytes, file_bytes}] for every path, outcome one of pushed, skipped, repaired, signed, failed, not-published, left-out (with its reason)",
            ),
        ],
        Some("sign") => &[
            ("dest, key", "the cache and the key's name"),
            (
                "narinfos, signed, already_signed, refused, failed, unusable",
                "narinfos looked at; signed now; signed before; not signed because the NAR does not match; rewrites that failed; narinfos that do not parse",
            ),
            ("ok", "whether nothing was refused, failed or unusable"),
            ("signed_paths", "with --json-paths: the store paths signed"),
        ],
        Some("gc") => &[
            ("dest, dry_run", "the cache, and whether anything was removed"),
            (
                "kept, removed_paths, removed_files, bytes_freed",
                "paths kept; paths and files removed (or that would be); bytes freed",
            ),
            ("warnings", "what gc said as warnings"),
            (
                "removals",
                "with --json-paths: [{file, path, reason}], reason old, incomplete, unusable or null (a file no narinfo names)",
            ),
        ],
        _ => &[],
    };
    if !json.is_empty() {
        out.push_str(".SH \"JSON OUTPUT\"\n");
        out.push_str(&format!(
            "{}\n",
            roff("With --json, one object on standard output at the end of the run (and nothing else there). Field names are stable; fields may be added.")
        ));
        for (fields, what) in json {
            out.push_str(&format!(".TP\n.B {}\n{}\n", roff(fields), roff(what)));
        }
    }
    if sub == Some("push") {
        out.push_str(".SH BUCKETS\n");
        out.push_str(&format!(
            "{}\n",
            roff("--dest s3://BUCKET/PREFIX?PARAMETERS writes an S3-compatible bucket with the same keys and bytes as a directory. Parameters as Nix spells them: endpoint (a full URL, http://host:port allowed), region (default us-east-1), profile, addressing-style=auto|path|virtual. Credentials are found as AWS tools find them: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, the profile in ~/.aws, container credentials, then the instance's role. Clients read the bucket over HTTP: substituters = http://ENDPOINT/BUCKET/PREFIX.")
        ));
    }
    if sub == Some("gc") {
        out.push_str(".SH \"THE RECORD GC READS\"\n");
        out.push_str(&format!(
            "{}\n",
            roff(
                "When a push last named or walked a path is the modification time of its narinfo: every push touches it, sign keeps it, and rsync -a copies it. A copy that loses times makes every path look freshly pushed, so gc keeps everything until the window passes. A NAR no narinfo names is kept for the window, at least an hour, since a writer without nixcache's lock may be about to name it."
            )
        ));
    }
    out
}

/// The ENVIRONMENT section: the variables the page's options are read from.
fn environment(c: &clap::Command) -> String {
    let mut out = String::new();
    for a in c.get_arguments().filter(|a| !a.is_hide_set()) {
        if let (Some(var), Some(long)) = (a.get_env(), a.get_long()) {
            let many = if a.get_value_delimiter().is_some() { " (several, separated by spaces)" } else { "" };
            out.push_str(&format!(
                ".TP\n.B {}\n{}\n",
                roff(&var.to_string_lossy()),
                roff(&format!("The same as --{long}{many}, when the option is not given."))
            ));
        }
    }
    let nix_conf = ".TP\n.B NIX_CONF_DIR\nWhere nix.conf is read from (default /etc/nix), only to say which keys Nix itself uses; nixcache never signs with them unasked.\n";
    if out.is_empty() && c.get_subcommands().next().is_some() {
        return String::new();
    }
    format!(
        ".SH ENVIRONMENT\n{out}{}",
        if c.get_name() == "push" || c.get_name() == "serve" { nix_conf } else { "" }
    )
}

/// SEE ALSO: the other pages, and the documentation installed beside them.
fn see_also(sub: Option<&str>) -> String {
    let pages = [
        "nixcache",
        "nixcache-push",
        "nixcache-verify",
        "nixcache-sign",
        "nixcache-gc",
        "nixcache-serve",
        "nixcache-keygen",
    ];
    let own = sub.map_or_else(|| "nixcache".to_owned(), |s| format!("nixcache-{s}"));
    let list: Vec<String> =
        pages.iter().filter(|p| **p != own).map(|p| format!("\\fB{}\\fR(1)", roff(p))).collect();
    format!(
        ".SH \"SEE ALSO\"\n{},\n\\fBnix.conf\\fR(5).\n.PP\n{}\n",
        list.join(", "),
        roff(
            "The guide (README.md: first steps, guarantees, buckets, serving, partial caches, deployments, troubleshooting) and the example nginx, systemd and nix.conf files are installed in share/doc/nixcache under the install prefix: /usr/local/share/doc/nixcache by default."
        )
    )
}

/// Text for a roff line: backslashes and hyphens escaped, no leading control character.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e").replace('-', "\\-");
    if escaped.starts_with(['.', '\'']) { format!("\\&{escaped}") } else { escaped }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_have_examples_exit_status_and_the_program_in_the_footer() {
        for (name, page) in man_pages() {
            let page = String::from_utf8(page).unwrap();
            assert!(page.contains(".SH EXAMPLES\n.TP\n.B nixcache"), "{name}");
            assert!(page.contains(".SH \"EXIT STATUS\""), "{name}");
            assert!(page.contains(&format!("\"nixcache {}\"", env!("CARGO_PKG_VERSION"))), "{name}: footer");
            match name.as_str() {
                "nixcache-push.1" => {
                    assert!(
                        page.contains("xz|bzip2|zstd|none") && page.contains("\\-\\-key\\-file"),
                        "{page}"
                    )
                }
                "nixcache-gc.1" => assert!(page.contains("THE RECORD GC READS")),
                "nixcache-verify.1" => assert!(page.contains("1 when problems were found")),
                _ => {}
            }
        }
    }

    /// Regenerate with `NIXCACHE_UPDATE_MAN=1 cargo test man_pages`.
    #[test]
    fn man_pages_are_current() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("man");
        let pages = man_pages();
        if std::env::var_os("NIXCACHE_UPDATE_MAN").is_some() {
            std::fs::create_dir_all(&dir).unwrap();
            for (name, text) in &pages {
                std::fs::write(dir.join(name), text).unwrap();
            }
        }
        let mut names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "nixcache-completions.1",
                "nixcache-gc.1",
                "nixcache-keygen.1",
                "nixcache-push.1",
                "nixcache-receive.1",
                "nixcache-serve.1",
                "nixcache-sign.1",
                "nixcache-verify.1",
                "nixcache.1"
            ]
        );
        for (name, text) in &pages {
            let on_disk = std::fs::read(dir.join(name)).unwrap_or_default();
            assert!(
                on_disk == *text,
                "man/{name} is stale: run NIXCACHE_UPDATE_MAN=1 cargo test man_pages, and commit man/"
            );
        }
        let mut listed: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        listed.sort();
        assert_eq!(listed, names, "man/ has pages for commands that are gone");
    }
}
