//! `moe-edge serve`: an OpenAI-compatible HTTP server on one model. axum on tokio serves the
//! requests (routing, SSE streaming, graceful shutdown); generation runs on the worker threads
//! of [`worker`], a fixed number of sessions behind a bounded queue.

pub mod api;
mod page;
mod worker;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use moe_edge_engine::{GenerateParams, Model, SamplingParams};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use api::{ApiError, Checked};
use worker::{Event, Job, Workers};

/// How the server runs.
pub struct ServeOptions {
    pub addr: SocketAddr,
    pub model_name: String,
    pub api_key: Option<String>,
    pub parallel: usize,
    pub queue: usize,
    pub max_tokens: usize,
    pub max_body_bytes: usize,
    /// Write each request's routing to `DIR/<response id>.jsonl` (off when `None`).
    pub trace_dir: Option<std::path::PathBuf>,
}

struct AppState {
    model: Arc<Model>,
    workers: Workers,
    opts: ServeOptions,
    chat_stops: Vec<i64>,
}

type Shared = Arc<AppState>;

pub fn run(model: Model, opts: ServeOptions) -> anyhow::Result<()> {
    let model = Arc::new(model);
    let chat_stops = match (model.chat_template(), model.tokenizer()) {
        (Some(t), Some(tok)) => t.end_of_turn_tokens(tok)?,
        _ => vec![],
    };
    let workers = Workers::start(model.clone(), opts.parallel, opts.queue);
    let addr = opts.addr;
    let body_limit = opts.max_body_bytes;
    let state = Arc::new(AppState {
        model,
        workers,
        opts,
        chat_stops,
    });
    let app = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/", get(page::index))
        .route("/chat.js", get(page::script))
        .route("/chat.css", get(page::style))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown_signal(state))
            .await?;
        eprintln!("shut down");
        anyhow::Ok(())
    })
}

/// Resolves at SIGTERM or Ctrl-C, after telling the workers to stop: running generations end at
/// their next token (their responses complete normally, cut short), queued requests are refused,
/// and axum then waits for the open responses to finish.
async fn shutdown_signal(state: Shared) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing the SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    eprintln!("shutting down: stopping the running generations");
    state.workers.stop_all();
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(e.body())).into_response()
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.opts.api_key else {
        return Ok(());
    };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError {
            status: 401,
            message: "invalid or missing API key (Authorization: Bearer KEY)".into(),
            kind: "invalid_request_error",
            code: "invalid_api_key",
        })
    }
}

fn body_of(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|r| ApiError {
        status: r.status().as_u16(),
        message: format!("the request body could not be read: {}", r.body_text()),
        kind: "invalid_request_error",
        code: if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            "body_too_large"
        } else {
            "invalid_body"
        },
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn chat_completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = (|| {
        authorize(&state, &headers)?;
        let req: api::ChatRequest = api::parse(&body_of(body)?)?;
        let checked = req
            .sampling
            .check(&state.opts.model_name, state.opts.max_tokens)?;
        if req.messages.is_empty() {
            return Err(ApiError::invalid("messages is empty", "invalid_messages"));
        }
        let (Some(template), Some(tok)) = (state.model.chat_template(), state.model.tokenizer())
        else {
            return Err(ApiError::invalid(
                "the model has no chat template or tokenizer: use /v1/completions",
                "no_chat_template",
            ));
        };
        let text = template
            .render(&req.messages, true)
            .map_err(|e| ApiError::invalid(e.to_string(), "invalid_messages"))?;
        let prompt = tok
            .encode_raw(&text)
            .map_err(|e| ApiError::invalid(e.to_string(), "invalid_messages"))?;
        Ok((prompt, checked))
    })();
    match prepared {
        Ok((prompt, checked)) => {
            let stops = state.chat_stops.clone();
            respond(state, prompt, checked, stops, true).await
        }
        Err(e) => error(e),
    }
}

async fn completions(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let prepared = (|| {
        authorize(&state, &headers)?;
        let req: api::CompletionRequest = api::parse(&body_of(body)?)?;
        let checked = req
            .sampling
            .check(&state.opts.model_name, state.opts.max_tokens)?;
        let tok = state
            .model
            .tokenizer()
            .ok_or_else(|| ApiError::invalid("the model has no tokenizer", "no_tokenizer"))?;
        let prompt = tok
            .encode(&req.prompt)
            .map_err(|e| ApiError::invalid(e.to_string(), "invalid_prompt"))?;
        if prompt.is_empty() {
            return Err(ApiError::invalid("prompt is empty", "invalid_prompt"));
        }
        Ok((prompt, checked))
    })();
    match prepared {
        Ok((prompt, checked)) => respond(state, prompt, checked, vec![], false).await,
        Err(e) => error(e),
    }
}

/// Queues the generation and answers as one JSON object or as an SSE stream.
async fn respond(
    state: Shared,
    prompt: Vec<i64>,
    checked: Checked,
    extra_stops: Vec<i64>,
    chat: bool,
) -> Response {
    if let Some(limit) = state.model.context_limit() {
        if prompt.len() >= limit {
            return error(ApiError::invalid(
                format!(
                    "the prompt has {} tokens; the model's context holds {limit}",
                    prompt.len()
                ),
                "context_length_exceeded",
            ));
        }
    }
    let mut stop_tokens = state.model.config().eos_token_ids.clone();
    for t in extra_stops {
        if !stop_tokens.contains(&t) {
            stop_tokens.push(t);
        }
    }
    let params = GenerateParams {
        max_tokens: checked.max_tokens,
        sampling: SamplingParams {
            temperature: checked.temperature,
            top_p: checked.top_p,
            seed: checked.seed,
            ..Default::default()
        },
        stop_tokens,
        stop_strings: checked.stop.clone(),
    };
    let (tx, mut rx) = mpsc::channel::<Event>(64);
    state
        .workers
        .metrics
        .requests
        .fetch_add(1, Ordering::Relaxed);
    let id = format!("moe-edge-{}", now_id());
    if !state.workers.submit(Job {
        prompt,
        params,
        events: tx,
        trace: state
            .opts
            .trace_dir
            .as_ref()
            .map(|dir| dir.join(format!("{id}.jsonl"))),
    }) {
        return error(ApiError {
            status: 429,
            message: "the server is busy: every slot and queue place is taken; retry later".into(),
            kind: "server_error",
            code: "queue_full",
        });
    }
    let created = now();
    let model = state.opts.model_name.clone();
    if !checked.stream {
        let mut text = String::new();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Piece(p) => text.push_str(&p),
                Event::Done(f) => {
                    let g = &f.generation;
                    let choice = if chat {
                        json!({"index": 0, "message": {"role": "assistant", "content": text},
                               "finish_reason": api::finish_reason(g)})
                    } else {
                        json!({"index": 0, "text": text, "logprobs": null,
                               "finish_reason": api::finish_reason(g)})
                    };
                    let object = if chat {
                        "chat.completion"
                    } else {
                        "text_completion"
                    };
                    return Json(json!({"id": id, "object": object, "created": created,
                                       "model": model, "choices": [choice],
                                       "usage": api::usage(g), "timings": api::timings(&f)}))
                    .into_response();
                }
                Event::Failed(m) => return server_error(m),
                Event::Refused => return error(shutting_down()),
            }
        }
        return server_error("the generation ended without a result".into());
    }
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let chunk = move |choice: Value, extra: Option<(&str, Value)>| {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model,
                           "choices": if choice.is_null() { json!([]) } else { json!([choice]) }});
        if let Some((key, value)) = extra {
            v[key] = value;
        }
        SseEvent::default().data(v.to_string())
    };
    let include_usage = checked.include_usage;
    let (out_tx, out_rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        if chat {
            let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                               "finish_reason": null});
            if out_tx.send(chunk(first, None)).await.is_err() {
                return;
            }
        }
        while let Some(ev) = rx.recv().await {
            let event = match ev {
                Event::Piece(p) if p.is_empty() => continue,
                Event::Piece(p) => {
                    let choice = if chat {
                        json!({"index": 0, "delta": {"content": p}, "finish_reason": null})
                    } else {
                        json!({"index": 0, "text": p, "logprobs": null, "finish_reason": null})
                    };
                    chunk(choice, None)
                }
                Event::Done(f) => {
                    let g = &f.generation;
                    let last = if chat {
                        json!({"index": 0, "delta": {}, "finish_reason": api::finish_reason(g)})
                    } else {
                        json!({"index": 0, "text": "", "logprobs": null,
                               "finish_reason": api::finish_reason(g)})
                    };
                    let timings = api::timings(&f);
                    let _ = out_tx.send(chunk(last, Some(("timings", timings)))).await;
                    if include_usage {
                        let usage = api::usage(g);
                        let _ = out_tx
                            .send(chunk(Value::Null, Some(("usage", usage))))
                            .await;
                    }
                    let _ = out_tx.send(SseEvent::default().data("[DONE]")).await;
                    return;
                }
                Event::Failed(m) => SseEvent::default()
                    .data(json!({"error": {"message": m, "type": "server_error"}}).to_string()),
                Event::Refused => SseEvent::default().data(shutting_down().body().to_string()),
            };
            // a closed stream drops `rx`: the worker stops at its next token
            if out_tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(out_rx).map(Ok::<_, std::convert::Infallible>)).into_response()
}

fn shutting_down() -> ApiError {
    ApiError {
        status: 503,
        message: "the server is shutting down".into(),
        kind: "server_error",
        code: "shutting_down",
    }
}

fn server_error(message: String) -> Response {
    error(ApiError {
        status: 500,
        message,
        kind: "server_error",
        code: "generation_failed",
    })
}

fn now_id() -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{}-{}", now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&state, &headers) {
        return error(e);
    }
    Json(
        json!({"object": "list", "data": [{"id": state.opts.model_name, "object": "model",
                "created": 0, "owned_by": "moe-edge"}]}),
    )
    .into_response()
}

async fn health() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(state): State<Shared>) -> Response {
    let m = &state.workers.metrics;
    let generated = m.generated_tokens.load(Ordering::Relaxed);
    let decode_s = m.decode_micros.load(Ordering::Relaxed) as f64 / 1e6;
    let mut out = format!(
        "moe_edge_requests_total {}\nmoe_edge_requests_rejected_total {}\nmoe_edge_prompt_tokens_total {}\n\
         moe_edge_generated_tokens_total {}\nmoe_edge_decode_tokens_per_second {:.2}\nmoe_edge_slots_busy {}\n",
        m.requests.load(Ordering::Relaxed),
        m.rejected.load(Ordering::Relaxed),
        m.prompt_tokens.load(Ordering::Relaxed),
        generated,
        if decode_s > 0.0 { generated as f64 / decode_s } else { 0.0 },
        m.busy.load(Ordering::Relaxed),
    );
    if let Some(c) = state.model.cache_stats() {
        out.push_str(&format!(
            "moe_edge_expert_cache_hits_total {}\nmoe_edge_expert_cache_misses_total {}\n\
             moe_edge_expert_cache_resident_bytes {}\nmoe_edge_expert_cache_peak_resident_bytes {}\n\
             moe_edge_expert_cache_budget_bytes {}\n",
            c.hits, c.misses, c.resident_bytes, c.peak_resident_bytes, c.budget_bytes
        ));
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}
