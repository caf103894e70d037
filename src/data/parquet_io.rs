//! Reading (and, for tests and fixtures, writing) a single string column of a parquet file.
//!
//! Uses the `parquet` crate without arrow, with only the snappy codec: the hub's converted
//! parquet files are written by pyarrow with its default codec, snappy.

use std::{fs::File, path::Path, sync::Arc};

use anyhow::{bail, Context as _, Result};
use parquet::{
    basic::Compression,
    data_type::{ByteArray, ByteArrayType},
    file::{
        properties::WriterProperties,
        reader::{FileReader as _, SerializedFileReader},
        writer::SerializedFileWriter,
    },
    record::Field,
    schema::parser::parse_message_type,
};

/// The values of string column `column`, in row order. A null reads as `""` (the WikiText files
/// have none).
pub fn read_text_column(path: &Path, column: &str) -> Result<Vec<String>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{} is not a readable parquet file", path.display()))?;
    let meta = reader.metadata().file_metadata();
    let rows = usize::try_from(meta.num_rows()).unwrap_or(0);
    let fields = meta.schema_descr().root_schema().get_fields();
    if !fields.iter().any(|f| f.name() == column) {
        let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
        bail!("{} has no column `{column}` (columns: {})", path.display(), names.join(", "));
    }
    let mut out = Vec::with_capacity(rows);
    for row in reader.get_row_iter(None)? {
        let row = row.with_context(|| format!("reading {}", path.display()))?;
        let (_, field) =
            row.get_column_iter().find(|(name, _)| name.as_str() == column).context("row without the column")?;
        out.push(match field {
            Field::Str(s) => s.clone(),
            Field::Bytes(b) => String::from_utf8(b.data().to_vec())
                .with_context(|| format!("{}: `{column}` is not UTF-8", path.display()))?,
            Field::Null => String::new(),
            other => bail!("{}: `{column}` holds {other:?}, not a string", path.display()),
        });
    }
    Ok(out)
}

/// Writes `rows` as a one-column parquet file shaped like the hub's WikiText files
/// (`optional binary <column> (STRING)`, snappy, one row group).
pub fn write_text_column<S: AsRef<str>>(path: &Path, column: &str, rows: &[S]) -> Result<()> {
    let schema = parse_message_type(&format!("message schema {{ optional binary {column} (STRING); }}"))?;
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props))?;
    let values: Vec<ByteArray> = rows.iter().map(|r| ByteArray::from(r.as_ref())).collect();
    let defs = vec![1i16; values.len()];
    let mut group = writer.next_row_group()?;
    while let Some(mut col) = group.next_column()? {
        col.typed::<ByteArrayType>().write_batch(&values, Some(&defs), None)?;
        col.close()?;
    }
    group.close()?;
    writer.close()?;
    Ok(())
}
