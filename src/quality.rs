//! Measuring a model's quality over text: which tokens a perplexity run scores (the windows),
//! the negative log-likelihood of a token, the comparison of a token's distribution with a base
//! model's (KL divergence, top-1 agreement), summaries of those, and the file that keeps a base
//! model's logits between runs.
//!
//! The windows follow llama.cpp's `llama-perplexity` so that the two tools' figures on the same
//! text and tokenizer are comparable: windows of `context` tokens, the first token of each
//! replaced by BOS when the tokenizer starts every text with BOS, and only the tokens in the
//! second part of a window scored, so that every scored token has at least half a window of
//! context.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context};
use moe_edge_engine::PartialFile;
use serde::{Deserialize, Serialize};

/// The token that replaces the first of every window: BOS when the tokenizer starts every text
/// with it (as llama-perplexity does), else none.
pub fn window_bos(
    model: &moe_edge_engine::Model,
    tokenizer: &moe_edge_engine::Tokenizer,
) -> Option<i64> {
    model.config().bos_token_id.filter(|&b| {
        tokenizer
            .encode("a")
            .ok()
            .and_then(|ids| ids.first().copied())
            == Some(b)
    })
}

/// One window of a perplexity run over a token sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Index of the window's first token in the sequence.
    pub start: usize,
    /// The logits at window positions `first..context - 1` are scored, each against the next
    /// token.
    pub first: usize,
}

/// The windows of a run over `tokens` tokens: one every `stride` tokens, each `context` long
/// (a trailing part shorter than a window is not scored).
///
/// With `stride == context` (the default) this is llama-perplexity's scheme: the logits from
/// position `context / 2` on are scored, so the second half of each chunk (but its first token)
/// is. With a smaller stride, each window scores the `min(stride, context / 2)` tokens at its
/// end: with `stride <= context / 2` every token after the first window's context is scored
/// exactly once, with at least `context - stride` tokens before it.
pub fn windows(tokens: usize, context: usize, stride: usize) -> anyhow::Result<Vec<Window>> {
    ensure!(
        context >= 4,
        "--context must be at least 4 tokens, got {context}"
    );
    ensure!(
        stride >= 1 && stride <= context,
        "--stride must be between 1 and the context ({context}), got {stride}"
    );
    let first = if stride == context {
        context / 2
    } else {
        context - 1 - stride.min(context / 2)
    };
    let mut out = vec![];
    let mut start = 0;
    while start + context <= tokens {
        out.push(Window { start, first });
        start += stride;
    }
    Ok(out)
}

/// `ln softmax(logits)`, computed in f64.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = max + sum.ln();
    logits.iter().map(|&v| v as f64 - log_sum).collect()
}

/// The index of the largest value (the first of equal ones).
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// How one token's distribution compares with the base model's at the same position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenComparison {
    /// KL(base ‖ model) in nats.
    pub kl: f64,
    /// Whether both models rank the same token first.
    pub same_top1: bool,
}

/// Compares log-probabilities of one position: `KL(base ‖ model) = Σ p_base (ln p_base − ln p_model)`.
pub fn compare(base_logp: &[f64], logp: &[f64]) -> TokenComparison {
    let kl = base_logp
        .iter()
        .zip(logp)
        .map(|(&b, &m)| {
            if b == f64::NEG_INFINITY {
                0.0
            } else {
                b.exp() * (b - m)
            }
        })
        .sum::<f64>()
        .max(0.0);
    TokenComparison {
        kl,
        same_top1: argmax(base_logp) == argmax(logp),
    }
}

/// Perplexity `exp(mean nll)` and its standard error by the delta method (as llama-perplexity
/// prints it).
pub fn perplexity(nll: &[f64]) -> (f64, f64) {
    let n = nll.len() as f64;
    if nll.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = nll.iter().sum::<f64>() / n;
    let var = nll.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let ppl = mean.exp();
    (ppl, ppl * (var / n).sqrt())
}

/// Mean, median, 99th percentile and maximum of a list of values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    pub mean: f64,
    pub median: f64,
    pub p99: f64,
    pub max: f64,
}

pub fn spread(values: &[f64]) -> Spread {
    if values.is_empty() {
        return Spread {
            mean: f64::NAN,
            median: f64::NAN,
            p99: f64::NAN,
            max: f64::NAN,
        };
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    // nearest rank
    let rank =
        |q: f64| sorted[((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1];
    Spread {
        mean: values.iter().sum::<f64>() / values.len() as f64,
        median: rank(0.5),
        p99: rank(0.99),
        max: sorted[sorted.len() - 1],
    }
}

const MAGIC: &[u8; 16] = b"moe-edge-logits\x01";
/// Larger headers are refused before they are read (a header lists every token id).
const MAX_HEADER: u64 = 1 << 30;

/// What a saved-logits file was computed over: the run's windows and each text's token ids, so
/// that a comparison run can check that it scores the same tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogitsHeader {
    pub model: String,
    pub vocab: usize,
    pub context: usize,
    pub stride: usize,
    pub texts: Vec<TextTokens>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextTokens {
    pub label: String,
    pub ids: Vec<i64>,
    /// Rows stored for this text: one per scored position.
    pub scored: usize,
}

impl LogitsHeader {
    fn rows(&self) -> usize {
        self.texts.iter().map(|t| t.scored).sum()
    }

    /// Checks that a run with `other`'s settings scores the same tokens as this file holds.
    pub fn check_same_run(&self, other: &LogitsHeader, path: &Path) -> anyhow::Result<()> {
        let p = path.display();
        ensure!(
            self.vocab == other.vocab,
            "{p} holds logits over {} tokens, the model has {}",
            self.vocab,
            other.vocab
        );
        ensure!(
            (self.context, self.stride) == (other.context, other.stride),
            "{p} was computed with --context {} --stride {}, this run uses {} and {}",
            self.context,
            self.stride,
            other.context,
            other.stride
        );
        ensure!(
            self.texts.len() == other.texts.len(),
            "{p} holds {} texts, this run has {}",
            self.texts.len(),
            other.texts.len()
        );
        for (a, b) in self.texts.iter().zip(&other.texts) {
            ensure!(
                a.ids == b.ids,
                "{p}: text '{}' was tokenised differently ({} tokens there, {} here): compare models with the same tokenizer and text",
                b.label,
                a.ids.len(),
                b.ids.len()
            );
        }
        Ok(())
    }
}

/// Writes a saved-logits file: a temporary file beside the target, renamed over it by
/// [`LogitsWriter::finish`] once every row is written and synced (a run that fails first leaves
/// no file).
pub struct LogitsWriter {
    file: PartialFile,
    path: PathBuf,
    vocab: usize,
    rows_left: usize,
}

impl LogitsWriter {
    pub fn create(path: &Path, header: &LogitsHeader) -> anyhow::Result<Self> {
        let mut file =
            PartialFile::create(path).with_context(|| format!("creating {}", path.display()))?;
        let json = serde_json::to_vec(header)?;
        let out = file.writer();
        out.write_all(MAGIC)?;
        out.write_all(&(json.len() as u64).to_le_bytes())?;
        out.write_all(&json)?;
        Ok(LogitsWriter {
            file,
            path: path.to_path_buf(),
            vocab: header.vocab,
            rows_left: header.rows(),
        })
    }

    /// Appends the logits of the next scored position.
    pub fn push(&mut self, logits: &[f32]) -> anyhow::Result<()> {
        ensure!(
            logits.len() == self.vocab && self.rows_left > 0,
            "a row of {} logits does not fit the header ({} per row, {} rows left)",
            logits.len(),
            self.vocab,
            self.rows_left
        );
        self.rows_left -= 1;
        let out = self.file.writer();
        for v in logits {
            out.write_all(&v.to_le_bytes())?;
        }
        Ok(())
    }

    pub fn finish(self) -> anyhow::Result<()> {
        ensure!(
            self.rows_left == 0,
            "{}: {} rows were not written",
            self.path.display(),
            self.rows_left
        );
        self.file
            .commit()
            .with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Reads a saved-logits file row by row, in the order they were written.
pub struct LogitsReader {
    input: BufReader<File>,
    pub header: LogitsHeader,
    path: PathBuf,
    row: Vec<u8>,
}

impl LogitsReader {
    /// Opens `path` and checks that its size is what its header promises.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let p = path.display();
        let file = File::open(path).with_context(|| format!("opening {p}"))?;
        let size = file.metadata()?.len();
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 16];
        let mut len = [0u8; 8];
        input
            .read_exact(&mut magic)
            .and_then(|()| input.read_exact(&mut len))
            .map_err(|_| anyhow::anyhow!("{p} is too short to be a saved-logits file"))?;
        ensure!(
            &magic == MAGIC,
            "{p} is not a saved-logits file of this version (write it with `moe-edge perplexity --save-logits`)"
        );
        let len = u64::from_le_bytes(len);
        ensure!(
            len <= MAX_HEADER && len <= size.saturating_sub(24),
            "{p}: header length {len} does not fit the file ({size} bytes)"
        );
        let mut json = vec![0u8; len as usize];
        input.read_exact(&mut json)?;
        let header: LogitsHeader =
            serde_json::from_slice(&json).with_context(|| format!("{p}: invalid header"))?;
        ensure!(header.vocab > 0, "{p}: vocabulary size 0");
        let expected = (header.rows() as u128) * (header.vocab as u128) * 4 + 24 + len as u128;
        if expected != size as u128 {
            bail!("{p} holds {size} bytes, its header describes {expected} (a truncated or damaged file)");
        }
        Ok(LogitsReader {
            input,
            row: vec![0u8; header.vocab * 4],
            header,
            path: path.to_path_buf(),
        })
    }

    /// The logits of the next row.
    pub fn next_row(&mut self) -> anyhow::Result<Vec<f32>> {
        self.input
            .read_exact(&mut self.row)
            .with_context(|| format!("reading {}", self.path.display()))?;
        Ok(self
            .row
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_follow_llama_perplexity_by_default() {
        // 10 tokens, context 4: windows at 0 and 4 (tokens 8..10 left over), first scored logit 2
        let w = windows(10, 4, 4).unwrap();
        assert_eq!(
            w,
            vec![Window { start: 0, first: 2 }, Window { start: 4, first: 2 }]
        );
        // a stride of a quarter scores the last quarter: targets 6..8, then 8..10, ...
        let w = windows(16, 8, 2).unwrap();
        assert_eq!(w.len(), 5);
        assert_eq!(w[1], Window { start: 2, first: 5 });
        // stride 1: the last token of each window
        assert_eq!(windows(5, 4, 1).unwrap()[1], Window { start: 1, first: 2 });
        assert!(windows(3, 4, 4).unwrap().is_empty());
        assert!(windows(10, 4, 5).is_err());
        assert!(windows(10, 2, 2).is_err());
    }

    #[test]
    fn log_softmax_kl_and_perplexity_by_hand() {
        // logits ln 1, ln 2, ln 1: probabilities 1/4, 1/2, 1/4
        let lp = log_softmax(&[0.0, 2f32.ln(), 0.0]);
        for (got, want) in lp.iter().zip([0.25f64, 0.5, 0.25]) {
            assert!((got - want.ln()).abs() < 1e-7);
        }
        // KL(p ‖ q) with p = (1/4, 1/2, 1/4), q = (1/2, 1/4, 1/4)
        let q = [0.5f64.ln(), 0.25f64.ln(), 0.25f64.ln()];
        let want = 0.25 * (0.25f64 / 0.5).ln() + 0.5 * (0.5f64 / 0.25).ln();
        let c = compare(&lp, &q);
        assert!((c.kl - want).abs() < 1e-7, "{} vs {want}", c.kl);
        assert!(!c.same_top1);
        assert_eq!(compare(&lp, &lp).kl, 0.0);
        // nll 1 and 3: perplexity e^2, standard error e^2 * sqrt(2 / 2)
        let (ppl, se) = perplexity(&[1.0, 3.0]);
        assert!((ppl - 2f64.exp()).abs() < 1e-12);
        assert!((se - 2f64.exp()).abs() < 1e-12);
    }

    #[test]
    fn spread_uses_nearest_rank() {
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        let s = spread(&v);
        assert_eq!((s.median, s.p99, s.max), (100.0, 198.0, 200.0));
        assert!((s.mean - 100.5).abs() < 1e-12);
    }

    fn header() -> LogitsHeader {
        LogitsHeader {
            model: "m".into(),
            vocab: 3,
            context: 4,
            stride: 4,
            texts: vec![TextTokens {
                label: "a".into(),
                ids: vec![1, 2, 3, 4],
                scored: 2,
            }],
        }
    }

    #[test]
    fn saved_logits_round_trip_and_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("moe-edge-quality-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.logits");
        let mut w = LogitsWriter::create(&path, &header()).unwrap();
        w.push(&[1.0, 2.0, 3.0]).unwrap();
        w.push(&[4.0, 5.0, -6.5]).unwrap();
        assert!(w.push(&[0.0; 3]).is_err(), "more rows than the header");
        w.finish().unwrap();
        let mut r = LogitsReader::open(&path).unwrap();
        assert_eq!(r.header, header());
        assert_eq!(r.next_row().unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(r.next_row().unwrap(), vec![4.0, 5.0, -6.5]);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );

        // a truncated file is refused with its size named
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = LogitsReader::open(&path).err().unwrap().to_string();
        assert!(e.contains("truncated or damaged"), "{e}");
        std::fs::write(&path, b"not logits at all, but long enough").unwrap();
        let e = LogitsReader::open(&path).err().unwrap().to_string();
        assert!(e.contains("not a saved-logits file"), "{e}");

        // an unfinished writer leaves nothing
        let mut w = LogitsWriter::create(&dir.join("other.logits"), &header()).unwrap();
        w.push(&[1.0, 2.0, 3.0]).unwrap();
        drop(w);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_different_run_is_named() {
        let a = header();
        let mut b = header();
        b.texts[0].ids.push(5);
        let e = a
            .check_same_run(&b, Path::new("x"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenised differently"), "{e}");
        b = header();
        b.context = 8;
        assert!(a.check_same_run(&b, Path::new("x")).is_err());
        assert!(a.check_same_run(&header(), Path::new("x")).is_ok());
    }
}
