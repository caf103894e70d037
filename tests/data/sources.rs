//! Local file and directory sources: text, identities, errors.

use std::fs;

use rpt_flow::data::{DataError, Source};
use serde_json::json;

fn source(path: &std::path::Path) -> Source {
    Source::from_value(&json!({ "path": path.to_str().unwrap() })).unwrap()
}

#[test]
fn a_file_is_read_as_dataset_rows_joined_by_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.txt");
    fs::write(&path, " = A = \n \n b c \n").unwrap();
    let text = source(&path).text().unwrap();
    assert_eq!(text.text, " = A = \n\n\n\n\n b c \n");
    assert_eq!(text.rows, 3);
    assert_eq!(text.bytes(), text.text.len());

    let whole = Source::from_value(&json!({ "path": path.to_str().unwrap(), "rows": "file" })).unwrap();
    assert_eq!(whole.text().unwrap().text, " = A = \n \n b c \n");
    let spaced = Source::from_value(&json!({ "path": path.to_str().unwrap(), "join": " " })).unwrap();
    assert_eq!(spaced.text().unwrap().text, " = A = \n   b c \n");
}

#[test]
fn identity_is_the_content_not_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    fs::write(&a, "same words\n").unwrap();
    fs::write(&b, "same words\n").unwrap();
    let id_a = source(&a).identity().unwrap();
    assert_eq!(id_a, source(&b).identity().unwrap());
    assert_eq!(id_a["blake3"], blake3::hash(b"same words\n").to_hex().as_str());
    // A different size (and mtime) is noticed by the memo.
    fs::write(&b, "other words, longer\n").unwrap();
    assert_ne!(id_a, source(&b).identity().unwrap());
    // How rows are joined is part of the identity.
    let joined = Source::from_value(&json!({ "path": a.to_str().unwrap(), "join": " " })).unwrap();
    assert_ne!(id_a, joined.identity().unwrap());
}

#[test]
fn a_directory_is_its_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("b.txt"), "second\n").unwrap();
    fs::write(dir.path().join("a.txt"), "first\n").unwrap();
    fs::write(dir.path().join(".hidden"), "never\n").unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    fs::write(dir.path().join("sub/c.txt"), "nested\n").unwrap();
    let src = source(dir.path());
    assert_eq!(src.text().unwrap().text, "first\n\n\nsecond\n");
    let id = src.identity().unwrap();
    assert_eq!(id["dir"], true);
    // Renaming a file changes the identity.
    fs::rename(dir.path().join("b.txt"), dir.path().join("c.txt")).unwrap();
    assert_ne!(id, source(dir.path()).identity().unwrap());
}

#[test]
fn relative_paths_resolve_against_a_base_dir() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("x.txt"), "x\n").unwrap();
    let src = Source::from_value(&json!({ "path": "x.txt" })).unwrap().with_base_dir(dir.path());
    assert_eq!(src.text().unwrap().text, "x\n");
}

#[test]
fn errors_say_what_is_wrong() {
    let err = source(std::path::Path::new("/nonexistent/wiki.raw")).identity().unwrap_err();
    assert!(matches!(err.downcast_ref::<DataError>(), Some(DataError::MissingFile(_))), "{err}");
    assert!(err.to_string().contains("/nonexistent/wiki.raw"));

    let err = Source::from_value(&json!({ "paht": "x" })).unwrap_err().to_string();
    assert!(err.contains("did you mean `path`"), "{err}");
    let err = Source::from_value(&json!({ "path": "x", "rows": "words" })).unwrap_err().to_string();
    assert!(err.contains("\"lines\" or \"file\""), "{err}");
    let err = Source::from_value(&json!("wikitext-2-raw-v1:valid")).unwrap_err().to_string();
    assert!(err.contains("did you mean `wikitext-2-raw-v1:validation`"), "{err}");
    let err = Source::from_value(&json!(3)).unwrap_err().to_string();
    assert!(err.contains("expected a name or a table"), "{err}");
    assert!(Source::from_value(&json!({ "path": "x", "name": "synthetic:facts" })).is_err());
}
