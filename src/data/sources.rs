//! Document sources for GPT-2 BPE preparation: text, JSON lines and parquet files.
//!
//! A [`Source`] is an ordered list of files of one format. Its documents are numbered in
//! file order, then in order inside each file; that numbering is what the train/val split
//! permutes. [`Source::plan`] cuts the files into [`Unit`]s of work (parquet row groups,
//! byte ranges of ~8 MB of lines, whole text files) and counts the documents of each,
//! reading only parquet footers and scanning line ends. [`Source::read_unit`] streams the
//! documents of one unit, so memory is bounded by a unit, never by a file or the corpus.
//!
//! Formats:
//! - text, `--sample_by document` (default): each file is one document (read as Python
//!   reads text: UTF-8, `\r\n` and lone `\r` become `\n`); `line`: each line is a document
//!   (Hugging Face's `text` loader; empty lines are empty documents); `paragraph`: each run
//!   of non-blank lines is a document.
//! - jsonl: one JSON object per non-blank line; the document is its `column` field (a
//!   string).
//! - parquet: the `column` of every row (string, large string or string view); only that
//!   column is read, one row group at a time.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arrow_array::cast::AsArray;
use arrow_array::Array;
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::DataError;

/// Target size of a byte-range unit (lines, paragraphs, JSON lines).
const UNIT_BYTES: u64 = 8 << 20;
/// Parquet row groups are grouped into units of at least this many uncompressed bytes.
const UNIT_PARQUET_BYTES: i64 = 8 << 20;
/// Rows per decoded parquet batch.
const PARQUET_BATCH_ROWS: usize = 1024;

/// How a text file is cut into documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SampleBy {
    Document,
    Paragraph,
    Line,
}

impl std::str::FromStr for SampleBy {
    type Err = String;
    fn from_str(s: &str) -> Result<SampleBy, String> {
        match s {
            "document" => Ok(SampleBy::Document),
            "paragraph" => Ok(SampleBy::Paragraph),
            "line" => Ok(SampleBy::Line),
            other => Err(format!(
                "--sample_by {other:?} is not one of: document, paragraph, line"
            )),
        }
    }
}

/// File format of a source.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Text(SampleBy),
    Jsonl,
    Parquet,
}

impl Format {
    pub fn name(&self) -> &'static str {
        match self {
            Format::Text(_) => "text",
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
        }
    }
}

/// An ordered list of files of one format, and the field that holds the text.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Source {
    pub format: Format,
    pub files: Vec<PathBuf>,
    /// jsonl / parquet: the text field or column.
    pub column: String,
}

/// A piece of work: some consecutive documents of one file.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unit {
    /// Index into [`Source::files`].
    pub file: usize,
    pub range: UnitRange,
    /// Global index of the unit's first document.
    pub first_doc: u64,
    pub docs: u64,
    /// Bytes of text (parquet: uncompressed column bytes), for estimates.
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum UnitRange {
    WholeFile,
    Bytes { start: u64, end: u64 },
    RowGroups { start: usize, end: usize },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> DataError + 'a {
    move |e| DataError::io(action, path, e)
}

/// A parquet error for `path`, with what to do next.
fn parquet_err(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::BadSource {
        path: path.to_path_buf(),
        reason: format!(
            "not a readable parquet file ({e}); it may be truncated or corrupt: delete it \
             (from the Hugging Face cache if it was downloaded) and run again to fetch it anew"
        ),
    }
}

impl Source {
    /// Expands a local glob (or plain path) into sorted files; an error when nothing matches.
    pub fn local_files(pattern: &str) -> Result<Vec<PathBuf>, DataError> {
        let paths = glob::glob(pattern).map_err(|e| DataError::BadSource {
            path: PathBuf::from(pattern),
            reason: format!("invalid glob pattern: {e}"),
        })?;
        let mut files: Vec<PathBuf> = paths
            .filter_map(|p| p.ok())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(DataError::BadSource {
                path: PathBuf::from(pattern),
                reason: "no file matches this --input pattern; check the path (quote globs so \
                         the shell does not expand them)"
                    .into(),
            });
        }
        Ok(files)
    }

    /// Units of work and their document counts, in document order.
    pub fn plan(&self) -> Result<Vec<Unit>, DataError> {
        let mut units = Vec::new();
        let mut next_doc = 0u64;
        for (file, path) in self.files.iter().enumerate() {
            let mut file_units = match &self.format {
                Format::Parquet => self.plan_parquet(file, path)?,
                Format::Text(SampleBy::Document) => {
                    let bytes = std::fs::metadata(path)
                        .map_err(io_err("cannot read metadata of", path))?
                        .len();
                    vec![Unit {
                        file,
                        range: UnitRange::WholeFile,
                        first_doc: 0,
                        docs: 1,
                        bytes,
                    }]
                }
                Format::Text(mode) => plan_lines(file, path, LineMode::Text(*mode))?,
                Format::Jsonl => plan_lines(file, path, LineMode::Jsonl)?,
            };
            for u in &mut file_units {
                u.first_doc = next_doc;
                next_doc += u.docs;
            }
            units.extend(file_units.into_iter().filter(|u| u.docs > 0));
        }
        Ok(units)
    }

    fn plan_parquet(&self, file: usize, path: &Path) -> Result<Vec<Unit>, DataError> {
        let f = File::open(path).map_err(io_err("cannot open", path))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| parquet_err(path, e))?;
        let col = column_index(builder.schema(), &self.column, path)?;
        let meta = builder.metadata();
        let mut units = Vec::new();
        let mut cur: Option<Unit> = None;
        for (g, rg) in meta.row_groups().iter().enumerate() {
            let bytes = rg.column(col).uncompressed_size().max(0);
            let u = cur.get_or_insert(Unit {
                file,
                range: UnitRange::RowGroups { start: g, end: g },
                first_doc: 0,
                docs: 0,
                bytes: 0,
            });
            if let UnitRange::RowGroups { end, .. } = &mut u.range {
                *end = g + 1;
            }
            u.docs += rg.num_rows().max(0) as u64;
            u.bytes += bytes as u64;
            if u.bytes as i64 >= UNIT_PARQUET_BYTES {
                units.extend(cur.take());
            }
        }
        units.extend(cur);
        // first_doc within the file; made global by the caller.
        let mut d = 0;
        for u in &mut units {
            u.first_doc = d;
            d += u.docs;
        }
        Ok(units)
    }

    /// Streams the documents of `unit` as (global document index, text).
    pub fn read_unit(
        &self,
        unit: &Unit,
        f: &mut dyn FnMut(u64, &str) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        let path = &self.files[unit.file];
        let mut doc = unit.first_doc;
        let mut emit = |text: &str| -> Result<(), DataError> {
            f(doc, text)?;
            doc += 1;
            Ok(())
        };
        match (&self.format, &unit.range) {
            (Format::Parquet, UnitRange::RowGroups { start, end }) => {
                self.read_parquet(path, *start..*end, &mut emit)?
            }
            (Format::Text(SampleBy::Document), _) => {
                let text = super::prepare::read_text(path)?;
                emit(&text)?;
            }
            (Format::Text(mode), UnitRange::Bytes { start, end }) => read_lines(
                path,
                *start,
                *end,
                LineMode::Text(*mode),
                &self.column,
                &mut emit,
            )?,
            (Format::Jsonl, UnitRange::Bytes { start, end }) => {
                read_lines(path, *start, *end, LineMode::Jsonl, &self.column, &mut emit)?
            }
            (format, range) => unreachable!("plan made a {range:?} unit for {format:?}"),
        }
        let read = doc - unit.first_doc;
        if read != unit.docs {
            return Err(DataError::BadSource {
                path: path.clone(),
                reason: format!(
                    "held {} documents when the preparation was planned but {read} now; the \
                     file changed during preparation: run again to start over",
                    unit.docs
                ),
            });
        }
        Ok(())
    }

    fn read_parquet(
        &self,
        path: &Path,
        groups: std::ops::Range<usize>,
        emit: &mut dyn FnMut(&str) -> Result<(), DataError>,
    ) -> Result<(), DataError> {
        let f = File::open(path).map_err(io_err("cannot open", path))?;
        let builder =
            ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| parquet_err(path, e))?;
        let col = column_index(builder.schema(), &self.column, path)?;
        let mask = ProjectionMask::roots(builder.parquet_schema(), [col]);
        let reader = builder
            .with_projection(mask)
            .with_row_groups(groups.collect())
            .with_batch_size(PARQUET_BATCH_ROWS)
            .build()
            .map_err(|e| parquet_err(path, e))?;
        for batch in reader {
            let batch = batch.map_err(|e| parquet_err(path, e))?;
            let array = batch.column(0);
            let null = |row: usize| DataError::BadSource {
                path: path.to_path_buf(),
                reason: format!(
                    "column {:?} is null in a row (row {row} of a batch); remove or fill null \
                     rows before preparing",
                    self.column
                ),
            };
            if let Some(a) = array.as_string_opt::<i32>() {
                for i in 0..a.len() {
                    if a.is_null(i) {
                        return Err(null(i));
                    }
                    emit(a.value(i))?;
                }
            } else if let Some(a) = array.as_string_opt::<i64>() {
                for i in 0..a.len() {
                    if a.is_null(i) {
                        return Err(null(i));
                    }
                    emit(a.value(i))?;
                }
            } else if let Some(a) = array.as_string_view_opt() {
                for i in 0..a.len() {
                    if a.is_null(i) {
                        return Err(null(i));
                    }
                    emit(a.value(i))?;
                }
            } else {
                return Err(DataError::BadSource {
                    path: path.to_path_buf(),
                    reason: format!(
                        "column {:?} has type {}, not text; pass the text column with --column",
                        self.column,
                        array.data_type()
                    ),
                });
            }
        }
        Ok(())
    }
}

fn column_index(
    schema: &arrow_schema::SchemaRef,
    column: &str,
    path: &Path,
) -> Result<usize, DataError> {
    let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
    let idx = schema.index_of(column).map_err(|_| DataError::BadSource {
        path: path.to_path_buf(),
        reason: format!(
            "has no column {column:?} (columns: {}); choose one with --column",
            names.join(", ")
        ),
    })?;
    match schema.field(idx).data_type() {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(idx),
        other => Err(DataError::BadSource {
            path: path.to_path_buf(),
            reason: format!(
                "column {column:?} has type {other}, not text (columns: {}); choose the text \
                 column with --column",
                names.join(", ")
            ),
        }),
    }
}

#[derive(Clone, Copy)]
enum LineMode {
    Text(SampleBy),
    Jsonl,
}

/// Line content without its `\n` (and `\r` before it).
fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| b.is_ascii_whitespace())
}

/// Cuts a line-oriented file into ~[`UNIT_BYTES`] units at document boundaries and counts
/// the documents of each.
fn plan_lines(file: usize, path: &Path, mode: LineMode) -> Result<Vec<Unit>, DataError> {
    let f = File::open(path).map_err(io_err("cannot open", path))?;
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut units = Vec::new();
    let mut start = 0u64;
    let mut pos = 0u64;
    let mut docs = 0u64;
    let mut in_paragraph = false;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = r
            .read_until(b'\n', &mut line)
            .map_err(io_err("cannot read", path))?;
        if n == 0 {
            break;
        }
        let content = trim_eol(&line);
        let boundary_before = match mode {
            LineMode::Text(SampleBy::Line) => true,
            LineMode::Jsonl => true,
            LineMode::Text(_) => !in_paragraph,
        };
        if boundary_before && pos - start >= UNIT_BYTES {
            units.push(Unit {
                file,
                range: UnitRange::Bytes { start, end: pos },
                first_doc: 0,
                docs,
                bytes: pos - start,
            });
            start = pos;
            docs = 0;
        }
        match mode {
            LineMode::Text(SampleBy::Line) => docs += 1,
            LineMode::Jsonl => docs += !is_blank(content) as u64,
            LineMode::Text(_) => {
                let blank = is_blank(content);
                if !blank && !in_paragraph {
                    docs += 1;
                }
                in_paragraph = !blank;
            }
        }
        pos += n as u64;
    }
    if pos > start {
        units.push(Unit {
            file,
            range: UnitRange::Bytes { start, end: pos },
            first_doc: 0,
            docs,
            bytes: pos - start,
        });
    }
    let mut d = 0;
    for u in &mut units {
        u.first_doc = d;
        d += u.docs;
    }
    Ok(units)
}

fn read_lines(
    path: &Path,
    start: u64,
    end: u64,
    mode: LineMode,
    column: &str,
    emit: &mut dyn FnMut(&str) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut f = File::open(path).map_err(io_err("cannot open", path))?;
    f.seek(SeekFrom::Start(start))
        .map_err(io_err("cannot read", path))?;
    let mut buf = Vec::with_capacity((end - start) as usize);
    f.take(end - start)
        .read_to_end(&mut buf)
        .map_err(io_err("cannot read", path))?;
    let utf8 = |bytes: &[u8], offset: usize| -> Result<String, DataError> {
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(DataError::NotUtf8 {
                path: path.to_path_buf(),
                offset: start as usize + offset + e.valid_up_to(),
            }),
        }
    };
    let mut offset = 0usize;
    let mut paragraph = String::new();
    let mut in_paragraph = false;
    let mut line_no = 0usize;
    for raw in buf.split_inclusive(|&b| b == b'\n') {
        let content = trim_eol(raw);
        line_no += 1;
        match mode {
            LineMode::Text(SampleBy::Line) => emit(&utf8(content, offset)?)?,
            LineMode::Text(_) => {
                if is_blank(content) {
                    if in_paragraph {
                        emit(&paragraph)?;
                        paragraph.clear();
                    }
                    in_paragraph = false;
                } else {
                    if in_paragraph {
                        paragraph.push('\n');
                    }
                    paragraph.push_str(&utf8(content, offset)?);
                    in_paragraph = true;
                }
            }
            LineMode::Jsonl => {
                if !is_blank(content) {
                    let text =
                        json_field(content, column).map_err(|reason| DataError::BadSource {
                            path: path.to_path_buf(),
                            reason: format!(
                                "line at byte offset {}: {reason}",
                                start as usize + offset
                            ),
                        })?;
                    emit(&text)?;
                }
            }
        }
        offset += raw.len();
    }
    let _ = line_no;
    if in_paragraph {
        emit(&paragraph)?;
    }
    Ok(())
}

/// The string field `column` of a JSON object line.
fn json_field(line: &[u8], column: &str) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not valid JSON ({e})"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| "not a JSON object".to_string())?;
    match obj.get(column) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "field {column:?} is not a string but {}",
            match other {
                serde_json::Value::Null => "null",
                serde_json::Value::Bool(_) => "a boolean",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Array(_) => "an array",
                _ => "an object",
            }
        )),
        None => Err(format!(
            "has no field {column:?} (fields: {}); choose the text field with --column",
            obj.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(source: &Source) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        for u in source.plan().unwrap() {
            source
                .read_unit(&u, &mut |i, t| {
                    out.push((i, t.to_string()));
                    Ok(())
                })
                .unwrap();
        }
        out
    }

    #[test]
    fn text_modes_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.txt");
        std::fs::write(&a, "one\r\ntwo\n\n\nthree\nfour\n").unwrap();
        let src = |format| Source {
            format,
            files: vec![a.clone()],
            column: "text".into(),
        };
        let docs = collect(&src(Format::Text(SampleBy::Line)));
        let texts: Vec<&str> = docs.iter().map(|d| d.1.as_str()).collect();
        assert_eq!(texts, ["one", "two", "", "", "three", "four"]);
        let docs = collect(&src(Format::Text(SampleBy::Paragraph)));
        assert_eq!(
            docs,
            vec![(0, "one\ntwo".to_string()), (1, "three\nfour".to_string())]
        );
        let docs = collect(&src(Format::Text(SampleBy::Document)));
        assert_eq!(docs, vec![(0, "one\ntwo\n\n\nthree\nfour\n".to_string())]);

        let j = dir.path().join("b.jsonl");
        std::fs::write(
            &j,
            "{\"text\": \"héllo\", \"id\": 1}\n\n{\"text\": \"x\\ny\"}",
        )
        .unwrap();
        let s = Source {
            format: Format::Jsonl,
            files: vec![j.clone()],
            column: "text".into(),
        };
        assert_eq!(
            collect(&s),
            vec![(0, "héllo".to_string()), (1, "x\ny".to_string())]
        );
        let bad = Source {
            column: "body".into(),
            ..s
        };
        let u = &bad.plan().unwrap()[0];
        let err = bad
            .read_unit(u, &mut |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("b.jsonl") && err.contains("\"body\"") && err.contains("id, text"),
            "{err}"
        );
    }
}
