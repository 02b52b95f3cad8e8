//! Token files: plain text (byte-tokenized) or little-endian `u16`/`u32` token arrays, validated.
//!
//! Reading a file is storage, which the design routes through a seam. All file access of the data
//! pipeline is therefore in the one small function [`load_tokens`]; everything else here is pure
//! ([`parse_tokens`] on bytes already in memory, [`encode_tokens`] to produce a file's bytes), so
//! the read can later be swapped for the storage seam without touching the validation.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use super::DataError;
use super::tokenizer::ByteTokenizer;

/// How a token file is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenFormat {
    /// Any bytes (normally UTF-8 text), one token per byte via the [`ByteTokenizer`].
    Text,
    /// Little-endian `u16` token ids, 2 bytes each, no header (the usual `.bin` of nanoGPT-style
    /// pipelines for vocabularies up to 65,536).
    U16,
    /// Little-endian `u32` token ids, 4 bytes each, no header.
    U32,
}

impl TokenFormat {
    /// The format's name as written in configuration: `text`, `u16` or `u32`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::U16 => "u16",
            Self::U32 => "u32",
        }
    }

    /// Bytes per token in the file (1 for text).
    #[must_use]
    pub const fn width(self) -> usize {
        match self {
            Self::Text => 1,
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

impl fmt::Display for TokenFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for TokenFormat {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "u16" => Ok(Self::U16),
            "u32" => Ok(Self::U32),
            other => Err(DataError::UnknownFormat(other.to_owned())),
        }
    }
}

/// Reads the file at `path` and returns its tokens, each checked to be below `vocab_size`.
///
/// This is the data pipeline's only file access (see the module documentation). Errors name the
/// file and, for bad contents, the byte offset: an unreadable file, a binary file whose length is
/// not a whole number of tokens, an empty file, or a token id `>= vocab_size`.
pub fn load_tokens(
    path: &Path,
    format: TokenFormat,
    vocab_size: u32,
) -> Result<Vec<u32>, DataError> {
    let origin = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: origin.clone(),
        source,
    })?;
    parse_tokens(&bytes, format, vocab_size, &origin)
}

/// Decodes `bytes` laid out as `format` into token ids, each checked to be below `vocab_size`.
/// `origin` (a file name, usually) is quoted in errors.
pub fn parse_tokens(
    bytes: &[u8],
    format: TokenFormat,
    vocab_size: u32,
    origin: &str,
) -> Result<Vec<u32>, DataError> {
    if bytes.is_empty() {
        return Err(DataError::Empty {
            origin: origin.to_owned(),
        });
    }
    let width = format.width();
    if !bytes.len().is_multiple_of(width) {
        return Err(DataError::TruncatedToken {
            origin: origin.to_owned(),
            len: bytes.len(),
            width,
            format: format.name(),
            offset: bytes.len() - bytes.len() % width,
        });
    }
    let tokens: Vec<u32> = match format {
        TokenFormat::Text => ByteTokenizer::new().encode(bytes),
        TokenFormat::U16 => bytes
            .chunks_exact(2)
            .map(|c| u32::from(u16::from_le_bytes([c[0], c[1]])))
            .collect(),
        TokenFormat::U32 => bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    if let Some(index) = tokens.iter().position(|&t| t >= vocab_size) {
        return Err(DataError::TokenOutOfRange {
            origin: origin.to_owned(),
            index,
            offset: index * width,
            token: tokens[index],
            vocab_size,
        });
    }
    Ok(tokens)
}

/// The bytes of a token file holding `tokens` in `format` (the inverse of [`parse_tokens`]).
/// Fails if a token does not fit the format's width (`>= 256` for text, `>= 65,536` for `u16`).
pub fn encode_tokens(tokens: &[u32], format: TokenFormat) -> Result<Vec<u8>, DataError> {
    let too_wide = |index: usize| DataError::TokenTooWide {
        index,
        token: tokens[index],
        format: format.name(),
    };
    let mut out = Vec::with_capacity(tokens.len() * format.width());
    for (index, &token) in tokens.iter().enumerate() {
        match format {
            TokenFormat::Text => out.push(u8::try_from(token).map_err(|_| too_wide(index))?),
            TokenFormat::U16 => {
                let t = u16::try_from(token).map_err(|_| too_wide(index))?;
                out.extend_from_slice(&t.to_le_bytes());
            }
            TokenFormat::U32 => out.extend_from_slice(&token.to_le_bytes()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in the system temp directory, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(name: &str, bytes: &[u8]) -> Self {
            let path =
                std::env::temp_dir().join(format!("flotilla-data-{}-{name}", std::process::id()));
            std::fs::write(&path, bytes).expect("temp file");
            Self(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn message<T: fmt::Debug>(r: Result<T, DataError>) -> String {
        match r {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn formats_parse_and_print() {
        for f in [TokenFormat::Text, TokenFormat::U16, TokenFormat::U32] {
            assert_eq!(f.name().parse::<TokenFormat>().ok(), Some(f));
            assert_eq!(f.to_string(), f.name());
        }
        assert!(message("u8".parse::<TokenFormat>()).contains("\"u8\""));
        let json = serde_json::to_string(&TokenFormat::U16).unwrap_or_default();
        assert_eq!(json, "\"u16\"");
    }

    #[test]
    fn loads_text_u16_and_u32_files() {
        let text = TempFile::new("a.txt", b"Hi!\n");
        let tokens = load_tokens(&text.0, TokenFormat::Text, 256).ok();
        assert_eq!(tokens, Some(vec![72, 105, 33, 10]));

        let ids = vec![0, 1, 255, 256, 65_535];
        let bytes = encode_tokens(&ids, TokenFormat::U16).unwrap_or_default();
        assert_eq!(&bytes[..4], &[0, 0, 1, 0]);
        let f16 = TempFile::new("b.bin", &bytes);
        assert_eq!(
            load_tokens(&f16.0, TokenFormat::U16, 65_536).ok(),
            Some(ids.clone())
        );

        let ids32 = vec![7, 70_000, 1 << 20];
        let bytes = encode_tokens(&ids32, TokenFormat::U32).unwrap_or_default();
        let f32 = TempFile::new("c.bin", &bytes);
        assert_eq!(
            load_tokens(&f32.0, TokenFormat::U32, 1 << 21).ok(),
            Some(ids32)
        );
    }

    #[test]
    fn odd_length_u16_file_names_file_and_offset() {
        let f = TempFile::new("odd.bin", &[1, 0, 2, 0, 3]);
        let msg = message(load_tokens(&f.0, TokenFormat::U16, 256));
        assert!(msg.contains(&f.0.display().to_string()), "{msg}");
        assert!(msg.contains("byte offset 4"), "{msg}");
        assert!(msg.contains("length 5"), "{msg}");
        let msg = message(parse_tokens(&[0; 7], TokenFormat::U32, 256, "x.bin"));
        assert!(
            msg.contains("x.bin") && msg.contains("byte offset 4"),
            "{msg}"
        );
    }

    #[test]
    fn token_beyond_vocab_names_file_index_and_offset() {
        let bytes = encode_tokens(&[5, 6, 1000, 7], TokenFormat::U32).unwrap_or_default();
        let f = TempFile::new("big.bin", &bytes);
        let msg = message(load_tokens(&f.0, TokenFormat::U32, 512));
        assert!(msg.contains(&f.0.display().to_string()), "{msg}");
        assert!(msg.contains("token 2 (byte offset 8)"), "{msg}");
        assert!(msg.contains("id 1000") && msg.contains("512"), "{msg}");
        // Text bytes are tokens too: a vocabulary below 256 rejects high bytes.
        let msg = message(parse_tokens(
            "é".as_bytes(),
            TokenFormat::Text,
            128,
            "t.txt",
        ));
        assert!(msg.contains("token 0 (byte offset 0)"), "{msg}");
    }

    #[test]
    fn missing_and_empty_files_are_errors() {
        let missing = std::env::temp_dir().join("flotilla-data-definitely-missing.bin");
        let msg = message(load_tokens(&missing, TokenFormat::U16, 256));
        assert!(
            msg.contains("flotilla-data-definitely-missing.bin"),
            "{msg}"
        );
        let empty = TempFile::new("empty.txt", b"");
        let msg = message(load_tokens(&empty.0, TokenFormat::Text, 256));
        assert!(msg.contains("holds no tokens"), "{msg}");
    }

    #[test]
    fn encode_rejects_tokens_too_wide_for_the_format() {
        assert!(message(encode_tokens(&[1, 70_000], TokenFormat::U16)).contains("token 1"));
        assert!(message(encode_tokens(&[256], TokenFormat::Text)).contains("text"));
        let bytes = encode_tokens(&[104, 105], TokenFormat::Text).unwrap_or_default();
        assert_eq!(bytes, b"hi");
    }
}
