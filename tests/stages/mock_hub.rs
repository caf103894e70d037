//! A loopback mock of the Hugging Face hub API, enough for hf-hub 0.5's sync client
//! (notes/hub-protocol.md): repo info (`/api/models/{repo}/revision/{rev}` → `sha`, `siblings`)
//! and file downloads (`/{repo}/resolve/{rev}/{file}`, `/datasets/{repo}/resolve/…`, with
//! `Range`, answering `x-repo-commit`, `etag` and `Content-Range`). It can cut a download off
//! half-way, once, to test resuming. It listens on 127.0.0.1 only and stops when dropped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A repo: revision (branch or commit) → commit, and file name → bytes.
type RepoState = (BTreeMap<String, String>, BTreeMap<String, Vec<u8>>);

#[derive(Default)]
struct State {
    /// `org/name` for models, `datasets/org/name` for datasets.
    repos: BTreeMap<String, RepoState>,
    /// File names whose next full download is cut off half-way (then served normally).
    cut_once: Vec<String>,
    /// The start of every ranged download request that did not start at byte 0.
    resumed_from: Vec<usize>,
}

pub struct MockHub {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MockHub {
    pub fn start() -> MockHub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State::default()));
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, r, st) = (state.clone(), requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = serve(conn, &s);
                }
            }
        });
        MockHub { endpoint, state, requests, stop, thread: Some(thread) }
    }

    /// Publishes `files` in `repo` with `branch` pointing at `commit`.
    pub fn publish(&self, repo: &str, branch: &str, commit: &str, files: BTreeMap<String, Vec<u8>>) {
        let mut st = self.state.lock().unwrap();
        let entry = st.repos.entry(repo.to_string()).or_default();
        entry.0.insert(branch.to_string(), commit.to_string());
        entry.0.insert(commit.to_string(), commit.to_string()); // a commit is a revision too
        entry.1 = files;
    }

    /// The next download of `file` (from byte 0) sends half of it and closes the connection.
    pub fn cut_next_download(&self, file: &str) {
        self.state.lock().unwrap().cut_once.push(file.to_string());
    }

    /// Byte offsets at which downloads were resumed.
    pub fn resumed_from(&self) -> Vec<usize> {
        self.state.lock().unwrap().resumed_from.clone()
    }

    /// Requests answered so far.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for MockHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.endpoint.trim_start_matches("http://")); // wake accept()
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut conn: TcpStream, state: &Mutex<State>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    // `Range: bytes=0-0` (hf-hub's metadata probe) or `bytes=N-` (a download, resumed at N).
    let (mut range_start, mut range_end) = (0usize, None::<usize>);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            let (a, b) = v.trim().split_once('-').unwrap_or((v.trim(), ""));
            range_start = a.parse().unwrap_or(0);
            range_end = b.parse().ok();
        }
    }
    let mut st = state.lock().unwrap();
    let respond = |conn: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes())?;
        conn.write_all(body)?;
        conn.flush()
    };
    // /api/models/{org}/{name}/revision/{rev}
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let parts: Vec<&str> = rest.split('/').collect();
        if parts.len() == 4 && parts[2] == "revision" {
            let repo = format!("{}/{}", parts[0], parts[1]);
            if let Some((branches, files)) = st.repos.get(&repo) {
                if let Some(commit) = branches.get(parts[3]) {
                    let siblings: Vec<String> = files.keys().map(|f| format!("{{\"rfilename\":\"{f}\"}}")).collect();
                    let body = format!("{{\"sha\":\"{commit}\",\"siblings\":[{}]}}", siblings.join(","));
                    return respond(
                        &mut conn,
                        "200 OK",
                        &[("Content-Type".into(), "application/json".into())],
                        body.as_bytes(),
                    );
                }
            }
        }
        return respond(&mut conn, "404 Not Found", &[("x-error-code".into(), "RepoNotFound".into())], b"{}");
    }
    // /{org}/{name}/resolve/{rev}/{file} and /datasets/{org}/{name}/resolve/{rev}/{file}
    let (prefix, rest) = match path.strip_prefix("/datasets/") {
        Some(rest) => ("datasets/", rest),
        None => ("", path.trim_start_matches('/')),
    };
    let parts: Vec<&str> = rest.splitn(5, '/').collect();
    if parts.len() == 5 && parts[2] == "resolve" {
        let repo = format!("{prefix}{}/{}", parts[0], parts[1]);
        let found = st
            .repos
            .get(&repo)
            .and_then(|(branches, files)| Some((branches.get(parts[3])?.clone(), files.get(parts[4])?.clone())));
        if let Some((commit, bytes)) = found {
            let start = range_start.min(bytes.len());
            let last = range_end.unwrap_or(usize::MAX).min(bytes.len().saturating_sub(1));
            let body: &[u8] = if start <= last { &bytes[start..=last] } else { &[] };
            let headers = vec![
                ("x-repo-commit".to_string(), commit),
                ("etag".to_string(), format!("\"{}\"", blake3::hash(&bytes).to_hex())),
                ("Content-Range".to_string(), format!("bytes {start}-{last}/{}", bytes.len())),
            ];
            if range_end.is_none() && start > 0 {
                st.resumed_from.push(start);
            }
            let name = parts[4].to_string();
            if range_end.is_none() && start == 0 && st.cut_once.contains(&name) {
                // Announce the whole body, send half, hang up: an interrupted download.
                st.cut_once.retain(|f| *f != name);
                let mut head =
                    format!("HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
                for (k, v) in &headers {
                    head.push_str(&format!("{k}: {v}\r\n"));
                }
                head.push_str("\r\n");
                conn.write_all(head.as_bytes())?;
                conn.write_all(&body[..body.len() / 2])?;
                conn.flush()?;
                return conn.shutdown(std::net::Shutdown::Both);
            }
            return respond(&mut conn, "206 Partial Content", &headers, body);
        }
        return respond(&mut conn, "404 Not Found", &[("x-error-code".into(), "EntryNotFound".into())], b"");
    }
    respond(&mut conn, "404 Not Found", &[], b"")
}
