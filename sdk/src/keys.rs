//! Helpers for etcd keys, which are bytes and by convention `/`-separated paths
//! (`/registry/secrets/<namespace>/<name>` in Kubernetes).

/// Whether `key` starts with `prefix`.
pub fn has_prefix(key: &[u8], prefix: &[u8]) -> bool {
    key.starts_with(prefix)
}

/// The `index`-th `/`-separated segment of `key`, counting from 0 and ignoring a leading `/`.
///
/// `segment(b"/registry/secrets/ns/name", 2)` is `Some(b"ns")`. Empty segments (from `//`)
/// count; a key with fewer segments gives `None`.
pub fn segment(key: &[u8], index: usize) -> Option<&[u8]> {
    let key = key.strip_prefix(b"/").unwrap_or(key);
    key.split(|b| *b == b'/').nth(index)
}

/// The prefix of `key` up to and including its `index`-th segment and the `/` after it:
/// `segment_prefix(b"/registry/secrets/ns/name", 2)` is `Some(b"/registry/secrets/ns/")`.
/// `None` when the key has no such segment followed by a `/`.
pub fn segment_prefix(key: &[u8], index: usize) -> Option<&[u8]> {
    let start = usize::from(key.first() == Some(&b'/'));
    let mut seen = 0;
    for (i, b) in key.iter().enumerate().skip(start) {
        if *b == b'/' {
            if seen == index {
                return Some(&key[..=i]);
            }
            seen += 1;
        }
    }
    None
}

/// The first key after every key starting with `prefix` (etcd's `range_end` for a prefix);
/// empty when there is none (a prefix of only `0xff` bytes).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    Vec::new()
}

/// Whether `key` falls in the half-open range `[start, end)`; an empty `end` means the end of
/// the keyspace.
pub fn in_range(key: &[u8], start: &[u8], end: &[u8]) -> bool {
    key >= start && (end.is_empty() || key < end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_ignore_the_leading_slash() {
        assert_eq!(segment(b"/registry/secrets/ns/name", 0), Some(&b"registry"[..]));
        assert_eq!(segment(b"/registry/secrets/ns/name", 2), Some(&b"ns"[..]));
        assert_eq!(segment(b"registry/secrets", 1), Some(&b"secrets"[..]));
        assert_eq!(segment(b"/registry", 1), None);
    }

    #[test]
    fn segment_prefix_ends_after_the_segment() {
        assert_eq!(segment_prefix(b"/registry/secrets/ns/name", 2), Some(&b"/registry/secrets/ns/"[..]));
        assert_eq!(segment_prefix(b"/registry/secrets/ns/name", 0), Some(&b"/registry/"[..]));
        // The last segment has no `/` after it: no prefix.
        assert_eq!(segment_prefix(b"/registry/secrets/ns", 2), None);
    }

    #[test]
    fn prefix_end_skips_trailing_ff() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff, 0xff]), Vec::<u8>::new());
    }

    #[test]
    fn ranges_are_half_open() {
        assert!(in_range(b"b", b"a", b"c"));
        assert!(in_range(b"a", b"a", b"c"));
        assert!(!in_range(b"c", b"a", b"c"));
        assert!(in_range(b"zzz", b"a", b""));
    }
}
