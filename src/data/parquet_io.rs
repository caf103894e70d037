//! Reading parquet files — a single string column (WikiText), or whole rows as JSON (the task
//! datasets) — and, for tests and fixtures, writing them.
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
use serde_json::Value as Json;

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

/// Every row of a parquet file as JSON (lists as arrays, groups as objects; `LIST` columns in the
/// standard three-level encoding read as plain arrays).
pub fn read_rows(path: &Path) -> Result<Vec<Json>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = SerializedFileReader::new(file)
        .with_context(|| format!("{} is not a readable parquet file", path.display()))?;
    let mut out = Vec::new();
    for row in reader.get_row_iter(None)? {
        out.push(row.with_context(|| format!("reading {}", path.display()))?.to_json_value());
    }
    Ok(out)
}

/// Writes JSON rows under `schema` (a parquet message type) as one snappy row group: strings
/// (`binary (STRING)`), `int64`/`int32`, optional groups and three-level `LIST`s — the shapes of
/// the hub's task datasets. For tests and fixtures.
pub fn write_rows(path: &Path, schema: &str, rows: &[Json]) -> Result<()> {
    let schema = Arc::new(parse_message_type(schema)?);
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut writer = SerializedFileWriter::new(file, schema.clone(), Arc::new(props))?;
    let descr = parquet::schema::types::SchemaDescriptor::new(schema.clone());
    let mut group = writer.next_row_group()?;
    let mut leaf = 0;
    while let Some(mut col) = group.next_column()? {
        let path: Vec<String> = descr.column(leaf).path().parts().to_vec();
        let mut levels = Leaf::default();
        for row in rows {
            shred(&schema, Some(row), &path, 0, 0, 0, &mut levels, true)?;
        }
        let (defs, reps) = (Some(levels.defs.as_slice()), Some(levels.reps.as_slice()));
        match col.untyped() {
            parquet::column::writer::ColumnWriter::ByteArrayColumnWriter(w) => {
                let values: Vec<ByteArray> =
                    levels.values.iter().map(|v| ByteArray::from(v.as_str().unwrap_or_default())).collect();
                w.write_batch(&values, defs, reps)?;
            }
            parquet::column::writer::ColumnWriter::Int64ColumnWriter(w) => {
                let values: Vec<i64> = levels.values.iter().map(|v| v.as_i64().unwrap_or_default()).collect();
                w.write_batch(&values, defs, reps)?;
            }
            parquet::column::writer::ColumnWriter::Int32ColumnWriter(w) => {
                let values: Vec<i32> = levels.values.iter().map(|v| v.as_i64().unwrap_or_default() as i32).collect();
                w.write_batch(&values, defs, reps)?;
            }
            _ => bail!("write_rows writes strings and integers only (column {})", path.join(".")),
        }
        col.close()?;
        leaf += 1;
    }
    group.close()?;
    writer.close()?;
    Ok(())
}

/// One leaf column's values with their definition and repetition levels.
#[derive(Default)]
struct Leaf {
    values: Vec<Json>,
    defs: Vec<i16>,
    reps: Vec<i16>,
}

/// Dremel striping of `value` (the field `node`) towards the leaf at `path`: `def` and `depth`
/// are the levels reached above it, `rep` the repetition level of its first entry.
#[allow(clippy::too_many_arguments)]
fn shred(
    node: &parquet::schema::types::Type,
    value: Option<&Json>,
    path: &[String],
    def: i16,
    rep: i16,
    depth: i16,
    leaf: &mut Leaf,
    root: bool,
) -> Result<()> {
    use parquet::basic::{ConvertedType, Repetition};
    let value = value.filter(|v| !v.is_null());
    let mut def = def;
    if !root {
        match node.get_basic_info().repetition() {
            Repetition::OPTIONAL => match value {
                None => {
                    leaf.defs.push(def);
                    leaf.reps.push(rep);
                    return Ok(());
                }
                Some(_) => def += 1,
            },
            Repetition::REQUIRED => {
                if value.is_none() {
                    bail!("required field `{}` is missing", node.name());
                }
            }
            Repetition::REPEATED => bail!("a repeated field outside a LIST group: `{}`", node.name()),
        }
    }
    let value = value.context("a present value")?;
    if node.is_primitive() {
        leaf.values.push(value.clone());
        leaf.defs.push(def);
        leaf.reps.push(rep);
        return Ok(());
    }
    let fields = node.get_fields();
    if node.get_basic_info().converted_type() == ConvertedType::LIST {
        // optional group x (LIST) { repeated group list { <element>; } }
        let element = fields[0].get_fields().first().context("a LIST group with no element")?;
        let items = value.as_array().with_context(|| format!("`{}` is a list, found {value}", node.name()))?;
        if items.is_empty() {
            leaf.defs.push(def);
            leaf.reps.push(rep);
        }
        for (k, item) in items.iter().enumerate() {
            let r = if k == 0 { rep } else { depth + 1 };
            shred(element, Some(item), &path[2..], def + 1, r, depth + 1, leaf, false)?;
        }
        return Ok(());
    }
    let name = path.first().context("a group above no leaf")?;
    let child = fields.iter().find(|f| f.name() == name).with_context(|| format!("no field `{name}`"))?;
    shred(child, value.get(name.as_str()), &path[1..], def, rep, depth, leaf, false)
}
