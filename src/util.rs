//! What every layer uses: errors in words, and a map over items on a few threads.

/// Formats an error with its sources: `outer: inner: innermost`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = plain(e);
    let mut src = e.source();
    while let Some(inner) = src {
        // An error whose text already ends with its source's says it once.
        let text = plain(inner);
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        src = inner.source();
    }
    s
}

/// An error's own text, without the ` (os error 13)` tail an OS error carries: the sentence
/// ("Permission denied") says it to a person, the number only to a programmer.
/// (An error that prints its source in its own text carries the tail inside: every ` (os
/// error N)` is dropped.)
pub fn plain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    while let Some(at) = text.find(" (os error ") {
        let rest = &text[at + " (os error ".len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || !rest[digits..].starts_with(')') {
            break;
        }
        text.replace_range(at..at + " (os error ".len() + digits + 1, "");
    }
    text
}

/// `f` of each of `items` on up to `threads` threads, the items taken in order; the results
/// in the items' order. Once a result satisfies `stop`, no further item is taken, and the
/// results are those of the items taken, a prefix of `items` (each item before the last one
/// taken was taken and finished).
pub fn map_in_order<T: Send, R: Send>(
    items: impl ExactSizeIterator<Item = T> + Send,
    threads: usize,
    stop: impl Fn(&R) -> bool + Sync,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.min(items.len());
    if threads <= 1 {
        let mut done = Vec::new();
        for item in items {
            let r = f(item);
            let stopped = stop(&r);
            done.push(r);
            if stopped {
                break;
            }
        }
        return done;
    }
    let next = std::sync::Mutex::new(items.enumerate());
    let stopped = std::sync::atomic::AtomicBool::new(false);
    let mut done: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                        // The lock is let go before the work.
                        let item = next.lock().unwrap_or_else(|e| e.into_inner()).next();
                        let Some((k, item)) = item else { break };
                        let r = f(item);
                        if stop(&r) {
                            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        done.push((k, r));
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    });
    done.sort_by_key(|&(k, _)| k);
    done.into_iter().map(|(_, r)| r).collect()
}

#[cfg(test)]
mod map_tests {
    #[test]
    fn map_in_order_keeps_the_order_and_stops_after_a_prefix() {
        for threads in [1, 2, 8] {
            let all = super::map_in_order(0..100u32, threads, |_| false, |i| i * 2);
            assert_eq!(all, (0..100).map(|i| i * 2).collect::<Vec<_>>());
            let some = super::map_in_order(0..100u32, threads, |&r| r == 10, |i| i);
            assert!(some.len() >= 11 && some.iter().copied().eq(0..some.len() as u32), "{some:?}");
        }
    }
}

#[cfg(test)]
mod error_text_tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{} cannot be read: {source}", "/x")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn chains_drop_errno_tails_and_repeats() {
        let e = Outer { source: std::io::Error::from_raw_os_error(13) };
        assert_eq!(super::error_chain(&e), "/x cannot be read: Permission denied");
    }
}
