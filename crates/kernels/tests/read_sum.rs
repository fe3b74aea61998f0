//! `ops::read_sum` (the read loop of `gemma3 bench`'s bandwidth figure) is
//! the wrapping sum of the buffer's little-endian u64 words, on whichever
//! path this CPU takes and for every stream count, with lengths whose
//! streams end in a partial step.

use gemma3_kernels::ops::{read_sum, read_sum_ref};

#[test]
fn read_sum_is_the_sum_of_the_words() {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..64 * 4 * 37)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for streams in [1, 2, 4] {
        for lines in [1, 2, 3, 5, 8, 37] {
            let b = &bytes[..64 * streams * lines];
            let want = (b.chunks_exact(8))
                .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                .fold(0u64, |s, w| s.wrapping_add(w));
            assert_eq!(
                read_sum(b, streams),
                want,
                "{streams} streams, {lines} lines"
            );
            assert_eq!(
                read_sum_ref(b, streams),
                want,
                "ref: {streams} streams, {lines} lines"
            );
        }
    }
}
