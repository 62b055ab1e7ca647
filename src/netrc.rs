//! The netrc file Nix reads for HTTP credentials (`netrc-file`, default `/etc/nix/netrc`):
//! `machine HOST login USER password SECRET`, and a `default` entry for any host.

/// A login and password for a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub login: String,
    pub password: String,
}

/// The credentials `text` (a netrc file) gives for `host`: its `machine` entry, else the
/// `default` entry. Tokens are separated by any white space, as curl reads them; `macdef`
/// bodies are not supported and end the file.
pub fn lookup(text: &str, host: &str) -> Option<Credentials> {
    let mut tokens = text.split_whitespace();
    let mut found: Option<Credentials> = None;
    let mut default: Option<Credentials> = None;
    // The entry being read: whether it is for `host`, or the default.
    let mut current: Option<(bool, Credentials)> = None;
    let mut finish = |current: &mut Option<(bool, Credentials)>| match current.take() {
        Some((true, c)) if found.is_none() => found = Some(c),
        Some((false, c)) if default.is_none() => default = Some(c),
        _ => {}
    };
    let empty = || Credentials { login: String::new(), password: String::new() };
    let mut in_entry = false;
    while let Some(t) = tokens.next() {
        match t {
            "machine" => {
                finish(&mut current);
                let name = tokens.next()?;
                in_entry = name == host;
                current = in_entry.then(|| (true, empty()));
            }
            "default" => {
                finish(&mut current);
                in_entry = true;
                current = Some((false, empty()));
            }
            "login" | "password" | "account" => {
                let value = tokens.next().unwrap_or_default();
                if let Some((_, c)) = current.as_mut().filter(|_| in_entry) {
                    match t {
                        "login" => c.login = value.to_owned(),
                        "password" => c.password = value.to_owned(),
                        _ => {}
                    }
                }
            }
            "macdef" => break,
            _ => {}
        }
    }
    finish(&mut current);
    found.or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_then_default() {
        let text = "machine a.example login u password p1\n\
                    machine pi\n  login ci\n  password secret\n\
                    default login anon password x\n";
        let c = |l: &str, p: &str| Some(Credentials { login: l.into(), password: p.into() });
        assert_eq!(lookup(text, "pi"), c("ci", "secret"));
        assert_eq!(lookup(text, "a.example"), c("u", "p1"));
        assert_eq!(lookup(text, "elsewhere"), c("anon", "x"));
        assert_eq!(lookup("machine pi password only", "pi"), c("", "only"));
        assert_eq!(lookup("machine other login a password b", "pi"), None);
        assert_eq!(lookup("", "pi"), None);
    }
}
