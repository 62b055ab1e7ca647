//! What an S3 server answers, read as untrusted input: listings and upload lists parsed
//! strictly, error bodies, and what of a server's words may be printed. Pure: no I/O.
//!
//! A listing decides what gc deletes, so nothing in one is guessed: an entry without its
//! `Key`, `Size` or `LastModified` (or with one that does not parse), a page without
//! `IsTruncated`, a truncated page without its continuation token, a `KeyCount` that does not
//! match the entries, a key outside the prefix asked for, or a document that does not end, is
//! an error, never a default.

use std::time::SystemTime;

/// One object of a listing page.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Object {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
    /// The `ETag` as the server wrote it (quotes and all), when it gave one: what a copy kept
    /// on this machine is matched against, so an odd one only means no match.
    pub etag: Option<String>,
}

/// A page of `ListObjectsV2`.
#[derive(Debug, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<Object>,
    /// The continuation token, when the listing goes on.
    pub next: Option<String>,
}

/// One incomplete multipart upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadEntry {
    pub key: String,
    pub id: String,
    pub initiated: SystemTime,
}

/// A page of `ListMultipartUploads`.
#[derive(Debug, PartialEq, Eq)]
pub struct UploadPage {
    pub uploads: Vec<UploadEntry>,
    /// The key and upload-id markers of the next page, when there is one.
    pub next: Option<(String, String)>,
}

/// The text of every `<tag>…</tag>` in `body`, in order.
pub fn xml_values<'a>(body: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = body;
    while let Some((_, r)) = rest.split_once(open.as_str()) {
        let Some((v, r)) = r.split_once(close.as_str()) else { break };
        out.push(v);
        rest = r;
    }
    out
}

/// The one `<tag>` of `body`: an error when there are several, `None` when there is none.
fn only<'a>(body: &'a str, tag: &str) -> Result<Option<&'a str>, String> {
    let opens = body.matches(&format!("<{tag}>")).count();
    let values = xml_values(body, tag);
    match (opens, values.as_slice()) {
        (0, _) => Ok(None),
        (1, [v]) => Ok(Some(v)),
        _ => Err(format!("<{tag}> appears {opens} times or is not closed")),
    }
}

fn required<'a>(body: &'a str, tag: &str) -> Result<&'a str, String> {
    only(body, tag)?.ok_or_else(|| format!("an entry has no <{tag}>"))
}

/// Undoes XML's escapes: the five entities and numeric character references.
pub fn xml_unescape(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let (entity, after) =
            rest[i + 1..].split_once(';').ok_or_else(|| format!("unterminated entity in {s:?}"))?;
        let c = match entity {
            "lt" => '<',
            "gt" => '>',
            "quot" => '"',
            "apos" => '\'',
            "amp" => '&',
            e => e
                .strip_prefix("#x")
                .map(|h| u32::from_str_radix(h, 16))
                .or_else(|| e.strip_prefix('#').map(|d| d.parse::<u32>()))
                .and_then(|n| n.ok())
                .and_then(char::from_u32)
                .ok_or_else(|| format!("unknown entity &{e}; in {s:?}"))?,
        };
        out.push(c);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// Undoes `encoding-type=url` (form encoding: `+` is a space); the result must be UTF-8.
pub fn url_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let v = s
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad escape in {s:?}"))?;
                out.push(v);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not UTF-8 once decoded"))
}

/// A time as S3 writes it in XML (RFC 3339) or in a header (RFC 2822); `None` if neither.
pub fn parse_time(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>()
        .ok()
        .or_else(|| jiff::fmt::rfc2822::parse(s).ok().map(|z| z.timestamp()))
        .map(SystemTime::from)
}

/// The root element must be there and closed: a document cut short is not a listing.
fn whole<'a>(body: &'a str, root: &str) -> Result<&'a str, String> {
    let trimmed = body.trim_end();
    let start = trimmed.find(&format!("<{root}")).ok_or_else(|| format!("no <{root}> element"))?;
    let inner = trimmed[start..]
        .strip_suffix(&format!("</{root}>"))
        .ok_or_else(|| format!("the document ends before </{root}> (cut short?)"))?;
    Ok(inner)
}

fn truncated(page: &str) -> Result<bool, String> {
    match only(page, "IsTruncated")? {
        Some("true") => Ok(true),
        Some("false") => Ok(false),
        Some(v) => Err(format!("<IsTruncated> is {v:?}, not true or false")),
        None => Err("no <IsTruncated>".into()),
    }
}

/// How the server wrote keys: url-encoded only if it says so.
fn key_decoder(page: &str) -> Result<impl Fn(&str) -> Result<String, String>, String> {
    let encoded = match only(page, "EncodingType")? {
        None => false,
        Some(e) if e.eq_ignore_ascii_case("url") => true,
        Some(e) => return Err(format!("unknown <EncodingType> {e:?}")),
    };
    Ok(move |raw: &str| {
        let k = xml_unescape(raw)?;
        if encoded { url_decode(&k) } else { Ok(k) }
    })
}

/// The elements `<tag>…</tag>` of a page, checked to be balanced.
fn elements<'a>(page: &'a str, tag: &str) -> Result<Vec<&'a str>, String> {
    let items = xml_values(page, tag);
    let (opens, closes) =
        (page.matches(&format!("<{tag}>")).count(), page.matches(&format!("</{tag}>")).count());
    if opens != items.len() || closes != items.len() {
        return Err(format!("unbalanced <{tag}> elements"));
    }
    Ok(items)
}

/// Parses a `ListObjectsV2` page asked for with `prefix`.
pub fn list_page(body: &str, prefix: &str) -> Result<ListPage, String> {
    let page = whole(body, "ListBucketResult")?;
    let decode = key_decoder(page)?;
    let mut objects = Vec::new();
    let contents = elements(page, "Contents")?;
    for c in &contents {
        let key = decode(required(c, "Key")?)?;
        if !key.starts_with(prefix) {
            return Err(format!("the listing of {prefix:?} names {key:?}, outside it"));
        }
        let size = required(c, "Size")?;
        let size = size.trim().parse().map_err(|_| format!("<Size> of {key:?} is {size:?}"))?;
        let modified = required(c, "LastModified")?;
        let modified = parse_time(modified.trim())
            .ok_or_else(|| format!("<LastModified> of {key:?} is {modified:?}"))?;
        let etag = match only(c, "ETag")? {
            Some(e) => Some(xml_unescape(e.trim()).map_err(|e| format!("<ETag> of {key:?}: {e}"))?),
            None => None,
        };
        objects.push(Object { key, size, modified, etag });
    }

    // Directories (with a delimiter) are not objects, but they count.
    let prefixes = elements(page, "CommonPrefixes")?.len();
    if let Some(n) = only(page, "KeyCount")? {
        let n: usize = n.trim().parse().map_err(|_| format!("<KeyCount> is {n:?}"))?;
        if n != contents.len() + prefixes {
            return Err(format!(
                "<KeyCount> says {n} keys but the page has {} (cut short?)",
                contents.len() + prefixes
            ));
        }
    }
    let next = if truncated(page)? {
        let t = only(page, "NextContinuationToken")?
            .filter(|t| !t.is_empty())
            .ok_or("a truncated page has no <NextContinuationToken>")?;
        Some(xml_unescape(t)?)
    } else {
        None
    };
    Ok(ListPage { objects, next })
}

/// Parses a `ListMultipartUploads` page asked for with `prefix`.
pub fn upload_page(body: &str, prefix: &str) -> Result<UploadPage, String> {
    let page = whole(body, "ListMultipartUploadsResult")?;
    let decode = key_decoder(page)?;
    let mut uploads = Vec::new();
    for u in elements(page, "Upload")? {
        let key = decode(required(u, "Key")?)?;
        if !key.starts_with(prefix) {
            return Err(format!("the upload list of {prefix:?} names {key:?}, outside it"));
        }
        let id = xml_unescape(required(u, "UploadId")?)?;
        if id.is_empty() {
            return Err(format!("the upload to {key:?} has an empty <UploadId>"));
        }
        let initiated = required(u, "Initiated")?;
        let initiated = parse_time(initiated.trim())
            .ok_or_else(|| format!("<Initiated> of the upload to {key:?} is {initiated:?}"))?;
        uploads.push(UploadEntry { key, id, initiated });
    }
    let next = if truncated(page)? {
        let k = only(page, "NextKeyMarker")?.filter(|k| !k.is_empty());
        let u = only(page, "NextUploadIdMarker")?.filter(|u| !u.is_empty());
        match (k, u) {
            (Some(k), Some(u)) => Some((decode(k)?, xml_unescape(u)?)),
            _ => return Err("a truncated upload list has no <NextKeyMarker> and <NextUploadIdMarker>".into()),
        }
    } else {
        None
    };
    Ok(UploadPage { uploads, next })
}

/// The `Code` and `Message` of an S3 error body (the message not yet fit to print: see
/// [`printable`]).
pub fn error_code(body: &str) -> (String, String) {
    let tag =
        |t: &str| xml_values(body, t).first().map(|v| xml_unescape(v).unwrap_or_else(|_| v.to_string()));
    (tag("Code").unwrap_or_default(), tag("Message").unwrap_or_default())
}

/// The longest server message printed.
pub const MESSAGE_LIMIT: usize = 200;

/// Whether a word looks like a credential: an AWS key id, a signature, a token.
fn secret_like(word: &str) -> bool {
    let lower = word.to_ascii_lowercase();
    let named =
        ["signature", "credential", "security-token", "token", "awsaccesskeyid", "authorization", "secret"]
            .iter()
            .any(|n| lower.contains(n));
    let long_run = word
        .split(|c: char| !(c.is_ascii_alphanumeric() || "+/=_-%".contains(c)))
        .any(|run| run.len() >= 20 && run.chars().any(|c| c.is_ascii_digit()));
    let key_id = word.starts_with("AKIA") || word.starts_with("ASIA");
    named || long_run || key_id
}

/// A server's message made fit for a log: without anything that looks like a signature,
/// credential or token (a server or proxy may quote the signed request), without the
/// `secrets` themselves, without control characters, and at most [`MESSAGE_LIMIT`] long.
pub fn printable(message: &str, secrets: &[&str]) -> String {
    let mut m = message.to_owned();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        m = m.replace(s, "[redacted]");
    }
    let words: Vec<String> = m
        .split_whitespace()
        .map(|w| {
            // A URL: its query and any user:password go.
            let w = redact_url(w);
            if secret_like(&w) { "[redacted]".to_owned() } else { w }
        })
        .collect();
    let mut out: String = words.join(" ").chars().filter(|c| !c.is_control()).collect();
    if out.chars().count() > MESSAGE_LIMIT {
        out = out.chars().take(MESSAGE_LIMIT).collect::<String>() + "…";
    }
    out
}

/// A URL fit to print: without `user:password@` and without a query (a signed URL's query
/// holds the signature and any session token). Text that is not a URL is returned as it is.
pub fn redact_url(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else { return s.to_owned() };
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let host = match authority.rsplit_once('@') {
        Some((_, host)) => format!("[redacted]@{host}"),
        None => authority.to_owned(),
    };
    let path = match path.split_once('?') {
        Some((p, _)) => format!("{p}?[redacted]"),
        None => path.to_owned(),
    };
    format!("{scheme}://{host}{path}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> SystemTime {
        parse_time(s).unwrap()
    }

    const PAGE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><Prefix>p/</Prefix><KeyCount>2</KeyCount><MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated><NextContinuationToken>tok&amp;1</NextContinuationToken><Contents><Key>p/a%01b.narinfo</Key><LastModified>2026-12-01T10:00:00.000Z</LastModified><ETag>&quot;9b2c&quot;</ETag><Size>12</Size></Contents><Contents><Key>p/x+y</Key><LastModified>2026-12-01T10:00:01Z</LastModified><Size>0</Size></Contents></ListBucketResult>
"#;

    #[test]
    fn a_whole_page() {
        let p = list_page(PAGE, "p/").unwrap();
        assert_eq!(p.next.as_deref(), Some("tok&1"));
        assert_eq!(
            p.objects,
            [
                Object {
                    key: "p/a\u{1}b.narinfo".into(),
                    size: 12,
                    modified: t("2026-12-01T10:00:00Z"),
                    etag: Some("\"9b2c\"".into())
                },
                Object { key: "p/x y".into(), size: 0, modified: t("2026-12-01T10:00:01Z"), etag: None },
            ]
        );
        // Not url-encoded unless the server says so.
        let raw = PAGE.replace("<EncodingType>url</EncodingType>", "");
        assert_eq!(list_page(&raw, "p/").unwrap().objects[1].key, "p/x+y");
    }

    #[test]
    fn anything_missing_or_odd_is_an_error() {
        let broken = [
            PAGE.replace("<Size>12</Size>", ""),
            PAGE.replace("<Size>12</Size>", "<Size>twelve</Size>"),
            PAGE.replace("<LastModified>2026-12-01T10:00:00.000Z</LastModified>", ""),
            PAGE.replace("2026-12-01T10:00:00.000Z", "yesterday"),
            PAGE.replace("<Key>p/a%01b.narinfo</Key>", ""),
            PAGE.replace("<IsTruncated>true</IsTruncated>", ""),
            PAGE.replace("<IsTruncated>true</IsTruncated>", "<IsTruncated>maybe</IsTruncated>"),
            PAGE.replace("<NextContinuationToken>tok&amp;1</NextContinuationToken>", ""),
            PAGE.replace("<KeyCount>2</KeyCount>", "<KeyCount>3</KeyCount>"),
            PAGE.replace("p/x+y", "q/x"),
            PAGE.replace("%01", "%G1"),
            PAGE.replace("<ETag>&quot;9b2c&quot;</ETag>", "<ETag>a</ETag><ETag>b</ETag>"),
            PAGE.replace("&quot;9b2c&quot;", "&bogus;"),
            // Cut short, at an entry's end and mid-entry.
            PAGE[..PAGE.find("<Contents><Key>p/x").unwrap()].to_owned(),
            PAGE[..PAGE.len() - 30].to_owned(),
            String::new(),
        ];
        for b in &broken {
            assert!(list_page(b, "p/").is_err(), "accepted: {b}");
        }
        // A last page: no token needed.
        let last = PAGE.replace("<IsTruncated>true</IsTruncated>", "<IsTruncated>false</IsTruncated>");
        assert_eq!(list_page(&last, "p/").unwrap().next, None);
    }

    #[test]
    fn upload_pages() {
        let body = r#"<ListMultipartUploadsResult><Bucket>b</Bucket><EncodingType>url</EncodingType><IsTruncated>false</IsTruncated><Upload><Key>p/nar/.nixcache-tmp-ab.nar.xz</Key><UploadId>u1</UploadId><Initiated>2026-12-01T10:00:00Z</Initiated></Upload></ListMultipartUploadsResult>"#;
        let p = upload_page(body, "p/").unwrap();
        assert_eq!(p.uploads[0].key, "p/nar/.nixcache-tmp-ab.nar.xz");
        assert_eq!(p.next, None);
        assert!(upload_page(&body.replace("<UploadId>u1</UploadId>", ""), "p/").is_err());
        assert!(upload_page(&body.replace("2026-12-01T10:00:00Z", ""), "p/").is_err());
        assert!(upload_page(&body.replace("false", "true"), "p/").is_err());
        assert!(upload_page(&body[..body.len() - 5], "p/").is_err());
    }

    #[test]
    fn entities() {
        assert_eq!(xml_unescape("&quot;e&quot; &#x1; &#65;").unwrap(), "\"e\" \u{1} A");
        assert!(xml_unescape("&bogus;").is_err());
        let body =
            "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>";
        assert_eq!(error_code(body).0, "NoSuchBucket");
        assert_eq!(xml_values("<a><K>1</K><K>2</K></a>", "K"), ["1", "2"]);
    }

    #[test]
    fn nothing_secret_is_printed() {
        let quoted = "Denied: GET http://h:1/b/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIAEXAMPLE%2F2026&X-Amz-Security-Token=FQoGZXIvYXdzEJr1234567890abcdef&X-Amz-Signature=0123456789abcdef0123456789abcdef failed for secretvalue1";
        let p = printable(quoted, &["secretvalue1"]);
        for leak in ["AKIAEXAMPLE", "FQoGZXIvYXdz", "0123456789abcdef", "secretvalue1", "X-Amz-Signature"] {
            assert!(!p.contains(leak), "{leak} in {p}");
        }
        assert!(p.starts_with("Denied: GET http://h:1/b/k?[redacted]"), "{p}");
        assert_eq!(printable("The specified key does not exist.", &[]), "The specified key does not exist.");
        assert_eq!(printable(&"x".repeat(500), &[]).chars().count(), MESSAGE_LIMIT + 1);
        assert_eq!(printable("a\u{1b}[31mb", &[]), "a[31mb");
        assert_eq!(redact_url("http://KEY:SECRET@host:9000/x"), "http://[redacted]@host:9000/x");
        assert_eq!(redact_url("https://s3.amazonaws.com"), "https://s3.amazonaws.com");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
