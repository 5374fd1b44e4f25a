//! Command output shared by the providers: the cap on a reply's output and the buffer that keeps
//! its tail.

use std::collections::VecDeque;
use std::time::Duration;

/// Maximum output of one reply: the last 1 MiB of what the command wrote.
///
/// An agent needs the end of a long log (the failing test, the compiler's summary). 1 MiB is
/// tens of thousands of lines, by estimate more text than an agent's context takes in at once.
/// The cap also bounds memory, because a command's buffer never grows past it.
pub const MAX_OUTPUT_BYTES: usize = 1024 * 1024;

/// How long output is still collected after the main process has ended (or was killed).
///
/// What the ended processes wrote is already in the pipe and is read at once. Later output comes
/// from background processes that outlive the command, and waiting for them would delay every
/// reply of a command that starts a server. 100 ms collects the former and bounds the latter.
pub const OUTPUT_DRAIN_GRACE: Duration = Duration::from_millis(100);

/// The exit code of a command killed by its timeout, as `timeout(1)` reports it.
pub const TIMEOUT_EXIT_CODE: i32 = 124;

/// The last `limit` bytes of a stream, and whether earlier ones were dropped.
#[derive(Debug)]
pub(crate) struct TailBuffer {
    bytes: VecDeque<u8>,
    limit: usize,
    truncated: bool,
}

impl TailBuffer {
    pub(crate) fn new(limit: usize) -> TailBuffer {
        TailBuffer {
            bytes: VecDeque::new(),
            limit,
            truncated: false,
        }
    }

    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend(chunk);
        let excess = self.bytes.len().saturating_sub(self.limit);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.truncated = true;
        }
    }

    /// Decodes the bytes, replacing invalid UTF-8 with U+FFFD, and keeps the result within the
    /// limit; returns it with the truncation flag.
    pub(crate) fn into_text(self) -> (String, bool) {
        let mut bytes = Vec::from(self.bytes);
        let mut truncated = self.truncated;
        if truncated {
            // The cut may have split a character: drop its remaining bytes rather than show
            // U+FFFD for them.
            let partial = bytes
                .iter()
                .take(3)
                .take_while(|byte| **byte & 0xC0 == 0x80)
                .count();
            bytes.drain(..partial);
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if text.len() > self.limit {
            // Each invalid byte became three bytes of U+FFFD; cut at a character boundary.
            let mut cut = text.len() - self.limit;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.drain(..cut);
            truncated = true;
        }
        (text, truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(limit: usize, chunks: &[&[u8]], expected: (&str, bool)) {
        let mut buffer = TailBuffer::new(limit);
        for chunk in chunks {
            buffer.push(chunk);
        }
        let (text, truncated) = buffer.into_text();
        assert_eq!((text.as_str(), truncated), expected, "chunks {chunks:?}");
    }

    #[test]
    fn tail_buffer_keeps_the_end() {
        check(4, &[b"ab", b"cd"], ("abcd", false));
        check(4, &[b"ab", b"cde"], ("bcde", true));
        check(4, &[b"abcdefgh"], ("efgh", true));
        check(4, &[b"ab", b"", b"cdefgh", b"i"], ("fghi", true));
        check(4, &[], ("", false));
    }

    #[test]
    fn tail_buffer_replaces_invalid_utf8() {
        check(8, &[b"a\xffb\n"], ("a\u{fffd}b\n", false));
        check(8, &[b"no newline"], (" newline", true));
        check(4, &["\u{e9}\u{e9}".as_bytes()], ("\u{e9}\u{e9}", false));
        check(3, &["x\u{e9}\u{e9}".as_bytes()], ("\u{e9}", true));
        check(4, &["x\u{20ac}yz".as_bytes()], ("yz", true));
        check(4, &[b"\xff\xff\xff"], ("\u{fffd}", true));
    }
}
