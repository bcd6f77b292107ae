//! TensorRT's legacy calibration cache (implicit quantization).
//!
//! The format is text:
//!
//! ```text
//! TRT-<version>-<algorithm>
//! <tensor name>: <hex>
//! ...
//! ```
//!
//! where `<algorithm>` is `EntropyCalibration2`, `MinMaxCalibration` or
//! another calibrator name (kept as a string), and `<hex>` is the IEEE-754
//! float32 bit pattern of `scale = amax / 127`, as a lowercase hexadecimal
//! integer without `0x` or zero padding (a zero scale is `0`). Tensor names
//! may contain any character but a newline, including `: `, so a line is
//! split at its last `: `.
//!
//! Reading is strict: every malformed line is an error with its line number.
//! Two leniencies keep hand-edited files readable without changing what they
//! mean: a `\r` before a newline is dropped, and hex digits may be upper case.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::{Result, TrtError};

/// The first line of a cache: `TRT-<version>-<algorithm>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheHeader {
    /// TensorRT version text, copied verbatim (for example `8601`). It may
    /// not be empty or contain `-` or a line break.
    pub version: String,
    /// Calibrator name, for example `EntropyCalibration2` or
    /// `MinMaxCalibration`. It may not be empty or contain a line break.
    pub algorithm: String,
}

impl CacheHeader {
    /// The header line, without newline.
    pub fn to_line(&self) -> String {
        format!("TRT-{}-{}", self.version, self.algorithm)
    }

    /// Parses a header line (without newline).
    pub fn parse(line: &str) -> Result<Self> {
        if line.is_empty() {
            return Err(TrtError::MissingHeader);
        }
        let bad = |reason| TrtError::BadHeader {
            text: line.to_string(),
            reason,
        };
        let rest = line
            .strip_prefix("TRT-")
            .ok_or_else(|| bad("it does not start with `TRT-`"))?;
        let (version, algorithm) = rest
            .split_once('-')
            .ok_or_else(|| bad("no `-` between version and algorithm"))?;
        let header = CacheHeader {
            version: version.to_string(),
            algorithm: algorithm.to_string(),
        };
        header.validate()?;
        Ok(header)
    }

    /// Checks that the header can be written and read back unchanged.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason| TrtError::BadHeader {
            text: self.to_line(),
            reason,
        };
        let breaks = |s: &str| s.contains(['\n', '\r']);
        if self.version.is_empty() {
            return Err(bad("the version is empty"));
        }
        // The version ends at the first `-`, so one inside it would move text
        // into the algorithm on reading.
        if self.version.contains('-') || breaks(&self.version) {
            return Err(bad("the version contains `-` or a line break"));
        }
        if self.algorithm.is_empty() {
            return Err(bad("the algorithm name is empty"));
        }
        if breaks(&self.algorithm) {
            return Err(bad("the algorithm name contains a line break"));
        }
        Ok(())
    }
}

/// A TensorRT legacy calibration cache: a header and per-tensor scales, in
/// file order.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationCache {
    /// `TRT-<version>-<algorithm>`.
    pub header: CacheHeader,
    /// `(tensor name, scale)` with `scale = amax / 127`.
    pub entries: Vec<(String, f32)>,
}

impl CalibrationCache {
    /// Builds a cache from per-tensor amax values (`scale = amax / 127`).
    ///
    /// `version` is copied verbatim into the header. There is no default:
    /// a cache belongs to one TensorRT version, so the caller passes the
    /// text of the build that will read it. Fails on an invalid header, an
    /// amax that is NaN, infinite or negative, or an invalid or repeated
    /// name.
    pub fn from_amax<N: Into<String>>(
        version: impl Into<String>,
        algorithm: impl Into<String>,
        amax: impl IntoIterator<Item = (N, f32)>,
    ) -> Result<Self> {
        let header = CacheHeader {
            version: version.into(),
            algorithm: algorithm.into(),
        };
        let mut entries = Vec::new();
        for (name, amax) in amax {
            let name = name.into();
            if !amax.is_finite() || amax < 0.0 {
                return Err(TrtError::InvalidAmax { name, amax });
            }
            // -0.0 / 127 is -0.0, whose sign bit `parse` rejects: store +0.
            let scale = if amax == 0.0 { 0.0 } else { amax / 127.0 };
            entries.push((name, scale));
        }
        let cache = CalibrationCache { header, entries };
        cache.validate()?;
        Ok(cache)
    }

    /// The scale of a tensor.
    pub fn scale(&self, name: &str) -> Option<f32> {
        self.entries
            .iter()
            .find(|(n, _)| n == name)
            .map(|&(_, s)| s)
    }

    /// The amax of a tensor, `scale * 127` (equal to the amax the scale was
    /// made from up to float32 rounding).
    pub fn amax(&self, name: &str) -> Option<f32> {
        self.scale(name).map(|s| s * 127.0)
    }

    /// The cache as text, one `\n`-terminated line per entry after the
    /// header. It is what [`write`](Self::write) stores; unlike `write` it
    /// does not validate, so an invalid cache gives text `parse` rejects.
    pub fn to_text(&self) -> String {
        let mut text = self.header.to_line();
        text.push('\n');
        for (name, scale) in &self.entries {
            text.push_str(name);
            text.push_str(": ");
            text.push_str(&format!("{:x}", scale.to_bits()));
            text.push('\n');
        }
        text
    }

    /// Parses cache text. A trailing newline is optional; every other line,
    /// blank ones included, must be `name: hex`.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines: Vec<&str> = text.split('\n').collect();
        // Text ending in a newline leaves an empty piece that is not a line.
        if lines.last() == Some(&"") {
            lines.pop();
        }
        let mut lines = lines
            .into_iter()
            .map(|l| l.strip_suffix('\r').unwrap_or(l))
            .zip(1usize..);
        let header = match lines.next() {
            Some((line, _)) => CacheHeader::parse(line)?,
            None => return Err(TrtError::MissingHeader),
        };
        let mut entries = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (text, line) in lines {
            let (name, hex) = text
                .rsplit_once(": ")
                .ok_or_else(|| TrtError::MissingSeparator {
                    line,
                    text: text.to_string(),
                })?;
            check_name(line, name)?;
            let scale = parse_scale(line, name, hex)?;
            if let Some(&first_line) = seen.get(name) {
                return Err(TrtError::DuplicateName {
                    line,
                    first_line,
                    name: name.to_string(),
                });
            }
            seen.insert(name, line);
            entries.push((name.to_string(), scale));
        }
        Ok(CalibrationCache { header, entries })
    }

    /// Checks that [`to_text`](Self::to_text) gives text that parses back to
    /// this cache: a valid header, non-empty names without newlines, no
    /// repeated name, finite non-negative scales (not -0). Errors give the
    /// line each entry would occupy in the file.
    pub fn validate(&self) -> Result<()> {
        self.header.validate()?;
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for ((name, scale), line) in self.entries.iter().zip(2usize..) {
            check_name(line, name)?;
            check_scale(line, name, scale.to_bits())?;
            if let Some(&first_line) = seen.get(name.as_str()) {
                return Err(TrtError::DuplicateName {
                    line,
                    first_line,
                    name: name.clone(),
                });
            }
            seen.insert(name, line);
        }
        Ok(())
    }

    /// Validates the cache and writes it to `path` atomically: `path` keeps
    /// its old contents (or stays absent) if anything fails.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        self.validate()?;
        write_atomically(path.as_ref(), self.to_text().as_bytes())
    }

    /// Reads and parses a cache file; parse errors name the file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| TrtError::Io {
            path: path.to_path_buf(),
            action: "reading",
            source,
        })?;
        Self::parse(&text).map_err(|e| TrtError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }
}

fn check_name(line: usize, name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "the name is empty"
    } else if name.contains('\n') {
        "the name contains a newline"
    } else {
        return Ok(());
    };
    Err(TrtError::InvalidName {
        line,
        name: name.to_string(),
        reason,
    })
}

fn parse_scale(line: usize, name: &str, hex: &str) -> Result<f32> {
    // Checked by hand: `from_str_radix` would also take a leading `+`.
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(TrtError::InvalidHex {
            line,
            name: name.to_string(),
            hex: hex.to_string(),
        });
    }
    if hex.len() > 8 {
        return Err(TrtError::HexTooLong {
            line,
            name: name.to_string(),
            hex: hex.to_string(),
        });
    }
    let bits = u32::from_str_radix(hex, 16).map_err(|_| TrtError::InvalidHex {
        line,
        name: name.to_string(),
        hex: hex.to_string(),
    })?;
    check_scale(line, name, bits)?;
    Ok(f32::from_bits(bits))
}

/// Rejects NaN, infinities and any set sign bit (negative values and -0).
fn check_scale(line: usize, name: &str, bits: u32) -> Result<()> {
    let value = f32::from_bits(bits);
    if value.is_finite() && bits & 0x8000_0000 == 0 {
        return Ok(());
    }
    Err(TrtError::InvalidScale {
        line,
        name: name.to_string(),
        bits,
        value,
    })
}

/// Writes `bytes` to `path` whole or not at all
/// ([`qint8_graph::atomic::write_atomically`]).
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    qint8_graph::atomic::write_atomically(path, |w| w.write_all(bytes)).map_err(|e| TrtError::Io {
        path: e.path,
        action: e.action,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cache(entries: &[(&str, f32)]) -> CalibrationCache {
        CalibrationCache {
            header: CacheHeader {
                version: "8601".into(),
                algorithm: "EntropyCalibration2".into(),
            },
            entries: entries.iter().map(|&(n, s)| (n.to_string(), s)).collect(),
        }
    }

    fn parse_err(text: &str) -> TrtError {
        match CalibrationCache::parse(text) {
            Ok(c) => panic!("{text:?} parsed as {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn hand_computed_bit_patterns() {
        let c = CalibrationCache::from_amax(
            "8601",
            "EntropyCalibration2",
            [
                ("one", 127.0f32),
                ("zero", 0.0),
                ("neg_zero", -0.0),
                ("half", 63.5),
                ("tiny", 127.0 * 2f32.powi(-20)),
            ],
        )
        .unwrap();
        assert_eq!(
            c.to_text(),
            "TRT-8601-EntropyCalibration2\n\
             one: 3f800000\n\
             zero: 0\n\
             neg_zero: 0\n\
             half: 3f000000\n\
             tiny: 35800000\n"
        );
        assert_eq!(c.scale("half"), Some(0.5));
        assert_eq!(c.amax("one"), Some(127.0));
        assert_eq!(c.amax("tiny"), Some(127.0 * 2f32.powi(-20)));
        assert_eq!(c.amax("missing"), None);
        // Smallest subnormal: one hex digit, no padding.
        assert_eq!(
            cache(&[("s", f32::from_bits(1))]).to_text().lines().nth(1),
            Some("s: 1")
        );
    }

    #[test]
    fn text_round_trips_exactly() {
        let text = "TRT-100300-MinMaxCalibration\n\
                    input: 3c010204\n\
                    /backbone/conv1/Conv_output_0: 3d4ccccd\n\
                    zero: 0\n\
                    sub: 1\n\
                    max: 7f7fffff\n";
        let c = CalibrationCache::parse(text).unwrap();
        assert_eq!(c.header.version, "100300");
        assert_eq!(c.header.algorithm, "MinMaxCalibration");
        assert_eq!(c.entries.len(), 5);
        assert_eq!(c.scale("max"), Some(f32::MAX));
        assert_eq!(c.to_text(), text);
    }

    #[test]
    fn other_algorithms_and_versions_are_kept_as_text() {
        let c = CalibrationCache::parse("TRT-8.6.1-LegacyCalibration-v2\n").unwrap();
        assert_eq!(c.header.version, "8.6.1");
        assert_eq!(c.header.algorithm, "LegacyCalibration-v2");
        assert!(c.entries.is_empty());
        assert_eq!(c.to_text(), "TRT-8.6.1-LegacyCalibration-v2\n");
    }

    #[test]
    fn names_containing_separator_split_at_last() {
        let names = [
            "a: b",
            "x: ",
            ": y",
            "::",
            "a:b",
            " lead",
            "tab\there",
            "ünï: cödé",
        ];
        let c = cache(&names.iter().map(|&n| (n, 0.25f32)).collect::<Vec<_>>());
        let text = c.to_text();
        assert!(text.contains("a: b: 3e800000\n"));
        let back = CalibrationCache::parse(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.to_text(), text);
    }

    #[test]
    fn crlf_missing_final_newline_and_upper_case_hex_are_read() {
        let c =
            CalibrationCache::parse("TRT-8601-EntropyCalibration2\r\na: 3F800000\r\nb: 0").unwrap();
        assert_eq!(c, cache(&[("a", 1.0), ("b", 0.0)]));
    }

    #[test]
    fn missing_and_malformed_headers() {
        assert!(matches!(parse_err(""), TrtError::MissingHeader));
        assert!(matches!(parse_err("\n"), TrtError::MissingHeader));
        assert!(matches!(parse_err("\na: 0\n"), TrtError::MissingHeader));
        for bad in [
            "trt-8601-EntropyCalibration2",
            "TRT-8601",
            "TRT--EntropyCalibration2",
            "TRT-8601-",
            "conv1: 3f800000",
        ] {
            match parse_err(&format!("{bad}\nx: 0\n")) {
                TrtError::BadHeader { text, .. } => assert_eq!(text, bad),
                e => panic!("{bad:?}: {e}"),
            }
        }
        let msg = parse_err("TRT-8601\n").to_string();
        assert!(msg.contains("line 1") && msg.contains("TRT-8601"), "{msg}");
    }

    #[test]
    fn line_without_separator() {
        let e = parse_err("TRT-1-A\na: 0\nb:0\n");
        assert!(
            matches!(&e, TrtError::MissingSeparator { line: 3, text } if text == "b:0"),
            "{e}"
        );
        // A blank line in the middle is a line without a separator too.
        let e = parse_err("TRT-1-A\na: 0\n\nb: 0\n");
        assert!(
            matches!(e, TrtError::MissingSeparator { line: 3, .. }),
            "{e}"
        );
    }

    #[test]
    fn empty_name() {
        let e = parse_err("TRT-1-A\n: 3f800000\n");
        assert!(matches!(e, TrtError::InvalidName { line: 2, .. }), "{e}");
    }

    #[test]
    fn invalid_hex() {
        for hex in [
            "", "0x3f80", "3f80000g", "+3f8", "-1", " 3f8", "3f8 ", "1.5",
        ] {
            let e = parse_err(&format!("TRT-1-A\nok: 0\nt: {hex}\n"));
            match &e {
                TrtError::InvalidHex {
                    line: 3,
                    name,
                    hex: h,
                } => {
                    assert_eq!((name.as_str(), h.as_str()), ("t", hex))
                }
                _ => panic!("{hex:?}: {e}"),
            }
        }
    }

    #[test]
    fn hex_longer_than_eight_digits() {
        for hex in ["03f800000", "100000000", "ffffffffffffffffffff"] {
            let e = parse_err(&format!("TRT-1-A\nt: {hex}\n"));
            assert!(
                matches!(e, TrtError::HexTooLong { line: 2, .. }),
                "{hex}: {e}"
            );
            assert!(e.to_string().contains("at most 8"), "{e}");
        }
    }

    #[test]
    fn non_finite_and_negative_scales_are_rejected_with_their_line() {
        for hex in [
            "7f800000", "ff800000", "7fc00000", "7f800001", "ffffffff", "bf800000", "80000000",
        ] {
            let e = parse_err(&format!("TRT-1-A\na: 0\nb: 3f800000\nt: {hex}\n"));
            match &e {
                TrtError::InvalidScale {
                    line: 4,
                    name,
                    bits,
                    ..
                } => {
                    assert_eq!(name, "t");
                    assert_eq!(format!("{bits:x}"), hex);
                }
                _ => panic!("{hex}: {e}"),
            }
            assert!(e.to_string().starts_with("line 4: "), "{e}");
        }
    }

    #[test]
    fn duplicate_names() {
        let e = parse_err("TRT-1-A\na: 0\nb: 0\na: 3f800000\n");
        assert!(
            matches!(&e, TrtError::DuplicateName { line: 4, first_line: 2, name } if name == "a"),
            "{e}"
        );
    }

    #[test]
    fn from_amax_and_validate_reject_what_parse_rejects() {
        for amax in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -1.0,
            -f32::MIN_POSITIVE,
        ] {
            let e = CalibrationCache::from_amax("1", "A", [("t", amax)]).unwrap_err();
            assert!(
                matches!(&e, TrtError::InvalidAmax { name, .. } if name == "t"),
                "{e}"
            );
        }
        let e = CalibrationCache::from_amax("1", "A", [("t", 1.0), ("t", 2.0)]).unwrap_err();
        assert!(
            matches!(
                e,
                TrtError::DuplicateName {
                    line: 3,
                    first_line: 2,
                    ..
                }
            ),
            "{e}"
        );
        let e = CalibrationCache::from_amax("1", "A", [("a\nb", 1.0)]).unwrap_err();
        assert!(matches!(e, TrtError::InvalidName { line: 2, .. }), "{e}");
        let e = CalibrationCache::from_amax("1", "A", [("", 1.0)]).unwrap_err();
        assert!(matches!(e, TrtError::InvalidName { .. }), "{e}");
        for (v, a) in [
            ("", "A"),
            ("8-6", "A"),
            ("1\n", "A"),
            ("1", ""),
            ("1", "A\r"),
        ] {
            let e = CalibrationCache::from_amax(v, a, [("t", 1.0)]).unwrap_err();
            assert!(matches!(e, TrtError::BadHeader { .. }), "{v:?} {a:?}: {e}");
        }
        let e = cache(&[("a", 1.0), ("b", -0.0)]).validate().unwrap_err();
        assert!(matches!(e, TrtError::InvalidScale { line: 3, .. }), "{e}");
    }

    #[test]
    fn write_is_atomic_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.cache");
        let c = cache(&[("a: b", 1.0), ("c", 0.0)]);
        c.write(&path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), c.to_text());
        assert_eq!(CalibrationCache::read(&path).unwrap(), c);

        // Overwriting replaces the file; a failed write leaves it untouched.
        let c2 = cache(&[("x", 0.5)]);
        c2.write(&path).unwrap();
        assert_eq!(CalibrationCache::read(&path).unwrap(), c2);
        assert!(cache(&[("x", f32::NAN)]).write(&path).is_err());
        assert_eq!(CalibrationCache::read(&path).unwrap(), c2);

        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("model.cache")]);
    }

    #[test]
    fn io_errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no_such_dir").join("x.cache");
        let e = cache(&[("a", 1.0)]).write(&missing).unwrap_err();
        assert!(matches!(e, TrtError::Io { .. }), "{e}");
        assert!(e.to_string().contains("no_such_dir"), "{e}");
        assert!(!missing.exists());

        let e = CalibrationCache::read(&missing).unwrap_err();
        assert!(
            matches!(&e, TrtError::Io { path, .. } if path == &missing),
            "{e}"
        );

        let bad = dir.path().join("bad.cache");
        fs::write(&bad, "TRT-1-A\nt: zz\n").unwrap();
        let e = CalibrationCache::read(&bad).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("bad.cache") && msg.contains("line 2"), "{msg}");
        assert!(
            matches!(&e, TrtError::InFile { source, .. } if matches!(**source, TrtError::InvalidHex { .. }))
        );

        fs::write(&bad, [0xff, 0xfe, b'\n']).unwrap();
        assert!(matches!(
            CalibrationCache::read(&bad),
            Err(TrtError::Io { .. })
        ));
    }

    proptest! {
        #[test]
        fn finite_non_negative_scales_round_trip_bit_exactly(
            bits in prop::collection::vec(0u32..0x7f80_0000, 0..20),
        ) {
            let entries: Vec<(String, f32)> = bits
                .iter()
                .enumerate()
                .map(|(i, &b)| (format!("t{i}: x"), f32::from_bits(b)))
                .collect();
            let c = CalibrationCache { header: cache(&[]).header, entries };
            prop_assert!(c.validate().is_ok());
            let text = c.to_text();
            let back = CalibrationCache::parse(&text).unwrap();
            let back_bits: Vec<u32> = back.entries.iter().map(|(_, s)| s.to_bits()).collect();
            prop_assert_eq!(back_bits, bits);
            prop_assert_eq!(back.to_text(), text);
        }

        #[test]
        fn parse_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = CalibrationCache::parse(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn parse_never_panics_on_cache_like_text(
            lines in prop::collection::vec("[a-zA-Z0-9: \\-\r.]{0,24}", 0..8),
        ) {
            let text = format!("TRT-8601-EntropyCalibration2\n{}", lines.join("\n"));
            let _ = CalibrationCache::parse(&text);
        }
    }
}
