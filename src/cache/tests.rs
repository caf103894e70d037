use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::json;

use super::*;

fn info(pipeline: &str, metric: f64) -> EntryInfo {
    EntryInfo {
        kind: "test".into(),
        version: 3,
        key_material: json!({"kind": "test", "n": 1}),
        metrics: json!({"m": metric}),
        seconds: 0.5,
        pipeline: pipeline.into(),
        instance: "inst".into(),
        inputs: vec![],
    }
}

fn key(n: u32) -> Key {
    Key::of_bytes(&n.to_le_bytes())
}

fn write(dir: &Path, rel: &str, bytes: &[u8]) {
    let path = dir.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, bytes).unwrap();
}

fn make_entry(cache: &Cache, k: &Key, files: &[(&str, &[u8])]) -> Manifest {
    let pending = cache.begin(k).unwrap();
    for (rel, bytes) in files {
        write(pending.dir(), rel, bytes);
    }
    pending.commit(info("p", 1.0)).unwrap()
}

/// Relative paths of every file below `dir`.
fn files_below(dir: &Path) -> Vec<String> {
    fsutil::walk_files(dir).unwrap().into_iter().map(|f| f.rel).collect()
}

fn names_in(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<String> = rd.map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        }
        Err(_) => Vec::new(),
    }
}

fn big_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

// ---------------------------------------------------------------- keys

#[test]
fn key_hex_round_trip() {
    for n in 0..50 {
        let k = key(n);
        let hex = k.to_hex();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(Key::from_hex(&hex), Some(k));
        assert_eq!(Key::from_hex(&hex.to_uppercase()), Some(k));
        assert_eq!(k.short(), hex[..12]);
        assert_eq!(format!("{k}"), hex);
        assert_eq!(hex.parse::<Key>().unwrap(), k);
    }
    let k = Key([0xab; 32]);
    assert_eq!(k.to_hex(), "ab".repeat(32));
    let mut bytes = [0u8; 32];
    bytes[0] = 0x01;
    bytes[31] = 0xf0;
    assert_eq!(Key(bytes).to_hex(), format!("01{}f0", "00".repeat(30)));
    assert_eq!(Key::of_bytes(b"abc").0, *blake3::hash(b"abc").as_bytes());
    // Wrong length, wrong digits.
    assert_eq!(Key::from_hex(&"a".repeat(63)), None);
    assert_eq!(Key::from_hex(&"a".repeat(65)), None);
    assert_eq!(Key::from_hex(&format!("{}g", "a".repeat(63))), None);
    assert_eq!(Key::from_hex(""), None);
    assert!("xyz".parse::<Key>().is_err());
}

#[test]
fn key_serde_is_hex_string() {
    let k = key(7);
    let s = serde_json::to_string(&k).unwrap();
    assert_eq!(s, format!("\"{}\"", k.to_hex()));
    let back: Key = serde_json::from_str(&s).unwrap();
    assert_eq!(back, k);
    assert!(serde_json::from_str::<Key>("\"abc\"").is_err());
    assert!(serde_json::from_str::<Key>("12").is_err());
    assert_eq!(serde_json::to_value(vec![k]).unwrap(), json!([k.to_hex()]));
}

// ---------------------------------------------------------------- commit

#[test]
fn commit_records_exactly_the_written_files() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path().join("cache"));
    let k = key(1);
    assert!(!cache.contains(&k));
    assert!(cache.manifest(&k).unwrap().is_none());

    let big = big_bytes(300_000);
    let pending = cache.begin(&k).unwrap();
    assert!(pending.dir().starts_with(cache.root().join("tmp")));
    let tmp_name = pending.dir().file_name().unwrap().to_str().unwrap().to_string();
    assert!(tmp_name.starts_with(&format!("{}.{}.", k.to_hex(), std::process::id())));
    write(pending.dir(), "z.txt", b"last");
    write(pending.dir(), "config.json", b"{}");
    write(pending.dir(), "sub/model.safetensors", &big);
    write(pending.dir(), "sub/deeper/empty", b"");
    let m = pending.commit(info("pipe", 2.5)).unwrap();

    let expect = [
        ("config.json", b"{}".to_vec()),
        ("sub/deeper/empty", Vec::new()),
        ("sub/model.safetensors", big.clone()),
        ("z.txt", b"last".to_vec()),
    ];
    assert_eq!(m.files.len(), expect.len());
    for (rec, (path, bytes)) in m.files.iter().zip(&expect) {
        assert_eq!(rec.path, *path);
        assert_eq!(rec.size, bytes.len() as u64);
        assert_eq!(rec.blake3, blake3::hash(bytes).to_hex().to_string());
    }
    assert_eq!(m.key, k);
    assert_eq!(m.kind, "test");
    assert_eq!(m.version, 3);
    assert_eq!(m.metrics, json!({"m": 2.5}));
    assert_eq!(m.pipeline, "pipe");
    assert_eq!(m.rpt_flow_version, env!("CARGO_PKG_VERSION"));
    assert!(m.created.abs_diff(fsutil::now_unix()) < 60);

    let dir = cache.entry_dir(&k);
    let hex = k.to_hex();
    assert_eq!(dir, cache.root().join(&hex[..2]).join(&hex));
    assert!(cache.contains(&k));
    let mut on_disk = files_below(&dir);
    on_disk.retain(|f| f != "manifest.json");
    assert_eq!(on_disk, expect.iter().map(|e| e.0).collect::<Vec<_>>());
    assert_eq!(fs::read(dir.join("sub/model.safetensors")).unwrap(), big);

    // manifest.json is pretty JSON equal to what commit returned.
    let text = fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(text.contains("\n  \"key\": "));
    let read = cache.manifest(&k).unwrap().unwrap();
    assert_eq!(serde_json::to_value(&read).unwrap(), serde_json::to_value(&m).unwrap());
    assert_eq!(read.key_material, json!({"kind": "test", "n": 1}));

    // The temporary directory is gone; the entry verifies.
    assert!(names_in(&cache.root().join("tmp")).is_empty());
    assert!(cache.verify().unwrap().is_empty());
}

#[test]
fn commit_of_empty_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let m = cache.begin(&key(1)).unwrap().commit(info("p", 0.0)).unwrap();
    assert!(m.files.is_empty());
    assert!(cache.contains(&key(1)));
    assert_eq!(names_in(&cache.entry_dir(&key(1))), vec!["manifest.json"]);
}

#[test]
fn uncommitted_drop_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path().join("c"));
    let k = key(2);
    let dir;
    {
        let pending = cache.begin(&k).unwrap();
        dir = pending.dir().to_path_buf();
        write(pending.dir(), "a/b/c.bin", &big_bytes(1000));
        assert!(dir.join("a/b/c.bin").exists());
    }
    assert!(!dir.exists());
    assert!(names_in(&cache.root().join("tmp")).is_empty());
    assert!(!cache.contains(&k));
    assert!(!cache.entry_dir(&k).exists());
    assert!(cache.entries().unwrap().is_empty());
}

#[test]
fn failed_commit_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let k = key(3);
    let pending = cache.begin(&k).unwrap();
    write(pending.dir(), "manifest.json", b"{}");
    let err = pending.commit(info("p", 0.0)).unwrap_err();
    assert!(format!("{err:#}").contains("reserved"), "{err:#}");
    assert!(!cache.contains(&k));
    assert!(names_in(&cache.root().join("tmp")).is_empty());

    #[cfg(unix)]
    {
        let pending = cache.begin(&k).unwrap();
        write(pending.dir(), "real", b"x");
        std::os::unix::fs::symlink(pending.dir().join("real"), pending.dir().join("link")).unwrap();
        let err = pending.commit(info("p", 0.0)).unwrap_err();
        assert!(format!("{err:#}").contains("not a regular file"), "{err:#}");
        assert!(!cache.contains(&k));
        assert!(names_in(&cache.root().join("tmp")).is_empty());
    }
}

#[test]
fn second_commit_of_same_key_returns_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let k = key(4);
    let p1 = cache.begin(&k).unwrap();
    let p2 = cache.begin(&k).unwrap();
    assert_ne!(p1.dir(), p2.dir());
    write(p1.dir(), "out", b"first");
    write(p2.dir(), "out", b"second, longer");
    let m1 = p1.commit(info("one", 1.0)).unwrap();
    let m2 = p2.commit(info("two", 2.0)).unwrap();
    assert_eq!(m2.pipeline, "one");
    assert_eq!(m2.metrics, json!({"m": 1.0}));
    assert_eq!(m2.files, m1.files);
    assert_eq!(fs::read(cache.entry_dir(&k).join("out")).unwrap(), b"first");
    assert!(names_in(&cache.root().join("tmp")).is_empty());
    assert!(cache.verify().unwrap().is_empty());
}

#[test]
fn concurrent_commits_of_same_key_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let k = key(5);
    let n = 6;
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let root = root.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let cache = Cache::open(root);
                let pending = cache.begin(&k).unwrap();
                write(pending.dir(), "out", format!("writer {i}").as_bytes());
                write(pending.dir(), "big", &big_bytes(50_000 + i));
                barrier.wait();
                pending.commit(info(&format!("w{i}"), i as f64)).unwrap()
            })
        })
        .collect();
    let results: Vec<Manifest> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let cache = Cache::open(root);
    let on_disk = cache.manifest(&k).unwrap().unwrap();
    for m in &results {
        assert_eq!(m.pipeline, on_disk.pipeline);
        assert_eq!(m.files, on_disk.files);
    }
    assert!(names_in(&cache.root().join("tmp")).is_empty());
    assert!(cache.verify().unwrap().is_empty());
    assert_eq!(cache.entries().unwrap().len(), 1);
}

#[test]
fn lock_makes_concurrent_runs_compute_once() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let k = key(6);
    let computed = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let root = root.clone();
            let computed = computed.clone();
            std::thread::spawn(move || {
                let cache = Cache::open(root);
                let _lock = cache.lock(&k).unwrap();
                if cache.contains(&k) {
                    return cache.manifest(&k).unwrap().unwrap();
                }
                computed.fetch_add(1, Ordering::SeqCst);
                let pending = cache.begin(&k).unwrap();
                write(pending.dir(), "out", b"result");
                std::thread::sleep(Duration::from_millis(50));
                pending.commit(info("p", 1.0)).unwrap()
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(computed.load(Ordering::SeqCst), 1);
}

#[test]
fn commit_replaces_debris_without_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let k = key(7);
    write(&cache.entry_dir(&k), "junk", b"junk");
    assert!(!cache.contains(&k));
    let m = make_entry(&cache, &k, &[("good", b"good")]);
    assert_eq!(m.files.len(), 1);
    assert_eq!(names_in(&cache.entry_dir(&k)), vec!["good", "manifest.json"]);
    assert!(names_in(&cache.root().join("tmp")).is_empty());
}

// ---------------------------------------------------------------- touch, entries

#[test]
fn touch_and_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    assert!(cache.entries().unwrap().is_empty());
    let (a, b) = (key(10), key(11));
    let ma = make_entry(&cache, &a, &[("x", &[1u8; 100]), ("d/y", &[2u8; 50])]);
    let mb = make_entry(&cache, &b, &[("x", b"1")]);
    assert!(cache.touch(&key(12), "nope").is_err());

    // Debris that entries() must ignore.
    let _pending = cache.begin(&key(13)).unwrap();
    cache.partial(&key(14)).save(1, |d| Ok(fs::write(d.join("s"), b"s")?)).unwrap();
    let _lock = cache.lock(&key(15)).unwrap();
    fs::write(cache.root().join("stray-file"), b"?").unwrap();
    fs::create_dir_all(cache.root().join("ab/notakey")).unwrap();
    fs::create_dir_all(cache.root().join("zz/notakey")).unwrap();

    let list = cache.entries().unwrap();
    let keys: Vec<Key> = list.iter().map(|e| e.manifest.key).collect();
    let mut sorted = vec![a, b];
    sorted.sort();
    assert_eq!(keys, sorted);
    let ea = list.iter().find(|e| e.manifest.key == a).unwrap();
    let manifest_len = fs::metadata(cache.entry_dir(&a).join("manifest.json")).unwrap().len();
    assert_eq!(ea.bytes, 150 + manifest_len);
    assert_eq!(ea.last_used, ma.created);
    assert_eq!(ea.last_pipeline, "p");

    // touch, with a forged old timestamp first to see it replaced.
    fs::write(
        cache.entry_dir(&b).join("last_used.json"),
        serde_json::to_vec(&json!({"pipeline": "old", "unix": 5})).unwrap(),
    )
    .unwrap();
    let eb = cache.entries().unwrap().into_iter().find(|e| e.manifest.key == b).unwrap();
    assert_eq!((eb.last_used, eb.last_pipeline.as_str()), (5, "old"));
    cache.touch(&b, "other-pipeline").unwrap();
    let eb = cache.entries().unwrap().into_iter().find(|e| e.manifest.key == b).unwrap();
    assert_eq!(eb.last_pipeline, "other-pipeline");
    assert!(eb.last_used >= mb.created);
    let lu: serde_json::Value =
        serde_json::from_slice(&fs::read(cache.entry_dir(&b).join("last_used.json")).unwrap()).unwrap();
    assert_eq!(lu["pipeline"], "other-pipeline");
    assert!(lu["unix"].as_u64().unwrap() >= mb.created);
    // Nothing left in tmp/ but the pending entry; manifest untouched; still verifies.
    assert_eq!(names_in(&cache.root().join("tmp")).len(), 1);
    assert_eq!(cache.manifest(&b).unwrap().unwrap().files, mb.files);
    let problems = cache.verify().unwrap();
    // Only the stray ab/notakey directory is reported (zz/ is not a shard).
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].key.is_none());
}

// ---------------------------------------------------------------- verify

#[test]
fn verify_detects_damage() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let content = big_bytes(40_000);
    let files: &[(&str, &[u8])] = &[("w.bin", &content), ("sub/t.txt", b"hello world")];
    let keys: Vec<Key> = (20..26).map(key).collect();
    for k in &keys {
        make_entry(&cache, k, files);
        cache.touch(k, "p").unwrap();
    }
    assert!(cache.verify().unwrap().is_empty());

    let [flipped, truncated, missing, extra, bad_manifest, healthy] = keys[..] else { unreachable!() };
    let mut bytes = content.clone();
    bytes[12_345] ^= 0x01;
    fs::write(cache.entry_dir(&flipped).join("w.bin"), &bytes).unwrap();
    OpenOptions::new().write(true).open(cache.entry_dir(&truncated).join("sub/t.txt")).unwrap().set_len(5).unwrap();
    fs::remove_file(cache.entry_dir(&missing).join("w.bin")).unwrap();
    write(&cache.entry_dir(&extra), "sub/new.txt", b"extra");
    fs::write(cache.entry_dir(&bad_manifest).join("manifest.json"), b"{not json").unwrap();

    let problems = cache.verify().unwrap();
    let of =
        |k: Key| -> Vec<String> { problems.iter().filter(|p| p.key == Some(k)).map(|p| p.problem.clone()).collect() };
    let one = |k: Key, needle: &str| {
        let ps = of(k);
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert!(ps[0].contains(needle), "{ps:?} lacks {needle:?}");
    };
    one(flipped, "hash mismatch for w.bin");
    one(truncated, "size mismatch for sub/t.txt");
    one(missing, "missing file w.bin");
    one(extra, "not listed in manifest: sub/new.txt");
    one(bad_manifest, "invalid manifest");
    assert!(of(healthy).is_empty());
    assert_eq!(problems.len(), 5, "{problems:?}");
    for p in &problems {
        assert_eq!(p.dir, cache.entry_dir(&p.key.unwrap()));
    }
    // A corrupt entry no longer shows in entries().
    assert_eq!(cache.entries().unwrap().len(), 5);
}

// ---------------------------------------------------------------- partial

fn ckpt_names(p: &PartialDir) -> Vec<String> {
    names_in(p.dir())
}

#[test]
fn partial_save_latest_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let k = key(30);
    let p = cache.partial(&k);
    assert_eq!(p.dir(), cache.root().join("partial").join(k.to_hex()));
    assert!(!p.exists());
    assert!(p.latest().unwrap().is_none());
    p.remove().unwrap();

    let c1 = p
        .save(1, |d| {
            fs::write(d.join("state"), b"one")?;
            fs::create_dir(d.join("opt"))?;
            fs::write(d.join("opt/m"), b"moments")?;
            Ok(())
        })
        .unwrap();
    assert_eq!(c1.step, 1);
    assert_eq!(c1.dir, p.dir().join("ckpt-000000000001"));
    assert!(p.exists());
    let l = p.latest().unwrap().unwrap();
    assert_eq!((l.step, l.dir.clone()), (1, c1.dir.clone()));
    assert_eq!(fs::read(l.dir.join("opt/m")).unwrap(), b"moments");

    let c5 = p.save(5, |d| Ok(fs::write(d.join("state"), b"five")?)).unwrap();
    assert_eq!(ckpt_names(&p), vec!["ckpt-000000000005"]);
    assert_eq!(p.latest().unwrap().unwrap().step, 5);
    assert_eq!(fs::read(c5.dir.join("state")).unwrap(), b"five");

    // Same step again: replaced.
    p.save(5, |d| Ok(fs::write(d.join("state"), b"five again")?)).unwrap();
    assert_eq!(ckpt_names(&p), vec!["ckpt-000000000005"]);
    assert_eq!(fs::read(p.latest().unwrap().unwrap().dir.join("state")).unwrap(), b"five again");

    // A failing writer changes nothing and leaves no temporary directory.
    let err = p
        .save(9, |d| {
            fs::write(d.join("state"), b"half")?;
            anyhow::bail!("out of disk")
        })
        .unwrap_err();
    assert!(format!("{err:#}").contains("out of disk"));
    assert_eq!(ckpt_names(&p), vec!["ckpt-000000000005"]);

    // A crashed save (leftover .tmp dir of a live process, here ours) is ignored by latest().
    let crashed = p.dir().join(format!(".tmp-{}-dead", std::process::id()));
    write(&crashed, "state", b"garbage");
    assert_eq!(p.latest().unwrap().unwrap().step, 5);
    // So is a file that looks like a checkpoint, and odd names.
    fs::write(p.dir().join("ckpt-000000000099"), b"not a dir").unwrap();
    fs::create_dir(p.dir().join("ckpt-x")).unwrap();
    assert_eq!(p.latest().unwrap().unwrap().step, 5);

    // A crash after the rename but before older checkpoints were deleted leaves several
    // complete ones: the highest step wins.
    fs::create_dir(p.dir().join("ckpt-000000000002")).unwrap();
    assert_eq!(p.latest().unwrap().unwrap().step, 5);
    fs::create_dir(p.dir().join("ckpt-000000000007")).unwrap();
    let l = p.latest().unwrap().unwrap();
    assert_eq!((l.step, l.dir.clone()), (7, p.dir().join("ckpt-000000000007")));

    // A lower step saved later becomes the latest (the others are dropped).
    p.save(3, |d| Ok(fs::write(d.join("state"), b"three")?)).unwrap();
    assert_eq!(p.latest().unwrap().unwrap().step, 3);
    for gone in ["ckpt-000000000002", "ckpt-000000000005", "ckpt-000000000007"] {
        assert!(!p.dir().join(gone).exists(), "{gone}");
    }

    // Steps beyond 12 digits still order numerically.
    p.save(1_000_000_000_000, |_| Ok(())).unwrap();
    assert_eq!(p.latest().unwrap().unwrap().step, 1_000_000_000_000);

    p.remove().unwrap();
    assert!(!p.dir().exists());
    assert!(!p.exists());
    assert!(p.latest().unwrap().is_none());
    p.remove().unwrap();
    assert!(names_in(&cache.root().join("tmp")).is_empty());
}

#[test]
fn partial_save_cleans_tmp_of_dead_processes() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let p = cache.partial(&key(31));
    let dead = p.dir().join(".tmp-4294967295-abc");
    write(&dead, "state", b"x");
    assert!(!p.exists());
    p.save(2, |_| Ok(())).unwrap();
    if fsutil::pid_alive(4294967295) == Some(false) {
        assert!(!dead.exists());
    }
}

// ---------------------------------------------------------------- locks

#[test]
fn lock_semantics() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let (k, other) = (key(40), key(41));

    let l1 = cache.try_lock(&k).unwrap().expect("free lock");
    assert_eq!(l1.key(), k);
    assert!(!l1.is_shared());
    assert!(cache.lock_path(&k).exists());
    assert!(cache.try_lock(&k).unwrap().is_none());
    // Other keys are independent.
    let l2 = cache.try_lock(&other).unwrap().expect("other key");
    drop(l1);
    let l1 = cache.try_lock(&k).unwrap().expect("released on drop");
    drop(l1);
    drop(l2);

    // Shared locks coexist and exclude exclusive ones.
    let s1 = cache.lock_shared(&k).unwrap();
    let s2 = cache.lock_shared(&k).unwrap();
    assert!(s1.is_shared());
    assert!(cache.try_lock(&k).unwrap().is_none());
    drop(s1);
    assert!(cache.try_lock(&k).unwrap().is_none());
    drop(s2);
    assert!(cache.try_lock(&k).unwrap().is_some());

    // A lock held through an unrelated handle on the lock file conflicts too.
    let handle = OpenOptions::new().read(true).write(true).open(cache.lock_path(&k)).unwrap();
    handle.lock().unwrap();
    assert!(cache.try_lock(&k).unwrap().is_none());
    handle.unlock().unwrap();
    assert!(cache.try_lock(&k).unwrap().is_some());
}

#[test]
fn blocking_lock_waits_for_release() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let k = key(42);
    let cache = Cache::open(root.clone());
    let held = cache.lock(&k).unwrap();
    let released = Arc::new(AtomicBool::new(false));
    let waiter = {
        let released = released.clone();
        let root = root.clone();
        std::thread::spawn(move || {
            let _l = Cache::open(root).lock(&k).unwrap();
            released.load(Ordering::SeqCst)
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    released.store(true, Ordering::SeqCst);
    drop(held);
    assert!(waiter.join().unwrap(), "lock() returned while another holder had it");
}

// ---------------------------------------------------------------- gc

fn keep(keys: &[Key]) -> Option<HashSet<Key>> {
    Some(keys.iter().copied().collect())
}

fn set_last_used(cache: &Cache, k: &Key, unix: u64) {
    fs::write(
        cache.entry_dir(k).join("last_used.json"),
        serde_json::to_vec(&json!({"pipeline": "p", "unix": unix})).unwrap(),
    )
    .unwrap();
}

#[test]
fn gc_by_keep_set() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let (a, b, c, d, e) = (key(50), key(51), key(52), key(53), key(54));
    make_entry(&cache, &a, &[("f", &[0u8; 1000])]);
    make_entry(&cache, &b, &[("f", &[0u8; 2000])]);
    make_entry(&cache, &c, &[("f", &[0u8; 3000])]);
    for k in [a, d, e] {
        cache.partial(&k).save(1, |dir| Ok(fs::write(dir.join("s"), b"state")?)).unwrap();
    }
    let size_b = fsutil::dir_size(&cache.entry_dir(&b));
    let size_partial = fsutil::dir_size(cache.partial(&a).dir());

    // a: finished (partial is stale); d: unfinished, reachable; e: unfinished, unreachable.
    let report = cache.gc(&GcOptions { keep: keep(&[a, c, d]), older_than: None, dry_run: false }).unwrap();
    assert_eq!(report.removed_entries, vec![(b, size_b)]);
    let mut removed_partials = report.removed_partials.clone();
    removed_partials.sort();
    let mut expect = vec![a, e];
    expect.sort();
    assert_eq!(removed_partials, expect);
    assert!(report.skipped_locked.is_empty());
    assert_eq!(report.bytes_freed, size_b + 2 * size_partial);

    assert!(cache.contains(&a) && !cache.contains(&b) && cache.contains(&c));
    assert!(!cache.entry_dir(&b).exists());
    assert!(!cache.partial(&a).exists() && !cache.partial(&a).dir().exists());
    assert!(cache.partial(&d).exists());
    assert!(!cache.partial(&e).dir().exists());
    assert!(names_in(&cache.root().join("tmp")).is_empty());
    assert!(cache.verify().unwrap().is_empty());

    // No filters: entries stay.
    let report = cache.gc(&GcOptions { keep: None, older_than: None, dry_run: false }).unwrap();
    assert!(report.removed_entries.is_empty() && report.removed_partials.is_empty());
    assert_eq!(cache.entries().unwrap().len(), 2);
}

#[test]
fn gc_by_age_and_union_with_keep() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let (old, fresh, unkept, old_unused) = (key(60), key(61), key(62), key(63));
    for k in [old, fresh, unkept, old_unused] {
        make_entry(&cache, &k, &[("f", b"data")]);
    }
    let now = fsutil::now_unix();
    set_last_used(&cache, &old, now - 10_000);
    set_last_used(&cache, &fresh, now - 10);
    // old_unused: never touched, created long ago (forged manifest.created).
    let mpath = cache.entry_dir(&old_unused).join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
    m["created"] = json!(now - 20_000);
    fs::write(&mpath, serde_json::to_vec(&m).unwrap()).unwrap();

    let age_only = GcOptions { keep: None, older_than: Some(Duration::from_secs(1000)), dry_run: false };
    let removed: Vec<Key> = cache.gc(&age_only).unwrap().removed_entries.iter().map(|e| e.0).collect();
    let mut expect = vec![old, old_unused];
    expect.sort();
    assert_eq!(removed, expect);
    assert!(cache.contains(&fresh) && cache.contains(&unkept));

    // Both filters: either one removes.
    make_entry(&cache, &old, &[("f", b"data")]);
    set_last_used(&cache, &old, now - 10_000);
    let both = GcOptions { keep: keep(&[old, fresh]), older_than: Some(Duration::from_secs(1000)), dry_run: false };
    let mut removed: Vec<Key> = cache.gc(&both).unwrap().removed_entries.iter().map(|e| e.0).collect();
    removed.sort();
    let mut expect = vec![old, unkept];
    expect.sort();
    assert_eq!(removed, expect);
    assert_eq!(cache.entries().unwrap().len(), 1);
    assert!(cache.contains(&fresh));
}

#[test]
fn gc_skips_locked_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let (a, b, p) = (key(70), key(71), key(72));
    make_entry(&cache, &a, &[("f", b"a")]);
    make_entry(&cache, &b, &[("f", b"b")]);
    cache.partial(&p).save(1, |_| Ok(())).unwrap();
    let all = GcOptions { keep: keep(&[]), older_than: None, dry_run: false };

    // a held exclusively through a second handle on its lock file, b held shared, p's partial
    // held through the cache API.
    fs::create_dir_all(cache.root().join("locks")).unwrap();
    let handle =
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(cache.lock_path(&a)).unwrap();
    handle.lock().unwrap();
    let shared = cache.lock_shared(&b).unwrap();
    let plock = cache.lock(&p).unwrap();

    let report = cache.gc(&all).unwrap();
    assert!(report.removed_entries.is_empty(), "{report:?}");
    assert!(report.removed_partials.is_empty(), "{report:?}");
    let mut skipped = report.skipped_locked.clone();
    skipped.sort();
    let mut expect = vec![a, b, p];
    expect.sort();
    assert_eq!(skipped, expect);
    assert_eq!(report.bytes_freed, 0);
    assert!(cache.contains(&a) && cache.contains(&b) && cache.partial(&p).exists());

    drop(shared);
    let report = cache.gc(&all).unwrap();
    assert_eq!(report.removed_entries.iter().map(|e| e.0).collect::<Vec<_>>(), vec![b]);
    assert!(cache.contains(&a) && !cache.contains(&b));

    handle.unlock().unwrap();
    drop(plock);
    let report = cache.gc(&all).unwrap();
    assert_eq!(report.removed_entries.iter().map(|e| e.0).collect::<Vec<_>>(), vec![a]);
    assert_eq!(report.removed_partials, vec![p]);
    assert!(report.skipped_locked.is_empty());
    assert!(cache.entries().unwrap().is_empty());
}

#[test]
fn gc_dry_run_deletes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let (a, b) = (key(80), key(81));
    make_entry(&cache, &a, &[("f", &[1u8; 500])]);
    make_entry(&cache, &b, &[("f", &[1u8; 700])]);
    cache.partial(&a).save(1, |d| Ok(fs::write(d.join("s"), b"s")?)).unwrap();
    let stale_tmp = cache.root().join("tmp").join(format!("{}.4294967295.abc", b.to_hex()));
    write(&stale_tmp, "x", b"leftover");
    let before = files_below(cache.root());

    let opts = GcOptions { keep: keep(&[a]), older_than: None, dry_run: true };
    let report = cache.gc(&opts).unwrap();
    assert_eq!(report.removed_entries.len(), 1);
    assert_eq!(report.removed_entries[0].0, b);
    assert_eq!(report.removed_partials, vec![a]);
    assert!(report.bytes_freed > 700);
    assert_eq!(files_below(cache.root()), before);
    assert!(!cache.root().join("locks").exists(), "dry run created lock files");

    // The real run removes what the dry run announced.
    let real = cache.gc(&GcOptions { dry_run: false, ..opts }).unwrap();
    assert_eq!(real.removed_entries, report.removed_entries);
    assert_eq!(real.removed_partials, report.removed_partials);
    assert_eq!(real.removed_tmp, report.removed_tmp);
    assert_eq!(real.bytes_freed, report.bytes_freed);
    assert!(!cache.contains(&b));
}

#[test]
fn gc_removes_abandoned_tmp_only() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = Cache::open(tmp.path());
    let k = key(90);
    let tmp_root = cache.root().join("tmp");
    // Written by a process that cannot exist (pid above any pid_max).
    let dead: PathBuf = tmp_root.join(format!("{}.4294967295.0f0f", k.to_hex()));
    write(&dead, "model.safetensors", &[0u8; 1234]);
    let dead_file = tmp_root.join(format!("{}.4294967295.0f0f.last-used", k.to_hex()));
    fs::write(&dead_file, b"{}").unwrap();
    // Ours, in progress.
    let pending = cache.begin(&k).unwrap();
    write(pending.dir(), "out", b"in progress");
    // Someone else's unparseable, fresh file: left alone.
    fs::write(tmp_root.join("unknown"), b"?").unwrap();

    if fsutil::pid_alive(4294967295) != Some(false) {
        return; // cannot tell dead processes apart on this platform
    }
    let opts = GcOptions { keep: None, older_than: None, dry_run: false };
    // Held key lock: even the dead writer's leftovers stay.
    let lock = cache.lock(&k).unwrap();
    let report = cache.gc(&opts).unwrap();
    assert!(report.removed_tmp.is_empty(), "{report:?}");
    drop(lock);

    let report = cache.gc(&opts).unwrap();
    let mut removed = report.removed_tmp.clone();
    removed.sort();
    assert_eq!(removed, vec![dead.clone(), dead_file.clone()]);
    assert_eq!(report.bytes_freed, 1234 + 2);
    assert!(!dead.exists() && !dead_file.exists());
    assert!(pending.dir().join("out").exists());
    assert!(tmp_root.join("unknown").exists());
    pending.commit(info("p", 0.0)).unwrap();
    assert!(cache.contains(&k));
}

#[test]
fn manifests_are_sealed_over_metrics_files_and_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path());
    let p = cache.begin(&key(40)).unwrap();
    std::fs::write(p.dir().join("a.bin"), b"abc").unwrap();
    let m = p.commit(info("p", 1.0)).unwrap();
    assert!(m.seal_problem().is_none() && !m.seal.is_empty());
    assert!(matches!(cache.inspect(&key(40)), EntryState::Intact(_)));
    for edit in [0, 1] {
        let mut e = m.clone();
        match edit {
            0 => e.metrics = json!({"m": 2.0}),
            _ => e.files[0].size += 1,
        }
        assert!(e.seal_problem().is_some(), "edit {edit} must break the seal");
    }
    // An unsealed (older) manifest is accepted.
    let mut old = m.clone();
    old.seal.clear();
    assert!(old.seal_problem().is_none());
    // The content ignores metrics (timings differ between identical recomputations).
    let mut other = m.clone();
    other.metrics = json!({"m": 3.0});
    assert_eq!(other.content(), m.content());
}
