//! Metadata values.

/// One metadata value. The variant order follows the GGUF value-type ids (0 = `U8` … 12 = `F64`).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// type 0
    U8(u8),
    /// type 1
    I8(i8),
    /// type 2
    U16(u16),
    /// type 3
    I16(i16),
    /// type 4
    U32(u32),
    /// type 5
    I32(i32),
    /// type 6
    F32(f32),
    /// type 7 (stored as one byte, 0 or 1)
    Bool(bool),
    /// type 8
    String(String),
    /// type 9
    Array(Array),
    /// type 10
    U64(u64),
    /// type 11
    I64(i64),
    /// type 12
    F64(f64),
}

/// A metadata array. Arrays are typed so that e.g. 262144 token strings are one [`StringArray`]
/// rather than 262144 boxed [`Value`]s. An array of arrays may hold arrays of different types.
#[derive(Clone, Debug, PartialEq)]
pub enum Array {
    /// elements of type 0
    U8(Vec<u8>),
    /// elements of type 1
    I8(Vec<i8>),
    /// elements of type 2
    U16(Vec<u16>),
    /// elements of type 3
    I16(Vec<i16>),
    /// elements of type 4
    U32(Vec<u32>),
    /// elements of type 5
    I32(Vec<i32>),
    /// elements of type 6
    F32(Vec<f32>),
    /// elements of type 7
    Bool(Vec<bool>),
    /// elements of type 8
    String(StringArray),
    /// elements of type 9
    Array(Vec<Array>),
    /// elements of type 10
    U64(Vec<u64>),
    /// elements of type 11
    I64(Vec<i64>),
    /// elements of type 12
    F64(Vec<f64>),
}

/// GGUF value-type id of an array.
pub(crate) const TYPE_ARRAY: u32 = 9;
/// GGUF value-type id of a string.
pub(crate) const TYPE_STRING: u32 = 8;

/// Name of a scalar GGUF value type, for messages.
pub(crate) fn type_id_name(id: u32) -> &'static str {
    match id {
        0 => "u8",
        1 => "i8",
        2 => "u16",
        3 => "i16",
        4 => "u32",
        5 => "i32",
        6 => "f32",
        7 => "bool",
        8 => "string",
        9 => "array",
        10 => "u64",
        11 => "i64",
        12 => "f64",
        _ => "unknown",
    }
}

impl Value {
    /// The GGUF value-type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => TYPE_STRING,
            Value::Array(_) => TYPE_ARRAY,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// A short description of the type, e.g. `"u32"` or `"array of string"`.
    pub fn type_name(&self) -> String {
        match self {
            Value::Array(a) => format!("array of {}", a.elem_type_name()),
            v => type_id_name(v.type_id()).to_string(),
        }
    }

    /// The value as an integer, if it is one of the integer types (`i128` holds them all).
    pub(crate) fn as_integer(&self) -> Option<i128> {
        match *self {
            Value::U8(x) => Some(x.into()),
            Value::I8(x) => Some(x.into()),
            Value::U16(x) => Some(x.into()),
            Value::I16(x) => Some(x.into()),
            Value::U32(x) => Some(x.into()),
            Value::I32(x) => Some(x.into()),
            Value::U64(x) => Some(x.into()),
            Value::I64(x) => Some(x.into()),
            _ => None,
        }
    }
}

impl Array {
    /// The GGUF value-type id of the elements.
    pub fn elem_type_id(&self) -> u32 {
        match self {
            Array::U8(_) => 0,
            Array::I8(_) => 1,
            Array::U16(_) => 2,
            Array::I16(_) => 3,
            Array::U32(_) => 4,
            Array::I32(_) => 5,
            Array::F32(_) => 6,
            Array::Bool(_) => 7,
            Array::String(_) => TYPE_STRING,
            Array::Array(_) => TYPE_ARRAY,
            Array::U64(_) => 10,
            Array::I64(_) => 11,
            Array::F64(_) => 12,
        }
    }

    /// Name of the element type, e.g. `"string"`.
    pub fn elem_type_name(&self) -> &'static str {
        type_id_name(self.elem_type_id())
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Array::U8(v) => v.len(),
            Array::I8(v) => v.len(),
            Array::U16(v) => v.len(),
            Array::I16(v) => v.len(),
            Array::U32(v) => v.len(),
            Array::I32(v) => v.len(),
            Array::F32(v) => v.len(),
            Array::Bool(v) => v.len(),
            Array::String(v) => v.len(),
            Array::Array(v) => v.len(),
            Array::U64(v) => v.len(),
            Array::I64(v) => v.len(),
            Array::F64(v) => v.len(),
        }
    }

    /// True if the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements if this is an array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn as_strings(&self) -> Option<&StringArray> {
        match self {
            Array::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of f32 (e.g. `tokenizer.ggml.scores`).
    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            Array::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of i32 (e.g. `tokenizer.ggml.token_type`).
    pub fn as_i32s(&self) -> Option<&[i32]> {
        match self {
            Array::I32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of u32.
    pub fn as_u32s(&self) -> Option<&[u32]> {
        match self {
            Array::U32(v) => Some(v),
            _ => None,
        }
    }
}

/// An array of strings held as one text buffer and the offsets of its elements, so that a
/// vocabulary's 262 144 token texts take two allocations instead of one each. (Reading the real
/// file's as a `Vec<String>` and freeing them again took a large share of loading a tokenizer.)
#[derive(Clone, PartialEq, Eq)]
pub struct StringArray {
    /// The elements, concatenated.
    text: String,
    /// (len + 1,) byte offsets into `text`: element i is `text[ends[i]..ends[i + 1]]`. Always starts
    /// with 0; every offset is a char boundary because each element was a whole `str` when pushed.
    ends: Vec<usize>,
}

impl StringArray {
    /// An empty array with room for `n` elements (the text buffer grows as
    /// they come: a file does not say their total length up front).
    pub fn with_capacity(n: usize) -> Self {
        let mut ends = Vec::with_capacity(n + 1);
        ends.push(0);
        Self {
            text: String::new(),
            ends,
        }
    }

    /// Appends one element.
    pub fn push(&mut self, s: &str) {
        self.text.push_str(s);
        self.ends.push(self.text.len());
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.ends.len() - 1
    }

    /// True if the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&str> {
        let (&start, &end) = (self.ends.get(i)?, self.ends.get(i.checked_add(1)?)?);
        Some(&self.text[start..end])
    }

    /// The elements in order.
    pub fn iter(&self) -> StringArrayIter<'_> {
        StringArrayIter {
            text: &self.text,
            ends: self.ends.windows(2),
        }
    }

    /// All elements concatenated, in order.
    pub fn concatenated(&self) -> &str {
        &self.text
    }
}

impl std::ops::Index<usize> for StringArray {
    type Output = str;

    /// Element `i`; panics past the end, as a slice does.
    fn index(&self, i: usize) -> &str {
        match self.get(i) {
            Some(s) => s,
            None => panic!("index {i} out of range for a StringArray of {}", self.len()),
        }
    }
}

impl Default for StringArray {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl std::fmt::Debug for StringArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<S: AsRef<str>> FromIterator<S> for StringArray {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut a = Self::default();
        for s in iter {
            a.push(s.as_ref());
        }
        a
    }
}

impl From<Vec<String>> for StringArray {
    fn from(v: Vec<String>) -> Self {
        v.iter().collect()
    }
}

impl<'a> IntoIterator for &'a StringArray {
    type Item = &'a str;
    type IntoIter = StringArrayIter<'a>;

    fn into_iter(self) -> StringArrayIter<'a> {
        self.iter()
    }
}

/// The elements of a [`StringArray`], in order.
#[derive(Clone, Debug)]
pub struct StringArrayIter<'a> {
    text: &'a str,
    ends: std::slice::Windows<'a, usize>,
}

impl<'a> Iterator for StringArrayIter<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        self.ends.next().map(|w| &self.text[w[0]..w[1]])
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.ends.size_hint()
    }
}

impl ExactSizeIterator for StringArrayIter<'_> {}

impl DoubleEndedIterator for StringArrayIter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.ends.next_back().map(|w| &self.text[w[0]..w[1]])
    }
}

#[cfg(test)]
mod tests {
    use super::StringArray;

    #[test]
    fn string_array_elements() {
        let a = StringArray::from(vec!["ab".to_string(), String::new(), "ü▁c".to_string()]);
        assert_eq!(a.len(), 3);
        assert!(!a.is_empty());
        assert_eq!(a.get(0), Some("ab"));
        assert_eq!(a.get(1), Some(""));
        assert_eq!(a.get(2), Some("ü▁c"));
        assert_eq!((a.get(3), a.get(usize::MAX)), (None, None));
        assert_eq!(&a[2], "ü▁c");
        assert_eq!(a.iter().collect::<Vec<_>>(), ["ab", "", "ü▁c"]);
        assert_eq!(a.iter().rev().collect::<Vec<_>>(), ["ü▁c", "", "ab"]);
        assert_eq!(a.iter().len(), 3);
        assert_eq!(a.concatenated(), "abü▁c");
        assert_eq!(format!("{a:?}"), r#"["ab", "", "ü▁c"]"#);

        // Equal texts split differently are different arrays; empty ones are equal however made.
        let split = |parts: &[&str]| parts.iter().collect::<StringArray>();
        assert_ne!(split(&["ab", "c"]), split(&["a", "bc"]));
        assert_ne!(split(&[""]), StringArray::default());
        assert_eq!(StringArray::from(vec![]), StringArray::default());
        assert_eq!(StringArray::default().len(), 0);
        assert_eq!(StringArray::default().iter().next(), None);
    }

    #[test]
    #[should_panic(expected = "index 1 out of range for a StringArray of 1")]
    fn string_array_index_past_the_end() {
        let a: StringArray = ["x"].into_iter().collect();
        let _ = &a[1];
    }
}
