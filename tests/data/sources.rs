//! Local file and directory sources: text, identities, errors.

use std::fs;

use rpt_flow::data::{token_stream, train_bpe, DataError, HubOptions, Source};
use serde_json::json;

fn source(path: &std::path::Path) -> Source {
    Source::from_value(&json!({ "path": path.to_str().unwrap() })).unwrap()
}

#[test]
fn a_text_file_is_read_as_it_is() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my.txt");
    let content = "first line\nsecond line\n\nafter one blank line\n \nlast, no newline";
    fs::write(&path, content).unwrap();
    let text = source(&path).text().unwrap();
    assert_eq!(text.text, content, "single newlines stay single");
    assert_eq!(text.rows, 1);
    assert_eq!(text.bytes(), content.len());
    // The same as saying so; `join` only matters for a directory.
    let explicit = Source::from_value(&json!({ "path": path.to_str().unwrap(), "rows": "file" })).unwrap();
    assert_eq!(explicit.identity().unwrap(), source(&path).identity().unwrap());
    let spaced = Source::from_value(&json!({ "path": path.to_str().unwrap(), "join": " " })).unwrap();
    assert_eq!(spaced.text().unwrap().text, content);
    // One token per byte (no merges): the stream is exactly the file's bytes, no newline added.
    let tok = train_bpe(&[content.to_string()], 258).unwrap();
    let ts =
        token_stream(&source(&path), &HubOptions::from_env(), &tok, "sources.rs: bytes, vocab 258", false).unwrap();
    assert_eq!(ts.ids.len(), content.len());
    assert_eq!(tok.decode(&ts.ids, false).unwrap(), content);
}

#[test]
fn the_wikitext_row_rule_is_opt_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.txt");
    fs::write(&path, " = A = \n \n b c \n").unwrap();
    let wiki = |extra: serde_json::Value| {
        let mut v = json!({ "path": path.to_str().unwrap(), "rows": "wikitext" });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        Source::from_value(&v).unwrap()
    };
    let text = wiki(json!({})).text().unwrap();
    assert_eq!(text.text, " = A = \n\n\n\n\n b c \n");
    assert_eq!(text.rows, 3);
    assert_eq!(wiki(json!({ "join": " " })).text().unwrap().text, " = A = \n   b c \n");
    // "lines", the rule's first name, is the same source with the same identity.
    let lines = Source::from_value(&json!({ "path": path.to_str().unwrap(), "rows": "lines" })).unwrap();
    assert_eq!(lines.identity().unwrap(), wiki(json!({})).identity().unwrap());
    assert_eq!(lines.identity().unwrap()["rows"], "lines");
}

#[test]
fn wikitext_files_keep_the_row_rule_and_their_identity() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["wiki.test.raw", "wiki.valid.raw", "wiki.train.tokens"] {
        let path = dir.path().join(name);
        fs::write(&path, " = A = \n \n b c \n").unwrap();
        let src = source(&path);
        assert_eq!(src.text().unwrap().text, " = A = \n\n\n\n\n b c \n", "{name}");
        // The identity every cached WikiText result was keyed with: renaming the rule kept it.
        let id = src.identity().unwrap();
        assert_eq!(
            id,
            json!({ "kind": "file", "blake3": blake3::hash(b" = A = \n \n b c \n").to_hex().as_str(),
                    "dir": false, "rows": "lines", "join": "\n\n" }),
            "{name}"
        );
        // As-is on request.
        let whole = Source::from_value(&json!({ "path": path.to_str().unwrap(), "rows": "file" })).unwrap();
        assert_eq!(whole.text().unwrap().text, " = A = \n \n b c \n");
    }
    for name in ["wiki.raw", "wiki..raw", "mywiki.test.raw", "wiki.test.txt"] {
        assert!(!rpt_flow::data::is_wikitext_file_name(name), "{name}");
    }
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
    assert!(err.contains("`rows` is \"file\"") && err.contains("or \"wikitext\""), "{err}");
    assert!(err.contains("not \"words\""), "{err}");
    let err = Source::from_value(&json!({ "path": "x", "rows": "wikitxt" })).unwrap_err().to_string();
    assert!(err.contains("did you mean \"wikitext\""), "{err}");
    let err = Source::from_value(&json!({ "path": "x", "rows": 1 })).unwrap_err().to_string();
    assert!(err.contains("`rows` must be a string"), "{err}");
    let err = Source::from_value(&json!("wikitext-2-raw-v1:valid")).unwrap_err().to_string();
    assert!(err.contains("did you mean `wikitext-2-raw-v1:validation`"), "{err}");
    let err = Source::from_value(&json!(3)).unwrap_err().to_string();
    assert!(err.contains("expected a name or a table"), "{err}");
    assert!(Source::from_value(&json!({ "path": "x", "name": "synthetic:facts" })).is_err());
}
