//! llama.cpp's GBNF grammars, read and rewritten in the Lark-like syntax
//! the constraint engine (llguidance) compiles.
//!
//! GBNF (llama.cpp's `grammars/README.md`): rules `name ::= alternatives`,
//! `root` the start; terminals are `"literals"` (escapes `\n \r \t \\ \"
//! \[ \] \xHH \uHHHH \UHHHHHHHH`), character classes `[a-z]` / `[^...]` and
//! `.` (any character); `( )` groups; `* + ?` and `{m}` `{m,}` `{m,n}`
//! `{,n}` repeat; `#` starts a comment. A rule ends at a line's end unless
//! inside parentheses or just after `|`.
//!
//! GBNF matches characters, while llguidance splits text into lexemes
//! greedily: a literal `"ab"` as one lexeme would refuse `a` `bc` where
//! the grammar `"ab" | "a" "bc"` allows it. So every terminal is written
//! as lexemes of one character each, which gives GBNF's meaning exactly.

use std::collections::HashMap;
use std::fmt::Write;

/// A GBNF text that does not parse (the message names the line), lacks a
/// `root` rule or uses a rule it never defines.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("GBNF grammar: {0}")]
pub struct GbnfError(pub String);

#[derive(Clone, Debug, PartialEq)]
enum Item {
    /// One character from the set (or outside it, when negated).
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// Any one character.
    Any,
    Rule(String),
    Group(Vec<Vec<Item>>),
    Repeat {
        item: Box<Item>,
        min: usize,
        max: Option<usize>,
    },
}

/// Counts of `{m,n}` must be below this (llama.cpp expands a repetition
/// into copies and refuses 2000 of them).
const MAX_REPEAT: usize = 2000;

/// Longest chain of rules, each reached first through the one before, that
/// a grammar may have (the compiler recurses once a rule).
const MAX_CHAIN: usize = 1000;

/// Most one-character terminals a grammar may hold in all (each is a symbol
/// of llguidance's grammar, which holds fewer than 65 526): about 800
/// labels of 40 characters.
const MAX_TERMINALS: usize = 32_000;

/// Deepest nesting of parentheses and repetitions a grammar may have: the
/// reader and the rewriting recurse once per level, and llguidance reads
/// no Lark nested 30 deep (ours adds a level per literal). Grammars people
/// write nest a handful deep.
const MAX_DEPTH: usize = 24;

struct Parser<'a> {
    src: &'a [u8],
    text: &'a str,
    pos: usize,
    /// Parentheses open at `pos`.
    depth: usize,
}

impl<'a> Parser<'a> {
    fn line(&self) -> usize {
        1 + self.src[..self.pos.min(self.src.len())]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, GbnfError> {
        Err(GbnfError(format!("line {}: {}", self.line(), msg.into())))
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    /// Spaces, tabs and comments; line ends too when `newline_ok`.
    fn space(&mut self, newline_ok: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => self.pos += 1,
                b'\r' | b'\n' if newline_ok => self.pos += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n' && c != b'\r') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.pos;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            self.pos += 1;
        }
        (self.pos > start).then(|| self.text[start..self.pos].to_string())
    }

    /// The next character of a literal or class, with its escapes.
    fn char(&mut self) -> Result<char, GbnfError> {
        let rest = &self.text[self.pos..];
        let Some(c) = rest.chars().next() else {
            return self.err("unexpected end of grammar");
        };
        if c != '\\' {
            self.pos += c.len_utf8();
            return Ok(c);
        }
        let Some(e) = rest[1..].chars().next() else {
            return self.err("unexpected end of grammar after '\\'");
        };
        self.pos += 1 + e.len_utf8();
        let hex = |p: &mut Self, n: usize| -> Result<char, GbnfError> {
            let digits = p.text.get(p.pos..p.pos + n).unwrap_or("");
            let v = (digits.len() == n && digits.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(digits, 16).ok())
                .flatten();
            let Some(v) = v else {
                return p.err(format!("'\\{e}' needs {n} hex digits"));
            };
            match char::from_u32(v) {
                Some(c) => {
                    p.pos += n;
                    Ok(c)
                }
                None => p.err(format!("'\\{e}{digits}' is not a Unicode character")),
            }
        };
        match e {
            'x' => hex(self, 2),
            'u' => hex(self, 4),
            'U' => hex(self, 8),
            'n' => Ok('\n'),
            'r' => Ok('\r'),
            't' => Ok('\t'),
            '\\' | '"' | '[' | ']' | '-' => Ok(e),
            other => self.err(format!("unknown escape '\\{other}'")),
        }
    }

    fn alternates(&mut self, nested: bool) -> Result<Vec<Vec<Item>>, GbnfError> {
        let mut alts = vec![self.sequence(nested)?];
        while self.peek() == Some(b'|') {
            self.pos += 1;
            self.space(true);
            alts.push(self.sequence(nested)?);
        }
        Ok(alts)
    }

    fn sequence(&mut self, nested: bool) -> Result<Vec<Item>, GbnfError> {
        let mut seq: Vec<Item> = Vec::new();
        while let Some(c) = self.peek() {
            match c {
                b'"' => {
                    self.pos += 1;
                    let mut chars = Vec::new();
                    loop {
                        match self.peek() {
                            None => return self.err("unterminated string literal"),
                            Some(b'"') => break,
                            Some(_) => chars.push(self.char()?),
                        }
                    }
                    self.pos += 1;
                    // Each character its own lexeme (see the module's note);
                    // an empty literal matches the empty text.
                    let lit = chars.into_iter().map(|c| Item::Class {
                        negated: false,
                        ranges: vec![(c, c)],
                    });
                    seq.push(Item::Group(vec![lit.collect()]));
                }
                b'[' => {
                    self.pos += 1;
                    let negated = self.peek() == Some(b'^');
                    if negated {
                        self.pos += 1;
                    }
                    let mut ranges = Vec::new();
                    loop {
                        match self.peek() {
                            None => return self.err("unterminated character class"),
                            Some(b']') => break,
                            Some(_) => {
                                let lo = self.char()?;
                                let hi = if self.peek() == Some(b'-')
                                    && self.src.get(self.pos + 1) != Some(&b']')
                                {
                                    self.pos += 1;
                                    self.char()?
                                } else {
                                    lo
                                };
                                if hi < lo {
                                    return self.err(format!(
                                        "character range '{lo}-{hi}' runs backwards"
                                    ));
                                }
                                ranges.push((lo, hi));
                            }
                        }
                    }
                    self.pos += 1;
                    if ranges.is_empty() && !negated {
                        return self.err("empty character class '[]' matches nothing");
                    }
                    seq.push(Item::Class { negated, ranges });
                }
                b'.' => {
                    self.pos += 1;
                    seq.push(Item::Any);
                }
                b'(' => {
                    if self.depth == MAX_DEPTH {
                        return self.err(format!("parentheses nest more than {MAX_DEPTH} deep"));
                    }
                    self.pos += 1;
                    self.depth += 1;
                    self.space(true);
                    let alts = self.alternates(true)?;
                    if self.peek() != Some(b')') {
                        return self.err("expected ')'");
                    }
                    self.pos += 1;
                    self.depth -= 1;
                    seq.push(Item::Group(alts));
                }
                b'*' | b'+' | b'?' | b'{' => {
                    let Some(last) = seq.pop() else {
                        return self
                            .err(format!("'{}' must follow something to repeat", c as char));
                    };
                    if self.depth + depth(&last) >= MAX_DEPTH {
                        return self.err(format!(
                            "repetitions and parentheses nest more than {MAX_DEPTH} deep"
                        ));
                    }
                    self.pos += 1;
                    let (min, max) = match c {
                        b'*' => (0, None),
                        b'+' => (1, None),
                        b'?' => (0, Some(1)),
                        _ => self.braces()?,
                    };
                    seq.push(Item::Repeat {
                        item: Box::new(last),
                        min,
                        max,
                    });
                }
                b'<' => return self.err("token references '<...>' are not supported"),
                c if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                    let name = self.name().expect("a name character");
                    seq.push(Item::Rule(name));
                }
                _ => break,
            }
            self.space(nested);
        }
        Ok(seq)
    }

    /// `{m}`, `{m,}`, `{m,n}` or `{,n}`, after the `{`.
    fn braces(&mut self) -> Result<(usize, Option<usize>), GbnfError> {
        let num = |p: &mut Self| -> Result<Option<usize>, GbnfError> {
            p.space(false);
            let start = p.pos;
            while p.peek().is_some_and(|c| c.is_ascii_digit()) {
                p.pos += 1;
            }
            let v = if p.pos > start {
                match p.text[start..p.pos].parse::<usize>() {
                    Ok(v) if v < MAX_REPEAT => Some(v),
                    _ => return p.err(format!("a repetition count is below {MAX_REPEAT}")),
                }
            } else {
                None
            };
            p.space(false);
            Ok(v)
        };
        let min = num(self)?;
        let (min, max) = if self.peek() == Some(b',') {
            self.pos += 1;
            (min.unwrap_or(0), num(self)?)
        } else {
            let Some(m) = min else {
                return self.err("expected a number after '{'");
            };
            (m, Some(m))
        };
        if self.peek() != Some(b'}') {
            return self.err("expected '}'");
        }
        self.pos += 1;
        if max.is_some_and(|max| max < min) {
            return self.err(format!(
                "repetition {{{min},{}}} runs backwards",
                max.unwrap_or(0)
            ));
        }
        Ok((min, max))
    }
}

/// The rules `items` name, in order (with repeats).
fn refs<'i>(items: &'i [Item], out: &mut Vec<&'i str>) {
    for it in items {
        match it {
            Item::Rule(n) => out.push(n),
            Item::Group(alts) => alts.iter().for_each(|a| refs(a, out)),
            Item::Repeat { item, .. } => refs(std::slice::from_ref(item), out),
            _ => {}
        }
    }
}

/// `X ::= α₁ X | … | β₁ | …`, where X appears only at the end of some
/// alternatives, as `X ::= (α₁ | …)* (β₁ | …)`: the same language, which
/// llguidance's parser reads with a fixed number of items, where right
/// recursion added items at each character (about 1600 characters of
/// `l ::= [a-z] l | [a-z]` exhausted them). `X ::= (α X)?`, the older
/// llama.cpp grammars' `ws`, is first read as `X ::= α X | ε`. Any other
/// use of X in its own rule leaves the rule as it is.
fn unroll_tail_recursion(name: &str, alts: &mut Vec<Vec<Item>>) {
    let mut work = alts.clone();
    if let [single] = work.as_slice() {
        if let [Item::Repeat {
            item,
            min: 0,
            max: Some(1),
        }] = single.as_slice()
        {
            if let Item::Group(inner) = &**item {
                let mut opened = inner.clone();
                opened.push(Vec::new());
                work = opened;
            }
        }
    }
    let mentions = |items: &[Item]| {
        let mut used = Vec::new();
        refs(items, &mut used);
        used.iter().filter(|n| **n == name).count()
    };
    let (mut prefixes, mut bases) = (Vec::new(), Vec::new());
    for a in work {
        match a.split_last() {
            Some((Item::Rule(n), head)) if n == name && mentions(head) == 0 => {
                if head.is_empty() {
                    return; // `X ::= X | …`: nothing to repeat.
                }
                prefixes.push(head.to_vec())
            }
            _ if mentions(&a) == 0 => bases.push(a),
            _ => return,
        }
    }
    if prefixes.is_empty() || bases.is_empty() {
        return;
    }
    let unrolled = vec![
        Item::Repeat {
            item: Box::new(Item::Group(prefixes)),
            min: 0,
            max: None,
        },
        Item::Group(bases),
    ];
    // (Within the nesting the reader allows, or left as it was.)
    if unrolled.iter().map(depth).max().unwrap_or(0) <= MAX_DEPTH {
        *alts = vec![unrolled];
    }
}

/// How deep `item` nests groups and repetitions.
fn depth(item: &Item) -> usize {
    match item {
        Item::Group(alts) => 1 + alts.iter().flatten().map(depth).max().unwrap_or(0),
        Item::Repeat { item, .. } => 1 + depth(item),
        _ => 0,
    }
}

/// Rewrite a GBNF grammar as the Lark-like text llguidance compiles: its
/// `root` rule is the start.
pub fn gbnf_to_lark(text: &str) -> Result<String, GbnfError> {
    let mut p = Parser {
        src: text.as_bytes(),
        text,
        pos: 0,
        depth: 0,
    };
    let mut rules: Vec<(String, Vec<Vec<Item>>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    loop {
        p.space(true);
        if p.peek().is_none() {
            break;
        }
        let Some(name) = p.name() else {
            return p.err("expected a rule name");
        };
        p.space(false);
        if !p.text[p.pos..].starts_with("::=") {
            return p.err(format!("expected '::=' after rule name '{name}'"));
        }
        p.pos += 3;
        p.space(true);
        let alts = p.alternates(false)?;
        match p.peek() {
            None | Some(b'\n') | Some(b'\r') => {}
            Some(c) => {
                return p.err(format!(
                    "unexpected '{}' in rule '{name}'",
                    p.text[p.pos..].chars().next().unwrap_or(c as char)
                ))
            }
        }
        // A rule given twice: the last definition holds (as llama.cpp).
        match index.get(&name) {
            Some(&i) => rules[i].1 = alts,
            None => {
                index.insert(name.clone(), rules.len());
                rules.push((name, alts));
            }
        }
    }
    let Some(&root) = index.get("root") else {
        return Err(GbnfError("the grammar has no 'root' rule".into()));
    };
    fn terminals(items: &[Item]) -> usize {
        items
            .iter()
            .map(|it| match it {
                Item::Class { .. } | Item::Any => 1,
                Item::Rule(_) => 0,
                Item::Group(alts) => alts.iter().map(|a| terminals(a)).sum(),
                Item::Repeat { item, .. } => terminals(std::slice::from_ref(item)),
            })
            .sum()
    }
    let total: usize = rules.iter().flat_map(|r| &r.1).map(|a| terminals(a)).sum();
    if total > MAX_TERMINALS {
        return Err(GbnfError(format!(
            "the grammar has {total} characters and classes in its terminals; at most {MAX_TERMINALS}"
        )));
    }
    for (name, alts) in rules.iter_mut() {
        unroll_tail_recursion(name, alts);
    }
    // Each rule's references, as rule indices; every rule used must be
    // defined (the first such name, in order, is the one reported).
    let mut edges: Vec<Vec<usize>> = Vec::with_capacity(rules.len());
    for (_, alts) in &rules {
        let mut used = Vec::new();
        alts.iter().for_each(|a| refs(a, &mut used));
        let to: Option<Vec<usize>> = used.iter().map(|n| index.get(*n).copied()).collect();
        match to {
            Some(to) => edges.push(to),
            None => {
                let n = used
                    .iter()
                    .filter(|n| !index.contains_key(**n))
                    .min()
                    .unwrap();
                return Err(GbnfError(format!("rule '{n}' is used but never defined")));
            }
        }
    }

    // How deep a compiler that follows each rule's references depth first
    // (as llguidance's does, recursing) goes: a chain of rules each naming
    // the next is refused past MAX_CHAIN.
    let mut seen = vec![false; rules.len()];
    let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
    seen[root] = true;
    while let Some(&mut (r, ref mut next)) = stack.last_mut() {
        match edges[r].get(*next) {
            Some(&to) => {
                *next += 1;
                if !seen[to] {
                    seen[to] = true;
                    stack.push((to, 0));
                    if stack.len() > MAX_CHAIN {
                        return Err(GbnfError(format!(
                            "rules reach more than {MAX_CHAIN} deep through one another (from 'root' to '{}')",
                            rules[to].0
                        )));
                    }
                }
            }
            None => {
                stack.pop();
            }
        }
    }

    // Rule i is `r{i}` in Lark (GBNF names may hold '-' and capitals).
    let mut out = format!("start: r{root}\n");
    for (i, (_, alts)) in rules.iter().enumerate() {
        let _ = writeln!(out, "r{i}: {}", lark_alts(alts, &index));
    }
    Ok(out)
}

fn lark_alts(alts: &[Vec<Item>], index: &HashMap<String, usize>) -> String {
    // An empty alternative: the rest, optional.
    let (empty, full): (Vec<_>, Vec<_>) = alts.iter().partition(|a| a.is_empty());
    let body: Vec<String> = full.iter().map(|a| lark_seq(a, index)).collect();
    match (empty.is_empty(), body.is_empty()) {
        (_, true) => "\"\"".into(),
        (true, false) => body.join(" | "),
        (false, false) => format!("({})?", body.join(" | ")),
    }
}

fn lark_seq(items: &[Item], index: &HashMap<String, usize>) -> String {
    let parts: Vec<String> = items.iter().map(|i| lark_item(i, index)).collect();
    parts.join(" ")
}

fn lark_item(item: &Item, index: &HashMap<String, usize>) -> String {
    match item {
        Item::Any => r"/(?s:.)/".into(),
        // `[^]`: any character.
        Item::Class { ranges, .. } if ranges.is_empty() => r"/(?s:.)/".into(),
        Item::Class { negated, ranges } => {
            let mut re = String::from(if *negated { "/[^" } else { "/[" });
            for &(lo, hi) in ranges {
                let _ = write!(re, "\\x{{{:x}}}", lo as u32);
                if hi != lo {
                    let _ = write!(re, "-\\x{{{:x}}}", hi as u32);
                }
            }
            re.push_str("]/");
            re
        }
        Item::Rule(n) => format!("r{}", index[n]),
        Item::Group(alts) => format!("({})", lark_alts(alts, index)),
        // `{0}`: nothing.
        Item::Repeat { max: Some(0), .. } => "\"\"".into(),
        Item::Repeat { item, min, max } => {
            let inner = lark_item(item, index);
            // (`"a"**`: Lark takes one operator after a value.)
            let inner = match **item {
                Item::Repeat { .. } => format!("({inner})"),
                _ => inner,
            };
            match (min, max) {
                (0, None) => format!("{inner}*"),
                (1, None) => format!("{inner}+"),
                (0, Some(1)) => format!("{inner}?"),
                (m, None) => format!("{inner}{{{m},}}"),
                (m, Some(n)) if m == n => format!("{inner}{{{m}}}"),
                (m, Some(n)) => format!("{inner}{{{m},{n}}}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::ApproximateTokEnv;
    use llguidance::{Matcher, ParserFactory};

    #[derive(Debug, PartialEq)]
    enum Verdict {
        /// The whole text matches.
        Match,
        /// A prefix of some match, not one itself.
        Prefix,
        /// The grammar refuses it.
        Refused,
    }
    use Verdict::*;

    /// What the rewritten grammar says of `input`, one byte at a time.
    fn judge(gbnf: &str, input: &str) -> Verdict {
        let env = ApproximateTokEnv::single_byte_env();
        let mut f = ParserFactory::new_simple(&env).unwrap();
        f.quiet();
        let lark = gbnf_to_lark(gbnf).unwrap();
        let mut m = Matcher::new(f.create_parser(TopLevelGrammar::from_lark(lark.clone())));
        assert!(m.get_error().is_none(), "{lark}: {:?}", m.get_error());
        for t in env.tok_trie().greedy_tokenize(input.as_bytes()) {
            if m.consume_token(t).is_err() {
                return Refused;
            }
        }
        if m.is_accepting().unwrap() {
            Match
        } else {
            Prefix
        }
    }

    #[test]
    fn literals_are_matched_character_by_character() {
        // One lexeme per literal would take "ab" greedily and refuse "abc".
        let g = r#"root ::= "ab" | "a" "bc""#;
        assert_eq!(judge(g, "abc"), Match);
        assert_eq!(judge(g, "ab"), Match);
        assert_eq!(judge(g, "a"), Prefix);
        assert_eq!(judge(g, "abd"), Refused);
    }

    #[test]
    fn classes_any_and_escapes() {
        let g = r#"root ::= [a-c]+ [^x]"#;
        assert_eq!(judge(g, "abz"), Match);
        assert_eq!(judge(g, "ab\n"), Match);
        assert_eq!(judge(g, "abcd"), Match);
        assert_eq!(judge(g, "xa"), Refused);
        assert_eq!(judge(r#"root ::= . "z""#, "\nz"), Match);
        assert_eq!(judge(r#"root ::= . "z""#, "éz"), Match);
        assert_eq!(
            judge(r#"root ::= "\x41\u00e9\n\"\\" [\]\[]"#, "Aé\n\"\\]"),
            Match
        );
        assert_eq!(judge(r#"root ::= [-a]"#, "-"), Match);
        assert_eq!(judge(r#"root ::= [a-]"#, "-"), Match);
        assert_eq!(judge(r#"root ::= [^]"#, "q"), Match);
        assert_eq!(judge(r#"root ::= [a\-z]+"#, "-a-z"), Match);
        assert_eq!(judge(r#"root ::= [a\-z]+"#, "b"), Refused);
    }

    #[test]
    fn repetitions() {
        let g = r#"root ::= "x"{2,3}"#;
        assert_eq!(judge(g, "x"), Prefix);
        assert_eq!(judge(g, "xx"), Match);
        assert_eq!(judge(g, "xxx"), Match);
        assert_eq!(judge(g, "xxxx"), Refused);
        assert_eq!(judge(r#"root ::= "x"{2}"#, "xxx"), Refused);
        assert_eq!(judge(r#"root ::= "x"{2,}"#, "xxxxx"), Match);
        assert_eq!(judge(r#"root ::= "x"{,2} "y""#, "y"), Match);
        assert_eq!(judge(r#"root ::= "x"{,2} "y""#, "xxxy"), Refused);
        assert_eq!(judge(r#"root ::= ("a" "b")? "c""#, "abc"), Match);
        // Operators stacked (llama.cpp takes them), and a count of 0.
        assert_eq!(judge(r#"root ::= "a"**"#, "aaa"), Match);
        assert_eq!(judge(r#"root ::= "a"{2}{3} "b""#, "aaaaaab"), Match);
        assert_eq!(judge(r#"root ::= "a"{2}{3} "b""#, "aaaab"), Refused);
        assert_eq!(judge(r#"root ::= [a-z]{2}+"#, "abc"), Prefix);
        assert_eq!(judge(r#"root ::= "x" "a"{0} "y""#, "xy"), Match);
        assert_eq!(judge(r#"root ::= "x" "a"{0,0} "y""#, "xay"), Refused);
        assert_eq!(judge(r#"root ::= ("a" "b")? "c""#, "ac"), Refused);
    }

    #[test]
    fn rules_comments_and_line_ends() {
        let g = "# numbers\nroot ::= item (\",\" item)*   # a list\nitem ::= [0-9]+\n";
        assert_eq!(judge(g, "1,22,3"), Match);
        assert_eq!(judge(g, "1,"), Prefix);
        assert_eq!(judge(g, "1,,"), Refused);
        // A rule goes on after '|' and inside parentheses.
        let g = "root ::= \"a\" |\n  \"b\"\nother ::= (\n \"c\"\n | \"d\")";
        assert_eq!(judge(g, "b"), Match);
        // An empty alternative, a name with '-'.
        let g = "root ::= \"a\" opt-b\nopt-b ::= | \"b\"";
        assert_eq!(judge(g, "a"), Match);
        assert_eq!(judge(g, "ab"), Match);
        // A rule given twice: the last holds (llama.cpp's add_rule replaces).
        let g = "root ::= \"a\"\nroot ::= \"z\"";
        assert_eq!(judge(g, "a"), Refused);
        assert_eq!(judge(g, "z"), Match);
        assert_eq!(judge(r#"root ::= """#, ""), Match);
    }

    #[test]
    fn tail_recursion_is_unrolled_into_the_same_language() {
        let g = "root ::= [a-z ] root | [a-z ]";
        assert_eq!(judge(g, "ab c"), Match);
        assert_eq!(judge(g, ""), Prefix);
        assert_eq!(judge(g, "ab1"), Refused);
        // r0 no longer names itself.
        let lark = gbnf_to_lark(g).unwrap();
        let r0 = lark.lines().find(|l| l.starts_with("r0:")).unwrap();
        assert!(!r0[3..].contains("r0"), "{lark}");
        // Several tails, and an empty base.
        let g = "root ::= \"a\" root | \"b\" root | \"c\" | ";
        for (text, v) in [
            ("abbac", Match),
            ("ab", Match),
            ("", Match),
            ("ca", Refused),
        ] {
            assert_eq!(judge(g, text), v, "{text:?}");
        }
        // The older llama.cpp grammars' optional whitespace.
        let g = "root ::= \"a\" ws \"b\"\nws ::= ([ \\t] ws)?";
        assert_eq!(judge(g, "a \t b"), Match);
        assert_eq!(judge(g, "ab"), Match);
        assert_eq!(judge(g, "a x"), Refused);
        // Recursion elsewhere than at the end stays (and still works).
        let g = "root ::= \"(\" root \")\" | \"x\"";
        assert_eq!(judge(g, "((x))"), Match);
        assert_eq!(judge(g, "((x)"), Prefix);
        let lark = gbnf_to_lark(g).unwrap();
        assert!(lark
            .lines()
            .any(|l| l.starts_with("r0:") && l[3..].contains("r0")));
    }

    #[test]
    fn bad_grammars_say_what_is_wrong() {
        let err = |g: &str| gbnf_to_lark(g).unwrap_err().0;
        assert!(err("item ::= \"a\"").contains("no 'root' rule"));
        assert!(err("root ::= item").contains("rule 'item' is used but never defined"));
        assert!(err("root ::= \"abc").contains("line 1: unterminated string"));
        assert!(err("root ::= \"a\"\nx ::= [abc").contains("line 2: unterminated character class"));
        assert!(err(r#"root ::= "\q""#).contains("unknown escape '\\q'"));
        assert!(err(r#"root ::= "\x4""#).contains("hex digits"));
        assert!(
            err(r#"root ::= "\U00110000""#).contains(r"'\U00110000' is not a Unicode character")
        );
        assert!(err(r#"root ::= "\uD800""#).contains("not a Unicode character"));
        let labels: Vec<String> = (0..2000)
            .map(|i| format!("\"label number {i:05}\""))
            .collect();
        let many = format!("root ::= {}", labels.join(" | "));
        assert!(err(&many).contains("at most 32000"));
        assert!(err("root ::= [z-a]").contains("runs backwards"));
        assert!(err("root ::= \"a\"{3,1}").contains("runs backwards"));
        assert!(err("root ::= \"a\"{2000}").contains("below 2000"));
        assert!(err("root ::= * \"a\"").contains("must follow something"));
        assert!(err("root ::= <[1000]>").contains("token references"));
        assert!(err("root = \"a\"").contains("expected '::='"));
        assert!(err("root ::= (\"a\"").contains("expected ')'"));
        assert!(err("root ::= \"a\" )").contains("unexpected ')'"));
        assert!(err("root ::= []").contains("matches nothing"));
        // A chain of 1001 rules, each naming the next.
        let chain: String = (0..=MAX_CHAIN)
            .map(|i| format!("a{i} ::= a{}\n", i + 1))
            .collect();
        let g = format!("root ::= a0\n{chain}a{} ::= \"x\"\n", MAX_CHAIN + 1);
        assert!(err(&g).contains("more than 1000 deep"));
        // Many rules side by side are not a chain.
        let labels: String = (0..3000).map(|i| format!("l{i} ::= \"{i}\"\n")).collect();
        let names: Vec<String> = (0..3000).map(|i| format!("l{i}")).collect();
        assert!(gbnf_to_lark(&format!("root ::= {}\n{labels}", names.join(" | "))).is_ok());
        // Nesting deep enough to overflow a recursive reader is refused.
        let deep = format!(
            "root ::= {}\"a\"{}",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        assert!(err(&deep).contains("nest more than 24 deep"));
        assert!(err(&format!("root ::= \"a\"{}", "*".repeat(100_000))).contains("nest more than"));
        // 24 levels are fine, and compile (see the grammar module's tests).
        let ok = format!("root ::= {}\"a\"{}", "(".repeat(23), ")".repeat(23));
        assert!(gbnf_to_lark(&ok).is_ok());
    }
}
