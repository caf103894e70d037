//! WikiText-2 from ../shared/data: rows as the hub dataset has them, the Wanda/SparseGPT text,
//! window counts, and the file source against the hub source read from a local hub cache.
//!
//! The expected numbers were computed with Python from the file itself, by the HF `wikitext`
//! dataset script's rule (`row if row.strip() else ""` per line) and `"\n\n".join(rows)`.

use std::{fs, path::PathBuf};

use rpt_flow::data::{
    chunks, llama_cpp, rolling, scored_bytes, token_bytes, token_stream, train_bpe, write_text_column, Bos, DataError,
    HubOptions, Source, WindowOptions, WIKITEXT_REVISION,
};
use serde_json::json;

/// `wiki.test.raw`, when the shared folder is here (see [`crate::support::shared`]).
fn test_raw() -> Option<PathBuf> {
    crate::support::shared("data/wikitext-2-raw/wiki.test.raw")
}

fn file_source(raw: &std::path::Path) -> Source {
    Source::from_value(&json!({ "path": raw.to_str().unwrap() })).unwrap()
}

/// The HF script's row rule, written independently of the library: lines with their "\n",
/// whitespace-only lines as "". (The file has no "\r" and none of the characters on which
/// Python's and Rust's whitespace differ.)
fn rows_by_hand(content: &str) -> Vec<String> {
    content.split_inclusive('\n').map(|l| if l.trim().is_empty() { String::new() } else { l.to_string() }).collect()
}

#[test]
fn test_split_rows_and_text() {
    let Some(raw) = test_raw() else { return };
    let text = file_source(&raw).text().unwrap();
    assert_eq!(text.rows, 4358, "rows of wiki.test.raw");
    assert_eq!(text.bytes(), 1_296_370, "bytes of \"\\n\\n\".join(rows)");
    assert_eq!(text.text.chars().count(), 1_294_336);
    // The file starts with an empty line, then the first article's title line (read at run time:
    // no WikiText text is committed); rows keep their "\n" and are joined with "\n\n".
    let title = fs::read_to_string(&raw).unwrap().lines().nth(1).unwrap().to_string();
    assert!(title.starts_with(" = ") && title.ends_with(" = "), "{title:?}");
    assert!(text.text.starts_with(&format!("\n\n{title}\n\n\n\n\n")), "{:?}", &text.text[..40]);
    let content = fs::read_to_string(&raw).unwrap();
    assert_eq!(text.text, rows_by_hand(&content).join("\n\n"));
    assert_eq!(rows_by_hand(&content).iter().filter(|r| r.is_empty()).count(), 1467);
}

#[test]
fn tokenised_wikitext_file_has_the_same_row_rule() {
    let Some(path) = crate::support::shared("data/wikitext-2/test.txt") else { return };
    // Not named like WikiText's own files (wiki.test.tokens): the row rule is asked for.
    let text =
        Source::from_value(&json!({ "path": path.to_str().unwrap(), "rows": "wikitext" })).unwrap().text().unwrap();
    assert_eq!(text.rows, 4358);
    assert_eq!(text.bytes(), 1_262_229, "bytes of \"\\n\\n\".join(rows) of wikitext-2/test.txt");
    // An empty first row, then the first title (read from the file: no WikiText text is committed).
    let title = fs::read_to_string(&path).unwrap().lines().nth(1).unwrap().to_string();
    assert!(title.starts_with(" = ") && title.contains("<unk>"), "the tokenized version has <unk>: {title:?}");
    assert!(text.text.starts_with(&format!("\n\n{title}\n\n")));
}

#[test]
fn byte_level_window_counts() {
    let Some(raw) = test_raw() else { return };
    // A BPE without merges (vocab = 2 specials + 256 bytes) makes one token per byte, so the
    // stream length is the text's byte count: 1,296,370.
    let tok = train_bpe(&["a"], 258).unwrap();
    let stream =
        token_stream(&file_source(&raw), &HubOptions::offline_at("/nonexistent"), &tok, "bytes-258", false).unwrap();
    assert_eq!(stream.ids.len(), 1_296_370);
    assert_eq!(stream.bytes, 1_296_370);
    let opts = |seq_len, bos| WindowOptions { seq_len, bos, bos_id: tok.token_to_id("<s>"), max_windows: None };
    let w = chunks(&stream.ids, &opts(2048, Bos::None)).unwrap();
    assert_eq!(w.len(), 632);
    assert_eq!(w.iter().map(|w| w.scored()).sum::<usize>(), 632 * 2047);
    let w = chunks(&stream.ids, &opts(128, Bos::StreamStart)).unwrap();
    assert_eq!(w.len(), 10_127);
    let w = llama_cpp(&stream.ids, &opts(512, Bos::WindowStart)).unwrap();
    assert_eq!(w.len(), 2531);
    assert_eq!(w.iter().map(|w| w.scored()).sum::<usize>(), 2531 * 255);
}

/// Builds `<cache>/datasets--Salesforce--wikitext/...` holding `rows` as the test split's parquet
/// file: under `snapshots/<WIKITEXT_REVISION>/` (how huggingface_hub stores a commit pin) when
/// `via_ref` is false, else under another snapshot name that `refs/<WIKITEXT_REVISION>` names.
fn hub_cache(rows: &[String], via_ref: bool) -> tempfile::TempDir {
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("datasets--Salesforce--wikitext");
    let snapshot = if via_ref { "0123456789abcdef0123456789abcdef01234567" } else { WIKITEXT_REVISION };
    if via_ref {
        fs::create_dir_all(repo.join("refs")).unwrap();
        fs::write(repo.join("refs").join(WIKITEXT_REVISION), snapshot).unwrap();
    }
    let dir = repo.join("snapshots").join(snapshot).join("wikitext-2-raw-v1");
    fs::create_dir_all(&dir).unwrap();
    write_text_column(&dir.join("test-00000-of-00001.parquet"), "text", rows).unwrap();
    cache
}

#[test]
fn file_and_offline_hub_give_the_same_text_and_tokens() {
    let Some(raw) = test_raw() else { return };
    let content = fs::read_to_string(&raw).unwrap();
    let rows = rows_by_hand(&content);
    let corpus: Vec<String> =
        Source::parse_name("synthetic:facts").unwrap().text().unwrap().text.lines().map(String::from).collect();
    let tok = train_bpe(&corpus, 600).unwrap();
    let file = file_source(&raw);
    let file_stream =
        token_stream(&file, &HubOptions::offline_at("/nonexistent"), &tok, "synthetic-600", false).unwrap();
    for via_ref in [false, true] {
        let cache = hub_cache(&rows, via_ref);
        let hub = HubOptions::offline_at(cache.path());
        let named = Source::parse_name("wikitext-2-raw-v1:test").unwrap();
        let hub_rows = named.rows_with(&hub).unwrap();
        assert_eq!(hub_rows.len(), 4358);
        assert_eq!(hub_rows, rows, "parquet rows differ from the file's rows");
        let hub_text = named.text_with(&hub).unwrap();
        assert_eq!(hub_text.text, file.text().unwrap().text);
        let hub_stream = token_stream(&named, &hub, &tok, "synthetic-600", false).unwrap();
        assert_eq!(hub_stream.ids, file_stream.ids);
        assert_eq!(hub_stream.bytes, file_stream.bytes);
    }
    assert!(file_stream.ids.len() > 100_000, "{} tokens", file_stream.ids.len());
}

#[test]
fn scored_bytes_cover_the_text_when_every_token_is_scored() {
    let Some(raw) = test_raw() else { return };
    let corpus: Vec<String> =
        Source::parse_name("synthetic:facts").unwrap().text().unwrap().text.lines().map(String::from).collect();
    let tok = train_bpe(&corpus, 700).unwrap();
    let table = token_bytes(&tok).unwrap();
    assert_eq!(table[0], 0, "BOS stands for no text");
    let stream =
        token_stream(&file_source(&raw), &HubOptions::offline_at("/nonexistent"), &tok, "synthetic-700", false)
            .unwrap();
    let total: u64 = stream.ids.iter().map(|&id| table[id as usize] as u64).sum();
    assert_eq!(total, 1_296_370, "token bytes do not add up to the text's bytes");
    let opts = WindowOptions { seq_len: 512, bos: Bos::StreamStart, bos_id: Some(0), max_windows: None };
    let every = rolling(&stream.ids, &opts, 384).unwrap();
    assert_eq!(scored_bytes(&every, &table), 1_296_370);
    let half = llama_cpp(&stream.ids, &WindowOptions { bos: Bos::WindowStart, ..opts }).unwrap();
    let covered = scored_bytes(&half, &table);
    assert!(covered > 1_296_370 / 3 && covered < 1_296_370 * 2 / 3, "llama-cpp scored {covered} bytes");
}

#[test]
fn hub_identity_names_repo_revision_and_split() {
    let id = Source::parse_name("wikitext-2-v1:validation").unwrap().identity().unwrap();
    assert_eq!(id["repo"], "Salesforce/wikitext");
    assert_eq!(id["revision"], WIKITEXT_REVISION);
    assert_eq!(id["config"], "wikitext-2-v1");
    assert_eq!(id["split"], "validation");
    assert_eq!(id["join"], "\n\n");
    let calib = Source::from_value(&json!({ "name": "wikitext-2-raw-v1:train", "join": " " })).unwrap();
    assert_eq!(calib.identity().unwrap()["join"], " ");
}

#[test]
fn offline_without_the_file_says_what_to_download() {
    let empty = tempfile::tempdir().unwrap();
    let named = Source::parse_name("wikitext-2-raw-v1:validation").unwrap();
    let err = named.text_with(&HubOptions::offline_at(empty.path())).unwrap_err();
    let typed = err.chain().find_map(|e| e.downcast_ref::<DataError>());
    assert!(matches!(typed, Some(DataError::HubNotCached { .. })), "{err:#}");
    let msg = format!("{err:#}");
    for needle in [
        "wikitext-2-raw-v1/validation-00000-of-00001.parquet",
        WIKITEXT_REVISION,
        "HF_HUB_OFFLINE",
        "huggingface-cli download",
    ] {
        assert!(msg.contains(needle), "error lacks `{needle}`: {msg}");
    }
}
