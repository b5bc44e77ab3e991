//! `moe-edge serve` over real HTTP on loopback: completions as the library computes them,
//! streaming, OpenAI-style errors for bad requests, a full queue, and a client that leaves
//! mid-stream. (The official `openai` client is exercised by `tests/server/test_openai.py`.)

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    fn start(dir: &std::path::Path, extra: &[&str]) -> Server {
        let mut child = moe_edge_cmd()
            .args([
                "serve",
                "-m",
                dir.to_str().unwrap(),
                "--addr",
                "127.0.0.1:0",
            ])
            .args(["--model-name", "tiny"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let addr = loop {
            line.clear();
            assert!(
                stderr.read_line(&mut line).unwrap() > 0,
                "the server exited"
            );
            if let Some(a) = line.trim().strip_prefix("listening on http://") {
                break a.to_string();
            }
        };
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Server { child, addr }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s
    }

    /// One request; returns status, body.
    fn request(&self, method: &str, path: &str, headers: &[&str], body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = self.connect();
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for h in headers {
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).unwrap();
        let _ = s.write_all(body);
        let mut raw = vec![];
        s.read_to_end(&mut raw).unwrap();
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut body = raw[split + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (status, body)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, body) = self.request("POST", path, &[], body.to_string().as_bytes());
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    loop {
        let end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let n = usize::from_str_radix(std::str::from_utf8(&b[..end]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[end + 2..end + 2 + n]);
        b = &b[end + 2 + n + 2..];
    }
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: ").map(str::to_string))
        .collect()
}

fn library_reply(dir: &std::path::Path, user: &str, max_tokens: usize) -> String {
    let model = moe_edge_engine::Model::load(dir, Default::default()).unwrap();
    let mut chat = moe_edge_engine::Conversation::new(&model).unwrap();
    let params = moe_edge_engine::GenerateParams::for_model(&model, max_tokens);
    chat.reply(user, params, |_| moe_edge_engine::Flow::Continue)
        .unwrap()
        .text
}

#[test]
fn completions_stream_and_answer_like_the_library() {
    let dir = chat_model("answers");
    let server = Server::start(&dir, &["--parallel", "2"]);
    let (status, body) = server.request("GET", "/health", &[], b"");
    assert_eq!(
        (status, body.as_slice()),
        (200, br#"{"status":"ok"}"#.as_slice())
    );
    let (status, body) = server.request("GET", "/v1/models", &[], b"");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["data"][0]["id"],
        "tiny"
    );

    let want = library_reply(&dir, "Was macht tar? 日本", 12);
    let request = json!({"model": "tiny", "messages": [{"role": "user", "content": "Was macht tar? 日本"}],
                         "max_tokens": 12, "temperature": 0});
    let (status, j) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["object"], "chat.completion");
    assert_eq!(j["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(j["choices"][0]["message"]["role"], "assistant");
    let usage = &j["usage"];
    assert_eq!(
        usage["total_tokens"].as_u64(),
        Some(
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        )
    );

    // streamed: the deltas make the same text; usage on request; [DONE] last
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (status, body) = server.request(
        "POST",
        "/v1/chat/completions",
        &[],
        streamed.to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    let data = sse_data(&body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, want);
    assert_eq!(chunks.last().unwrap()["usage"], *usage);
    assert!(chunks
        .iter()
        .any(|c| c["choices"][0]["finish_reason"].is_string()));

    // text completion of the same rendered prompt gives the same text
    let (status, j) = server.post(
        "/v1/completions",
        &json!({"prompt": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "max_tokens": 5, "temperature": 0}),
    );
    assert_eq!(status, 200, "{j}");
    assert_eq!(j["object"], "text_completion");
    assert!(j["usage"]["completion_tokens"].as_u64().unwrap() <= 5);

    let (status, body) = server.request("GET", "/metrics", &[], b"");
    let metrics = String::from_utf8_lossy(&body);
    assert_eq!(status, 200);
    assert!(metrics.contains("moe_edge_requests_total 3"), "{metrics}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let dir = chat_model("errors");
    let server = Server::start(&dir, &["--api-key", "sekrit", "--max-body-bytes", "100000"]);
    let key: &[&str] = &["Authorization: Bearer sekrit"];
    let no_key: &[&str] = &[];
    let wrong_key: &[&str] = &["Authorization: Bearer nope"];
    let good = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3});
    // (what, body, headers, status, error code)
    type Case<'a> = (&'a str, Vec<u8>, &'a [&'a str], u16, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            b"{\"messages\": [".to_vec(),
            key,
            400,
            "invalid_json",
        ),
        (
            "not an object",
            b"[1, 2]".to_vec(),
            key,
            400,
            "invalid_json",
        ),
        (
            "wrong type",
            json!({"messages": "hi"}).to_string().into_bytes(),
            key,
            400,
            "invalid_request",
        ),
        (
            "empty messages",
            json!({"messages": []}).to_string().into_bytes(),
            key,
            400,
            "invalid_messages",
        ),
        (
            "huge max_tokens",
            json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1_000_000})
                .to_string()
                .into_bytes(),
            key,
            400,
            "invalid_max_tokens",
        ),
        (
            "negative temperature",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1})
                .to_string()
                .into_bytes(),
            key,
            400,
            "invalid_temperature",
        ),
        (
            "n = 2",
            json!({"messages": [{"role": "user", "content": "hi"}], "n": 2})
                .to_string()
                .into_bytes(),
            key,
            400,
            "invalid_n",
        ),
        (
            "unknown model",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]})
                .to_string()
                .into_bytes(),
            key,
            404,
            "model_not_found",
        ),
        (
            "over the context",
            json!({"messages": [{"role": "user", "content": "x".repeat(600)}]})
                .to_string()
                .into_bytes(),
            key,
            400,
            "context_length_exceeded",
        ),
        (
            "body over the limit",
            vec![b' '; 200_000],
            key,
            413,
            "body_too_large",
        ),
        (
            "10 MB body",
            vec![b' '; 10 << 20],
            key,
            413,
            "body_too_large",
        ),
        (
            "no API key",
            good.to_string().into_bytes(),
            no_key,
            401,
            "invalid_api_key",
        ),
        (
            "wrong API key",
            good.to_string().into_bytes(),
            wrong_key,
            401,
            "invalid_api_key",
        ),
    ];
    for (what, body, headers, status, code) in cases {
        let (got, body) = server.request("POST", "/v1/chat/completions", headers, &body);
        let j: Value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| panic!("{what}: not JSON: {}", String::from_utf8_lossy(&body)));
        assert_eq!(got, status, "{what}: {j}");
        assert_eq!(j["error"]["code"], code, "{what}: {j}");
        assert!(
            j["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}"
        );
    }
    let (status, body) = server.request(
        "POST",
        "/v1/chat/completions",
        key,
        good.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_full_queue_answers_429_and_a_client_leaving_mid_stream_frees_its_session() {
    let dir = chat_model("queue");
    let server = Server::start(&dir, &["--parallel", "1", "--queue", "0"]);
    // a streaming request whose client does not read: the session stays busy on it
    let long = json!({"messages": [{"role": "user", "content": "go"}], "max_tokens": 240,
                      "temperature": 1.0, "stream": true})
    .to_string();
    let mut hog = server.connect();
    write!(
        hog,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long}",
        long.len()
    )
    .unwrap();
    let mut first = [0u8; 12];
    hog.read_exact(&mut first).unwrap(); // the stream has started
    let quick = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let mut refused = false;
    for _ in 0..50 {
        let (status, j) = server.post("/v1/chat/completions", &quick);
        if status == 429 {
            assert_eq!(j["error"]["code"], "queue_full");
            refused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        refused,
        "a request past the only session and an empty queue is refused"
    );
    drop(hog); // the client leaves mid-stream
    let mut served = false;
    for _ in 0..100 {
        let (status, _) = server.post("/v1/chat/completions", &quick);
        if status == 200 {
            served = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served, "the session was freed after its client left");
    std::fs::remove_dir_all(&dir).ok();
}

/// Reads an HTTP response head and returns the stream positioned at the body.
fn read_head(stream: &mut BufReader<TcpStream>) -> String {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            return head;
        }
        head.push_str(&line);
    }
}

#[test]
fn sigterm_cuts_running_generations_refuses_queued_ones_and_exits_0() {
    let dir = chat_model("sigterm");
    let mut server = Server::start(&dir, &["--parallel", "1", "--queue", "4"]);
    let long = json!({"messages": [{"role": "user", "content": "go"}], "max_tokens": 240,
                      "temperature": 1.0, "seed": 7});
    // the reference: alone, this request generates a long reply
    let (status, solo) = server.post("/v1/chat/completions", &long);
    assert_eq!(status, 200, "{solo}");
    let full = solo["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        full >= 100,
        "the reference reply is long enough to be cut ({full})"
    );

    // streamed, on the only slot; a second request waits in the queue behind it
    let mut streamed = long.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let body = streamed.to_string();
    let mut running = BufReader::new(server.connect());
    write!(
        running.get_mut(),
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let head = read_head(&mut running);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // the first chunk: the generation is running
    let mut size = String::new();
    running.read_line(&mut size).unwrap();
    let size = usize::from_str_radix(size.trim(), 16).unwrap();
    let mut first = vec![0u8; size + 2];
    running.read_exact(&mut first).unwrap();
    let queued = {
        let addr = server.addr.clone();
        std::thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
                .to_string();
            write!(
                s,
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut raw = String::new();
            s.read_to_string(&mut raw).unwrap();
            raw
        })
    };
    std::thread::sleep(Duration::from_millis(50)); // let the second request reach the queue
    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let mut rest = vec![];
    running.read_to_end(&mut rest).unwrap();
    let events = sse_data(&dechunk(&rest));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "the cut stream still ends properly"
    );
    let generated = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find_map(|v| v["usage"]["completion_tokens"].as_u64())
        .expect("a usage chunk");
    assert!(
        generated < full,
        "the running generation was cut short: {generated} of {full} tokens"
    );
    let answer = queued.join().unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 503") && answer.contains("\"shutting_down\""),
        "the queued request is refused: {answer}"
    );

    let start = std::time::Instant::now();
    let code = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "the server exits 0 on SIGTERM: {code}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--trace-dir`: one trace per request, named by the response id; the second of two equal
/// requests routes only what its kept KV cache did not hold, with the first one's routing.
#[test]
fn trace_dir_writes_each_requests_routing() {
    let dir = chat_model("trace");
    let traces = scratch_dir("serve", "traces");
    let server = Server::start(&dir, &["--trace-dir", traces.to_str().unwrap()]);
    let request =
        json!({"model": "tiny", "prompt": "Was macht tar?", "max_tokens": 6, "temperature": 0});
    let read = |id: &str| -> Vec<Value> {
        std::fs::read_to_string(traces.join(format!("{id}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (status, first) = server.post("/v1/completions", &request);
    assert_eq!(status, 200, "{first}");
    let (status, second) = server.post("/v1/completions", &request);
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    let generated = first["usage"]["completion_tokens"].as_u64().unwrap();
    let a = read(first["id"].as_str().unwrap());
    let b = read(second["id"].as_str().unwrap());
    // every fed position (the last generated token is never fed) at each of the 2 layers
    let positions = |t: &[Value]| -> Vec<u64> {
        let mut p: Vec<u64> = t
            .iter()
            .filter(|l| l["layer"] == 0)
            .map(|l| l["position"].as_u64().unwrap())
            .collect();
        p.dedup();
        p
    };
    assert_eq!(a.len() as u64, 2 * (prompt + generated - 1));
    assert_eq!(
        positions(&a),
        (0..prompt + generated - 1).collect::<Vec<_>>()
    );
    // the second request reuses all but the prompt's last token
    assert_eq!(
        positions(&b),
        (prompt - 1..prompt + generated - 1).collect::<Vec<_>>()
    );
    for line in &b {
        let same = a
            .iter()
            .find(|l| l["position"] == line["position"] && l["layer"] == line["layer"])
            .unwrap();
        assert_eq!(same["experts"], line["experts"]);
    }
    assert_eq!(
        std::fs::read_dir(&traces).unwrap().count(),
        2,
        "no temporary file left"
    );
    drop(server);
    // off by default
    let quiet = Server::start(&dir, &[]);
    assert_eq!(quiet.post("/v1/completions", &request).0, 200);
    assert_eq!(std::fs::read_dir(&traces).unwrap().count(), 2);
    std::fs::remove_dir_all(&traces).ok();
}
