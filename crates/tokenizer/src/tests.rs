//! Unit tests on tiny hand-made vocabularies, expectations derived by hand from llama.cpp's algorithm.

use super::*;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Ids 0..3 are `<pad>`, `<eos>`, `<bos>`, `<unk>`; then `entries` in order; then the 256 byte tokens.
fn vocab_parts(entries: &[(&str, f32, i32)]) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let mut tokens = vec![
        "<pad>".into(),
        "<eos>".into(),
        "<bos>".into(),
        "<unk>".into(),
    ];
    let mut scores = vec![0.0; 4];
    let mut types = vec![CONTROL, CONTROL, CONTROL, UNKNOWN];
    for &(text, score, ty) in entries {
        tokens.push(text.to_string());
        scores.push(score);
        types.push(ty);
    }
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        scores.push(0.0);
        types.push(BYTE);
    }
    (tokens, scores, types)
}

fn specials() -> SpecialTokens {
    SpecialTokens {
        bos: 2,
        eos: 1,
        unk: Some(3),
        pad: Some(0),
        start_of_turn: None,
        end_of_turn: None,
    }
}

fn vocab(entries: &[(&str, f32, i32)]) -> Tokenizer {
    let (tokens, scores, types) = vocab_parts(entries);
    Tokenizer::new(tokens, scores, types, specials()).expect("valid test vocabulary")
}

/// Ids of `texts`, looked up by their vocabulary text.
fn ids(tok: &Tokenizer, texts: &[&str]) -> Vec<u32> {
    texts
        .iter()
        .map(|t| {
            tok.token_id(t)
                .unwrap_or_else(|| panic!("{t:?} not in vocab"))
        })
        .collect()
}

fn single_chars(chars: &str) -> Vec<(String, f32, i32)> {
    chars
        .chars()
        .map(|c| (c.to_string(), -10.0, NORMAL))
        .collect()
}

fn vocab_with_chars(chars: &str, entries: &[(&str, f32, i32)]) -> Tokenizer {
    let owned = single_chars(chars);
    let mut all: Vec<(&str, f32, i32)> =
        owned.iter().map(|(t, s, y)| (t.as_str(), *s, *y)).collect();
    all.extend_from_slice(entries);
    vocab(&all)
}

#[test]
fn higher_score_merges_first() {
    // "ab" -2 vs "bc" -1: bc wins; the queued (a,b) entry is then stale (b grew to 2 bytes) and "abc" is
    // not a token, so nothing else merges.
    let tok = vocab_with_chars("abc", &[("ab", -2.0, NORMAL), ("bc", -1.0, NORMAL)]);
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["a", "bc"]));
}

#[test]
fn equal_scores_merge_leftmost_first() {
    let tok = vocab_with_chars("abc", &[("ab", -1.0, NORMAL), ("bc", -1.0, NORMAL)]);
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["ab", "c"]));
}

#[test]
fn stale_entries_are_skipped() {
    // Queue: bc -1, cd -2, ab -3. bc merges; (c,d) is stale (c merged away), (a,b) is stale (b grew).
    let tok = vocab_with_chars(
        "abcd",
        &[
            ("ab", -3.0, NORMAL),
            ("bc", -1.0, NORMAL),
            ("cd", -2.0, NORMAL),
        ],
    );
    assert_eq!(
        tok.encode("abcd", false, false),
        ids(&tok, &["a", "bc", "d"])
    );
}

#[test]
fn merged_symbols_offer_new_pairs() {
    // ab and cd (equal score: ab first, then cd), then the new pair (ab, cd) forms "abcd".
    let tok = vocab_with_chars(
        "abcd",
        &[
            ("ab", -1.0, NORMAL),
            ("cd", -1.0, NORMAL),
            ("abcd", -5.0, NORMAL),
            ("bc", -0.5, NORMAL),
        ],
    );
    // With "bc" best, b+c merge first and block both ab and cd: a | bc | d.
    assert_eq!(
        tok.encode("abcd", false, false),
        ids(&tok, &["a", "bc", "d"])
    );
    let tok = vocab_with_chars(
        "abcd",
        &[
            ("ab", -1.0, NORMAL),
            ("cd", -1.0, NORMAL),
            ("abcd", -5.0, NORMAL),
        ],
    );
    assert_eq!(tok.encode("abcd", false, false), ids(&tok, &["abcd"]));
    assert_eq!(
        tok.encode("abcdab", false, false),
        ids(&tok, &["abcd", "ab"])
    );
}

#[test]
fn unknown_character_falls_back_to_bytes() {
    let tok = vocab_with_chars("a", &[]);
    assert_eq!(
        tok.encode("a€a", false, false),
        ids(&tok, &["a", "<0xE2>", "<0x82>", "<0xAC>", "a"])
    );
}

#[test]
fn spaces_become_lower_one_eighth_block() {
    let tok = vocab_with_chars("a▁", &[("▁a", -1.0, NORMAL)]);
    assert_eq!(
        tok.encode(" a a ", false, false),
        ids(&tok, &["▁a", "▁a", "▁"])
    );
    // No dummy prefix: "a" stays "a".
    assert_eq!(tok.encode("a", false, false), ids(&tok, &["a"]));
}

#[test]
fn user_defined_tokens_match_longest_first_even_without_parse_special() {
    let tok = vocab_with_chars("xy", &[("\n", 0.0, USER), ("\n\n", 0.0, USER)]);
    for parse_special in [false, true] {
        assert_eq!(
            tok.encode("\n\n\n", false, parse_special),
            ids(&tok, &["\n\n", "\n"])
        );
        assert_eq!(
            tok.encode("x\n\n\ny\n", false, parse_special),
            ids(&tok, &["x", "\n\n", "\n", "y", "\n"])
        );
    }
}

#[test]
fn longer_special_tokens_are_taken_first_across_the_text() {
    // "bcd" (3 bytes) is matched before "ab" (2 bytes) although "ab" occurs earlier.
    let tok = vocab_with_chars("abcd", &[("ab", 0.0, USER), ("bcd", 0.0, USER)]);
    assert_eq!(tok.encode("abcd", false, false), ids(&tok, &["a", "bcd"]));
    assert_eq!(
        tok.encode("abcdab", false, false),
        ids(&tok, &["a", "bcd", "ab"])
    );
}

#[test]
fn equal_length_special_tokens_go_by_id() {
    // "ab" (lower id) claims first; "bc" can then only match outside it.
    let tok = vocab_with_chars("abc", &[("ab", 0.0, USER), ("bc", 0.0, USER)]);
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["ab", "c"]));
    let tok = vocab_with_chars("abc", &[("bc", 0.0, USER), ("ab", 0.0, USER)]);
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["a", "bc"]));
}

/// 1000 user-defined tokens a…ab of every length: a long run of a's had cost its length
/// times the sum of the tokens' lengths (43 s for 5 KB at 2000 tokens), where one walk
/// from each position costs its length times the longest.
#[test]
fn many_special_token_lengths_in_one_pass() {
    let texts: Vec<String> = (1..=1000).map(|k| format!("{}b", "a".repeat(k))).collect();
    let entries: Vec<(&str, f32, i32)> = texts.iter().map(|t| (t.as_str(), 0.0, USER)).collect();
    let tok = vocab_with_chars("ab", &entries);
    let text = format!("{}b", "a".repeat(20_000));
    let got = tok.encode(&text, false, false);
    // The longest token claims the end; the a's before it stay plain text.
    assert_eq!(got.last(), Some(&tok.token_id(&texts[999]).unwrap()));
    assert_eq!(got.len(), 19_000 + 1);
}

/// A special token past 1024 bytes is refused: finding the special tokens in a text takes
/// its length times the longest.
#[test]
fn a_special_token_past_1024_bytes_is_refused() {
    let long = "x".repeat(1025);
    let (tokens, scores, types) = vocab_parts(&[(long.as_str(), 0.0, USER)]);
    let e = Tokenizer::new(tokens, scores, types, specials()).err();
    assert_eq!(e, Some(TokenizerError::SpecialTooLong { id: 4, len: 1025 }));
    let fine = "x".repeat(1024);
    let (tokens, scores, types) = vocab_parts(&[(fine.as_str(), 0.0, USER)]);
    assert!(Tokenizer::new(tokens, scores, types, specials()).is_ok());
}

#[test]
fn repeated_special_tokens_do_not_overlap() {
    let tok = vocab_with_chars("a", &[("aa", 0.0, USER)]);
    assert_eq!(
        tok.encode("aaaaa", false, false),
        ids(&tok, &["aa", "aa", "a"])
    );
}

#[test]
fn control_tokens_match_only_with_parse_special() {
    let tok = vocab_with_chars("xy<c>", &[("<c>", 0.0, CONTROL)]);
    assert_eq!(
        tok.encode("x<c>y", false, true),
        ids(&tok, &["x", "<c>", "y"])
    );
    assert_eq!(
        tok.encode("x<c>y", false, false),
        ids(&tok, &["x", "<", "c", ">", "y"])
    );
    // UNKNOWN tokens behave like CONTROL ones.
    assert_eq!(tok.encode("<unk>", false, true), vec![3]);
    assert_ne!(tok.encode("<unk>", false, false), vec![3]);
}

#[test]
fn bpe_may_form_a_control_token_from_plain_text() {
    // llama.cpp's SPM merge looks pairs up among all tokens, whatever their type.
    let tok = vocab_with_chars("ab", &[("ab", -1.0, CONTROL)]);
    assert_eq!(tok.encode("ab", false, false), ids(&tok, &["ab"]));
}

#[test]
fn bos_is_prepended_on_request() {
    let tok = vocab_with_chars("a", &[]);
    assert_eq!(tok.encode("", true, false), vec![2]);
    assert_eq!(tok.encode("", false, false), Vec::<u32>::new());
    assert_eq!(
        tok.encode("a", true, false),
        vec![2, tok.token_id("a").unwrap()]
    );
}

#[test]
fn duplicate_texts_resolve_to_the_later_id() {
    let tok = vocab(&[("a", 0.0, NORMAL), ("a", 0.0, NORMAL)]);
    assert_eq!(tok.token_id("a"), Some(5));
    assert_eq!(tok.encode("a", false, false), vec![5]);
}

#[test]
fn every_token_keeps_its_text_and_a_repeated_byte_token_is_the_later_id() {
    let entries = [
        ("▁x", 0.0, NORMAL),
        ("", 0.0, NORMAL),
        ("<0x41>", 0.0, USER),
    ];
    let (tokens, scores, types) = vocab_parts(&entries);
    let tok = Tokenizer::new(tokens.clone(), scores, types, specials()).unwrap();
    assert_eq!(tok.vocab_size(), tokens.len());
    for (id, text) in tokens.iter().enumerate() {
        assert_eq!(tok.token_text(id as u32), Some(text.as_str()), "id {id}");
    }
    assert_eq!(tok.token_text(tokens.len() as u32), None);
    // "<0x41>" is id 6 and again id 4 + 3 + 0x41 (the byte token): the later one is the byte's.
    let byte_a = 4 + entries.len() as u32 + 0x41;
    assert_eq!(tok.token_id("<0x41>"), Some(byte_a));
    // "A" is no token's text: it falls back to that byte token.
    assert_eq!(tok.encode("A", false, false), vec![byte_a]);
}

#[test]
fn pieces_follow_token_types() {
    let tok = vocab(&[
        ("▁hi▁there", 0.0, NORMAL),
        ("\n\n", 0.0, USER),
        ("<ctl>", 0.0, CONTROL),
        ("<unused0>", 0.0, UNUSED),
    ]);
    let id = |t| tok.token_id(t).unwrap();
    assert_eq!(
        tok.token_to_piece(id("▁hi▁there"), false).unwrap(),
        b" hi there"
    );
    assert_eq!(tok.token_to_piece(id("\n\n"), false).unwrap(), b"\n\n");
    assert_eq!(tok.token_to_piece(id("<ctl>"), false).unwrap(), b"");
    assert_eq!(tok.token_to_piece(id("<ctl>"), true).unwrap(), b"<ctl>");
    assert_eq!(tok.token_to_piece(3, true).unwrap(), b"<unk>");
    assert_eq!(tok.token_to_piece(3, false).unwrap(), b"");
    // As in llama.cpp, UNUSED decodes to nothing even with `special`.
    assert_eq!(tok.token_to_piece(id("<unused0>"), true).unwrap(), b"");
    assert_eq!(tok.token_to_piece(id("<0xE2>"), false).unwrap(), &[0xE2]);
    assert_eq!(tok.token_type(id("<0xE2>")), Some(TokenType::Byte));
    assert_eq!(tok.token_text(id("<ctl>")), Some("<ctl>"));
    assert_eq!(tok.token_text(10_000), None);
}

#[test]
fn decode_joins_pieces_and_rejects_unknown_ids() {
    let tok = vocab_with_chars("a", &[("▁a", 0.0, NORMAL)]);
    let mut ids = tok.encode(" a€", true, false);
    assert_eq!(tok.decode(&ids, false).unwrap(), " a€");
    assert_eq!(tok.decode(&ids, true).unwrap(), "<bos> a€");
    ids.pop(); // cut the euro sign's last byte
    assert_eq!(tok.decode(&ids, false).unwrap(), " a\u{FFFD}");
    let n = tok.vocab_size() as u32;
    assert_eq!(tok.decode(&[n], false), Err(TokenizerError::UnknownId(n)));
    assert_eq!(
        tok.token_to_piece(u32::MAX, true),
        Err(TokenizerError::UnknownId(u32::MAX))
    );
}

#[test]
fn new_rejects_bad_vocabularies() {
    let (t, s, y) = vocab_parts(&[]);
    let err = Tokenizer::new(t.clone(), s[1..].to_vec(), y.clone(), specials()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::LengthMismatch { .. }),
        "{err}"
    );

    let mut bad_type = y.clone();
    bad_type[0] = 7;
    let err = Tokenizer::new(t.clone(), s.clone(), bad_type, specials()).unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::InvalidTokenType {
                id: 0,
                value: 7,
                ..
            }
        ),
        "{err}"
    );

    let mut nan = s.clone();
    nan[1] = f32::NAN;
    let err = Tokenizer::new(t.clone(), nan, y.clone(), specials()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::NanScore { id: 1, .. }),
        "{err}"
    );

    let mut missing = t.clone();
    missing[4 + 0x41] = "A".into();
    let err = Tokenizer::new(missing, s.clone(), y.clone(), specials()).unwrap_err();
    assert_eq!(
        err,
        TokenizerError::MissingByteToken {
            text: "<0x41>".into()
        }
    );
    assert!(err.to_string().contains("<0x41>"));

    let mut malformed = t.clone();
    malformed.push("<0xZZ>".into());
    let (mut s2, mut y2) = (s.clone(), y.clone());
    s2.push(0.0);
    y2.push(BYTE);
    let err = Tokenizer::new(malformed, s2, y2, specials()).unwrap_err();
    assert!(
        matches!(err, TokenizerError::MalformedByteToken { .. }),
        "{err}"
    );

    let n = t.len() as u32;
    let mut sp = specials();
    sp.end_of_turn = Some(n);
    let err = Tokenizer::new(t, s, y, sp).unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::SpecialOutOfRange {
                role: "end_of_turn",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn negative_zero_scores_tie_with_zero() {
    // -0.0 == 0.0 in llama.cpp's comparison, so the tie goes to the leftmost pair.
    let tok = vocab_with_chars("abc", &[("ab", 0.0, NORMAL), ("bc", -0.0, NORMAL)]);
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["ab", "c"]));
    let tok = vocab_with_chars("abc", &[("ab", -0.0, NORMAL), ("bc", 0.0, NORMAL)]);
    assert_eq!(tok.encode("abc", false, false), ids(&tok, &["ab", "c"]));
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let tok = vocab_with_chars("a", &[]);
    let crab = "🦀".as_bytes(); // F0 9F A6 80
    let byte_ids: Vec<u32> = crab
        .iter()
        .map(|b| tok.token_id(&format!("<0x{b:02X}>")).unwrap())
        .collect();
    let mut dec = tok.stream_decoder(false);
    assert_eq!(dec.push(tok.token_id("a").unwrap()).unwrap(), "a");
    for &id in &byte_ids[..3] {
        assert_eq!(dec.push(id).unwrap(), "");
    }
    assert_eq!(dec.push(byte_ids[3]).unwrap(), "🦀");
    assert_eq!(dec.finish(), "");
}

#[test]
fn stream_decoder_replaces_invalid_bytes_and_keeps_what_follows() {
    let tok = vocab_with_chars("a", &[]);
    let b = |x: u8| tok.token_id(&format!("<0x{x:02X}>")).unwrap();
    let a = tok.token_id("a").unwrap();
    let mut dec = tok.stream_decoder(false);
    // An invalid lead byte is replaced at once.
    assert_eq!(dec.push(b(0xFF)).unwrap(), "\u{FFFD}");
    // An incomplete sequence broken by a valid character: one U+FFFD, then the character.
    assert_eq!(dec.push(b(0xE2)).unwrap(), "");
    assert_eq!(dec.push(b(0x82)).unwrap(), "");
    assert_eq!(dec.push(a).unwrap(), "\u{FFFD}a");
    // A lead byte whose next byte is out of its range is hopeless at once.
    assert_eq!(dec.push(b(0xE0)).unwrap(), "");
    assert_eq!(dec.push(b(0x80)).unwrap(), "\u{FFFD}\u{FFFD}");
    // Unknown ids are errors that change nothing.
    assert_eq!(dec.push(b(0xC3)).unwrap(), "");
    assert_eq!(dec.push(u32::MAX), Err(TokenizerError::UnknownId(u32::MAX)));
    assert_eq!(dec.push(b(0xA9)).unwrap(), "é");
    // What is left at the end is flushed lossily.
    assert_eq!(dec.push(b(0xF0)).unwrap(), "");
    assert_eq!(dec.finish(), "\u{FFFD}");
    assert_eq!(dec.finish(), "");
}

#[test]
fn stream_output_equals_decode() {
    let tok = vocab_with_chars("a▁", &[("▁a", 0.0, NORMAL), ("<c>", 0.0, CONTROL)]);
    let byte = |x: u8| tok.token_id(&format!("<0x{x:02X}>")).unwrap();
    let a = tok.token_id("a").unwrap();
    let c = tok.token_id("<c>").unwrap();
    let mut seq: Vec<u32> = vec![2, a, c];
    seq.extend("é🦀 ".bytes().map(byte));
    seq.extend([
        byte(0xF0),
        byte(0x9F),
        a,
        byte(0xC3),
        byte(0xFF),
        byte(0xE2),
        byte(0x82),
    ]);
    for special in [false, true] {
        // Every prefix, so every possible cut is exercised.
        for end in 0..=seq.len() {
            let mut dec = tok.stream_decoder(special);
            let mut streamed = String::new();
            for &id in &seq[..end] {
                streamed += &dec.push(id).unwrap();
            }
            streamed += &dec.finish();
            assert_eq!(streamed, tok.decode(&seq[..end], special).unwrap());
        }
    }
}

#[test]
fn round_trip_with_byte_fallback() {
    let tok = vocab_with_chars("ab▁\n", &[("▁a", -1.0, NORMAL), ("\n\n", 0.0, USER)]);
    for s in ["", " ", "  a b  ", "a\n\n\nb", "日本語 🦀 é", "\t\r\0"] {
        assert_eq!(tok.decode(&tok.encode(s, true, false), false).unwrap(), s);
    }
}

#[test]
fn token_type_from_i32() {
    assert_eq!(TokenType::try_from(1), Ok(TokenType::Normal));
    assert_eq!(TokenType::try_from(6), Ok(TokenType::Byte));
    assert_eq!(TokenType::try_from(0), Err(0));
    assert_eq!(TokenType::try_from(7), Err(7));
}
