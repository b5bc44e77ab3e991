//! The generation workers: a fixed number of sessions over one model (and its expert cache),
//! each on its own thread, fed from a bounded queue. A worker keeps its session between
//! requests and reuses the KV cache of the prefix a new prompt shares with it. A request whose
//! client went away stops at its next token; so does every request once the server shuts down.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use std::sync::atomic::AtomicBool;

use moe_edge_engine::pack::CacheStats;
use moe_edge_engine::{Flow, GenerateParams, Generation, Generator, Model, Session};
use tokio::sync::mpsc;

/// What a worker sends back for one request.
pub enum Event {
    /// Text produced by the next token (possibly empty).
    Piece(String),
    Done(Finished),
    Failed(String),
    /// Not run: the server is shutting down.
    Refused,
}

/// A finished request: the generation, how much of the prompt came from the kept KV cache, and
/// the expert cache's traffic while it ran.
pub struct Finished {
    pub generation: Generation,
    /// Prompt tokens whose KV entries were reused from the worker's previous request.
    pub reused_prompt_tokens: usize,
    /// Expert cache counters over the request (packed models only). The cache is shared, so
    /// with several slots busy they include the other requests' traffic.
    pub cache: Option<CacheDelta>,
}

pub struct CacheDelta {
    pub hits: u64,
    pub misses: u64,
    pub resident_bytes: u64,
    pub budget_bytes: u64,
}

impl CacheDelta {
    fn between(before: &CacheStats, after: &CacheStats) -> CacheDelta {
        CacheDelta {
            hits: after.hits.saturating_sub(before.hits),
            misses: after.misses.saturating_sub(before.misses),
            resident_bytes: after.resident_bytes,
            budget_bytes: after.budget_bytes,
        }
    }
}

pub struct Job {
    pub prompt: Vec<i64>,
    pub params: GenerateParams,
    pub events: mpsc::Sender<Event>,
    /// Where to write the request's routing trace (`serve --trace-dir`).
    pub trace: Option<std::path::PathBuf>,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub rejected: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub decode_micros: AtomicU64,
    pub busy: AtomicUsize,
}

/// The queue in front of the workers.
pub struct Workers {
    queue: SyncSender<Job>,
    pub metrics: Arc<Metrics>,
    /// Set at shutdown: running generations stop at their next token, queued ones are refused.
    stopping: Arc<AtomicBool>,
}

impl Workers {
    /// Starts `parallel` workers behind a queue of `queue` waiting requests.
    pub fn start(model: Arc<Model>, parallel: usize, queue: usize) -> Workers {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let metrics = Arc::new(Metrics::default());
        let stopping = Arc::new(AtomicBool::new(false));
        for i in 0..parallel.max(1) {
            let (model, rx, metrics) = (model.clone(), rx.clone(), metrics.clone());
            let stopping = stopping.clone();
            std::thread::Builder::new()
                .name(format!("slot-{i}"))
                .spawn(move || work(&model, &rx, &metrics, &stopping))
                .expect("spawning a worker thread");
        }
        Workers {
            queue: tx,
            metrics,
            stopping,
        }
    }

    /// Stops every running generation at its next token and refuses the queued requests.
    pub fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Queues a job; `false` when the queue is full.
    pub fn submit(&self, job: Job) -> bool {
        match self.queue.try_send(job) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.rejected.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

fn work(model: &Model, jobs: &Mutex<Receiver<Job>>, metrics: &Metrics, stopping: &AtomicBool) {
    let mut session: Option<Session> = None;
    loop {
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(job) => job,
                Err(_) => return, // the server is gone
            }
        };
        if stopping.load(Ordering::SeqCst) {
            let _ = job.events.blocking_send(Event::Refused);
            continue;
        }
        metrics.busy.fetch_add(1, Ordering::Relaxed);
        let events = job.events.clone();
        let before = model.cache_stats();
        let outcome = run(model, &mut session, job, stopping);
        metrics.busy.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            Ok((g, reused)) => {
                metrics
                    .prompt_tokens
                    .fetch_add(g.prompt_ids.len() as u64, Ordering::Relaxed);
                metrics
                    .generated_tokens
                    .fetch_add(g.generated_ids.len() as u64, Ordering::Relaxed);
                metrics
                    .decode_micros
                    .fetch_add((g.decode_seconds * 1e6) as u64, Ordering::Relaxed);
                let cache = before
                    .zip(model.cache_stats())
                    .map(|(b, a)| CacheDelta::between(&b, &a));
                let _ = events.blocking_send(Event::Done(Finished {
                    generation: g,
                    reused_prompt_tokens: reused,
                    cache,
                }));
            }
            Err(e) => {
                session = None;
                let _ = events.blocking_send(Event::Failed(format!("{e:#}")));
            }
        }
    }
}

/// One request on the worker's session: keeps the cache of the common prefix, feeds the rest.
/// Returns the generation and the number of prompt tokens reused.
fn run(
    model: &Model,
    session: &mut Option<Session>,
    job: Job,
    stopping: &AtomicBool,
) -> moe_edge_engine::Result<(Generation, usize)> {
    let mut s = match session.take() {
        Some(s) => s,
        None => Session::new(model)?,
    };
    let common = s
        .tokens()
        .iter()
        .zip(&job.prompt)
        .take_while(|(a, b)| a == b)
        .count();
    let keep = common.min(job.prompt.len() - 1);
    s.truncate(keep)?;
    let trace = match &job.trace {
        Some(path) => Some(
            crate::cli::trace::TraceFile::create(path)
                .map_err(|e| moe_edge_engine::Error::InvalidInput(format!("{e:#}")))?,
        ),
        None => None,
    };
    if let Some(t) = &trace {
        s.set_observer(Some(t.clone()));
    }
    let mut generator = Generator::with_session(model, s, job.params)?;
    let events = job.events;
    let result = generator.generate(&job.prompt[keep..], |step| {
        if stopping.load(Ordering::Relaxed) {
            return Flow::Stop;
        }
        match events.blocking_send(Event::Piece(step.text.clone())) {
            Ok(()) => Flow::Continue,
            Err(_) => Flow::Stop, // the client went away
        }
    });
    let mut s = generator.into_session();
    s.set_observer(None);
    let mut g = result?;
    *session = Some(s);
    if let Some(t) = trace {
        // the reply stands without its trace: a failed write is logged, not the request's error
        if let Err(e) = t.finish() {
            log::warn!("{e:#}");
        }
    }
    // report the whole prompt, not only what was fed
    g.prompt_ids = job.prompt;
    Ok((g, keep))
}
