//! Reading int64 arrays from `.npy` files (NumPy's format 1.0, 2.0 and 3.0), with a strict parser
//! of the header's dictionary: only the literal NumPy writes (`{'descr': '<i8', 'fortran_order':
//! False, 'shape': (2, 7), }`) is accepted. A general Python-literal parser is not used on
//! purpose: the one `ndarray-npy` uses takes exponential time on nested brackets, so that a
//! 128-byte header hangs it (found by the `npy` fuzz target).
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use anyhow::{bail, ensure, Context, Result};

const MAGIC: &[u8] = b"\x93NUMPY";

/// The largest header accepted (NumPy writes headers of a few dozen bytes, padded to 64).
const MAX_HEADER: usize = 64 << 10;

/// The most dimensions accepted (NumPy's own limit).
const MAX_DIMS: usize = 64;

/// A C-order int64 array: its shape and its elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I64Array {
    pub shape: Vec<usize>,
    pub data: Vec<i64>,
}

/// Parses an `.npy` file's bytes as an int64 array. The declared shape is checked against the
/// bytes present before anything is allocated for it.
pub fn read_i64(bytes: &[u8]) -> Result<I64Array> {
    let ends = "the file ends in its header";
    let rest = bytes
        .strip_prefix(MAGIC)
        .context("not an .npy file (no \\x93NUMPY magic)")?;
    let (&major, rest) = rest.split_first().context(ends)?;
    let (_minor, rest) = rest.split_first().context(ends)?;
    let (header_len, rest) = match major {
        1 => {
            let (len, rest) = rest.split_first_chunk::<2>().context(ends)?;
            (usize::from(u16::from_le_bytes(*len)), rest)
        }
        2 | 3 => {
            let (len, rest) = rest.split_first_chunk::<4>().context(ends)?;
            let len = u32::from_le_bytes(*len);
            (usize::try_from(len).unwrap_or(usize::MAX), rest)
        }
        v => bail!("format version {v} is not one NumPy writes (1, 2 or 3)"),
    };
    ensure!(
        header_len <= MAX_HEADER,
        "a header of {header_len} bytes is longer than the {MAX_HEADER} accepted"
    );
    let (header, data) = rest.split_at_checked(header_len).context(ends)?;
    let header = std::str::from_utf8(header).context("the header is not text")?;
    let fields = parse_header(header)?;
    ensure!(
        fields.descr == "<i8" || (fields.descr == "=i8" && cfg!(target_endian = "little")),
        "the elements are {:?}; int64 little-endian ('<i8') is required",
        fields.descr
    );
    ensure!(
        !fields.fortran_order || fields.shape.len() <= 1,
        "Fortran-order arrays are not read; write the ids in C order"
    );
    let count = fields
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .context("the shape's element count overflows")?;
    let expected = count.checked_mul(8).context("the shape's size overflows")?;
    ensure!(
        data.len() == expected,
        "the shape {:?} needs {expected} bytes of data, the file has {}",
        fields.shape,
        data.len()
    );
    let (elements, _) = data.as_chunks::<8>();
    Ok(I64Array {
        shape: fields.shape,
        data: elements.iter().map(|&c| i64::from_le_bytes(c)).collect(),
    })
}

struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// The header's dictionary: exactly the keys `descr`, `fortran_order` and `shape`, in any order.
fn parse_header(text: &str) -> Result<Header> {
    let text = text.trim_end_matches(['\n', ' ', '\0']).as_bytes();
    let mut p = Parser {
        whole: text.len(),
        rest: text,
    };
    let (mut descr, mut fortran_order, mut shape) = (None, None, None);
    p.expect(b'{')?;
    loop {
        p.skip_spaces();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.skip_spaces();
        p.expect(b':')?;
        p.skip_spaces();
        match key.as_str() {
            "descr" if descr.is_none() => descr = Some(p.string()?),
            "fortran_order" if fortran_order.is_none() => fortran_order = Some(p.boolean()?),
            "shape" if shape.is_none() => shape = Some(p.tuple()?),
            _ => bail!("the header has an unexpected or repeated key {key:?}"),
        }
        p.skip_spaces();
        if !p.eat(b',') {
            p.skip_spaces();
            p.expect(b'}')?;
            break;
        }
    }
    p.skip_spaces();
    ensure!(
        p.rest.is_empty(),
        "the header has text after its dictionary"
    );
    Ok(Header {
        descr: descr.context("the header has no 'descr'")?,
        fortran_order: fortran_order.context("the header has no 'fortran_order'")?,
        shape: shape.context("the header has no 'shape'")?,
    })
}

/// A cursor over the header's bytes.
struct Parser<'a> {
    whole: usize,
    rest: &'a [u8],
}

impl<'a> Parser<'a> {
    /// Where the cursor is, for messages.
    fn at(&self) -> usize {
        self.whole.saturating_sub(self.rest.len())
    }

    fn eat(&mut self, c: u8) -> bool {
        match self.rest.split_first() {
            Some((&first, tail)) if first == c => {
                self.rest = tail;
                true
            }
            _ => false,
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        ensure!(
            self.eat(c),
            "the header's dictionary is malformed: expected '{}' at byte {}",
            c as char,
            self.at()
        );
        Ok(())
    }

    fn skip_spaces(&mut self) {
        while self.eat(b' ') {}
    }

    /// The longest prefix whose bytes satisfy `keep`, consumed.
    fn take_while(&mut self, keep: impl Fn(u8) -> bool) -> &'a [u8] {
        let n = self.rest.iter().take_while(|&&c| keep(c)).count();
        let (taken, rest) = self.rest.split_at_checked(n).unwrap_or((self.rest, &[]));
        self.rest = rest;
        taken
    }

    /// A quoted string without escapes (`'<i8'`, `"shape"`).
    fn string(&mut self) -> Result<String> {
        let quote = if self.eat(b'\'') {
            b'\''
        } else if self.eat(b'"') {
            b'"'
        } else {
            bail!(
                "the header's dictionary is malformed: expected a string at byte {}",
                self.at()
            )
        };
        let text = self.take_while(|c| c != quote && c != b'\\');
        ensure!(
            self.eat(quote),
            "the header has an unterminated string or an escape in one"
        );
        Ok(std::str::from_utf8(text)?.to_string())
    }

    fn boolean(&mut self) -> Result<bool> {
        for (word, value) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if let Some(rest) = self.rest.strip_prefix(word) {
                self.rest = rest;
                return Ok(value);
            }
        }
        bail!("fortran_order must be True or False")
    }

    /// `()`, `(3,)`, `(2, 7)`: non-negative integers.
    fn tuple(&mut self) -> Result<Vec<usize>> {
        self.expect(b'(')?;
        let mut dims = vec![];
        loop {
            self.skip_spaces();
            if self.eat(b')') {
                break;
            }
            let digits = std::str::from_utf8(self.take_while(|c| c.is_ascii_digit()))?;
            ensure!(
                !digits.is_empty(),
                "the shape must hold non-negative integers"
            );
            dims.push(
                digits
                    .parse::<usize>()
                    .context("a dimension of the shape is too large")?,
            );
            ensure!(
                dims.len() <= MAX_DIMS,
                "the shape has more than {MAX_DIMS} dimensions"
            );
            self.skip_spaces();
            if !self.eat(b',') {
                self.skip_spaces();
                self.expect(b')')?;
                break;
            }
        }
        Ok(dims)
    }
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn npy(header: &str, data: &[i64]) -> Vec<u8> {
        let mut h = header.to_string();
        while !(10 + h.len() + 1).is_multiple_of(64) {
            h.push(' ');
        }
        h.push('\n');
        let mut out = MAGIC.to_vec();
        out.extend([1, 0]);
        out.extend((h.len() as u16).to_le_bytes());
        out.extend(h.as_bytes());
        for v in data {
            out.extend(v.to_le_bytes());
        }
        out
    }

    /// The fixtures were written by NumPy (`np.save`): the independent reference.
    #[test]
    fn reads_what_numpy_writes() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-moe/inputs");
        let shapes = [[1, 1], [1, 4], [1, 11], [1, 32], [2, 7]];
        for (i, shape) in shapes.iter().enumerate() {
            let bytes = std::fs::read(dir.join(format!("input_ids_{i}.npy"))).unwrap();
            let a = read_i64(&bytes).unwrap();
            assert_eq!(a.shape, shape.to_vec());
            // the same numbers as ndarray-npy reads (a second, general reader)
            use ndarray_npy::ViewNpyExt;
            let view = ndarray::ArrayViewD::<i64>::view_npy(&bytes).unwrap();
            assert_eq!(a.data, view.iter().copied().collect::<Vec<_>>());
        }
    }

    #[test]
    fn header_forms_by_hand() {
        let a = read_i64(&npy(
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2, 3), }",
            &[1, 2, 3, 4, 5, -6],
        ))
        .unwrap();
        assert_eq!((a.shape, a.data), (vec![2, 3], vec![1, 2, 3, 4, 5, -6]));
        let a = read_i64(&npy(
            "{\"shape\": (3,), \"descr\": \"<i8\", \"fortran_order\": True}",
            &[7, 8, 9],
        ))
        .unwrap();
        assert_eq!((a.shape, a.data), (vec![3], vec![7, 8, 9]));
        let a = read_i64(&npy(
            "{'descr': '<i8', 'fortran_order': False, 'shape': ()}",
            &[42],
        ))
        .unwrap();
        assert_eq!((a.shape, a.data), (vec![], vec![42]));
    }

    #[test]
    fn bad_headers_are_errors_naming_what_is_wrong() {
        let cases = [
            (
                "{'descr': '<f4', 'fortran_order': False, 'shape': (1,), }",
                "int64",
            ),
            (
                "{'descr': '<i8', 'fortran_order': True, 'shape': (2, 2), }",
                "Fortran",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (1099511627776, 2), }",
                "needs",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (18446744073709551615, 3), }",
                "overflows",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (-1,), }",
                "non-negative",
            ),
            ("{'descr': '<i8', 'fortran_order': False}", "no 'shape'"),
            (
                "{'descr': '<i8', 'descr': '<i8', 'fortran_order': False, 'shape': (1,)}",
                "repeated",
            ),
            (
                "{'descr': {{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{, 1), }",
                "expected a string",
            ),
            (
                "{'descr': '<i8', 'fortran_order': False, 'shape': (1,), } x",
                "after",
            ),
        ];
        for (header, expected) in cases {
            let err = format!("{:#}", read_i64(&npy(header, &[1])).unwrap_err());
            assert!(err.contains(expected), "{header}: {err}");
        }
        for (bytes, expected) in [
            (&b"\x93NUMPY"[..], "ends in its header"),
            (&b"PK\x03\x04"[..], "magic"),
            (&b"\x93NUMPY\x09\x00\x10\x00"[..], "version 9"),
            (&b"\x93NUMPY\x02\x00\xff\xff\xff\xff"[..], "longer than"),
        ] {
            let err = format!("{:#}", read_i64(bytes).unwrap_err());
            assert!(err.contains(expected), "{bytes:?}: {err}");
        }
    }
}
